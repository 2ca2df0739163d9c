"""Training samples from the tile dataset: augmentation on the label map, targets built last.

A sample is one window (pixels + instance label layers, see `tiles`). The geometric
augmentation (scale jitter, random crop, flips, 90-degree turns) is applied to the
label map, not to one full-size mask per nucleus: the crop is chosen first and
only its pixels are resampled (nearest neighbour for labels, the same source pixel
torchvision's nearest resize of the whole window would pick). Boxes come from the
transformed labels; the per-instance masks Mask R-CNN wants are expanded from the
label map by `expand_masks`, on the training device, after the batch left the
loader. Colour: an optional stain jitter in HED space (`stain_jitter`, H&E colour varies
between labs and scanners), then brightness/contrast/saturation/hue jitter.

Copy-paste (Ghiasi et al. 2021, "Simple Copy-Paste"), off unless `copy_paste` > 0: a window
may get whole nuclei of another training window pasted onto it after its geometric
augmentation and before its colour one, so pasted and own nuclei are coloured alike. Each
pasted nucleus has its own scale, flips and quarter turns (the window's settings) and a
random place on the window's content (never on padding); it is pasted hard (its pixels
replace what is under its mask, as in the paper), takes the pixels it covers from the masks
under it, and an instance left with less than PASTE_MIN_VISIBLE of its area is dropped.

Randomness comes from a generator seeded with (seed, epoch, index): the same
sample gets the same augmentation whatever the worker count, and a resumed run
replays exactly the epochs it missed. The sampler hands each index together with
its epoch, so persistent loader workers need no state from the main process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms.v2 import functional as TF

from nucleiseg.core.config import AugmentConfig
from nucleiseg.core.windows import PAD_VALUE
from nucleiseg.data.tile_store import read_index, read_window

MIN_MASK_PIXELS = 4  # crops can leave slivers of a nucleus: too small to learn from
# An instance partly covered by pasted nuclei is kept while this share of it shows: the rule (and the default
# tile.min_visible) the tile stage applies to nuclei cut by a window's edge. Fixed, so the train stage reads no tile key.
PASTE_MIN_VISIBLE = 0.3


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation for a window of `size` px."""

    scaled: int  # side of the window after scale jitter
    top: int  # crop origin in the scaled window (may be negative: padding)
    left: int
    crop: int  # side of the output
    hflip: bool
    vflip: bool
    rot90: int  # counter-clockwise quarter turns
    jitter: tuple[tuple[str, float], ...]  # (adjustment, factor) in the order applied
    stain: tuple[tuple[float, float], ...] = ()  # (factor, shift) of the H, E and D densities; () = off


def draw_scale(rng: np.random.Generator, cfg: AugmentConfig) -> float:
    lo, hi = cfg.scale
    if cfg.scale_sampling == "log_uniform":  # as likely to zoom out by x as in by x
        return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * rng.random())
    return lo + (hi - lo) * rng.random()


def draw_params(rng: np.random.Generator, size: int, cfg: AugmentConfig) -> AugmentParams:
    scaled = max(1, round(size * draw_scale(rng, cfg)))
    crop = int(cfg.crop) or scaled
    # A crop larger than the scaled window is padded around it (PAD_VALUE, no labels).
    top = int(rng.integers(0, scaled - crop + 1)) if scaled >= crop else -int(rng.integers(0, crop - scaled + 1))
    left = int(rng.integers(0, scaled - crop + 1)) if scaled >= crop else -int(rng.integers(0, crop - scaled + 1))
    hflip = bool(cfg.flip and rng.random() < 0.5)
    vflip = bool(cfg.flip and rng.random() < 0.5)
    rot90 = int(rng.integers(0, 4)) if cfg.rot90 else 0
    jitter: tuple = ()
    if cfg.color_jitter:
        j = float(cfg.color_jitter)
        factors = {
            "brightness": 1 + rng.uniform(-j, j),
            "contrast": 1 + rng.uniform(-j, j),
            "saturation": 1 + rng.uniform(-j, j),
            "hue": rng.uniform(-j / 4, j / 4),
        }
        order = rng.permutation(len(factors))
        names = list(factors)
        jitter = tuple((names[i], float(factors[names[i]])) for i in order)
    stain: tuple = ()
    if cfg.stain:  # drawn last: the other draws stay what they were without it
        s = float(cfg.stain)
        stain = tuple((float(f), float(b)) for f, b in zip(rng.uniform(1 - s, 1 + s, 3), rng.uniform(-s, s, 3)))
    return AugmentParams(scaled, top, left, crop, hflip, vflip, rot90, jitter, stain)


