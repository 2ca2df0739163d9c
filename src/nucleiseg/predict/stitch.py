"""Seam-free merging of per-window instances into whole-image instances.

Rule 1 (ownership): each window owns a *core*: the part of the image closer to
its own centre line than to a neighbour's, i.e. the overlaps are split at their
midpoints. The cores tile the image exactly, so an instance is kept only by the
window whose core holds its centre. With overlap > nucleus diameter, a nucleus
whose centre lies in a core is whole in that window, and the half of it that a
neighbouring window sees has its centre outside that neighbour's core.

Rule 2 (de-duplication): survivors are still checked against each other by
mask IoU and by intersection over the smaller mask (IoS), best score first, for
what the geometry cannot promise (nuclei larger than the overlap, TTA copies).
"""

from __future__ import annotations

from collections import defaultdict

from nucleiseg.core.masks import Instance, intersection
from nucleiseg.core.windows import Window


def owned(instances: list[Instance], window: Window) -> list[Instance]:
    """Instances (image coordinates) whose centre of mass lies in the window's core."""
    kept = []
    for inst in instances:
        cx, cy = inst.centre()
        # +0.5: pixel i covers [i, i + 1), so its centre is at i + 0.5.
        if window.owns(cx + 0.5, cy + 0.5):
            kept.append(inst)
    return kept


def deduplicate(instances: list[Instance], iou_threshold: float, ios_threshold: float, cell: int = 64) -> list[Instance]:
    """Greedy mask NMS, best score first: drop an instance whose IoU with a kept one exceeds
    `iou_threshold` or whose intersection covers more than `ios_threshold` of the smaller mask.

    A uniform grid over box corners keeps it near-linear in the number of instances.
    """
    order = sorted(range(len(instances)), key=lambda i: -instances[i].score)
    grid: dict[tuple[int, int], list[int]] = defaultdict(list)
    kept: list[int] = []
    areas = [inst.area for inst in instances]
    for i in order:
        inst = instances[i]
        cells = [(gx, gy) for gx in range(inst.x0 // cell, (inst.x1 - 1) // cell + 1) for gy in range(inst.y0 // cell, (inst.y1 - 1) // cell + 1)]
        candidates = {j for c in cells for j in grid.get(c, ())}
        duplicate = False
        for j in candidates:
            inter = intersection(inst, instances[j])
            if not inter:
                continue
            union = areas[i] + areas[j] - inter
            if inter / union > iou_threshold or inter / min(areas[i], areas[j]) > ios_threshold:
                duplicate = True
                break
        if duplicate:
            continue
        kept.append(i)
        for c in cells:
            grid[c].append(i)
    return [instances[i] for i in sorted(kept, key=lambda i: -instances[i].score)]


def merge_windows(per_window: list[tuple[Window, list[Instance]]], iou_threshold: float = 0.3, ios_threshold: float = 0.6) -> list[Instance]:
    """Whole-image instances from per-window ones (already in image coordinates)."""
    survivors: list[Instance] = []
    for window, instances in per_window:
        survivors.extend(owned(instances, window))
    return deduplicate(survivors, iou_threshold, ios_threshold)
