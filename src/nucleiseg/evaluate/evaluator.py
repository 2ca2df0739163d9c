"""Scoring a set of whole-image predictions: COCO AP (the leaderboard's numbers), the operating point
chosen on val, and the nuclei metrics at it. Used by the train stage's validation and the evaluate stage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nucleiseg.core import coco
from nucleiseg.core.masks import Instance
from nucleiseg.data.layout import Sample, val_image_ids
from nucleiseg.evaluate.metrics import coco_segm_metrics, score_sweep


def operating_grid(floor: float, step: float = 0.025) -> list[float]:
    """Candidate score thresholds: the inference floor, then every `step` up to 0.95."""
    grid = [round(t, 4) for t in np.arange(0.0, 0.95 + 1e-9, step) if t > floor]
    return [float(floor)] + grid


@dataclass
class Evaluation:
    metrics: dict  # what metrics/eval.json holds for one split
    pr_curve: list  # (recall, precision) at IoU 0.5 over all detections
    sweep: list[dict]  # pooled metrics per candidate score threshold
    predicted: dict[int, list[Instance]]  # the results decoded, per image id


def val_records(samples: list[Sample]) -> list[coco.ImageRecord]:
    """Ground truth of the val images, with the image ids of predictions/val.json."""
    ids = val_image_ids([s.name for s in samples])
    return [coco.ImageRecord(ids[s.name], f"{s.name}.png", *s.image.shape[:2], s.instances) for s in samples]


DETECTION_KEYS = ("precision", "recall", "f1", "aji", "pq", "dq", "sq", "tp", "fp", "fn")


def evaluate(records: list[coco.ImageRecord], results: list[dict], max_dets_all: int, operating_metric: str = "f1",
             score_threshold: float | None = None, score_floor: float = 0.0) -> Evaluation:
    """AP over every detection, and the detection metrics at an operating point.

    AP (`ap50` as the leaderboard computes it, `ap50_all` uncapped, `ap`, `ap75`) needs
    all detections. Precision/recall/F1/AJI/PQ are taken at the score threshold that
    maximises `operating_metric` over the grid from `score_floor` (chosen here: use on
    val only), or at `score_threshold` when given (test: the threshold val chose).
    `f1_all_detections` is F1 over every detection, for comparison.
    """
    gt_doc = coco.ground_truth(records)
    ap = coco_segm_metrics(gt_doc, results, max_dets_all)
    predicted = coco.instances_by_image(results)
    gt = [rec.instances for rec in records]
    pred = [predicted.get(rec.id, []) for rec in records]
    if score_threshold is None:
        sweep = score_sweep(gt, pred, operating_grid(score_floor))
        best = max(sweep, key=lambda row: (row[operating_metric], -row["score_threshold"]))
    else:
        sweep = score_sweep(gt, pred, [0.0, score_threshold])
        best = sweep[1]
    metrics = {k: float(ap[k]) for k in ("ap50", "ap50_all", "ap", "ap75")}
    metrics["operating_metric"] = operating_metric
    metrics["score_threshold"] = best["score_threshold"]
    metrics.update({k: (int(best[k]) if k in ("tp", "fp", "fn") else float(best[k])) for k in DETECTION_KEYS})
    metrics["f1_all_detections"] = float(sweep[0]["f1"])
    if any(r.get("detector_score", r["score"]) != r["score"] for r in results):
        # Does the mask-weighted ranking beat the raw detector score under the top-100 cap?
        metrics["ap50_detector_score"] = float(coco_segm_metrics(gt_doc, rescored(results, "detector_score"), max_dets_all)["ap50"])
    return Evaluation(metrics, ap["pr_curve"], sweep, predicted)


def rescored(results: list[dict], key: str) -> list[dict]:
    """The same results ranked by another score field (e.g. the raw detector score)."""
    return [{**r, "score": r[key]} for r in results if key in r]


def at_threshold(instances: list[Instance], score_threshold: float) -> list[Instance]:
    return [inst for inst in instances if inst.score >= score_threshold]
