"""DVC stage `train`: data/tiles/ (+ the val images in data/raw) -> models/model.pt, models/run.json,
metrics/train.json, plots/train.csv.

With train.gpus > 1 the stage relaunches itself under torchrun (one process per GPU, DDP).
"""

import os
import sys

import torch

from nucleiseg.core.config import read_params
from nucleiseg.core.errors import main_guard
from nucleiseg.train.stage import run_training


@main_guard
def main() -> None:
    params = read_params()
    if params.train.gpus > 1 and "WORLD_SIZE" not in os.environ:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={params.train.gpus}", __file__]
        os.execv(sys.executable, torchrun)
    try:
        run_training(params)  # Ctrl-C or SIGTERM: raises Interrupted saying whether a rerun resumes
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
