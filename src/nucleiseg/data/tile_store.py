"""The tile dataset on disk: training windows as image + instance label maps. Writes and reads it.

Layout of `data/tiles/` (what the train stage reads):

    summary.json                    counts, the data source, the tiling params
    train/index.json                one entry per window: file names, source image, origin, size, instances
    train/<image>_y<y>_x<x>.png     the window's pixels (RGB)
    train/<...>_labels.png          16-bit instance labels (0 = background, k = instance k)
    train/<...>_labels1.png, ...    further label layers, only for windows whose instances overlap

One label map per window loads in about a millisecond, where decoding one COCO RLE per
nucleus at window size cost 0.5 s per window. Instances that overlap an earlier one
(none in the real data, a few in the synthetic) go to the next layer, so nothing is
lost. Instance ids are unique across a window's layers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.io import read_json
from nucleiseg.core.masks import Instance
from nucleiseg.core.windows import crop_window, window_instances, windows
from nucleiseg.data.layout import Sample, load_train_sample, read_array, read_rgb

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class WindowEntry:
    """One window of the tile dataset, as listed in index.json."""

    image: str  # file name of the pixels, relative to the split folder
    labels: tuple[str, ...]  # label layers, relative to the split folder
    source_image: str
    origin: tuple[int, int]  # (x0, y0) in the source image
    size: int
    instances: int


def label_layers(instances: list[Instance], size: int) -> list[np.ndarray]:
    """uint16 label maps holding `instances` (window coordinates); an instance goes to the
    first layer where none of its pixels is taken, so overlapping instances stay whole."""
    if len(instances) >= np.iinfo(np.uint16).max:
        raise NucleisegError(f"a window holds {len(instances)} instances; 16-bit labels hold at most 65534: use a smaller tile.size")
    layers: list[np.ndarray] = []
    for label, inst in enumerate(instances, start=1):
        for layer in layers:
            region = layer[inst.y0 : inst.y1, inst.x0 : inst.x1]
            if not region[inst.mask].any():
                break
        else:
            layer = np.zeros((size, size), dtype=np.uint16)
            layers.append(layer)
            region = layer[inst.y0 : inst.y1, inst.x0 : inst.x1]
        region[inst.mask] = label
    return layers or [np.zeros((size, size), dtype=np.uint16)]


def write_image_windows(sample: Sample, split_dir: Path, size: int, overlap: int, min_visible: float) -> list[dict]:
    """Write the windows of one image; returns their index entries."""
    entries = []
    height, width = sample.image.shape[:2]
    for window in windows(height, width, size, overlap):
        stem = f"{sample.name}_y{window.y0:05d}_x{window.x0:05d}"
        Image.fromarray(crop_window(sample.image, window)).save(split_dir / f"{stem}.png", compress_level=1)
        instances = window_instances(sample.instances, window, min_visible)
        layers = label_layers(instances, window.size)
        names = [f"{stem}_labels{'' if k == 0 else k}.png" for k in range(len(layers))]
        for name, layer in zip(names, layers):
            Image.fromarray(layer).save(split_dir / name, compress_level=1)
        entries.append({"image": f"{stem}.png", "labels": names, "source_image": sample.name,
                        "origin": [window.x0, window.y0], "size": window.size, "instances": len(instances)})
    return entries


def _tile_one(raw_dir: Path, name: str, split_dir: Path, size: int, overlap: int, min_visible: float) -> list[dict]:
    return write_image_windows(load_train_sample(raw_dir, name), split_dir, size, overlap, min_visible)


def write_split(raw_dir: Path, names: list[str], out_dir: Path, split: str, size: int, overlap: int, min_visible: float,
                workers: int = 1) -> dict:
    """Write the windows of the training images `names` into `out_dir/split/`; returns counts.

    Images are tiled in `workers` processes (decoding ~1,000 mask PNGs per image dominates).
    """
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    args = [(Path(raw_dir), name, split_dir, size, overlap, min_visible) for name in names]
    if workers > 1 and len(names) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(names))) as pool:
            per_image = list(tqdm(pool.map(_tile_one, *zip(*args)), total=len(args), desc=f"tile {split}", unit="image", disable=None))
    else:
        per_image = [_tile_one(*a) for a in tqdm(args, desc=f"tile {split}", unit="image", disable=None)]
    entries = [entry for image_entries in per_image for entry in image_entries]
    n_instances = sum(e["instances"] for e in entries)
    n_layered = sum(len(e["labels"]) > 1 for e in entries)
    (split_dir / INDEX).write_text(json.dumps({"version": FORMAT_VERSION, "windows": entries}))
    log.info("%s: %d windows, %d instances (%d windows with overlapping instances)", split, len(entries), n_instances, n_layered)
    return {"images": len(names), "windows": len(entries), "instances": n_instances, "windows_with_overlaps": n_layered}


def read_index(tiles_dir: str | Path, split: str) -> list[WindowEntry]:
    path = Path(tiles_dir) / split / INDEX
    doc = read_json(path, missing="missing; run the tile stage first (dvc repro tile)", fix="run the tile stage again (dvc repro -f tile)")
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise NucleisegError(f"{path}: written by another version of the tile stage; run it again (dvc repro -f tile)")
    return [WindowEntry(e["image"], tuple(e["labels"]), e["source_image"], tuple(e["origin"]), int(e["size"]), int(e["instances"])) for e in doc["windows"]]


def read_window(split_dir: Path, entry: WindowEntry) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 pixels, L x H x W uint16 labels) of one window."""
    try:
        image = np.array(read_rgb(split_dir / entry.image))  # writable, as torch.from_numpy wants it (PIL's buffer is not)
        labels = np.stack([read_array(split_dir / name).astype(np.uint16, copy=False) for name in entry.labels])
    except NucleisegError as exc:  # e.g. data/tiles removed or re-tiled while the train stage reads it
        raise NucleisegError(f"{exc}; did {split_dir.parent} change after the tile stage wrote it? run it again (dvc repro -f tile)") from None
    return image, labels
