"""Whole-image prediction: sliding windows, optional test-time augmentation (`tta`), seam-free stitching.

The infer stage and `nucleiseg predict` both go through `Predictor.predict`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nucleiseg.core import coco
from nucleiseg.core.config import InferConfig
from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.masks import Instance
from nucleiseg.core.windows import Window, crop_window, windows
from nucleiseg.data.layout import read_rgb
from nucleiseg.predict.postprocess import (
    detections_to_instances,
    predict_batch,
    to_tensor,
)
from nucleiseg.predict.stitch import deduplicate, merge_windows
from nucleiseg.predict.tta import TRANSFORMS, apply, invert, vote


class Predictor:
    """Whole-image instances from a model in eval mode on `device`. The model is anything with
    `detect(images, score_floor)` (`NucleiMaskRCNN`); infer.score_floor is the floor passed to it.
    infer.score `mask_iou` needs a model whose `predicts_mask_iou` is true."""

    def __init__(self, model: torch.nn.Module, cfg: InferConfig, device: torch.device | str = "cpu", progress: bool = False):
        if cfg.score == "mask_iou" and not getattr(model, "predicts_mask_iou", False):
            # Where a model file meets infer settings not checked with it (its saved ones, --params, flags).
            raise NucleisegError("infer.score = 'mask_iou' needs a model trained with the MaskIoU head (model.mask_iou_head: true), "
                                 "and this model has none; use infer.score detector or mask_weighted, or retrain with the head")
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
        transforms = TRANSFORMS[self.cfg.tta]
        # per_pass[k][t]: window k's instances from transform t, in window coordinates
        per_pass: list[list[list[Instance]]] = [[] for _ in crops]
        passes = len(transforms) * len(crops)
        shown = self.progress and passes > self.cfg.batch_size
        bar = tqdm(total=passes, desc="windows", unit="window", leave=False, disable=None if shown else True)
        for turns, mirror in transforms:
            # Float tensors one batch at a time: all windows at once would cost ~14x the uint8 image.
            for start in range(0, len(crops), self.cfg.batch_size):
                tensors = [apply(to_tensor(crop), turns, mirror) for crop in crops[start : start + self.cfg.batch_size]]
                outputs = predict_batch(self.model, tensors, self.device, self.cfg.score_floor)
                for k, output in enumerate(outputs):
                    per_pass[start + k].append([invert(inst, turns, mirror, size) for inst in self._to_instances(output, size)])
                bar.update(len(tensors))
        bar.close()
        if self.cfg.tta == "d4":
            min_area = max(self.cfg.min_area, 1)  # a voted mask can come out smaller than every member
            return [[inst for inst in vote(passes) if inst.area >= min_area] for passes in per_pass]
        if self.cfg.tta == "flip":
            return [deduplicate([inst for found in passes for inst in found], self.cfg.dedup_iou, self.cfg.dedup_ios) for passes in per_pass]
        return [passes[0] for passes in per_pass]

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
