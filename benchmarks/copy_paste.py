"""CPU milliseconds per training sample with copy-paste off and on (train.augment.copy_paste), on one core.

    python benchmarks/copy_paste.py --tiles data/tiles     # the tile stage's output (real data)
    python benchmarks/copy_paste.py                        # synthetic 1000 px images, tiled on the fly

The same windows and draws with `copy_paste` 0 (the default: the sample path without copy-paste) and
1 (every window pasted on, 1 to `--max` nuclei); the rest of the augmentation is params.yaml's
default. 'on' adds one more window read and the cut, scale and paste of the nuclei. The figure is
this process's CPU time (one thread), which other jobs on the machine change far less than wall
time; wall time is printed beside it. Off and on alternate `--repeats` times; the fastest of each counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from loader import synthetic_tiles  # benchmarks/loader.py: this folder is on sys.path when run as a script
from nucleiseg.core.config import AugmentConfig
from nucleiseg.train.samples import TileDataset


def time_samples(dataset: TileDataset, samples: int) -> tuple[float, float, float]:
    """(CPU ms, wall ms, targets) per sample over `samples` windows of epoch 1, after one to warm up."""
    dataset[(0, 0)]
    targets = 0
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for i in range(samples):
        targets += len(dataset[(1, i % len(dataset))][1]["instance_ids"])
    return 1000 * (time.process_time() - cpu_started) / samples, 1000 * (time.perf_counter() - wall_started) / samples, targets / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=Path, help="a tile stage output folder (default: synthetic 1000 px images)")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max", type=int, default=AugmentConfig().copy_paste_max, help="train.augment.copy_paste_max")
    args = parser.parse_args()
    torch.set_num_threads(1)
    off = AugmentConfig()
    configs = {"off": off, "on": dataclasses.replace(off, copy_paste=1.0, copy_paste_max=args.max)}
    with tempfile.TemporaryDirectory(prefix="nucleiseg-copy-paste-") as tmp:
        tiles = args.tiles or synthetic_tiles(Path(tmp))
        datasets = {name: TileDataset(tiles, "train", cfg, seed=0) for name, cfg in configs.items()}
        entries = datasets["off"].entries
        print(f"{tiles}: {len(entries)} windows of {entries[0].size} px, {sum(e.instances for e in entries) / len(entries):.0f} "
              f"nuclei per window; crop {off.crop}; load average {os.getloadavg()[0]:.1f}")
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in datasets}
        for _ in range(args.repeats):
            for name, dataset in datasets.items():
                runs[name].append(time_samples(dataset, args.samples))
        fastest = {name: min(times) for name, times in runs.items()}
        for name, (cpu_ms, wall_ms, targets) in fastest.items():
            label = f"copy_paste {configs[name].copy_paste:g}" + (f", copy_paste_max {args.max}" if configs[name].copy_paste else "")
            print(f"{label:32s}: {cpu_ms:6.1f} CPU ms per sample ({wall_ms:.1f} wall), {targets:5.1f} targets per sample")
        extra = fastest["on"][0] - fastest["off"][0]
        print(f"on - off: {extra:+.1f} CPU ms per sample ({100 * extra / fastest['off'][0]:+.0f} %); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
