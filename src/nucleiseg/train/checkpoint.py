"""The resume checkpoint and the best-weights file of one training, written off the training thread.

`<name>.pt` holds what a resumed run needs to replay the rest exactly (model, optimizer,
scheduler, scaler, epoch, history, the best epoch's record, the MLflow run); the best epoch's
weights live in their own small file `<name>.best-<epoch>.pt`, written with the first checkpoint
after that epoch and named by it, so the checkpoint on disk always has its own best file beside
it, whenever the process dies. Writes run on one background thread from a CPU copy taken at the
epoch end: the training goes on while the file is written; a new write waits for the previous
one, and each lands atomically (temp path + rename).
"""

from __future__ import annotations

import logging
import pickle
import threading
from pathlib import Path
from typing import Callable

import torch

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "history", "best"}


def cpu_copy(obj):
    """A copy of a state dict (nested dicts/lists of tensors and plain data) on the CPU, sharing no
    storage with the original: the training may change the original while the copy is written."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def _refusal(path: Path, exc: Exception) -> NucleisegError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError):  # torch's text advises weights_only=False: never for a damaged file
        detail = "not a file of tensors and plain data that torch.load can read"
    return NucleisegError(f"{path}: cannot resume from this checkpoint ({detail}); delete it to train from the start")


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A resume checkpoint (tensors and plain data only); a damaged one is one clear error. With `mmap`
    the tensors stay in the file until used: cheap when only the epoch or the run id is wanted."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
            raise ValueError("not a training checkpoint")
        return ckpt
    except Exception as exc:
        raise _refusal(path, exc) from None


class BackgroundWriter:
    """Runs one write at a time on its own thread. `submit` first waits for the previous write;
    `wait` joins the pending one and raises its failure as one NucleisegError. The thread is not a
    daemon, so even an interrupted process finishes the file it is writing before it exits."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: tuple[str, BaseException] | None = None

    def submit(self, what: str, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # handed to the training thread by wait()
                self._failure = (what, exc)

        self._thread = threading.Thread(target=run, name="nucleiseg-checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            what, exc = self._failure
            self._failure = None
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise NucleisegError(f"{what}: could not be written ({detail}); check the free space and permissions there") from None


def _save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Checkpointer:
    """Writes and reads `path` (the resume checkpoint) and its best-weights file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.writer = BackgroundWriter()
        self.epoch: int | None = None  # the epoch of the checkpoint on disk, once this process wrote or read it
        self._best_on_disk = 0

    def best_path(self, epoch: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.best-{epoch}.pt")

    def _best_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.best-*.pt"))

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> tuple[dict, dict | None]:
        """(checkpoint, best weights or None when no epoch was best yet), both on the CPU."""
        ckpt = load_checkpoint(self.path)
        best_epoch = int(ckpt["best"]["epoch"])
        best_state = None
        if best_epoch:
            best_file = self.best_path(best_epoch)
            if not best_file.is_file():
                raise _refusal(self.path, FileNotFoundError(f"its best-weights file {best_file.name} is missing"))
            try:
                best_state = torch.load(best_file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise _refusal(self.path, ValueError(f"{best_file.name}: {exc}")) from None
        self.epoch, self._best_on_disk = int(ckpt["epoch"]), best_epoch
        return ckpt, best_state

    def save(self, checkpoint: dict, best_state: dict | None, copy: bool = True) -> None:
        """Write `checkpoint` (whose 'best' names the best epoch) and, when that epoch's weights are not
        on disk yet, `best_state` (CPU tensors) in the background; then drop best files of other epochs.
        `copy=False` when nothing changes the live tensors before `wait()` (the training's last checkpoint)."""
        if copy:
            checkpoint = cpu_copy(checkpoint)  # taken now: the training changes the live tensors from the next step on
        best_epoch = int(checkpoint["best"]["epoch"])
        write_best = bool(best_epoch) and best_epoch != self._best_on_disk
        if write_best and best_state is None:
            raise ValueError(f"the checkpoint names epoch {best_epoch} as the best, but its weights were not given")
        keep = self.best_path(best_epoch) if best_epoch else None

        def job() -> None:
            if write_best:
                _save(best_state, keep)  # before the checkpoint that names it
            _save(checkpoint, self.path)
            for stale in self._best_files():
                if stale != keep:
                    stale.unlink(missing_ok=True)

        self.writer.submit(str(self.path), job)
        self.epoch, self._best_on_disk = int(checkpoint["epoch"]), best_epoch

    def wait(self) -> None:
        self.writer.wait()

    def remove(self) -> None:
        """After a finished training: the checkpoint and its best-weights file go."""
        self.wait()
        self.path.unlink(missing_ok=True)
        for best in self._best_files():
            best.unlink(missing_ok=True)

    def summary(self) -> dict | None:
        """The checkpoint's epoch and run record without reading its tensors; None without a checkpoint."""
        if not self.exists():
            return None
        ckpt = load_checkpoint(self.path, mmap=True)
        self.epoch = int(ckpt["epoch"])
        return {"epoch": self.epoch, "run": dict(ckpt.get("run") or {})}

    def resume_hint(self, epochs: int) -> str:
        """What running a training of `epochs` epochs again does, for the line printed when it is interrupted."""
        if not self.exists():
            return "nothing to resume: no checkpoint was written yet, so running the stage again starts from epoch 1"
        if self.epoch is None:
            return f"run the stage again to resume from {self.path}"
        if self.epoch >= epochs:
            return f"all {epochs} epochs are checkpointed in {self.path}: running the stage again writes the outputs without training"
        return f"epoch {self.epoch} is checkpointed in {self.path}: running the stage again resumes from epoch {self.epoch + 1}"
