"""The training loop: `train_one_epoch` (torchvision references/detection's shape: explicit
objects), a small `Trainer` that runs epochs and calls its hooks (validation, best weights,
logging, checkpoints: train/hooks.py), and `fit`, which builds both from the train params and
resumes from a checkpoint. Each epoch reseeds the global RNG from (seed, epoch), so a run resumed
from a checkpoint replays exactly the epochs an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from nucleiseg.core.config import TrainConfig
from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.runtime import DistInfo, default_workers, seed_everything
from nucleiseg.train.checkpoint import Checkpointer, cpu_copy
from nucleiseg.train.hooks import (
    BestWeightsHook,
    CheckpointHook,
    HookBase,
    LoggingHook,
    ValidationHook,
)
from nucleiseg.train.samples import EpochBatches, EpochSampler, collate, expand_masks

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, **implementation) -> torch.optim.Optimizer:
    """`train.optimizer`; `implementation` (foreach=, fused=) picks torch's kernels (benchmarks/train_step.py compares them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **implementation)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **implementation)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **implementation)
    raise NucleisegError(f"params.yaml: train.optimizer={cfg.optimizer!r}; choose adam, adamw or sgd")


def build_scheduler(optimizer, cfg: TrainConfig, iters_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule: linear warm-up from 0.001 x lr over `warmup_iters`, and x `lr_gamma` from
    the start of each epoch in `lr_milestones` (epochs count from 1). Chained rather than sequential:
    the factors multiply, so a milestone inside the warm-up still applies from its epoch on."""
    lr_scheduler = torch.optim.lr_scheduler
    steps = []
    if cfg.warmup_iters:
        steps.append(lr_scheduler.LinearLR(optimizer, start_factor=0.001, end_factor=1.0, total_iters=cfg.warmup_iters))
    milestones = [(epoch - 1) * iters_per_epoch for epoch in cfg.lr_milestones]
    steps.append(lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_gamma))
    return lr_scheduler.ChainedScheduler(steps, optimizer)


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


class StopRequest:
    """While active (main thread only), the first SIGINT/SIGTERM asks the trainer to stop after the
    epoch it is in, once that epoch is checkpointed; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: stopping after this epoch, once it is checkpointed (send it again to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    """The loop: per epoch, reseed, `train_one_epoch`, append the epoch's row to the history, call the hooks.

    `stop_requested` is decided once per epoch, before its hooks (agreed between DDP ranks), so that
    every hook of that epoch sees the same answer; then the trainer raises KeyboardInterrupt.
    """

    def __init__(self, model, optimizer, scheduler, cfg: TrainConfig, device: torch.device, seed: int, dist: DistInfo,
                 scaler=None, amp_dtype: torch.dtype | None = None, show_progress: bool = True) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.cfg, self.device, self.seed, self.dist = cfg, device, seed, dist
        self.amp_dtype, self.show_progress = amp_dtype, show_progress
        self.hooks: list[HookBase] = []
        self.stop = StopRequest()
        self.stop_requested = False
        self.epoch, self.max_epoch = 0, cfg.epochs
        self.history: list[dict] = []
        self.row: dict = {}

    def register(self, *hooks: HookBase) -> None:
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "epoch": self.epoch, "history": self.history}

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.history = int(ckpt["epoch"]), list(ckpt["history"])

    def _agree_to_stop(self) -> bool:
        if not self.dist.enabled:
            return self.stop.requested
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def train(self, train_set, sampler: EpochSampler, workers: int, handle_signals: bool) -> None:
        """Epochs after `self.epoch` (0, or the checkpoint's) up to `max_epoch`; with `handle_signals`, a first
        SIGTERM/SIGINT stops after the epoch it lands in (see StopRequest)."""
        cfg, dist = self.cfg, self.dist
        steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
        # Wrapped after resuming: every rank loaded the checkpoint, so all start from the same weights and epoch.
        train_model = self.model
        if dist.enabled:
            train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        log.info("training on %s: %d windows per epoch, batch %d, %d loader workers, amp %s", self.device, len(sampler) * dist.world_size,
                 cfg.batch_size, workers, self.amp_dtype or "off")
        loader = build_loader(train_set, EpochBatches(sampler, cfg.batch_size, self.epoch + 1, self.max_epoch), workers,
                              pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        try:
            with self.stop if handle_signals else nullcontext():
                for hook in self.hooks:
                    hook.before_train()
                for epoch in range(self.epoch + 1, self.max_epoch + 1):
                    self.epoch = epoch
                    seed_everything(self.seed * 1000 + epoch)
                    started = time.perf_counter()
                    losses = train_one_epoch(train_model, self.optimizer, self.scheduler, batches, steps_per_epoch, self.device, epoch,
                                             self.amp_dtype, self.scaler, cfg.grad_clip, self.show_progress and dist.is_main)
                    seconds = time.perf_counter() - started
                    self.row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
                                "windows_per_second": len(sampler) * dist.world_size / max(seconds, 1e-9),
                                "loader_wait_share": losses.pop("loader_wait_seconds") / max(seconds, 1e-9)}
                    self.row.update({f"train_{k}": v for k, v in losses.items()})
                    self.history.append(self.row)
                    self.stop_requested = self._agree_to_stop()
                    for hook in self.hooks:
                        hook.after_epoch()
                    if self.stop_requested:
                        raise KeyboardInterrupt
        finally:
            for hook in self.hooks:
                hook.after_train()


def fit(
    model: torch.nn.Module,
    train_set,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    validate: Callable[[torch.nn.Module], dict] | None = None,
    checkpointer: Checkpointer | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    extra_state: dict | None = None,
    dist: DistInfo | None = None,
    show_progress: bool = True,
    workers: int | None = None,
) -> FitResult:
    """Train for cfg.epochs, resuming from `checkpointer`'s checkpoint when there is one.

    The hooks, in order: validation with `validate(model)` (whole-image val metrics) every
    cfg.val_every epochs and at the last; the best epoch (highest `cfg.select_metric` among
    validated epochs; the lowest train loss without `validate`); the log line and
    `on_epoch_end(row)`; the resume checkpoint (cfg.checkpoint_every/checkpoint_seconds,
    the last epoch, a SIGTERM/SIGINT), holding `extra_state` as its "run". Under DDP only rank 0
    runs hooks; every rank reads the checkpoint. `workers` overrides cfg.workers.
    """
    dist = dist or DistInfo()
    model.to(device)
    # cudnn.benchmark stays off: the RoI heads see a different number of boxes every step, and
    # benchmark mode autotunes each new shape (on an H200 the first epochs ran 5-7 windows/s).
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if workers is None:
        workers = default_workers() if cfg.workers == "auto" else int(cfg.workers)
    sampler = EpochSampler(len(train_set), seed, cfg.samples_per_epoch, dist.rank, dist.world_size)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, math.ceil(len(sampler) / cfg.batch_size))
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    trainer = Trainer(model, optimizer, scheduler, cfg, device, seed, dist, scaler, amp_dtype, show_progress)
    best = BestWeightsHook(f"val_{cfg.select_metric}" if validate is not None else None)
    if dist.is_main:
        if validate is not None:
            trainer.register(ValidationHook(validate, cfg.val_every))
        trainer.register(best, LoggingHook(on_epoch_end))
        if checkpointer is not None:
            trainer.register(CheckpointHook(checkpointer, best, cfg.checkpoint_every, cfg.checkpoint_seconds, extra_state))
    if checkpointer is not None and checkpointer.exists():
        ckpt, best_state = checkpointer.load()
        trainer.load_state_dict(ckpt)
        best.restore(ckpt["best"], best_state)
        log.info("resuming from %s at epoch %d", checkpointer.path, trainer.epoch + 1)
    trainer.train(train_set, sampler, workers, handle_signals=checkpointer is not None)
    if not dist.is_main:
        return FitResult(trainer.epoch, model.state_dict(), -math.inf, trainer.history)
    if best.state is None:  # no epoch was ever better (e.g. no validation metric): the last one
        best.restore({**best.record, "epoch": trainer.epoch}, cpu_copy(model.state_dict()))
    return FitResult(best.record["epoch"], best.state, best.record["metric"], trainer.history)