def nearest_source(start: int, count: int, scaled: int, size: int) -> np.ndarray:
    """Source index of each output pixel start..start+count-1 of a nearest resize size -> scaled;
    -1 where the output lies outside the scaled window (padding)."""
    out = np.arange(start, start + count)
    src = np.floor(out * (size / scaled)).astype(np.int64)
    src = np.minimum(src, size - 1)
    src[(out < 0) | (out >= scaled)] = -1
    return src


def _resize_crop_image(image: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """3 x crop x crop uint8: the window resized to p.scaled (bilinear, antialiased), cropped, padded."""
    if p.scaled != image.shape[-1]:
        image = TF.resize(image, [p.scaled, p.scaled], antialias=True)
    out = torch.full((3, p.crop, p.crop), PAD_VALUE, dtype=torch.uint8)
    y0, x0 = max(p.top, 0), max(p.left, 0)
    y1, x1 = min(p.top + p.crop, p.scaled), min(p.left + p.crop, p.scaled)
    out[:, y0 - p.top : y1 - p.top, x0 - p.left : x1 - p.left] = image[:, y0:y1, x0:x1]
    return out


def _resize_crop_labels(labels: np.ndarray, p: AugmentParams) -> np.ndarray:
    """L x crop x crop: only the cropped pixels are looked up (nearest neighbour)."""
    size = labels.shape[-1]
    rows = nearest_source(p.top, p.crop, p.scaled, size)
    cols = nearest_source(p.left, p.crop, p.scaled, size)
    out = labels[:, np.maximum(rows, 0)][:, :, np.maximum(cols, 0)]
    if (rows < 0).any() or (cols < 0).any():
        out[:, rows < 0] = 0
        out[:, :, cols < 0] = 0
    return out


def orient(array: np.ndarray, hflip: bool, vflip: bool, rot90: int) -> np.ndarray:
    """Flips then `rot90` counter-clockwise quarter turns on the last two axes."""
    if hflip:
        array = array[..., ::-1]
    if vflip:
        array = array[..., ::-1, :]
    if rot90:
        array = np.rot90(array, rot90, axes=(-2, -1))
    return np.ascontiguousarray(array)


def _orient(array: np.ndarray, p: AugmentParams) -> np.ndarray:
    return orient(array, p.hflip, p.vflip, p.rot90)


HED_FROM_RGB = np.asarray(hed_from_rgb, np.float32)
RGB_FROM_HED = np.asarray(rgb_from_hed, np.float32)


def stain_jitter(pixels: np.ndarray, stain: tuple[tuple[float, float], ...]) -> np.ndarray:
    """3 x H x W uint8 with each stain's optical density (natural log) scaled and shifted: d' = d * factor + shift.

    The colour deconvolution is skimage's H&E-DAB one (Ruifrok & Johnston), through its matrices rather than
    rgb2hed/hed2rgb: rgb2hed clips negative densities, so even factor 1, shift 0 would change pixels (by up
    to 26 levels on the synthetic images); this way the identity is exact.
    """
    density = -np.log(np.maximum(pixels.astype(np.float32) / 255.0, 1e-6))
    stains = np.einsum("chw,cd->dhw", density, HED_FROM_RGB)
    factors, shifts = np.asarray(stain, np.float32).T
    stains = stains * factors[:, None, None] + shifts[:, None, None]
    rgb = np.exp(-np.einsum("dhw,dc->chw", stains, RGB_FROM_HED))
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def padding(p: AugmentParams, size: int) -> np.ndarray:
    """crop x crop bool, True where the output is padding (outside the scaled window), oriented like the pixels."""
    rows = nearest_source(p.top, p.crop, p.scaled, size) < 0
    cols = nearest_source(p.left, p.crop, p.scaled, size) < 0
    return _orient((rows[:, None] | cols[None, :])[None], p)[0]


_ADJUST = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}


