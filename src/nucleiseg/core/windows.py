"""Window geometry: overlapping windows over an image, each with the core it owns.

Windows cover every pixel; the last window of a row/column is shifted inward
(never padded) when the image is larger than a window, so every window is full
of real tissue. An image smaller than a window gives one padded window.

Each window owns a *core*: the part of the image closer to its own centre line
than to a neighbour's (overlaps split at their midpoints). The cores tile the
image exactly, so stitching keeps an instance only in the window whose core
holds its centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.masks import Instance

# Padding colour of windows that are larger than the image: white, like glass in H&E.
PAD_VALUE = 255


@dataclass(frozen=True)
class Window:
    x0: int
    y0: int
    size: int
    core: tuple[float, float, float, float]  # (x0, y0, x1, y1) this window owns, image coordinates

    @property
    def x1(self) -> int:
        return self.x0 + self.size

    @property
    def y1(self) -> int:
        return self.y0 + self.size

    def owns(self, x: float, y: float) -> bool:
        cx0, cy0, cx1, cy1 = self.core
        return cx0 <= x < cx1 and cy0 <= y < cy1


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


def axis_cores(starts: list[int], length: int, size: int) -> list[tuple[float, float]]:
    """[lo, hi) owned by each window start along one axis; together they cover [0, length)."""
    cores = []
    for i, start in enumerate(starts):
        lo = 0.0 if i == 0 else (starts[i - 1] + size + start) / 2.0
        hi = float(length) if i == len(starts) - 1 else (start + size + starts[i + 1]) / 2.0
        cores.append((lo, hi))
    return cores


def windows(height: int, width: int, size: int, overlap: int) -> list[Window]:
    """Row-major windows of `size` over an image, with their cores."""
    xs = window_starts(width, size, overlap)
    ys = window_starts(height, size, overlap)
    x_cores, y_cores = axis_cores(xs, width, size), axis_cores(ys, height, size)
    return [Window(x, y, size, (cx[0], cy[0], cx[1], cy[1])) for y, cy in zip(ys, y_cores) for x, cx in zip(xs, x_cores)]


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
