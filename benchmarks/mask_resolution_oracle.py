"""Mask-head oracle on the real training images: how much of each nucleus can a mask head give back?

Mask R-CNN learns each nucleus as an M x M grid over its box (M = 28, the target made by
roi_align of the ground-truth mask over the box) and inference pastes that grid back into
the box. Here a perfect mask head is assumed: its output is the training target itself,
pasted back at mask threshold 0.5. The IoU of each pasted nucleus with its ground truth is
the most any mask head can reach with that pair of target and paste:

- nucleiseg: torchvision's targets (roi_align, aligned=False) pasted by
  `predict.postprocess.detections_to_instances` (torchvision's paste geometry);
- exact: targets sampled at pixel centres (aligned=True) and pasted back by their exact
  inverse, detectron2's pair (`exact_paste` below).

The exact pair lifts this ceiling, but was measured end to end and did not pay on a trained
model (docs/recipes.md, "Mask geometry"): the trained masks fall short of the ceiling for other reasons.

    python benchmarks/mask_resolution_oracle.py --zip /work/shared/data/nuclei-hw3-train.zip
    python benchmarks/mask_resolution_oracle.py --raw data/raw --sizes 14,28,56

Reads the data where it lies (or extracts the zip to a temp folder); writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from nucleiseg.core.masks import Instance
from nucleiseg.data.download import dataset_root, safe_extract
from nucleiseg.data.layout import load_train_sample, train_ids
from nucleiseg.predict.postprocess import detections_to_instances

SIZE_BINS = ((0, 15), (15, 30), (30, 10_000))  # largest extent of a nucleus, px
PAIRS = ("nucleiseg", "exact")


def exact_paste(grid: torch.Tensor, box: list[float], height: int, width: int) -> np.ndarray:
    """The M x M grid read back at each pixel centre (k + 0.5) of the height x width image, as
    roi_align(aligned=True) sampled it over `box` (x0, y0, x1, y1; x1/y1 exclusive)."""
    x0, y0, x1, y1 = box
    gx = 2 * (torch.arange(width, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) - 1
    gy = 2 * (torch.arange(height, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) - 1
    where = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    return F.grid_sample(grid[None, None], where, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].numpy()


def pasted_iou(inst: Instance, resolution: int, pair: str) -> float:
    """IoU with `inst` of its own resolution x resolution training target pasted back into its box."""
    pad = 3  # room for the pastes' margins around the box
    canvas = np.zeros((inst.mask.shape[0] + 2 * pad, inst.mask.shape[1] + 2 * pad), dtype=np.float32)
    canvas[pad:-pad, pad:-pad] = inst.mask
    height, width = canvas.shape
    box = torch.tensor([[pad, pad, pad + inst.mask.shape[1], pad + inst.mask.shape[0]]], dtype=torch.float32)
    target = roi_align(torch.from_numpy(canvas)[None, None], [box], (resolution, resolution), 1.0, aligned=pair == "exact")
    if pair == "exact":
        full = exact_paste(target[0, 0], box[0].tolist(), height, width) > 0.5
    else:
        full = np.zeros((height, width), dtype=bool)
        for p in detections_to_instances({"boxes": box, "scores": torch.ones(1), "masks": target}, height, width, 0.5, "detector"):
            full[p.y0 : p.y1, p.x0 : p.x1] = p.mask
    ground = canvas > 0
    return float((full & ground).sum() / (full | ground).sum())


def run(raw: Path, resolutions: list[int], limit: int | None) -> None:
    started = time.perf_counter()
    nuclei = [inst for name in train_ids(raw)[:limit] for inst in load_train_sample(raw, name).instances]
    extents = np.array([max(i.mask.shape) for i in nuclei])
    print(f"{len(nuclei)} nuclei; largest extent (px): median {np.median(extents):.0f}, "
          f"90th percentile {np.percentile(extents, 90):.0f}, max {extents.max()}")
    print("share of nuclei by extent: " + ", ".join(
        f"{_bin_name(lo, hi)} px {100 * np.mean((extents >= lo) & (extents < hi)):.1f}%" for lo, hi in SIZE_BINS))
    print(f"{'pair':<12} {'M':>3} {'mean IoU':>9} {'IoU<0.5':>8} {'IoU<0.75':>9} {'IoU<0.9':>8}   mean IoU by extent: "
          + " ".join(f"{_bin_name(lo, hi):>7}" for lo, hi in SIZE_BINS))
    for pair in PAIRS:
        for resolution in resolutions:
            ious = np.array([pasted_iou(inst, resolution, pair) for inst in nuclei])
            by_size = [ious[(extents >= lo) & (extents < hi)] for lo, hi in SIZE_BINS]
            print(f"{pair:<12} {resolution:>3} {ious.mean():>9.4f} {100 * np.mean(ious < 0.5):>7.2f}% {100 * np.mean(ious < 0.75):>8.2f}% "
                  f"{100 * np.mean(ious < 0.9):>7.2f}%   {' ' * 19}" + " ".join(f"{v.mean():>7.4f}" if v.size else f"{'-':>7}" for v in by_size), flush=True)
    print(f"time: {time.perf_counter() - started:.1f} s")


def _bin_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}" if hi < 10_000 else f"{lo}+"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--zip", type=Path, help="the homework's training zip")
    source.add_argument("--raw", type=Path, help="an extracted dataset folder (train/<ID>/images, masks)")
    parser.add_argument("--sizes", default="14,28,56", help="mask resolutions M to try (torchvision: 28)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    args = parser.parse_args(argv)
    resolutions = [int(v) for v in args.sizes.split(",")]
    if args.raw is not None:
        run(dataset_root(args.raw), resolutions, args.limit)
        return 0
    with tempfile.TemporaryDirectory(prefix="mask-oracle-") as tmp:
        safe_extract(args.zip, Path(tmp))
        run(dataset_root(Path(tmp)), resolutions, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
