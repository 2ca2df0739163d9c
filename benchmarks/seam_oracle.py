"""Seam oracle on the real training images: ground truth cut into windows and merged must be the ground truth.

For every training image, the GT nuclei are cut into overlapping windows exactly as a
perfect model would see them (instances_in_windows) and merged back with
stitch.merge_windows; AP50 over all images must be 1.000. The homework's 2x2 cut without
overlap or merging (cut_without_overlap) is scored the same way for contrast.

    python benchmarks/seam_oracle.py --zip /work/shared/data/nuclei-hw3-train.zip
    python benchmarks/seam_oracle.py --raw data/raw          # an extracted dataset folder

Reads the data where it lies (or extracts the zip to a temp folder); writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from nucleiseg.core import coco
from nucleiseg.core.masks import Instance
from nucleiseg.core.windows import Window, windows
from nucleiseg.data.download import dataset_root, safe_extract
from nucleiseg.data.layout import load_train_sample, train_ids
from nucleiseg.evaluate.metrics import coco_segm_metrics
from nucleiseg.predict import stitch


def instances_in_windows(instances: list[Instance], height: int, width: int, size: int, overlap: int) -> list[tuple[Window, list[Instance]]]:
    """Every visible piece of every instance per window, in image coordinates: what a perfect model sees."""
    out = []
    for window in windows(height, width, size, overlap):
        pieces = []
        for inst in instances:
            piece = inst.clip(window.x0, window.y0, min(window.x1, width), min(window.y1, height))
            if piece is not None:
                pieces.append(piece.shifted(window.x0, window.y0))
        out.append((window, pieces))
    return out


def cut_without_overlap(instances: list[Instance], height: int, width: int, parts: int = 2) -> list[Instance]:
    """The homework's approach: a parts x parts grid, no overlap, no merging (split nuclei stay split)."""
    ys = np.linspace(0, height, parts + 1).astype(int)
    xs = np.linspace(0, width, parts + 1).astype(int)
    out = []
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            for inst in instances:
                piece = inst.clip(x0, y0, x1, y1)
                if piece is not None:
                    out.append(piece.shifted(x0, y0))
    return out


def _key(inst) -> tuple:
    return inst.x0, inst.y0, inst.mask.shape, np.packbits(inst.mask).tobytes()


def crossing_cut(instances, height: int, width: int, parts: int = 2) -> int:
    """Nuclei with pixels on both sides of an interior line of the parts x parts grid."""
    ys = np.linspace(0, height, parts + 1).astype(int)[1:-1]
    xs = np.linspace(0, width, parts + 1).astype(int)[1:-1]
    return sum(1 for i in instances if any(i.x0 < c < i.x1 for c in xs) or any(i.y0 < c < i.y1 for c in ys))


def run(raw: Path, size: int, overlap: int, max_dets_all: int, limit: int | None) -> None:
    names = train_ids(raw)[:limit]
    records, merged_res, naive_res = [], [], []
    totals = Counter()
    t0 = time.perf_counter()
    print(f"{'image':<20} {'GT':>5} {'pieces':>7} {'merged':>7} {'exact':>6} {'2x2':>5} {'cross':>6} {'span':>5}")
    for image_id, name in enumerate(names, start=1):
        sample = load_train_sample(raw, name)
        height, width = sample.image.shape[:2]
        gt = sample.instances
        per_window = instances_in_windows(gt, height, width, size, overlap)
        merged = stitch.merge_windows(per_window)
        naive = cut_without_overlap(gt, height, width)
        gt_keys, merged_keys = Counter(map(_key, gt)), Counter(map(_key, merged))
        exact = sum((gt_keys & merged_keys).values())
        cross = crossing_cut(gt, height, width)
        span = max((max(i.mask.shape) for i in gt), default=0)
        pieces = sum(len(p) for _, p in per_window)
        print(f"{name[:20]:<20} {len(gt):>5} {pieces:>7} {len(merged):>7} {exact:>6} {len(naive):>5} {cross:>6} {span:>5}")
        totals.update(gt=len(gt), pieces=pieces, merged=len(merged), exact=exact, naive=len(naive), cross=cross)
        totals["span"] = max(totals["span"], span)
        records.append(coco.ImageRecord(image_id, f"{name}.png", height, width, gt))
        merged_res += coco.results(image_id, merged, height, width)
        naive_res += coco.results(image_id, naive, height, width)
    load_s = time.perf_counter() - t0
    doc = coco.ground_truth(records)
    t1 = time.perf_counter()
    ap_merged = coco_segm_metrics(doc, merged_res, max_dets_all)
    ap_naive = coco_segm_metrics(doc, naive_res, max_dets_all)
    eval_s = time.perf_counter() - t1
    print()
    print(f"images: {len(records)}   GT nuclei: {totals['gt']}   largest nucleus extent: {totals['span']} px (overlap {overlap})")
    print(f"windows {size}/{overlap} + merge_windows: {totals['merged']} instances ({totals['exact']} pixel-identical to a GT nucleus, "
          f"{totals['pieces']} window pieces before merging)   AP50_all = {ap_merged['ap50_all']:.4f}   AP50 (top 100) = {ap_merged['ap50']:.4f}")
    print(f"2x2 cut, no overlap, no merging: {totals['naive']} instances   AP50_all = {ap_naive['ap50_all']:.4f}   AP50 (top 100) = {ap_naive['ap50']:.4f}")
    print(f"GT nuclei crossing a 2x2 cut line: {totals['cross']} ({100.0 * totals['cross'] / max(totals['gt'], 1):.1f}%)")
    print(f"time: load + cut + merge {load_s:.1f} s, COCO eval {eval_s:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--zip", type=Path, help="the homework's training zip")
    source.add_argument("--raw", type=Path, help="an extracted dataset folder (train/<ID>/images, masks)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--max-dets-all", type=int, default=3000)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    args = parser.parse_args(argv)
    if args.raw is not None:
        run(dataset_root(args.raw), args.window, args.overlap, args.max_dets_all, args.limit)
        return 0
    with tempfile.TemporaryDirectory(prefix="seam-oracle-") as tmp:
        safe_extract(args.zip, Path(tmp))
        run(dataset_root(Path(tmp)), args.window, args.overlap, args.max_dets_all, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