@dataclass(frozen=True)
class PastedNucleus:
    """A whole nucleus cut from another window, after its own scale, flips and turns, and where it goes."""

    pixels: np.ndarray  # 3 x h x w uint8; only those under `mask` are pasted
    mask: np.ndarray  # h x w bool
    top: int  # origin in the augmented window (crop x crop)
    left: int


def whole_nuclei(labels: np.ndarray) -> list[tuple[int, int, tuple[slice, slice]]]:
    """(layer, label, box) of the instances in L x H x W label layers that do not touch the window's edge:
    one the edge cuts would be pasted with a straight side."""
    height, width = labels.shape[-2:]
    found = []
    for index, layer in enumerate(labels):
        for label, box in enumerate(ndimage.find_objects(layer), start=1):
            if box is not None and box[0].start > 0 and box[1].start > 0 and box[0].stop < height and box[1].stop < width:
                found.append((index, label, box))
    return found


def content_box(p: AugmentParams, size: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), exclusive end: the part of the augmented window that shows the window, not padding."""
    shown = ~padding(p, size)
    rows, cols = np.flatnonzero(shown.any(axis=1)), np.flatnonzero(shown.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _scale_patch(pixels: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A nucleus' pixels (bilinear, antialiased) and mask (nearest) resized by `factor`, as the window's are."""
    height, width = mask.shape
    out_height, out_width = max(1, round(height * factor)), max(1, round(width * factor))
    if (out_height, out_width) == (height, width):
        return pixels, mask
    pixels = TF.resize(torch.from_numpy(np.ascontiguousarray(pixels)), [out_height, out_width], antialias=True).numpy()
    rows = nearest_source(0, out_height, out_height, height)
    cols = nearest_source(0, out_width, out_width, width)
    return pixels, mask[rows][:, cols]


def draw_pastes(rng: np.random.Generator, source_image: np.ndarray, source_labels: np.ndarray, p: AugmentParams, size: int,
                cfg: AugmentConfig) -> list[PastedNucleus]:
    """1 to `cfg.copy_paste_max` whole nuclei of a source window (H x W x 3 pixels, L x H x W labels), for a window of
    `size` px augmented by `p`: each with its own scale (drawn like the window's), flips and quarter turns (when
    `cfg` has them on), at a random place inside the augmented window's content. One that does not fit is skipped."""
    candidates = whole_nuclei(source_labels)
    if not candidates:
        return []
    count = min(int(rng.integers(1, cfg.copy_paste_max + 1)), len(candidates))
    top, left, bottom, right = content_box(p, size)
    pastes = []
    for k in rng.choice(len(candidates), count, replace=False):
        layer, label, box = candidates[k]
        pixels, mask = _scale_patch(source_image[box].transpose(2, 0, 1), source_labels[layer][box] == label, draw_scale(rng, cfg))
        hflip = bool(cfg.flip and rng.random() < 0.5)
        vflip = bool(cfg.flip and rng.random() < 0.5)
        turns = int(rng.integers(0, 4)) if cfg.rot90 else 0
        pixels, mask = orient(pixels, hflip, vflip, turns), orient(mask, hflip, vflip, turns)
        height, width = mask.shape
        if height > bottom - top or width > right - left:
            continue
        at_top, at_left = int(rng.integers(top, bottom - height + 1)), int(rng.integers(left, right - width + 1))
        pastes.append(PastedNucleus(pixels, mask, at_top, at_left))
    return pastes


