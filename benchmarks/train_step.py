"""Training throughput per variant: windows/s, the share of time outside the steps (waiting for the
loader), GPU busy.

    python benchmarks/train_step.py                                   # R50-FPN, synthetic 512 px windows, CPU
    python benchmarks/train_step.py --backbone resnet18 --size 256 --steps 3
    python benchmarks/train_step.py --tiles data/tiles --steps 40 --batch-size 4 \\
        --variants bf16-nhwc,bf16-nhwc-fused,bf16-nhwc-foreach,bf16-nhwc-compile,bf16-nhwc-compile-fused   # on a GPU

Runs the training loop's own step (`train/loop.py`'s `train_one_epoch`: one loader iterator, masks expanded on the
device, autocast, gradient clipping), `--steps` timed steps after `--warmup` steps, once per
variant. A variant is a dtype (fp32, fp16, bf16 autocast) followed by any of: '-nhwc'
(channels_last weights), '-compile' (torch.compile of the backbone + FPN: training crops have one
static shape), '-foreach' / '-fused' (the optimizer's multi-tensor or fused kernels; without
either, torch's default), '-maskiou' (the model with Mask Scoring R-CNN's MaskIoU head,
`model.mask_iou_head`: `fp32,fp32-maskiou` gives the head's cost per step). `--compile` adds
'-compile' to every variant. The warm-up steps (the compilation included) are timed apart.
'outside steps' is the time the loop waited for its next batch; target <= 5 %. GPU busy:
torch.cuda.utilization() (NVML) sampled every 0.2 s, else `nvidia-smi`; left out when neither answers.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
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
FLAGS = ("nhwc", "compile", "foreach", "fused", "maskiou")


def parse_variant(name: str) -> tuple[torch.dtype | None, set[str]]:
    dtype, *flags = name.split("-")
    if dtype not in DTYPES or not set(flags) <= set(FLAGS) or {"foreach", "fused"} <= set(flags):
        raise SystemExit(f"error: variant {name!r}: expected fp32, fp16 or bf16, then any of -{', -'.join(FLAGS)} (not both foreach and fused)")
    return DTYPES[dtype], set(flags)


def make_tiles(root: Path, size: int) -> Path:
    raw = generate_dataset(root / "raw", n_train=2, n_test=0, size=2 * size)
    write_split(raw, ["synth-train-000", "synth-train-001"], root / "tiles", "train", size, size // 4, 0.3)
    return root / "tiles"


class Utilisation(threading.Thread):
    """Samples the GPU's busy share every 0.2 s until stopped: NVML through torch, else nvidia-smi."""

    def __init__(self, device: torch.device):
        super().__init__(daemon=True)
        self.device = device
        self.samples: list[float] = []
        self.stop = threading.Event()

    def sample(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # no NVML bindings: ask the driver's tool
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(self.device.index or 0)],
                              capture_output=True, text=True)
        try:
            return float(done.stdout.strip())
        except ValueError:
            return None

    def run(self):
        while not self.stop.is_set():
            value = self.sample()
            if value is None:
                return
            self.samples.append(value)
            time.sleep(0.2)


def run_variant(name: str, dataset, args, device) -> None:
    dtype, flags = parse_variant(name)
    seed_everything(0)
    cfg = TrainConfig(lr=1e-4, warmup_iters=10, batch_size=args.batch_size)
    model = build_model(ModelConfig(backbone=args.backbone, weights="none", mask_iou_head="maskiou" in flags)).to(device).train()
    if "nhwc" in flags:
        model.to(memory_format=torch.channels_last)
    if "compile" in flags:
        model.backbone = torch.compile(model.backbone, backend=args.compile_backend, dynamic=False)
    implementation = {"foreach": True} if "foreach" in flags else {"fused": True} if "fused" in flags else {}
    optimizer = build_optimizer(model, cfg, **implementation)
    scheduler = build_scheduler(optimizer, cfg, iters_per_epoch=100)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    total = args.warmup + args.steps
    sampler = EpochSampler(len(dataset), 0, samples_per_epoch=total * args.batch_size)
    loader = build_loader(dataset, EpochBatches(sampler, args.batch_size, 1, 1), args.workers, pin_memory=device.type == "cuda")
    util = Utilisation(device) if device.type == "cuda" else None
    batches = iter(loader)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # The loop's own step (gradient clipping included), first the warm-up steps, then the timed ones.
    started = time.perf_counter()
    train_one_epoch(model, optimizer, scheduler, batches, args.warmup, device, 0, dtype, scaler, cfg.grad_clip, show_progress=False)
    sync()
    warmup = time.perf_counter() - started
    if util:
        util.start()
    started = time.perf_counter()
    waited = train_one_epoch(model, optimizer, scheduler, batches, args.steps, device, 1, dtype, scaler, cfg.grad_clip,
                             show_progress=False)["loader_wait_seconds"]
    sync()
    seconds = time.perf_counter() - started
    busy = ""
    if util:
        util.stop.set()
        util.join()
        busy = f", GPU busy {sum(util.samples) / len(util.samples):.0f} %" if util.samples else ""
    print(f"{name:>24}: {args.steps * args.batch_size / seconds:6.1f} windows/s, step {seconds / args.steps * 1000:6.0f} ms, "
          f"outside steps {waited / seconds * 100:4.1f} % (loader wait){busy}; warm-up {args.warmup} steps {warmup:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=Path, help="a tile stage output folder (default: synthetic windows)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=512, help="synthetic window size")
    parser.add_argument("--crop", type=int, default=384, help="training crop (train.augment.crop), at most the window size")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--variants", default="fp32", help="comma-separated, e.g. fp32,bf16-nhwc,bf16-nhwc-compile-fused")
    parser.add_argument("--compile", action="store_true", help="add -compile to every variant")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' checks the wiring only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compile:
        variants = [v if "-compile" in v else f"{v}-compile" for v in variants]
    for variant in variants:
        parse_variant(variant)  # all checked before the first one runs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="nucleiseg-bench-") as tmp:
        tiles = args.tiles or make_tiles(Path(tmp), args.size)
        crop = min(args.crop, args.size) if args.tiles is None else args.crop
        dataset = TileDataset(tiles, "train", AugmentConfig(crop=crop), seed=0)
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"{args.backbone}-FPN, {len(dataset)} windows, crop {crop}, batch {args.batch_size}, {args.workers} workers, {name}", flush=True)
        for variant in variants:
            run_variant(variant, dataset, args, device)


if __name__ == "__main__":
    main()
