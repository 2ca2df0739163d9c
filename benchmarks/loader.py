"""Training samples per second per core: the label-map loader against the previous per-mask path.

    python benchmarks/loader.py --tiles /path/to/data/tiles            # the tile stage's output (real data)
    python benchmarks/loader.py                                        # synthetic windows made on the fly
    python benchmarks/loader.py --tiles data/tiles --workers 4         # through a DataLoader with 4 workers

Both paths draw the same augmentation (params.yaml's train.augment defaults) for the same
(epoch, window). 'previous' rebuilds what the loader did before the label-map format: one
full-size uint8 mask per nucleus, resized, cropped, flipped and rotated by torchvision
transforms v2, boxes from the masks (the old loader also decoded one COCO RLE per nucleus
first, which this does not count, so 'previous' is a lower bound on its cost). Runs on
one core (torch.set_num_threads(1)) unless --workers is given; then the figure is per worker.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from nucleiseg.core.config import AugmentConfig
from nucleiseg.data.tile_store import read_window
from nucleiseg.train.loop import build_loader
from nucleiseg.train.samples import (
    MIN_MASK_PIXELS,
    EpochBatches,
    EpochSampler,
    TileDataset,
    draw_params,
)


def previous_sample(dataset: TileDataset, epoch: int, index: int, cfg: AugmentConfig):
    """The per-mask path: N full-size masks through torchvision v2, with the same draw."""
    entry = dataset.entries[index]
    image, labels = read_window(dataset.split_dir, entry)
    ids = [k for layer in labels for k in np.unique(layer) if k]
    masks = np.stack([(labels == k).any(0) for k in ids]).astype(np.uint8) if ids else np.zeros((0,) + labels.shape[1:], np.uint8)
    p = draw_params(dataset.rng(epoch, index), entry.size, cfg)
    img, m = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(masks))
    img, m = TF.resize(img, [p.scaled, p.scaled], antialias=True), TF.resize(m, [p.scaled, p.scaled])
    img, m = TF.crop(img, p.top, p.left, p.crop, p.crop), TF.crop(m, p.top, p.left, p.crop, p.crop)
    if p.hflip:
        img, m = TF.horizontal_flip(img), TF.horizontal_flip(m)
    if p.vflip:
        img, m = TF.vertical_flip(img), TF.vertical_flip(m)
    if p.rot90:
        img, m = TF.rotate(img, 90.0 * p.rot90, expand=True), TF.rotate(m, 90.0 * p.rot90, expand=True)
    img = v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter, cfg.color_jitter / 4)(img)
    m = m[m.flatten(1).sum(1) >= MIN_MASK_PIXELS]
    boxes = masks_to_boxes(m) if len(m) else torch.zeros((0, 4))
    return img.float() / 255, {"boxes": boxes, "masks": m}


def synthetic_tiles(root: Path) -> Path:
    from nucleiseg.data.synthetic import generate_dataset
    from nucleiseg.data.tile_store import write_split

    raw = generate_dataset(root / "raw", n_train=2, n_test=0, size=1000)
    write_split(raw, ["synth-train-000", "synth-train-001"], root / "tiles", "train", 512, 192, 0.3)
    return root / "tiles"


def rate(fn, n: int) -> float:
    fn(0)
    started = time.perf_counter()
    for i in range(1, n + 1):
        fn(i)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=Path, help="a tile stage output folder (default: synthetic 1000 px images)")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--previous-samples", type=int, default=6)
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = AugmentConfig()
    with tempfile.TemporaryDirectory(prefix="nucleiseg-loader-") as tmp:
        tiles = args.tiles or synthetic_tiles(Path(tmp))
        dataset = TileDataset(tiles, "train", cfg, seed=0)
        n = len(dataset)
        instances = sum(e.instances for e in dataset.entries) / n
        print(f"{tiles}: {n} windows of {dataset.entries[0].size} px, {instances:.0f} nuclei per window; augment {cfg}")
        new = rate(lambda i: dataset[(1, i % n)], args.samples)
        print(f"label-map loader : {new:6.1f} samples/s on one core ({1000 / new:.0f} ms per sample)")
        old = rate(lambda i: previous_sample(dataset, 1, i % n, cfg), args.previous_samples)
        print(f"previous per-mask: {old:6.1f} samples/s on one core ({1000 / old:.0f} ms per sample)")
        print(f"speed-up {new / old:.1f}x")
        if args.workers:
            sampler = EpochSampler(n, 0, samples_per_epoch=max(args.samples, 4 * args.workers * 4))
            loader = build_loader(dataset, EpochBatches(sampler, 4, 1, 1), args.workers, pin_memory=False)
            batches = iter(loader)
            next(batches)  # the workers are up
            started = time.perf_counter()
            count = sum(len(images) for images, _ in batches)
            per_s = count / (time.perf_counter() - started)
            print(f"DataLoader, {args.workers} workers: {per_s:.1f} samples/s ({per_s / args.workers:.1f} per worker)")


if __name__ == "__main__":
    main()