def paste_nuclei(pixels: np.ndarray, labels: np.ndarray, pastes: Sequence[PastedNucleus]) -> tuple[np.ndarray, np.ndarray]:
    """3 x H x W uint8 pixels (changed in place) and L x H x W labels with `pastes` pasted in order, each on top.

    Every label layer loses the pixels a pasted nucleus covers; an instance (the window's, or pasted earlier) left
    with less than PASTE_MIN_VISIBLE of its area is dropped. Pasted nuclei take the labels after the window's
    largest, in layer 0 (free under them once covered). Returns int32 labels.
    """
    labels = labels.astype(np.int32)
    first = int(labels.max()) + 1
    areas = np.bincount(labels.ravel(), minlength=first + len(pastes))
    for k, paste in enumerate(pastes):
        rows = slice(paste.top, paste.top + paste.mask.shape[0])
        cols = slice(paste.left, paste.left + paste.mask.shape[1])
        pixels[:, rows, cols][:, paste.mask] = paste.pixels[:, paste.mask]
        labels[:, rows, cols][:, paste.mask] = 0
        labels[0, rows, cols][paste.mask] = first + k
        areas[first + k] = paste.mask.sum()
    hidden = np.bincount(labels.ravel(), minlength=len(areas)) < PASTE_MIN_VISIBLE * areas
    hidden[0] = False
    if hidden.any():
        labels[hidden[labels]] = 0
    return pixels, labels


def augment(image: np.ndarray, labels: np.ndarray, p: AugmentParams,
            pastes: Sequence[PastedNucleus] = ()) -> tuple[torch.Tensor, np.ndarray]:
    """(3 x crop x crop uint8 tensor, L x crop x crop labels) for one draw; `pastes` go in between the
    geometric and the colour augmentation."""
    pixels = _resize_crop_image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), p)
    oriented = _orient(pixels.numpy(), p)
    labels = _orient(_resize_crop_labels(labels, p), p)
    if pastes:
        oriented, labels = paste_nuclei(oriented, labels, pastes)
    if p.stain:
        oriented = stain_jitter(oriented, p.stain)
        oriented[:, padding(p, image.shape[0])] = PAD_VALUE  # padding stays what inference pads with
    pixels = torch.from_numpy(oriented)
    for name, factor in p.jitter:
        pixels = _ADJUST[name](pixels, factor)
    return pixels, labels


def label_targets(labels: np.ndarray) -> dict[str, torch.Tensor]:
    """Boxes (x0, y0, x1, y1, exclusive end) and ids of the instances in L x H x W label layers;
    instances under MIN_MASK_PIXELS pixels are dropped. Masks are expanded later (`expand_masks`)."""
    ids, layers, boxes = [], [], []
    for index, layer in enumerate(labels):
        counts = np.bincount(layer.ravel())
        for label, box in enumerate(ndimage.find_objects(layer), start=1):
            if box is None or counts[label] < MIN_MASK_PIXELS:
                continue
            ids.append(label)
            layers.append(index)
            boxes.append((box[1].start, box[0].start, box[1].stop, box[0].stop))
    order = np.argsort(ids, kind="stable")  # instance order = label order, whatever layer holds it
    ids, layers, boxes = [ids[i] for i in order], [layers[i] for i in order], [boxes[i] for i in order]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(ids), dtype=torch.int64),
        "instance_ids": torch.tensor(ids, dtype=torch.int32),
        "instance_layers": torch.tensor(layers, dtype=torch.int64),
        "label_map": torch.from_numpy(labels.astype(np.int32)),
    }


