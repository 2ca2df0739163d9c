"""Instance masks kept cropped to their box, and COCO RLE conversion.

A 1000x1000 image holds up to ~1900 nuclei; full-size boolean masks would cost
~2 GB per image, so every instance is stored as a small boolean crop plus its
origin. All geometry (IoU, pasting, RLE) works on the crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils


@dataclass
class Instance:
    """One object: a boolean mask cropped to its bounding box, placed at (x0, y0)."""

    mask: np.ndarray
    x0: int
    y0: int
    score: float = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def x1(self) -> int:
        return self.x0 + self.mask.shape[1]

    @property
    def y1(self) -> int:
        return self.y0 + self.mask.shape[0]

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive end."""
        return self.x0, self.y0, self.x1, self.y1

    def centre(self) -> tuple[float, float]:
        """Centre of mass (x, y) in image pixels."""
        ys, xs = np.nonzero(self.mask)
        return self.x0 + float(xs.mean()), self.y0 + float(ys.mean())

    def tight(self) -> "Instance | None":
        """The same instance cropped to its pixels; None when it has none."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(self.mask.any(axis=0))
        crop = self.mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        return Instance(np.ascontiguousarray(crop), self.x0 + int(cols[0]), self.y0 + int(rows[0]), self.score, dict(self.extra))

    def clip(self, x0: int, y0: int, x1: int, y1: int) -> "Instance | None":
        """The part inside the window [x0, x1) x [y0, y1), in window coordinates."""
        cx0, cy0 = max(x0, self.x0), max(y0, self.y0)
        cx1, cy1 = min(x1, self.x1), min(y1, self.y1)
        if cx0 >= cx1 or cy0 >= cy1:
            return None
        crop = self.mask[cy0 - self.y0 : cy1 - self.y0, cx0 - self.x0 : cx1 - self.x0]
        return Instance(crop, cx0 - x0, cy0 - y0, self.score, dict(self.extra)).tight()

    def shifted(self, dx: int, dy: int) -> "Instance":
        return Instance(self.mask, self.x0 + dx, self.y0 + dy, self.score, dict(self.extra))


def from_full_mask(mask: np.ndarray, score: float = 1.0) -> Instance | None:
    """An Instance from a full-size boolean mask; None when it is empty."""
    return Instance(np.asarray(mask, dtype=bool), 0, 0, score).tight()


def intersection(a: Instance, b: Instance) -> int:
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1, y1 = min(a.x1, b.x1), min(a.y1, b.y1)
    if x0 >= x1 or y0 >= y1:
        return 0
    pa = a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
    pb = b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(np.count_nonzero(pa & pb))


def iou(a: Instance, b: Instance) -> float:
    inter = intersection(a, b)
    if inter == 0:
        return 0.0
    return inter / float(a.area + b.area - inter)


def paste(instances: list[Instance], height: int, width: int) -> np.ndarray:
    """A label image (uint32, 0 = background); later instances overwrite earlier ones."""
    labels = np.zeros((height, width), dtype=np.uint32)
    for index, inst in enumerate(instances, start=1):
        region = labels[inst.y0 : inst.y1, inst.x0 : inst.x1]
        region[inst.mask[: region.shape[0], : region.shape[1]]] = index
    return labels


def _run_lengths(flat: np.ndarray) -> np.ndarray:
    """COCO run lengths of a flat boolean vector (first run counts zeros)."""
    n = flat.size
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [n])))
    if n and flat[0]:
        counts = np.concatenate(([0], counts))
    return counts


def to_rle(inst: Instance, height: int, width: int) -> dict:
    """Compressed COCO RLE ({'size': [h, w], 'counts': str}) of an instance in an h x w image.

    Only the column strip under the box is materialised: the runs before and
    after it are all zeros, so they are added to the first and last zero runs.
    """
    inst = inst.clip(0, 0, width, height) or Instance(np.zeros((0, 0), bool), 0, 0)
    if inst.mask.size == 0:
        counts = np.array([height * width])
    else:
        strip = np.zeros((height, inst.mask.shape[1]), dtype=bool)
        strip[inst.y0 : inst.y1] = inst.mask
        counts = _run_lengths(strip.ravel(order="F"))
        counts[0] += inst.x0 * height
        trailing = (width - inst.x1) * height
        if len(counts) % 2 == 1:
            counts[-1] += trailing
        elif trailing:
            counts = np.concatenate((counts, [trailing]))
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _counts_from_string(counts: str) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString, in Python)."""
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return np.asarray(out, dtype=np.int64)


def from_rle(rle: dict, score: float = 1.0) -> Instance | None:
    """An Instance from a COCO RLE (compressed str/bytes or uncompressed list counts).

    Only the columns under the mask are materialised: decoding every instance at full
    image size cost a 1000x1000 array each (seconds per evaluated image).
    """
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        counts = mask_utils.frPyObjects(rle, height, width)["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _counts_from_string(counts)
    ends = np.cumsum(runs)
    starts = ends - runs
    fg_starts, fg_ends = starts[1::2], ends[1::2]
    keep = fg_ends > fg_starts
    fg_starts, fg_ends = fg_starts[keep], fg_ends[keep]
    if fg_starts.size == 0:
        return None
    col0, col1 = int(fg_starts[0] // height), int((fg_ends[-1] - 1) // height) + 1
    strip = np.zeros((col1 - col0) * height, dtype=bool)
    offset = col0 * height
    lengths = fg_ends - fg_starts
    index = np.repeat(fg_starts - offset - np.cumsum(np.concatenate(([0], lengths[:-1]))), lengths) + np.arange(lengths.sum())
    strip[index] = True
    mask = strip.reshape(col1 - col0, height).T
    return Instance(mask, col0, 0, score).tight()


def bbox_xywh(inst: Instance) -> list[float]:
    return [float(inst.x0), float(inst.y0), float(inst.mask.shape[1]), float(inst.mask.shape[0])]
