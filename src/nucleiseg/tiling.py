"""Overlapping windows over an image, and the tile stage's window datasets.

Windows cover every pixel; the last window of a row/column is shifted inward
(never padded) when the image is larger than a window, so every window is
full of real tissue. An image smaller than a window gives one padded window.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import coco
from .data import Sample
from .errors import NucleisegError
from .masks import Instance

log = logging.getLogger(__name__)

# Padding colour of windows that are larger than the image: white, like glass in H&E.
PAD_VALUE = 255


@dataclass(frozen=True)
class Window:
    x0: int
    y0: int
    size: int

    @property
    def x1(self) -> int:
        return self.x0 + self.size

    @property
    def y1(self) -> int:
        return self.y0 + self.size


def window_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride size - overlap, last one flush with the end."""
    if size <= 0 or not 0 <= overlap < size:
        raise NucleisegError(f"params.yaml: window size {size} / overlap {overlap} invalid; need size > 0 and 0 <= overlap < size")
    if length <= size:
        return [0]
    stride = size - overlap
    starts = list(range(0, length - size, stride))
    starts.append(length - size)
    return starts


def windows(height: int, width: int, size: int, overlap: int) -> list[Window]:
    return [Window(x, y, size) for y in window_starts(height, size, overlap) for x in window_starts(width, size, overlap)]


def crop_window(image: np.ndarray, window: Window) -> np.ndarray:
    """The window's pixels, padded with PAD_VALUE where it runs past the image."""
    crop = image[window.y0 : window.y1, window.x0 : window.x1]
    if crop.shape[0] == window.size and crop.shape[1] == window.size:
        return crop
    padded = np.full((window.size, window.size) + image.shape[2:], PAD_VALUE, dtype=image.dtype)
    padded[: crop.shape[0], : crop.shape[1]] = crop
    return padded


def window_instances(instances: list[Instance], window: Window, min_visible: float) -> list[Instance]:
    """Instances of one window, clipped to it, in window coordinates.

    A clipped instance is kept when it is whole or when at least `min_visible`
    of its area is inside.
    """
    kept = []
    for inst in instances:
        clipped = inst.clip(window.x0, window.y0, window.x1, window.y1)
        if clipped is None:
            continue
        whole = clipped.area == inst.area
        if whole or clipped.area >= min_visible * inst.area:
            kept.append(clipped)
    return kept


def tile_split(samples, out_dir: Path, split: str, size: int, overlap: int, min_visible: float) -> dict:
    """Write the windows of `samples` as PNGs plus one COCO json (`<split>.json`); returns counts."""
    images_dir = out_dir / split
    images_dir.mkdir(parents=True, exist_ok=True)
    records, extra = [], {}
    n_windows = n_instances = 0
    for sample in tqdm(samples, desc=f"tile {split}", unit="image"):
        height, width = sample.image.shape[:2]
        for window in windows(height, width, size, overlap):
            n_windows += 1
            file_name = f"{sample.name}_y{window.y0:05d}_x{window.x0:05d}.png"
            Image.fromarray(crop_window(sample.image, window)).save(images_dir / file_name)
            instances = window_instances(sample.instances, window, min_visible)
            n_instances += len(instances)
            records.append(coco.ImageRecord(n_windows, f"{split}/{file_name}", window.size, window.size, instances))
            extra[n_windows] = {"source_image": sample.name, "origin": [window.x0, window.y0], "source_size": [height, width]}
    doc = coco.ground_truth(records, extra)
    (out_dir / f"{split}.json").write_text(json.dumps(doc))
    log.info("%s: %d windows, %d instances", split, n_windows, n_instances)
    return {"windows": n_windows, "instances": n_instances}
