"""Whole-image prediction: sliding windows, optional flip TTA, seam-free stitching.

The infer stage and `nucleiseg predict` both go through `Predictor.predict`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import coco

from .config import InferConfig
from .data import read_rgb
from .inference import detections_to_instances, predict_batch, to_tensor
from .masks import Instance
from .stitch import deduplicate, merge_windows
from .tiling import Window, crop_window, windows

# Flips as (horizontal, vertical); TTA runs all four and merges them by mask NMS.
TTA_FLIPS = [(False, False), (True, False), (False, True), (True, True)]


def _unflip(inst: Instance, hflip: bool, vflip: bool, size: int) -> Instance:
    mask = inst.mask
    x0, y0 = inst.x0, inst.y0
    if hflip:
        mask, x0 = mask[:, ::-1], size - inst.x1
    if vflip:
        mask, y0 = mask[::-1, :], size - inst.y1
    return Instance(np.ascontiguousarray(mask), x0, y0, inst.score, dict(inst.extra))


class Predictor:
    """Whole-image instances from a model in eval mode on `device`; the model is not changed
    (the detector's score threshold is set only for the duration of each forward pass)."""

    def __init__(self, model: torch.nn.Module, cfg: InferConfig, device: torch.device | str = "cpu", progress: bool = False):
        self.model = model
        self.cfg = cfg
        self.device = torch.device(device)
        # A bar per image over its windows (nucleiseg predict): a large image on a CPU takes minutes.
        self.progress = progress

    def _to_instances(self, output: dict, size: int, offset=(0, 0)) -> list[Instance]:
        cfg = self.cfg
        return detections_to_instances(output, size, size, cfg.mask_threshold, cfg.score, cfg.min_area, cfg.fill_holes, offset)

    def _predict_windows(self, crops: list[np.ndarray], size: int) -> list[list[Instance]]:
        """Instances per window crop, in window coordinates."""
        flips = TTA_FLIPS if self.cfg.tta else TTA_FLIPS[:1]
        per_crop: list[list[Instance]] = [[] for _ in crops]
        passes = len(flips) * len(crops)
        shown = self.progress and passes > self.cfg.batch_size
        bar = tqdm(total=passes, desc="windows", unit="window", leave=False, disable=None if shown else True)
        for hflip, vflip in flips:
            # Float tensors one batch at a time: all windows at once would cost ~14x the uint8 image.
            for start in range(0, len(crops), self.cfg.batch_size):
                tensors = []
                for crop in crops[start : start + self.cfg.batch_size]:
                    tensor = to_tensor(crop)
                    if hflip:
                        tensor = tensor.flip(-1)
                    if vflip:
                        tensor = tensor.flip(-2)
                    tensors.append(tensor)
                outputs = predict_batch(self.model, tensors, self.device, self.cfg.score_threshold)
                for k, output in enumerate(outputs):
                    found = self._to_instances(output, size)
                    per_crop[start + k] += [_unflip(inst, hflip, vflip, size) for inst in found]
                bar.update(len(tensors))
        bar.close()
        if self.cfg.tta:
            per_crop = [deduplicate(found, self.cfg.dedup_iou, self.cfg.dedup_ios) for found in per_crop]
        return per_crop

    def predict(self, image: np.ndarray) -> list[Instance]:
        """Instances of a whole H x W x 3 uint8 image, best score first."""
        height, width = image.shape[:2]
        if self.cfg.whole_image:
            size = max(height, width)
            window = Window(0, 0, size, (0.0, 0.0, float(width), float(height)))
            (found,) = self._predict_windows([crop_window(image, window)], size)
            found = [inst.clip(0, 0, width, height) for inst in found]
            return deduplicate([i for i in found if i is not None], self.cfg.dedup_iou, self.cfg.dedup_ios)
        size, overlap = self.cfg.window, self.cfg.overlap
        tiles = windows(height, width, size, overlap)
        found = self._predict_windows([crop_window(image, w) for w in tiles], size)
        per_window = []
        for window, instances in zip(tiles, found):
            # Padding (image smaller than the window) holds no nuclei: clip to the image.
            clipped = [inst.clip(0, 0, min(size, width - window.x0), min(size, height - window.y0)) for inst in instances]
            per_window.append((window, [inst.shifted(window.x0, window.y0) for inst in clipped if inst is not None]))
        return merge_windows(per_window, self.cfg.dedup_iou, self.cfg.dedup_ios)


def predict_files(predictor: Predictor, items: list[tuple[int, Path]], desc: str) -> list[dict]:
    """COCO results (every detection, best first per image) for (image_id, path) items."""
    results = []
    for image_id, path in tqdm(items, desc=desc, unit="image", disable=None):
        image = read_rgb(path)
        results += coco.results(image_id, predictor.predict(image), *image.shape[:2])
    return results
