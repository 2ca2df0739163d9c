"""Whole-image evaluation: COCO AP (the leaderboard's numbers) and nuclei metrics, plus overlays."""

from __future__ import annotations

import numpy as np
from PIL import Image

from . import coco
from .masks import Instance, paste
from .metrics import coco_segm_metrics, image_metrics, match, summarize


def val_image_ids(names: list[str]) -> dict[str, int]:
    """Image ids of the val images in predictions/val.json and in the val ground truth."""
    return {name: i for i, name in enumerate(names, start=1)}


def rescored(results: list[dict], key: str) -> list[dict]:
    """The same results ranked by another score field (e.g. the raw detector score)."""
    return [{**r, "score": r[key]} for r in results if key in r]


def evaluate(records: list[coco.ImageRecord], results: list[dict], max_dets_all: int) -> tuple[dict, list]:
    """All metrics of `results` against the ground truth in `records`; returns (metrics, pr_curve)."""
    gt_doc = coco.ground_truth(records)
    ap = coco_segm_metrics(gt_doc, results, max_dets_all)
    predicted = coco.instances_by_image(results)
    per_image = [image_metrics(rec.instances, predicted.get(rec.id, [])) for rec in records]
    summary = summarize(per_image)
    metrics = {k: float(ap[k]) for k in ("ap50", "ap50_all", "ap", "ap75")}
    metrics.update({k: float(summary[k]) for k in ("precision", "recall", "f1", "aji", "pq", "dq", "sq")})
    metrics.update({k: int(summary[k]) for k in ("tp", "fp", "fn")})
    if results and "detector_score" in results[0]:
        # Does the mask-weighted ranking beat the raw detector score under the top-100 cap?
        metrics["ap50_detector_score"] = float(coco_segm_metrics(gt_doc, rescored(results, "detector_score"), max_dets_all)["ap50"])
    return metrics, ap["pr_curve"]


def outline(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(labels, mode="inner")


def overlay(image: np.ndarray, gt: list[Instance], pred: list[Instance]) -> np.ndarray:
    """Predicted outlines in green; ground truth that no prediction matched (IoU >= 0.5) in red."""
    height, width = image.shape[:2]
    matched = {g for g, _, _ in match(gt, pred).pairs}
    missed = [inst for i, inst in enumerate(gt) if i not in matched]
    out = image.copy()
    out[outline(paste(pred, height, width))] = (0, 230, 0)
    out[outline(paste(missed, height, width))] = (255, 0, 0)
    return out


def save_overlay(image: np.ndarray, gt: list[Instance], pred: list[Instance], path) -> None:
    Image.fromarray(overlay(image, gt, pred)).save(path)
