"""Peak memory of Predictor.predict on a 4000x4000 image vs a 1000x1000 one (area ratio 16).

No network runs: a fake "label oracle" model reads each window's pixels, which encode the
ground-truth nucleus index as a colour, and returns one detection per nucleus piece it sees
(box + 28x28 raw mask resized from the piece, score 0.9), as a perfect Mask R-CNN's
`detect` would. Everything after the model (to_tensor, pasting masks into their boxes,
scoring, ownership, de-duplication) is the real code path.

Each case runs in fresh subprocesses: one synthesises the image and saves the colour-coded
label image to a temp file; others load it, note their RSS, then predict and report
  * peak RSS above that baseline (ru_maxrss: numpy, torch and Python together), once with
    glibc's defaults and once with MALLOC_MMAP_THRESHOLD_=131072 (without it glibc keeps
    freed window-sized buffers in the heap, so RSS grows with windows processed even though
    they are no longer live),
  * the tracemalloc peak during predict (numpy and Python objects; torch tensors are not seen).

    python benchmarks/infer_memory.py                 # sizes 1000 and 4000
    python benchmarks/infer_memory.py --sizes 500 2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

WHITE = 0xFFFFFF


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class LabelOracle:
    """Perfect detector of colour-coded nuclei: id = R + 256 G + 65536 B, white is background."""

    def detect(self, images, score_floor):
        out = []
        for tensor in images:
            rgb = (tensor * 255).round().to(torch.int32)
            ids = (rgb[0] + 256 * rgb[1] + 65536 * rgb[2]).numpy()
            ids[ids == WHITE] = 0
            boxes, masks = [], []
            for label, slc in enumerate(ndimage.find_objects(ids), start=1):
                if slc is None:
                    continue
                crop = torch.from_numpy(ids[slc] == label).float()[None, None]
                masks.append(F.interpolate(crop, size=(28, 28), mode="bilinear", align_corners=False)[0])
                boxes.append([slc[1].start, slc[0].start, slc[1].stop, slc[0].stop])
            n = len(boxes)
            out.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                    "scores": torch.full((n,), 0.9),
                    "labels": torch.ones(n, dtype=torch.int64),
                    "masks": torch.stack(masks) if masks else torch.zeros(0, 1, 28, 28),
                }
            )
        return out


def prepare(size: int, path: Path) -> dict:
    from nucleiseg.core.masks import paste
    from nucleiseg.data.synthetic import PIXELS_PER_NUCLEUS, synth_image

    t = time.perf_counter()
    # Same density at every size (synth_image's default caps the count at 5000).
    _, nuclei = synth_image(np.random.default_rng(size), size, size, n_nuclei=round(size * size / PIXELS_PER_NUCLEUS))
    labels = paste(nuclei, size, size)
    rgb = np.full((size, size, 3), 255, np.uint8)
    inside = labels > 0
    for c in range(3):
        rgb[..., c][inside] = (labels[inside] >> (8 * c)) & 255
    np.save(path, rgb)
    return {"nuclei": len(nuclei), "visible": int(len(np.unique(labels)) - 1), "synth_s": time.perf_counter() - t}


def measure(path: Path, tracemalloc_on: bool) -> dict:
    import tracemalloc

    from nucleiseg.core.config import InferConfig
    from nucleiseg.core.windows import windows
    from nucleiseg.predict.predictor import Predictor

    image = np.load(path)
    cfg = InferConfig()  # params.yaml defaults: window 512, overlap 128, batch 2
    predictor = Predictor(LabelOracle(), cfg)
    predictor.predict(image[:600, :600].copy())  # warm-up: imports, first allocations
    base_rss = _rss_kib()
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if tracemalloc_on:
        tracemalloc.start()
    t = time.perf_counter()
    found = predictor.predict(image)
    seconds = time.perf_counter() - t
    traced = tracemalloc.get_traced_memory()[1] if tracemalloc_on else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    masks_bytes = sum(i.mask.nbytes for i in found)
    return {
        "windows": len(windows(*image.shape[:2], cfg.window, cfg.overlap)),
        "instances": len(found),
        "image_mib": image.nbytes / 2**20,
        "baseline_rss_mib": base_rss / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_above_baseline_mib": (peak - max(base_rss, 0)) / 1024,
        "baseline_was_max": base_max >= peak,
        "tracemalloc_peak_mib": traced / 2**20 if traced is not None else None,
        "instance_masks_mib": masks_bytes / 2**20,
        "largest_mask": max((i.mask.size for i in found), default=0),
        "predict_s": seconds,
    }


def _child(args: list[str], env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# glibc raises its mmap threshold after big buffers are freed, so later window-sized buffers come
# from the heap and RSS keeps what the allocator retains; a fixed threshold shows the live memory.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the (slow) tracemalloc run")
    parser.add_argument("--prepare", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        print(json.dumps(prepare(int(args.prepare[0]), Path(args.prepare[1]))))
        return 0
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.trace)))
        return 0

    rows = {}
    with tempfile.TemporaryDirectory(prefix="infer-memory-") as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"labels_{size}.npy"
            r = _child(["--prepare", str(size), str(path)])
            r["default"] = _child(["--measure", str(path)])
            r["fixed"] = _child(["--measure", str(path)], FIXED_MMAP)
            r["traced"] = None if args.no_tracemalloc else _child(["--measure", str(path), "--trace"], FIXED_MMAP)["tracemalloc_peak_mib"]
            rows[size] = r
            d, f = r["default"], r["fixed"]
            tm = f"{r['traced']:.1f} MiB" if r["traced"] is not None else "off"
            print(
                f"{size}x{size}: {r['nuclei']} nuclei, {d['windows']} windows, {d['instances']} instances, predict {d['predict_s']:.1f} s; "
                f"image {d['image_mib']:.1f} MiB; baseline RSS {d['baseline_rss_mib']:.0f} MiB\n"
                f"    peak RSS above baseline: {d['peak_above_baseline_mib']:.0f} MiB (default glibc), "
                f"{f['peak_above_baseline_mib']:.0f} MiB (MALLOC_MMAP_THRESHOLD_=131072); tracemalloc peak {tm}; "
                f"instance masks {d['instance_masks_mib']:.1f} MiB (largest {d['largest_mask']} px)",
                flush=True,
            )
    if len(args.sizes) >= 2:
        small, big = min(args.sizes), max(args.sizes)
        a, b = rows[small], rows[big]

        def ratio(x, y):
            return f"{x:.0f} / {y:.0f} MiB = {x / max(y, 1e-9):.1f}x"

        print(f"area ratio {big}^2/{small}^2 = {(big / small) ** 2:.1f}; instances {b['default']['instances']} / {a['default']['instances']} "
              f"= {b['default']['instances'] / max(a['default']['instances'], 1):.1f}x")
        print(f"peak RSS above baseline, default glibc: {ratio(b['default']['peak_above_baseline_mib'], a['default']['peak_above_baseline_mib'])}")
        print(f"peak RSS above baseline, fixed mmap threshold: {ratio(b['fixed']['peak_above_baseline_mib'], a['fixed']['peak_above_baseline_mib'])}")
        if a["traced"] is not None:
            print(f"tracemalloc peak (numpy + Python): {b['traced']:.1f} / {a['traced']:.1f} MiB = {b['traced'] / max(a['traced'], 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
