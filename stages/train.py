"""DVC stage `train`: the training windows (+ the whole val images of the raw dataset) -> the model file,
the MLflow run id, the training metrics and the per-epoch curves.

With train.gpus > 1 the stage relaunches itself under torchrun (one process per GPU, DDP).
"""

import os
import sys

import torch

from nucleiseg.core.config import read_params
from nucleiseg.core.errors import main_guard
from nucleiseg.core.stage_args import stage_paths
from nucleiseg.train.stage import TrainInputs, TrainOutputs, run_training


@main_guard
def main() -> None:
    paths = stage_paths(__doc__, "tiles", "split", "raw", "model", "run", "metrics", "curves")
    params = read_params()
    if params.train.gpus > 1 and "WORLD_SIZE" not in os.environ:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={params.train.gpus}", __file__, *sys.argv[1:]]
        os.execv(sys.executable, torchrun)
    try:
        run_training(params, TrainInputs(paths.tiles, paths.split, paths.raw),
                     TrainOutputs(paths.model, paths.run, paths.metrics, paths.curves))  # Ctrl-C or SIGTERM: raises Interrupted saying whether a rerun resumes
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
