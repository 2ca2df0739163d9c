"""Where and how a process runs: device choice, DDP rank, seeding, loader worker count."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from nucleiseg.core.errors import NucleisegError


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
            raise NucleisegError("params.yaml: device=cuda but no CUDA device is visible; use auto or cpu")
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_workers(sharing: int = 1) -> int:
    """This process's share of the cores it may use (`sharing` processes split them), minus one for
    the training loop, at most 12."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(cores // max(sharing, 1) - 1, 12))
