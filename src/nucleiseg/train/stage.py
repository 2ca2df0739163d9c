"""The train stage's job: data + model + engine + MLflow + outputs, for one backbone."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from nucleiseg.core.config import Params
from nucleiseg.core.errors import Interrupted, NucleisegError, redact
from nucleiseg.core.io import atomic_path, read_json, repo_root, write_json
from nucleiseg.core.runtime import (
    DistInfo,
    default_workers,
    dist_info,
    resolve_device,
    seed_everything,
)
from nucleiseg.data.layout import load_train_sample, source_record
from nucleiseg.model.maskrcnn import build_model, model_file
from nucleiseg.track import runs as tracking
from nucleiseg.train.checkpoint import Checkpointer
from nucleiseg.train.concurrency import concurrent_trainings, training_lock
from nucleiseg.train.hooks import WholeImageValidator
from nucleiseg.train.loop import fit
from nucleiseg.train.samples import TileDataset

log = logging.getLogger(__name__)


# The stage's files: the train stage's `cmd` in dvc.yaml names them.
@dataclasses.dataclass
class TrainInputs:
    tiles: Path
    split: Path
    raw: Path  # the val images, whole


@dataclasses.dataclass
class TrainOutputs:
    model: Path
    run: Path  # the MLflow run id, read by the evaluate stage
    metrics: Path
    curves: Path


# The params the train stage reads: dvc.yaml lists exactly these (tests/test_dvc_deps.py) and the
# resume checkpoint is keyed by them, so an overlay or output setting neither retrains nor orphans it.
VALIDATION_INFER_KEYS = ("window", "overlap", "batch_size", "score_floor", "mask_threshold", "min_area", "fill_holes",
                         "dedup_iou", "dedup_ios", "tta", "whole_image", "score")
VALIDATION_EVALUATE_KEYS = ("max_dets_all", "operating_metric")
PARAMS = ("backbone", "seed", "device", "model", "train",
          *(f"infer.{k}" for k in VALIDATION_INFER_KEYS), *(f"evaluate.{k}" for k in VALIDATION_EVALUATE_KEYS))


def checkpoint_path(params: Params, inputs: TrainInputs, checkpoints_dir: Path | None = None) -> Path:
    """Resume file, keyed by the stage's params and data (split + tile index): a change starts afresh."""
    values = params.as_dict()
    key = {}
    for name in PARAMS:
        section, _, field = name.partition(".")
        key[name] = values[section][field] if field else values[section]
    for path in (inputs.split, inputs.tiles / "train" / "index.json"):
        key[path.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return (checkpoints_dir or repo_root() / "checkpoints") / f"train-{digest}.pt"


VAL_CURVES = ("val_ap50_all", "val_ap50", "val_f1", "val_pq")
CURVE_COLUMNS = ["epoch", "train_loss", *VAL_CURVES, "val_score_threshold", "lr", "epoch_seconds", "windows_per_second", "loader_wait_share"]


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["epoch"] for r in history], [r["train_loss"] for r in history], label="train loss")
    val_rows = [r for r in history if "val_ap50_all" in r]
    for key in VAL_CURVES:
        ax_val.plot([r["epoch"] for r in val_rows], [r.get(key) for r in val_rows], marker=".", label=key.replace("val_", "val "))
    for ax in (ax_loss, ax_val):
        ax.set_xlabel("epoch")
        ax.legend()
    ax_val.set_ylim(0, 1)
    ax_val.set_title("whole val images, stitched")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_curves(history: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: row.get(k, "") for k in CURVE_COLUMNS})


def epoch_metrics(row: dict) -> dict[str, float]:
    """MLflow names for one history row: train/..., val/... (whole val images), speed figures."""
    out = {}
    for key, value in row.items():
        if key.startswith("train_"):
            out[f"train/{key[len('train_'):]}"] = value
        elif key.startswith("val_"):
            out[f"val/{key[len('val_'):]}"] = value
        elif key != "epoch":
            out[key] = value
    return out


def _validator(params: Params, inputs: TrainInputs, device: torch.device) -> WholeImageValidator | None:
    names = read_json(inputs.split)["val"]
    if not names:  # data.fold: all (the final model): no val, the last epoch's weights are kept
        return None
    samples = [load_train_sample(inputs.raw, name) for name in names]
    return WholeImageValidator(samples, params.infer, params.evaluate, device)


