"""Trainings running at once on one machine (`dvc queue start -j N`, several recipes on one GPU).

Each train stage holds an exclusive `flock` on `<checkpoint>.lock` beside its resume checkpoint
while it runs. That keeps a second training with the same params and data (the same checkpoint)
from fighting over the file, and it lets `train.workers: auto` count the trainings running under
the repository: the loader cores are split between them. DVC tells a stage nothing about its
queue, and a training that starts alone takes the cores before the others arrive, so
NUCLEISEG_CONCURRENT_TRAININGS=N (set where `dvc queue start -j N` runs) makes the split certain.
flock is released by the kernel when a process dies: a killed training is never counted.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; each training then counts itself alone
    fcntl = None

from nucleiseg.core.errors import NucleisegError

CONCURRENT_ENV = "NUCLEISEG_CONCURRENT_TRAININGS"


def lock_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".lock")


@contextmanager
def training_lock(checkpoint: Path) -> Iterator[None]:
    """Hold `<checkpoint>.lock` for the training's lifetime; refuse when another process holds it."""
    lock = lock_path(checkpoint)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NucleisegError(
                    f"{lock}: another training with the same params and data is running and owns its checkpoint "
                    f"{checkpoint.name}; wait for it to finish, or change a param of this one"
                ) from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # before the lock is released: a newcomer then creates a fresh file


def running_trainings(folder: Path) -> int:
    """How many `*.lock` files in `folder` a live process holds (this process's own included)."""
    if fcntl is None or not folder.is_dir():
        return 0
    count = 0
    for lock in folder.glob("*.lock"):
        try:
            handle = open(lock)
        except FileNotFoundError:  # its training just ended
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                count += 1
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return count


def concurrent_trainings(folder: Path) -> int:
    """The number of trainings sharing this machine: NUCLEISEG_CONCURRENT_TRAININGS or the running count, whichever is larger."""
    value = os.environ.get(CONCURRENT_ENV, "").strip()
    declared = 1
    if value:
        if not value.isdigit() or int(value) < 1:
            raise NucleisegError(f"{CONCURRENT_ENV}={value!r}: expected a whole number >= 1 (the trainings you run at once), or unset it")
        declared = int(value)
    return max(declared, running_trainings(folder), 1)
