"""Training throughput: windows/s, the share of each step spent waiting for the loader, GPU busy share.

    python benchmarks/train_step.py                                   # R50-FPN, synthetic 512 px windows, CPU
    python benchmarks/train_step.py --backbone resnet18 --size 256 --steps 3
    python benchmarks/train_step.py --tiles data/tiles --steps 40 --variants fp32,bf16,bf16-nhwc   # on a GPU

Runs the engine's training step (`engine.train_one_epoch`: one loader iterator, masks expanded
on the device, autocast, gradient clipping), `--steps` steps after `--warmup` steps,
once per variant: fp32 / fp16 / bf16 autocast, '-nhwc' for channels_last weights.
'wait' is the time the loop waited for its next batch; target <= 5 % of the step.
On CUDA a thread samples torch.cuda.utilization() (the share of time a kernel ran).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import torch

from nucleiseg.core.config import AugmentConfig, ModelConfig, TrainConfig
from nucleiseg.core.runtime import default_workers, seed_everything
from nucleiseg.data.synthetic import generate_dataset
from nucleiseg.data.tile_store import write_split
from nucleiseg.model.maskrcnn import build_model
from nucleiseg.train.loop import (
    build_loader,
    build_optimizer,
    build_scheduler,
    train_one_epoch,
)
from nucleiseg.train.samples import EpochBatches, EpochSampler, TileDataset

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_tiles(root: Path, size: int) -> Path:
    raw = generate_dataset(root / "raw", n_train=2, n_test=0, size=2 * size)
    write_split(raw, ["synth-train-000", "synth-train-001"], root / "tiles", "train", size, size // 4, 0.3)
    return root / "tiles"


class Utilisation(threading.Thread):
    """Samples torch.cuda.utilization() every 0.2 s until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # no NVML: leave the figure out
                return
            time.sleep(0.2)


def run_variant(name: str, dataset, args, device) -> None:
    dtype = DTYPES[name.removesuffix("-nhwc")]
    seed_everything(0)
    cfg = TrainConfig(lr=1e-4, warmup_iters=10, batch_size=args.batch_size)
    model = build_model(ModelConfig(backbone=args.backbone, weights="none")).to(device).train()
    if name.endswith("-nhwc"):
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, iters_per_epoch=100)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    total = args.warmup + args.steps
    sampler = EpochSampler(len(dataset), 0, samples_per_epoch=total * args.batch_size)
    loader = build_loader(dataset, EpochBatches(sampler, args.batch_size, 1, 1), args.workers, pin_memory=device.type == "cuda")
    util = Utilisation() if device.type == "cuda" else None
    batches = iter(loader)
    # The engine's own step (gradient clipping included), first the warm-up steps, then the timed ones.
    train_one_epoch(model, optimizer, scheduler, batches, args.warmup, device, 0, dtype, scaler, cfg.grad_clip, show_progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if util:
        util.start()
    started = time.perf_counter()
    waited = train_one_epoch(model, optimizer, scheduler, batches, args.steps, device, 1, dtype, scaler, cfg.grad_clip,
                             show_progress=False)["loader_wait_seconds"]
    seconds = time.perf_counter() - started
    busy = ""
    if util:
        util.stop.set()
        util.join()
        busy = f", GPU busy {sum(util.samples) / max(len(util.samples), 1):.0f} %" if util.samples else ""
    print(f"{name:>10}: {args.steps * args.batch_size / seconds:6.1f} windows/s, step {seconds / args.steps * 1000:6.0f} ms, "
          f"loader wait {waited / seconds * 100:4.1f} % of the time{busy}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=Path, help="a tile stage output folder (default: synthetic windows)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=512, help="synthetic window size")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--variants", default="fp32", help="comma-separated: fp32, fp16, bf16, each optionally -nhwc")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="nucleiseg-bench-") as tmp:
        tiles = args.tiles or make_tiles(Path(tmp), args.size)
        dataset = TileDataset(tiles, "train", AugmentConfig(crop=min(384, args.size)), seed=0)
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"{args.backbone}-FPN, {len(dataset)} windows, crop {min(384, args.size)}, batch {args.batch_size}, {args.workers} workers, {name}")
        for variant in args.variants.split(","):
            run_variant(variant.strip(), dataset, args, device)


if __name__ == "__main__":
    main()
