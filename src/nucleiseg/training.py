"""The train stage's job: data + model + engine + MLflow + outputs, for one backbone."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from . import tracking
from .config import flatten, model_config, train_config
from .dataset import TileDataset
from .engine import dist_info, fit, resolve_device, seed_everything
from .io import atomic_path, repo_root, write_json
from .model import build_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainOutputs:
    model: Path = Path("models/model.pt")
    run: Path = Path("models/run.json")
    metrics: Path = Path("metrics/train.json")
    curves: Path = Path("plots/train.csv")


def checkpoint_path(params: dict, split_file: Path, checkpoints_dir: Path | None = None) -> Path:
    """Resume file, keyed by everything that shapes the training: a changed param starts afresh."""
    key = {k: params.get(k) for k in ("backbone", "seed", "data", "model", "train", "tile")}
    key["split"] = split_file.read_text() if split_file.is_file() else ""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return (checkpoints_dir or repo_root() / "checkpoints") / f"train-{digest}.pt"


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train loss")
    val_rows = [row for row in history if "val_loss" in row]
    if val_rows:
        ax_loss.plot([r["epoch"] for r in val_rows], [r["val_loss"] for r in val_rows], label="val loss")
        ax_ap.plot([r["epoch"] for r in val_rows], [r["val_ap50"] for r in val_rows], label="val AP50 (windows)", color="C2")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylim(0, 1)
    ax_ap.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CURVE_COLUMNS = ["epoch", "train_loss", "val_loss", "val_ap50", "lr", "epoch_seconds"]


def write_curves(history: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: row.get(k, "") for k in CURVE_COLUMNS})


def epoch_metrics(row: dict) -> dict[str, float]:
    """MLflow names for one history row."""
    out = {}
    for key, value in row.items():
        if key.startswith("train_"):
            out[f"train/{key[len('train_'):]}"] = value
        elif key == "val_loss":
            out["val/loss"] = value
        elif key == "val_ap50":
            out["val/window_ap50"] = value
        elif key in ("lr", "epoch_seconds", "images_per_second", "best_epoch"):
            out[key] = value
    return out


def run_training(params: dict, tiles_dir: Path = Path("data/tiles"), split_file: Path = Path("data/split.json"),
                 outputs: TrainOutputs | None = None, show_progress: bool = True) -> dict:
    """Train the configured backbone; write model, run id, metrics and curves; returns the metrics."""
    outputs = outputs or TrainOutputs()
    mcfg, tcfg = model_config(params), train_config(params)
    seed = int(params.get("seed", 0))
    dist = dist_info()
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() and tcfg.device != "cpu" else "gloo")
    device = resolve_device(tcfg.device, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(seed)
    model = build_model(mcfg)
    train_set = TileDataset(tiles_dir, "train", tcfg.augment, seed)
    val_set = TileDataset(tiles_dir, "val", None, seed)
    ckpt_path = checkpoint_path(params, split_file)
    resumed_run = None
    if ckpt_path.is_file():
        resumed_run = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("config", {}).get("mlflow_run_id")

    if not dist.is_main:
        fit(model, train_set, val_set, tcfg, device, seed, ckpt_path, dist=dist, show_progress=False)  # reads only; rank 0 writes
        return {}

    import mlflow

    started = time.perf_counter()
    tags = tracking.run_tags(mcfg.backbone, str(device))
    # A failure below must leave neither a half set of outputs nor a run.json naming an earlier training's run.
    for stale in (outputs.model, outputs.run):
        stale.unlink(missing_ok=True)
    with tracking.active_run(resumed_run, tracking.run_name(mcfg.backbone), tags) as run:
        if resumed_run is None:
            tracking.log_params(flatten(params))
            mlflow.log_params({"train_windows": len(train_set), "val_windows": len(val_set), "world_size": dist.world_size})
        result = fit(
            model, train_set, val_set, tcfg, device, seed, ckpt_path,
            on_epoch_end=lambda row: mlflow.log_metrics(epoch_metrics(row), step=row["epoch"]),
            extra_state={"mlflow_run_id": run.info.run_id, "model_config": dataclasses.asdict(mcfg)},
            dist=dist, show_progress=show_progress,
        )
        final = result.history[-1] if result.history else {}
        metrics = {
            "best_epoch": result.best_epoch,
            "epochs": tcfg.epochs,
            "best_val_window_ap50": result.best_metric if result.best_metric > -1 else None,
            "final_train_loss": final.get("train_loss"),
            "train_seconds": sum(r["epoch_seconds"] for r in result.history),
        }
        model.load_state_dict(result.best_state)
        checkpoint = {
            "model": result.best_state, "model_config": dataclasses.asdict(mcfg), "train_config": dataclasses.asdict(tcfg),
            "seed": seed, "best_epoch": result.best_epoch, "metrics": metrics, "history": result.history,
        }
        with atomic_path(outputs.model) as tmp:
            torch.save(checkpoint, tmp)
        write_json(outputs.metrics, metrics)
        write_curves(result.history, outputs.curves)
        mlflow.log_metrics({f"train/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(outputs.model), artifact_path="weights")
        curves_png = outputs.curves.with_suffix(".png")
        plot_curves(result.history, curves_png)
        mlflow.log_artifact(str(curves_png), artifact_path="plots")
        curves_png.unlink()
        tracking.log_model(model)
        write_json(outputs.run, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": tracking.tracking_uri()})
    log.info("trained %s in %.0f s; best epoch %d", mcfg.backbone, time.perf_counter() - started, result.best_epoch)
    ckpt_path.unlink(missing_ok=True)
    return metrics
