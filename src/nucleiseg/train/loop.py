"""Training loop: epochs, validation, best-epoch selection, checkpoint/resume, DDP.

Shaped like torchvision's references/detection engine: `train_one_epoch` takes
explicit objects; `fit` adds validation, checkpoints and resume. Each epoch
reseeds the global RNG from (seed, epoch), so a run resumed from a checkpoint
replays exactly the epochs an uninterrupted run would have.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from nucleiseg.core.config import TrainConfig
from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.io import atomic_path
from nucleiseg.core.runtime import DistInfo, default_workers, seed_everything
from nucleiseg.train.samples import EpochBatches, EpochSampler, collate, expand_masks

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise NucleisegError(f"params.yaml: train.optimizer={cfg.optimizer!r}; choose adam, adamw or sgd")


def build_scheduler(optimizer, cfg: TrainConfig, iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: linear warmup, then x lr_drop_factor from lr_drop_epoch on."""
    warmup = max(int(cfg.warmup_iters), 0)
    drop_at = (int(cfg.lr_drop_epoch) - 1) * iters_per_epoch  # epochs count from 1

    def factor(iteration: int) -> float:
        warm = min(1.0, 0.001 + (1 - 0.001) * iteration / warmup) if warmup else 1.0
        return warm * (cfg.lr_drop_factor if cfg.lr_drop_epoch and iteration >= drop_at else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for `train.amp` on this device; None runs in float32 (CPU, amp off)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _quiet_worker(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which shuts them down:
    otherwise each worker prints its own traceback after the stage's one-line message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset, batches: EpochBatches, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """One loader for the whole training: its workers keep batches prefetched while the model
    steps, across epoch ends and validation."""
    extra = {"prefetch_factor": 4, "worker_init_fn": _quiet_worker} if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, pin_memory=pin_memory, **extra)


def next_batch(batches):
    """The loader's next batch. torch re-raises the error of a loader worker with the worker's
    traceback as its message: a NucleisegError is cut back to its own one line."""
    try:
        return next(batches)
    except Exception as exc:
        text = str(exc).strip()
        if "DataLoader worker" not in text.split("\n", 1)[0]:
            raise
        # torch raises it from a frame that holds the exception, which holds the frame: a cycle that
        # keeps the loader, and its workers, alive until the process exits, which then waits for
        # them forever (they ignore SIGTERM). Dropping the traceback breaks it; the message has the worker's.
        exc.__traceback__ = None
        if isinstance(exc, NucleisegError):
            raise NucleisegError(text.splitlines()[-1].split("NucleisegError: ", 1)[-1]) from None
        raise


def targets_to_device(target: dict, device: torch.device) -> dict:
    moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in target.items()}
    return expand_masks(moved)


def train_one_epoch(model, optimizer, scheduler, batches, steps_per_epoch: int, device, epoch: int, amp_dtype: torch.dtype | None = None,
                    scaler=None, grad_clip: float = 0.0, show_progress: bool = True) -> dict[str, float]:
    """`steps_per_epoch` steps on batches from the iterator `batches`; returns the mean of each loss
    component, 'loss', and 'loader_wait_seconds' (time the steps waited for their batch)."""
    model.train()
    totals: dict[str, float] = {}
    steps, waited = 0, 0.0
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", unit="batch", disable=None if show_progress else True, leave=False)
    while steps < steps_per_epoch:
        started = time.perf_counter()
        images, targets = next_batch(batches)
        waited += time.perf_counter() - started
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [targets_to_device(t, device) for t in targets]
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(float(loss.detach())):
            detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise NucleisegError(f"non-finite loss at epoch {epoch} step {steps} ({detail}); lower train.lr or raise train.warmup_iters")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        steps += 1
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        bar.update()
        bar.set_postfix(loss=f"{totals['loss'] / steps:.3f}")
    bar.close()
    out = {k: v / max(steps, 1) for k, v in totals.items()}
    out["loader_wait_seconds"] = waited
    return out


@dataclass
class FitResult:
    best_epoch: int
    best_state: dict
    best_metric: float
    history: list[dict] = field(default_factory=list)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: Path) -> dict:
    """A resume checkpoint (tensors and plain data only); a damaged one is one clear error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "scheduler", "epoch", "history", "best"} <= set(ckpt):
            raise ValueError("not a training checkpoint")
        return ckpt
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):  # torch's text advises weights_only=False: never for a damaged file
            detail = "not a file of tensors and plain data that torch.load can read"
        raise NucleisegError(f"{path}: cannot resume from this checkpoint ({detail}); delete it to train from the start") from None