def loader_workers(setting: int | str, checkpoints_dir: Path, dist: DistInfo) -> int:
    """`train.workers`; 'auto' splits the cores between the trainings running under the repository
    and the DDP processes of this one."""
    if setting != "auto":
        return int(setting)
    trainings = concurrent_trainings(checkpoints_dir)
    workers = default_workers(trainings * int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    if trainings > 1:
        log.info("%d trainings share this machine: %d loader workers each", trainings, workers)
    return workers


def run_training(params: Params, inputs: TrainInputs, outputs: TrainOutputs, show_progress: bool = True) -> dict:
    """Train the configured backbone; write model, run id, metrics and curves; returns the metrics.

    Interrupted (Ctrl-C, SIGTERM), it raises `Interrupted` saying what running it again does."""
    checkpointer = Checkpointer(checkpoint_path(params, inputs))
    dist = dist_info()
    if not dist.is_main:  # rank 0 holds the lock, writes the files and logs
        return _train(params, inputs, outputs, checkpointer, dist, show_progress)
    try:
        with training_lock(checkpointer.path):
            metrics = _train(params, inputs, outputs, checkpointer, dist, show_progress)
            checkpointer.remove()
    except KeyboardInterrupt:
        raise Interrupted(checkpointer.resume_hint(params.train.epochs)) from None
    return metrics


def _train(params: Params, inputs: TrainInputs, outputs: TrainOutputs, checkpointer: Checkpointer, dist: DistInfo, show_progress: bool) -> dict:
    stage_started = time.perf_counter()
    mcfg, tcfg, seed = params.model, params.train, params.seed
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() and params.device != "cpu" else "gloo")
    device = resolve_device(params.device, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(seed)
    model = build_model(mcfg)
    train_set = TileDataset(inputs.tiles, "train", tcfg.augment, seed)
    workers = loader_workers(tcfg.workers, checkpointer.path.parent, dist)

    if not dist.is_main:
        fit(model, train_set, tcfg, device, seed, None, checkpointer, dist=dist, show_progress=False, workers=workers)  # reads only
        return {}

    validate = _validator(params, inputs, device)
    resumed = checkpointer.summary()
    resumed_run = resumed["run"].get("mlflow_run_id") if resumed else None
    if resumed_run:
        try:
            tracking.check_run(resumed_run)
        except NucleisegError as exc:  # the store lost the run: keep the training, log into a new run
            log.warning("%s; resuming the training into a new MLflow run", exc)
            resumed_run = None

    import mlflow

    data_source = source_record(inputs.raw)["source"]
    tags = {**tracking.run_tags(mcfg.backbone, str(device), data_source), **tracking.recipe_tags(params)}
    # A failure below must leave neither a half set of outputs nor a run.json naming an earlier training's run.
    for stale in (outputs.model, outputs.run):
        stale.unlink(missing_ok=True)
    with tracking.active_run(resumed_run, tracking.run_name(mcfg.backbone, data_source), tags) as run:
        tracking.log_dataset(data_source)
        if resumed_run is None:
            tracking.log_params(params.flat())
            mlflow.log_params({"train_windows": len(train_set), "val_images": len(validate.samples) if validate is not None else 0, "world_size": dist.world_size})
        result = fit(
            model, train_set, tcfg, device, seed, validate, checkpointer,
            on_epoch_end=lambda row: mlflow.log_metrics(epoch_metrics(row), step=row["epoch"]),
            extra_state={"mlflow_run_id": run.info.run_id},
            dist=dist, show_progress=show_progress, workers=workers,
        )
        if validate is None:
            result.best_epoch, result.best_state = tcfg.epochs, model.state_dict()
        best_row = next((r for r in result.history if r["epoch"] == result.best_epoch), {})
        metrics = {
            "best_epoch": result.best_epoch,
            "epochs": tcfg.epochs,
            "select_metric": f"val_{tcfg.select_metric}",
            **{k: best_row[k] for k in VAL_CURVES + ("val_score_threshold",) if k in best_row},
            "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
            "train_seconds": sum(r["epoch_seconds"] for r in result.history),
            "val_seconds": sum(r.get("val_seconds", 0.0) for r in result.history),
            "windows_per_second": sum(r["windows_per_second"] for r in result.history) / max(len(result.history), 1),
        }
        model.load_state_dict(result.best_state)
        with atomic_path(outputs.model) as tmp:
            torch.save(model_file(result.best_state, mcfg, result.best_epoch, params.infer), tmp)
        metrics["stage_seconds"] = time.perf_counter() - stage_started
        write_json(outputs.metrics, metrics)
        write_curves(result.history, outputs.curves)
        mlflow.log_metrics({f"train/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        curves_png = outputs.curves.with_suffix(".png")
        plot_curves(result.history, curves_png)
        mlflow.log_artifact(str(curves_png), artifact_path="plots")
        curves_png.unlink()
        tracking.log_model(outputs.model)
        write_json(outputs.run, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": redact(tracking.tracking_uri())})
    log.info("trained %s in %.0f s; best epoch %d", mcfg.backbone, time.perf_counter() - stage_started, result.best_epoch)
    return metrics
