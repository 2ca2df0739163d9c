"""Whole-image evaluation: COCO AP (the leaderboard's numbers) and nuclei metrics, plus overlays."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import coco
from .config import EvaluateConfig
from .data import Sample, load_train_sample, val_image_ids
from .errors import NucleisegError
from .io import atomic_path, read_json, write_json
from .masks import Instance, paste
from .metrics import coco_segm_metrics, match, score_sweep


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


# ------------------------------------------------------------------------------------ the evaluate stage


@dataclass
class EvaluateOutputs:
    metrics: Path = Path("metrics/eval.json")
    pr_curve: Path = Path("plots/pr.csv")
    sweep: Path = Path("plots/operating_point.csv")
    overlays: Path = Path("overlays")
    operating_point: Path = Path("models/operating_point.json")


SWEEP_COLUMNS = ("score_threshold", "precision", "recall", "f1", "pq", "aji")


def _write_csv(path: Path, header, rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)


def coco_records(annotations_path: str | Path) -> list[coco.ImageRecord]:
    """Ground truth of the test images from a COCO instances file (data.test_annotations)."""
    doc = read_json(annotations_path)
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise NucleisegError(f"{annotations_path}: data.test_annotations must be a COCO instances file (images + annotations)")
    by_image = coco.instances_by_image(doc["annotations"])
    return [coco.ImageRecord(img["id"], img.get("file_name", ""), img["height"], img["width"], by_image.get(img["id"], [])) for img in doc["images"]]


def evaluate_predictions(raw_dir: Path, split_file: Path, predictions_dir: Path, cfg: EvaluateConfig, score_floor: float,
                         test_annotations: str | None = None, outputs: EvaluateOutputs | None = None) -> dict:
    """The evaluate stage: val metrics with the operating point chosen on val, test metrics at that
    point when test ground truth is given, PR and threshold curves, overlays. Everything is
    computed before the first output is written; each output is written atomically."""
    outputs = outputs or EvaluateOutputs()
    val_names = read_json(split_file)["val"]
    if not val_names:
        raise NucleisegError(f"{split_file}: no val images to evaluate; set data.val_images >= 1")
    samples = [load_train_sample(raw_dir, name) for name in val_names]
    records = val_records(samples)
    val = evaluate(records, read_json(predictions_dir / "val.json"), cfg.max_dets_all, cfg.operating_metric, score_floor=score_floor)
    metrics = dict(val.metrics)
    threshold = metrics["score_threshold"]
    if test_annotations:
        test = evaluate(coco_records(test_annotations), read_json(predictions_dir / "test.json"), cfg.max_dets_all,
                        cfg.operating_metric, score_threshold=threshold)
        metrics["test"] = test.metrics
    overlays = {sample.name: overlay(sample.image, sample.instances, at_threshold(val.predicted.get(record.id, []), threshold))
                for sample, record in list(zip(samples, records))[: cfg.overlays]}

    with atomic_path(outputs.overlays) as out:
        out.mkdir()
        for name, picture in overlays.items():
            Image.fromarray(picture).save(out / f"{name}.png")
    _write_csv(outputs.pr_curve, ["recall", "precision"], val.pr_curve)
    _write_csv(outputs.sweep, SWEEP_COLUMNS, [[row[k] for k in SWEEP_COLUMNS] for row in val.sweep])
    write_json(outputs.operating_point, {"score_threshold": threshold, "metric": cfg.operating_metric,
                                         "value": metrics[cfg.operating_metric], "chosen_on": "val"})
    write_json(outputs.metrics, metrics)
    return metrics


def load_operating_point(model_path: str | Path) -> float | None:
    """The score threshold saved next to a model file by the evaluate stage (None when absent)."""
    path = Path(model_path).with_name("operating_point.json")
    if not path.is_file():
        return None
    point = read_json(path)
    value = point.get("score_threshold") if isinstance(point, dict) else None
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise NucleisegError(f"{path}: no valid score_threshold in it; run the evaluate stage again (dvc repro evaluate)")
    return float(value)
