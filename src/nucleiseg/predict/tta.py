"""Test-time augmentation: each window seen under flips and quarter turns, its instances mapped back, then merged.

`infer.tta`:
- `none`: one pass.
- `flip`: the 4 flips (none, horizontal, vertical, both), merged by mask NMS (what `tta: true` did before).
- `d4`: the 8 symmetries of the square (4 quarter turns, each with and without a mirror), merged per
  instance by mask voting (`vote`): instances of different passes overlapping with IoU >= 0.5 are one
  nucleus; its mask keeps the pixels at least half of them cover, its score is the sum of their scores
  over the number of passes, so a nucleus found in every pass keeps its mean score and one found in a
  single pass gets an eighth of it (agreement ranks detections under the top-100 cap).

A transform is (quarter turns counter-clockwise, mirror first): the window is mirrored left-right, then
turned, exactly like `torch.rot90(t.flip(-1), k, dims=(-2, -1))`; windows are square, so the frame keeps its size.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from nucleiseg.core.masks import Instance, intersection

# flip keeps the old pass order (none, horizontal, vertical, both): a vertical flip is a mirror turned twice.
TRANSFORMS = {
    "none": [(0, False)],
    "flip": [(0, False), (0, True), (2, True), (2, False)],
    "d4": [(turns, mirror) for mirror in (False, True) for turns in range(4)],
}
MATCH_IOU = 0.5  # instances of two passes are one nucleus from this mask IoU on (the metrics' match)


def apply(tensor: torch.Tensor, turns: int, mirror: bool) -> torch.Tensor:
    """The window (... x S x S) as the model sees it under the transform."""
    if mirror:
        tensor = tensor.flip(-1)
    return torch.rot90(tensor, turns, dims=(-2, -1)) if turns else tensor


def _turn(inst: Instance, size: int) -> Instance:
    """One quarter turn counter-clockwise of the S x S frame: pixel (y, x) goes to (S - 1 - x, y)."""
    return Instance(np.ascontiguousarray(np.rot90(inst.mask)), inst.y0, size - inst.x1, inst.score, dict(inst.extra))


def _mirror(inst: Instance, size: int) -> Instance:
    return Instance(np.ascontiguousarray(inst.mask[:, ::-1]), size - inst.x1, inst.y0, inst.score, dict(inst.extra))


def invert(inst: Instance, turns: int, mirror: bool, size: int) -> Instance:
    """An instance found in the transformed window, in the window's own coordinates."""
    for _ in range((4 - turns) % 4):
        inst = _turn(inst, size)
    return _mirror(inst, size) if mirror else inst


def _cells(inst: Instance, cell: int) -> list[tuple[int, int]]:
    return [(gx, gy) for gx in range(inst.x0 // cell, (inst.x1 - 1) // cell + 1) for gy in range(inst.y0 // cell, (inst.y1 - 1) // cell + 1)]


def _majority(members: list[Instance]) -> tuple[np.ndarray, int, int]:
    """(mask over the members' union box, x0, y0): the pixels at least half of them cover."""
    x0, y0 = min(m.x0 for m in members), min(m.y0 for m in members)
    x1, y1 = max(m.x1 for m in members), max(m.y1 for m in members)
    counts = np.zeros((y1 - y0, x1 - x0), np.int32)
    for m in members:
        counts[m.y0 - y0 : m.y1 - y0, m.x0 - x0 : m.x1 - x0] += m.mask
    return counts * 2 >= len(members), x0, y0


def vote(passes: list[list[Instance]], cell: int = 64) -> list[Instance]:
    """One instance per nucleus from the instances of several passes (same coordinates), best score first.

    Greedy, best score first: an instance not yet taken anchors a group with, from every other pass, the
    untaken instance of the highest IoU with it (>= MATCH_IOU). The group's mask is the pixel majority of
    its members, its score (and `detector_score`) the members' sum over the number of passes; `tta_votes`
    counts the members.
    """
    n_passes = len(passes)
    items = [(inst, p) for p, found in enumerate(passes) for inst in found]
    areas = [inst.area for inst, _ in items]
    grid: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (inst, _) in enumerate(items):
        for c in _cells(inst, cell):
            grid[c].append(i)
    taken = [False] * len(items)
    out = []
    for i in sorted(range(len(items)), key=lambda i: -items[i][0].score):
        if taken[i]:
            continue
        anchor, anchor_pass = items[i]
        best: dict[int, tuple[float, int]] = {}
        for j in {j for c in _cells(anchor, cell) for j in grid[c]}:
            inst, p = items[j]
            if taken[j] or p == anchor_pass:
                continue
            inter = intersection(anchor, inst)
            iou = inter / (areas[i] + areas[j] - inter) if inter else 0.0
            if iou >= MATCH_IOU and iou > best.get(p, (0.0, -1))[0]:
                best[p] = (iou, j)
        group = [i] + [j for _, j in best.values()]
        for j in group:
            taken[j] = True
        members = [items[j][0] for j in group]
        mask, x0, y0 = _majority(members)
        extra = {**anchor.extra, "tta_votes": len(members)}
        if "detector_score" in anchor.extra:
            extra["detector_score"] = sum(m.extra.get("detector_score", m.score) for m in members) / n_passes
        merged = Instance(mask, x0, y0, sum(m.score for m in members) / n_passes, extra).tight()
        if merged is not None:
            out.append(merged)
    return sorted(out, key=lambda inst: -inst.score)
