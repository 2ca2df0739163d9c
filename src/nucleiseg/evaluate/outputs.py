"""The evaluate stage's outputs: metrics, PR and operating-point CSVs, overlays, and operating_point.json
next to the model file (read back by `nucleiseg predict`). Only the evaluate stage and the CLI
reach this module, so editing it re-runs nothing upstream."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nucleiseg.core import coco
from nucleiseg.core.config import EvaluateConfig
from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.io import atomic_path, read_json, write_json
from nucleiseg.core.masks import Instance, paste
from nucleiseg.data.layout import load_train_sample
from nucleiseg.evaluate.evaluator import at_threshold, evaluate, val_records
from nucleiseg.evaluate.metrics import match
from nucleiseg.track.runs import active_run


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


# `nucleiseg predict` reads the operating point from this file next to the model file, or from this
# artifact of the model's MLflow run.
OPERATING_POINT_FILE = "operating_point.json"


# The evaluate stage's `cmd` in dvc.yaml names these.
@dataclass
class EvaluateOutputs:
    metrics: Path
    pr_curve: Path
    sweep: Path
    overlays: Path
    operating_point: Path


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
                         test_annotations: str | None, outputs: EvaluateOutputs) -> dict:
    """The evaluate stage: val metrics with the operating point chosen on val (or evaluate.score_threshold
    when set), test metrics at that point when test ground truth is given, PR and threshold curves,
    overlays. Without val images (data.fold: all) there is nothing to score on val: the operating point
    is evaluate.score_threshold, and the curves and overlays are empty. Everything is computed before
    the first output is written; each output is written atomically."""
    val_names = read_json(split_file)["val"]
    samples, records, val = [], [], None
    if val_names:
        samples = [load_train_sample(raw_dir, name) for name in val_names]
        records = val_records(samples)
        val = evaluate(records, read_json(predictions_dir / "val.json"), cfg.max_dets_all, cfg.operating_metric,
                       score_threshold=cfg.score_threshold, score_floor=score_floor)
        metrics = dict(val.metrics)
    elif cfg.score_threshold is None:
        raise NucleisegError(f"{split_file}: no val images (data.fold: all), so no operating point can be chosen on val; "
                             "set evaluate.score_threshold (the folds' mean from `python -m nucleiseg report`)")
    else:
        metrics = {"val_images": 0, "score_threshold": cfg.score_threshold}
    threshold = metrics["score_threshold"]
    chosen_on = "val" if val is not None and cfg.score_threshold is None else "evaluate.score_threshold"
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
    _write_csv(outputs.pr_curve, ["recall", "precision"], val.pr_curve if val else [])
    _write_csv(outputs.sweep, SWEEP_COLUMNS, [[row[k] for k in SWEEP_COLUMNS] for row in val.sweep] if val else [])
    write_json(outputs.operating_point, {"score_threshold": threshold, "metric": cfg.operating_metric,
                                         "value": metrics.get(cfg.operating_metric), "chosen_on": chosen_on})
    write_json(outputs.metrics, metrics)
    return metrics


def load_operating_point(model_path: str | Path) -> float | None:
    """The score threshold saved next to a model file by the evaluate stage (None when absent)."""
    path = Path(model_path).with_name(OPERATING_POINT_FILE)
    if not path.is_file():
        return None
    point = read_json(path)
    value = point.get("score_threshold") if isinstance(point, dict) else None
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise NucleisegError(f"{path}: no valid score_threshold in it; run the evaluate stage again (dvc repro evaluate)")
    return float(value)


def log_evaluation(run_id: str, metrics: dict, outputs: EvaluateOutputs, answer: Path | None = None) -> None:
    """The evaluate stage's results, into the training run: val/ and test/ metrics (the operating
    point as val/score_threshold), `operating_point.json` at the artifact root (what
    `nucleiseg predict --model runs:/<id>/model` loads), curves, overlays and the answer file."""
    import mlflow

    def numbers(values: dict, prefix: str) -> dict:
        return {f"{prefix}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    with active_run(run_id):
        # A run without val images (data.fold: all) logs no val/ metrics: the report's fold means stay folds only.
        val = numbers(metrics, "val") if metrics.get("val_images") != 0 else {}
        mlflow.log_metrics({**val, **numbers(metrics.get("test", {}), "test")})
        mlflow.log_dict(read_json(outputs.operating_point), OPERATING_POINT_FILE)
        mlflow.log_artifact(str(outputs.pr_curve), artifact_path="plots")
        mlflow.log_artifact(str(outputs.sweep), artifact_path="plots")
        mlflow.log_artifacts(str(outputs.overlays), artifact_path="overlays")
        if answer is not None and answer.is_file():
            mlflow.log_artifact(str(answer), artifact_path="submission")
