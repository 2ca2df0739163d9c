"""Seconds per training step, split into data loading (waiting on the DataLoader) and compute.

    python benchmarks/train_step.py                      # R50-FPN, 512² windows, batch 2, CPU
    python benchmarks/train_step.py --backbone resnet18 --size 256 --steps 3

Makes a synthetic tile set on the fly (images of 2 x size, cut into size² windows),
then runs `--steps` training steps after one warm-up step, with the project's
default augmentation and `--workers` DataLoader workers prefetching. 'data' is the
time the loop waits for the next batch; 'compute' is forward + backward + optimizer
step. step / compute near 1 means loading hides behind compute (target <= 1.05).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nucleiseg.config import AugmentConfig, ModelConfig, TrainConfig
from nucleiseg.data import load_train_sample, train_ids
from nucleiseg.dataset import TileDataset, collate
from nucleiseg.engine import build_optimizer, build_scheduler, seed_everything
from nucleiseg.model import build_model
from nucleiseg.synthetic import generate_dataset
from nucleiseg.tiling import tile_split


def make_tiles(root: Path, size: int, images: int) -> Path:
    raw = generate_dataset(root / "raw", n_train=images, n_test=0, size=2 * size)
    tiles = root / "tiles"
    tile_split((load_train_sample(raw, name) for name in train_ids(raw)), tiles, "train", size, size // 4, 0.3)
    return tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 1 warm-up step)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=512, help="window size (synthetic images are twice as large)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--no-augment", action="store_true", help="skip augmentation (crop/scale/flip/rot90/jitter)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(0)
    with tempfile.TemporaryDirectory(prefix="nucleiseg-bench-") as tmp:
        started = time.perf_counter()
        tiles = make_tiles(Path(tmp), args.size, images=1)  # 9 windows, drawn with replacement
        augment = None if args.no_augment else AugmentConfig(crop=min(384, args.size))
        dataset = TileDataset(tiles, "train", augment, seed=0)
        print(f"tile set: {len(dataset)} windows of {args.size}² in {time.perf_counter() - started:.1f} s")

        cfg = TrainConfig(lr=1e-4, warmup_iters=10, amp=device.type == "cuda", workers=args.workers, batch_size=args.batch_size)
        model = build_model(ModelConfig(backbone=args.backbone, weights="none")).to(device).train()
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, iters_per_epoch=100)
        needed = (args.steps + 1) * args.batch_size
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=needed, generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, collate_fn=collate,
            pin_memory=device.type == "cuda", persistent_workers=False, prefetch_factor=2 if args.workers else None,
        )

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        data_s, compute_s, step_s = [], [], []
        iterator = iter(loader)
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            images, targets = next(iterator)
            t1 = time.perf_counter()
            images = [img.to(device, non_blocking=True) for img in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            sync()
            t2 = time.perf_counter()
            tag = "warm-up" if step == 0 else f"step {step}"
            print(f"{tag:>8}: data {t1 - t0:6.3f} s  compute {t2 - t1:6.2f} s  loss {loss.detach().item():.3f}", flush=True)
            if step:
                data_s.append(t1 - t0)
                compute_s.append(t2 - t1)
                step_s.append(t2 - t0)

    mean = statistics.fmean
    print(
        f"\n{args.backbone}-FPN, {args.size}² windows, batch {args.batch_size}, {device.type}"
        f" ({torch.get_num_threads()} threads), workers {args.workers}, {args.steps} steps:"
    )
    print(f"  step    {mean(step_s):7.2f} s  (median {statistics.median(step_s):.2f})")
    print(f"  data    {mean(data_s):7.3f} s  (max {max(data_s):.3f}) waiting on the DataLoader")
    print(f"  compute {mean(compute_s):7.2f} s  forward + backward + step")
    print(f"  step / compute = {sum(step_s) / sum(compute_s):.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
