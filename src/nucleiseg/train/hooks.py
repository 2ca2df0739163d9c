"""What hangs on the training loop, after detectron2's hooks (`HookBase`, `EvalHook`,
`BestCheckpointer`, `PeriodicCheckpointer`): whole-image validation, the best epoch's weights,
the epoch's log line and metrics, the resume checkpoint.

After each epoch the trainer appends the epoch's row to its history and calls the hooks in
order; each may add to the row, so later hooks see what earlier ones measured.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from nucleiseg.core import coco
from nucleiseg.core.config import EvaluateConfig, InferConfig
from nucleiseg.data.layout import Sample
from nucleiseg.evaluate.evaluator import evaluate, val_records
from nucleiseg.predict.predictor import Predictor
from nucleiseg.train.checkpoint import Checkpointer, cpu_copy

if TYPE_CHECKING:
    from nucleiseg.train.loop import Trainer

log = logging.getLogger(__name__)


class HookBase:
    """Called by the trainer around its epochs; `trainer` is set when the trainer is built."""

    trainer: Trainer

    def before_train(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        """Runs when the loop ends, also when it ends with an exception."""


@dataclass
class WholeImageValidator:
    """The infer stage's predictor and the evaluate stage's metrics on the held-out images, so the best
    epoch is chosen on what evaluate reports."""

    samples: list[Sample]
    infer: InferConfig
    evaluate: EvaluateConfig
    device: torch.device

    def __call__(self, model: torch.nn.Module) -> dict:
        """Val metrics of `model` (left in eval mode: the caller switches back to training)."""
        model.eval()
        predictor = Predictor(model, self.infer, self.device)
        records = val_records(self.samples)
        results = []
        for sample, record in zip(self.samples, records):
            results += coco.results(record.id, predictor.predict(sample.image), record.height, record.width)
        ev = evaluate(records, results, self.evaluate.max_dets_all, self.evaluate.operating_metric, score_floor=self.infer.score_floor)
        return ev.metrics


class ValidationHook(HookBase):
    """`validate(model)` every `every` epochs and at the last; its numbers join the row as val_*."""

    def __init__(self, validate: Callable[[torch.nn.Module], dict], every: int) -> None:
        self.validate, self.every = validate, every

    def after_epoch(self) -> None:
        trainer = self.trainer
        if trainer.epoch % self.every and trainer.epoch != trainer.max_epoch:
            return
        started = time.perf_counter()
        metrics = self.validate(trainer.model)
        trainer.row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        trainer.row["val_seconds"] = time.perf_counter() - started
        trainer.model.train()


class BestWeightsHook(HookBase):
    """Keeps a CPU copy of the best epoch's weights: the highest `select_key` (lower train loss breaks
    ties) among validated epochs, or without validation (`select_key` None) the lowest train loss."""

    def __init__(self, select_key: str | None) -> None:
        self.select_key = select_key
        self.record = {"epoch": 0, "metric": -math.inf, "loss": math.inf}
        self.state: dict | None = None

    def restore(self, record: dict, state: dict | None) -> None:
        self.record, self.state = dict(record), state

    def _better(self, row: dict) -> bool:
        if self.select_key is None:
            return row["train_loss"] < self.record["loss"]
        if self.select_key not in row:
            return False
        return (row[self.select_key], -row["train_loss"]) > (self.record["metric"], -self.record["loss"])

    def after_epoch(self) -> None:
        row = self.trainer.row
        if self._better(row):
            metric = row[self.select_key] if self.select_key else -math.inf
            self.record = {"epoch": self.trainer.epoch, "metric": metric, "loss": row["train_loss"]}
            self.state = cpu_copy(self.trainer.model.state_dict())
        row["best_epoch"] = self.record["epoch"]


class LoggingHook(HookBase):
    """The epoch's log line, then `on_epoch_end(row)` (the train stage logs the row to MLflow)."""

    def __init__(self, on_epoch_end: Callable[[dict], None] | None = None) -> None:
        self.on_epoch_end = on_epoch_end

    def after_epoch(self) -> None:
        row = self.trainer.row
        log.info("epoch %d: %s", row["epoch"], ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if self.on_epoch_end is not None:
            self.on_epoch_end(row)


class CheckpointHook(HookBase):
    """The resume checkpoint every `every` epochs (0: never by count), at the first epoch end `seconds`
    after the previous checkpoint (0: never by time), at the last epoch, and at the epoch end where a
    stop was requested (SIGTERM/SIGINT). A run killed outright loses the epochs since the last one."""

    def __init__(self, checkpointer: Checkpointer, best: BestWeightsHook, every: int, seconds: float, run: dict | None = None) -> None:
        self.checkpointer, self.best = checkpointer, best
        self.every, self.seconds, self.run = every, seconds, run or {}
        self.last = time.monotonic()

    def before_train(self) -> None:
        self.last = time.monotonic()

    def _due(self) -> bool:
        trainer = self.trainer
        return bool(
            (self.every and trainer.epoch % self.every == 0)
            or (self.seconds and time.monotonic() - self.last >= self.seconds)
            or trainer.epoch == trainer.max_epoch
            or trainer.stop_requested
        )

    def after_epoch(self) -> None:
        if not self._due():
            return
        trainer = self.trainer
        # The loop ends after this one (and waits for it in after_train): no copy of the live tensors needed.
        final = trainer.epoch == trainer.max_epoch or trainer.stop_requested
        self.checkpointer.save({**trainer.state_dict(), "best": self.best.record, "run": self.run}, self.best.state, copy=not final)
        self.last = time.monotonic()

    def after_train(self) -> None:
        self.checkpointer.wait()