def _better(row: dict, best: dict, select_key: str | None) -> bool:
    """Higher val metric wins (lower train loss breaks ties); without validation, lower train loss."""
    if select_key is None:
        return row["train_loss"] < best["loss"]
    if select_key not in row:
        return False
    return (row[select_key], -row["train_loss"]) > (best["metric"], -best["loss"])


def fit(
    model: torch.nn.Module,
    train_set,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    validate: Callable[[torch.nn.Module], dict] | None = None,
    checkpoint_path: Path | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    extra_state: dict | None = None,
    dist: DistInfo | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Train for cfg.epochs, validating every cfg.val_every epochs (and at the last); resume from
    checkpoint_path if present.

    `validate(model)` returns whole-image val metrics; the best epoch has the highest
    `cfg.select_metric` among them. The global RNG is reseeded from (seed, epoch) at the start of
    each epoch and augmentations draw from (seed, epoch, index), so a resumed run replays
    exactly the epochs an uninterrupted run would have.
    """
    dist = dist or DistInfo()
    model.to(device)
    # cudnn.benchmark stays off: the RoI heads see a different number of boxes every step, and
    # benchmark mode autotunes each new shape (on an H200 the first epochs ran 5-7 windows/s).
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    workers = default_workers() if cfg.workers == "auto" else int(cfg.workers)
    sampler = EpochSampler(len(train_set), seed, cfg.samples_per_epoch, dist.rank, dist.world_size)
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    select_key = f"val_{cfg.select_metric}" if validate is not None else None

    start_epoch, history = 1, []
    best = {"epoch": 0, "metric": -math.inf, "loss": math.inf, "state": None}
    if checkpoint_path is not None and checkpoint_path.is_file():
        ckpt = load_checkpoint(checkpoint_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
        if best["state"] is None and best["epoch"] == ckpt["epoch"]:
            best = {**best, "state": copy.deepcopy(model.state_dict())}
        log.info("resuming from %s at epoch %d", checkpoint_path, start_epoch)
    # Wrapped after resuming: every rank loads the checkpoint, so all start from the same weights and epoch.
    train_model = model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    log.info("training on %s: %d windows per epoch, batch %d, %d loader workers, amp %s", device, len(sampler) * dist.world_size,
             cfg.batch_size, workers, amp_dtype or "off")
    loader = build_loader(train_set, EpochBatches(sampler, cfg.batch_size, start_epoch, cfg.epochs), workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    for epoch in range(start_epoch, cfg.epochs + 1):
        seed_everything(seed * 1000 + epoch)
        started = time.perf_counter()
        losses = train_one_epoch(train_model, optimizer, scheduler, batches, steps_per_epoch, device, epoch, amp_dtype, scaler,
                                 cfg.grad_clip, show_progress and dist.is_main)
        seconds = time.perf_counter() - started
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
               "windows_per_second": len(sampler) * dist.world_size / max(seconds, 1e-9),
               "loader_wait_share": losses.pop("loader_wait_seconds") / max(seconds, 1e-9)}
        row.update({f"train_{k}": v for k, v in losses.items()})
        if dist.is_main and validate is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            started = time.perf_counter()
            row.update({f"val_{k}": v for k, v in validate(model).items() if isinstance(v, (int, float))})
            row["val_seconds"] = time.perf_counter() - started
            model.train()
        if dist.is_main and _better(row, best, select_key):
            best = {"epoch": epoch, "metric": row.get(select_key, -math.inf) if select_key else -math.inf,
                    "loss": row["train_loss"], "state": copy.deepcopy(model.state_dict())}
        row["best_epoch"] = best["epoch"]
        history.append(row)
        if dist.is_main:
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
            if on_epoch_end is not None:
                on_epoch_end(row)
            if checkpoint_path is not None:
                # The best weights are stored only when they differ from the current ones.
                kept_best = {**best, "state": None} if best["epoch"] == epoch else best
                save_checkpoint(checkpoint_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                    "history": history, "best": kept_best, "run": extra_state or {},
                })
        if dist.enabled:
            torch.distributed.barrier()
    if best["state"] is None:
        best = {"epoch": cfg.epochs, "metric": best["metric"], "loss": best["loss"], "state": copy.deepcopy(model.state_dict())}
    return FitResult(best["epoch"], best["state"], best["metric"], history)
