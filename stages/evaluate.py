"""DVC stage `evaluate`: predictions -> metrics/eval.json, plots/pr.csv, overlays/; logged into the training run."""

import csv
import logging
from pathlib import Path

from nucleiseg import coco, tracking
from nucleiseg.config import load_params
from nucleiseg.data import load_train_sample
from nucleiseg.errors import NucleisegError, main_guard
from nucleiseg.evaluation import evaluate, save_overlay, val_image_ids
from nucleiseg.io import atomic_path, read_json, write_json

log = logging.getLogger("evaluate")


def test_metrics(annotations_path: str, results: list[dict], max_dets_all: int) -> dict:
    doc = read_json(annotations_path)
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise NucleisegError(f"{annotations_path}: data.test_annotations must be a COCO instances file (images + annotations)")
    by_image = coco.instances_by_image(doc["annotations"])
    records = [coco.ImageRecord(img["id"], img.get("file_name", ""), img["height"], img["width"], by_image.get(img["id"], [])) for img in doc["images"]]
    metrics, _ = evaluate(records, results, max_dets_all)
    return metrics


@main_guard
def main() -> None:
    params = load_params()
    cfg = params.get("evaluate") or {}
    max_dets_all = int(cfg.get("max_dets_all", 3000))
    val_names = read_json("data/split.json")["val"]
    if not val_names:
        raise NucleisegError("data/split.json: no val images to evaluate; set data.val_images >= 1")
    samples = {name: load_train_sample("data/raw", name) for name in val_names}
    ids = val_image_ids(val_names)
    records = [coco.ImageRecord(ids[n], f"{n}.png", *samples[n].image.shape[:2], samples[n].instances) for n in val_names]
    results = read_json("predictions/val.json")
    metrics, pr_curve = evaluate(records, results, max_dets_all)
    annotations = (params.get("data") or {}).get("test_annotations")
    if annotations:
        metrics["test"] = test_metrics(annotations, read_json("predictions/test.json"), max_dets_all)

    predicted = coco.instances_by_image(results)
    with atomic_path("overlays") as out:
        out.mkdir()
        for name in val_names[: int(cfg.get("overlays", 8))]:
            save_overlay(samples[name].image, samples[name].instances, predicted.get(ids[name], []), out / f"{name}.png")
    with atomic_path("plots/pr.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["recall", "precision"])
            writer.writerows(pr_curve)
    write_json("metrics/eval.json", metrics)

    run = read_json("models/run.json")
    with tracking.active_run(run["run_id"]):
        import mlflow

        flat = {f"val/{k}": v for k, v in metrics.items() if k != "test"}
        flat.update({f"test/{k}": v for k, v in metrics.get("test", {}).items()})
        mlflow.log_metrics(flat)
        mlflow.log_artifacts("overlays", artifact_path="overlays")
        mlflow.log_artifact("plots/pr.csv", artifact_path="plots")
        if Path("submission/answer.json").is_file():
            mlflow.log_artifact("submission/answer.json", artifact_path="submission")
    log.info("val: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