def expand_masks(target: dict) -> dict:
    """The target Mask R-CNN takes: N x H x W uint8 masks from the label map, on its device."""
    out = {k: v for k, v in target.items() if k not in ("label_map", "instance_ids", "instance_layers")}
    label_map, ids, layers = target["label_map"], target["instance_ids"], target["instance_layers"]
    if label_map.shape[0] == 1:
        out["masks"] = (label_map[0][None] == ids[:, None, None]).to(torch.uint8)
    else:
        out["masks"] = (label_map[layers] == ids[:, None, None]).to(torch.uint8)
    return out


class TileDataset(torch.utils.data.Dataset):
    """The training windows (`<tiles_dir>/<split>/`): float image [0, 1] and a label-map target.

    Indexed by (epoch, index) pairs from `EpochBatches` (an int index means epoch 0). With copy-paste on, the
    nuclei come from another window of the same split, chosen and cut with the sample's own generator: the
    sample still depends on (seed, epoch, index) and the tile store alone, in any loader worker.
    """

    def __init__(self, tiles_dir: str | Path, split: str = "train", augment: AugmentConfig | None = None, seed: int = 0):
        self.split_dir = Path(tiles_dir) / split
        self.entries = read_index(tiles_dir, split)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.entries)

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        entry = self.entries[index]
        image, labels = read_window(self.split_dir, entry)
        if self.augment is not None:
            rng = self.rng(epoch, index)
            p = draw_params(rng, entry.size, self.augment)
            # Drawn after the window's own augmentation, which stays what it was without copy-paste.
            pastes = self.pastes(rng, index, p) if self.augment.copy_paste else []
            pixels, labels = augment(image, labels, p, pastes)
        else:
            pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        target = label_targets(labels)
        target["window"] = index
        return pixels.float().div_(255.0), target

    def pastes(self, rng: np.random.Generator, index: int, p: AugmentParams) -> list[PastedNucleus]:
        """With probability `copy_paste`, nuclei of another window that holds some, to paste into window `index`."""
        if rng.random() >= self.augment.copy_paste:
            return []
        sources = [i for i, entry in enumerate(self.entries) if entry.instances and i != index]
        if not sources:
            return []
        source_image, source_labels = read_window(self.split_dir, self.entries[sources[int(rng.integers(len(sources)))]])
        return draw_pastes(rng, source_image, source_labels, p, self.entries[index].size, self.augment)


class EpochSampler:
    """Window indices of one epoch: a seeded permutation per epoch, this rank's share of it.

    `samples_per_epoch` draws that many per epoch (cycling through permutations);
    otherwise every window once, padded to divide evenly between ranks (like
    DistributedSampler).
    """

    def __init__(self, n: int, seed: int, samples_per_epoch: int | None = None, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        total = samples_per_epoch or n
        self.per_rank = math.ceil(total / world_size)

    def __len__(self) -> int:
        return self.per_rank

    def indices(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        needed = self.per_rank * self.world_size
        order = np.concatenate([rng.permutation(self.n) for _ in range(math.ceil(needed / self.n))])[:needed]
        return [int(i) for i in order[self.rank :: self.world_size]]


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (epoch, index) for epochs first..last, epoch after epoch, for one long-lived
    loader iterator: prefetching runs on across epoch ends and validation pauses, where a
    fresh iterator per epoch would make the first steps of each epoch wait."""

    def __init__(self, sampler: EpochSampler, batch_size: int, first: int, last: int):
        self.sampler, self.batch_size, self.first, self.last = sampler, batch_size, first, last

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __len__(self) -> int:
        return self.per_epoch * max(self.last - self.first + 1, 0)

    def __iter__(self):
        for epoch in range(self.first, self.last + 1):
            keys = [(epoch, index) for index in self.sampler.indices(epoch)]
            for start in range(0, len(keys), self.batch_size):
                yield keys[start : start + self.batch_size]


def collate(batch):
    return tuple(zip(*batch))
