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
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import coco
from .config import TrainConfig
from .dataset import collate
from .errors import NucleisegError
from .inference import detections_to_instances, predict_batch
from .io import atomic_path

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    return DistInfo(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, dist: DistInfo | None = None) -> torch.device:
    """'auto' -> cuda > mps > cpu; under DDP each process takes cuda:LOCAL_RANK."""
    dist = dist or DistInfo()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise NucleisegError("params.yaml: train.device=cuda but no CUDA device is visible; use auto or cpu")
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


def _frozen_norm(model: torch.nn.Module):
    """Put BatchNorm layers in eval mode (loss on val windows must not update running stats)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    return norms


def train_one_epoch(model, optimizer, scheduler, loader, device, epoch: int, scaler=None, grad_clip: float = 0.0, show_progress: bool = True) -> dict[str, float]:
    """One pass over `loader`; returns the mean of each loss component and 'loss'."""
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not show_progress, leave=False)
    for images, targets in bar:
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=device.type, enabled=scaler is not None):
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
        bar.set_postfix(loss=f"{totals['loss'] / steps:.3f}")
    return {k: v / max(steps, 1) for k, v in totals.items()}


@torch.no_grad()
def validation_loss(model, loader, device) -> float:
    model.train()
    _frozen_norm(model)
    total, steps = 0.0, 0
    for images, targets in loader:
        images = [img.to(device) for img in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        total += float(sum(model(images, targets).values()))
        steps += 1
    model.eval()
    return total / max(steps, 1)


def validation_ap50(model, dataset, device, batch_size: int, max_dets_all: int = 3000) -> float:
    """AP50 (all detections) of the model on the val windows against their clipped ground truth."""
    from .metrics import coco_segm_metrics

    model.eval()
    results = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = predict_batch(model, [img for img, _ in items], device)
        for (image, target), output in zip(items, outputs):
            height, width = image.shape[-2:]
            instances = detections_to_instances(output, height, width)
            results += coco.results(target["image_id"], instances, height, width)
    return coco_segm_metrics(dataset.doc, results, max_dets_all)["ap50_all"]


@dataclass
class FitResult:
    best_epoch: int
    best_state: dict
    best_metric: float
    history: list[dict] = field(default_factory=list)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def fit(
    model: torch.nn.Module,
    train_set,
    val_set,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    checkpoint_path: Path | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    extra_state: dict | None = None,
    dist: DistInfo | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Train for cfg.epochs, validating every cfg.val_every epochs; resume from checkpoint_path if present.

    The best epoch is the one with the highest val AP50 (lowest val loss breaks ties;
    without val windows, the lowest train loss).
    """
    dist = dist or DistInfo()
    model.to(device)
    # Each process draws its share of an epoch: all windows split by DistributedSampler, or samples_per_epoch / world_size.
    per_rank_samples = math.ceil(cfg.samples_per_epoch / dist.world_size) if cfg.samples_per_epoch else None
    sampler = None
    if dist.enabled and per_rank_samples is None:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    iters_per_epoch = math.ceil((len(sampler) if sampler is not None else (per_rank_samples or len(train_set))) / cfg.batch_size)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, iters_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda") else None

    start_epoch, history = 1, []
    best = {"epoch": 0, "metric": -math.inf, "loss": math.inf, "state": copy.deepcopy(model.state_dict())}
    if checkpoint_path is not None and checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
        log.info("resuming from %s at epoch %d", checkpoint_path, start_epoch)
    # Wrapped after resuming: every rank loads the checkpoint, so all start from the same weights and epoch.
    train_model = model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, cfg.epochs + 1):
        seed_everything(seed * 1000 + epoch)
        train_set.set_epoch(epoch)
        loader_generator = torch.Generator().manual_seed((seed * 1000 + epoch) * dist.world_size + dist.rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
            epoch_sampler = sampler
        else:
            epoch_sampler = torch.utils.data.RandomSampler(train_set, num_samples=per_rank_samples, generator=loader_generator)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=cfg.batch_size, sampler=epoch_sampler, num_workers=cfg.workers,
            collate_fn=collate, pin_memory=device.type == "cuda", generator=loader_generator,
        )
        started = time.perf_counter()
        losses = train_one_epoch(train_model, optimizer, scheduler, loader, device, epoch, scaler, cfg.grad_clip, show_progress and dist.is_main)
        seconds = time.perf_counter() - started
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
               "images_per_second": len(epoch_sampler) * dist.world_size / max(seconds, 1e-9)}
        row.update({f"train_{k}": v for k, v in losses.items()})
        validate = dist.is_main and val_set is not None and len(val_set) > 0 and (epoch % max(cfg.val_every, 1) == 0 or epoch == cfg.epochs)
        if validate:
            val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=0, collate_fn=collate)
            row["val_loss"] = validation_loss(model, val_loader, device)
            row["val_ap50"] = validation_ap50(model, val_set, device, cfg.batch_size)
            better = (row["val_ap50"], -row["val_loss"]) > (best["metric"], -best["loss"])
            metric, loss_key = row["val_ap50"], row["val_loss"]
        else:
            better = val_set is None or len(val_set) == 0
            better = better and row["train_loss"] < best["loss"]
            metric, loss_key = best["metric"], row["train_loss"]
        if dist.is_main and better:
            best = {"epoch": epoch, "metric": metric, "loss": loss_key, "state": copy.deepcopy(model.state_dict())}
        row["best_epoch"] = best["epoch"]
        history.append(row)
        if dist.is_main:
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
            if on_epoch_end is not None:
                on_epoch_end(row)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch, "rng": _rng_state(),
                    "history": history, "best": best, "config": extra_state or {},
                })
        if dist.enabled:
            torch.distributed.barrier()
    if best["epoch"] == 0:
        best = {"epoch": cfg.epochs, "metric": best["metric"], "loss": best["loss"], "state": copy.deepcopy(model.state_dict())}
    return FitResult(best["epoch"], best["state"], best["metric"], history)

