"""Seeded synthetic H&E-like nuclei images, written in the layout of the real dataset zip.

    <out_dir>/train/<ID>/images/<ID>.png         RGB uint8
    <out_dir>/train/<ID>/masks/mask_0001.png ..  one 'L' PNG (0/255) per nucleus
    <out_dir>/test/<ID>.png                      RGB uint8, no masks
    <out_dir>/test_img_ids.json                  [{"file_name", "height", "id", "width"}, ...]

The colours come from Beer-Lambert optical density with the standard
haematoxylin/eosin stain vectors, so overlaps and rims darken the way stains do.
Everything, noise included, is drawn from one seeded generator per image.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.masks import Instance

log = logging.getLogger(__name__)

# Optical density per unit stain (RGB): Ruifrok & Johnston's haematoxylin; eosin
# given more blue absorption than theirs so the background reads pink, not magenta.
_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_EOSIN = np.array([0.05, 0.80, 0.40], dtype=np.float32)

PIXELS_PER_NUCLEUS = 900  # default density: ~70 nuclei on 256², ~1100 on 1000²
MAX_OVERLAP_FRACTION = 0.2  # of either area
OVERLAPPING_FRACTION = 0.05  # of nuclei that may share pixels with another
MIN_PIXELS = 10
SEAM_NUCLEI = 2


def _check_radius_range(radius_range: tuple[int, int]) -> tuple[int, int]:
    lo, hi = (int(v) for v in radius_range)
    if lo < 2 or hi < lo:
        raise NucleisegError(f"synthetic radius_range {tuple(radius_range)} must satisfy 2 <= min <= max")
    return lo, hi


def _sample_shape(rng: np.random.Generator, lo: int, hi: int) -> dict:
    """Random nucleus geometry; `r` is the equal-area radius."""
    # Beta(1.5, 7) puts most radii at the small end with a long tail, like real nuclei.
    r = lo + (hi - lo) * rng.beta(1.5, 7.0)
    ratio = rng.uniform(0.55, 1.0)  # minor/major axis
    # Outline wobble: harmonics of order 2, 3, 4 of the angle, weaker as the order rises.
    amps = rng.uniform(0.0, 0.07, size=3) / np.array([1.0, 2.0, 3.0])
    phases = rng.uniform(0.0, 2 * math.pi, size=3)
    a, b = r / math.sqrt(ratio), r * math.sqrt(ratio)
    reach = a * (1.0 + amps.sum())
    if reach > hi:  # cap the extent so no nucleus spans more than 2 * max radius
        a, b = a * hi / reach, b * hi / reach
    return {"a": a, "b": b, "angle": rng.uniform(0.0, math.pi), "amps": amps, "phases": phases}


def _draw_shape(shape: dict, cx: float, cy: float, height: int, width: int) -> Instance | None:
    """The shape's mask at (cx, cy), clipped to the image and cropped tight."""
    a, b = shape["a"], shape["b"]
    reach = a * (1.0 + shape["amps"].sum()) + 1.0
    x0, x1 = max(0, int(math.floor(cx - reach))), min(width, int(math.ceil(cx + reach)) + 1)
    y0, y1 = max(0, int(math.floor(cy - reach))), min(height, int(math.ceil(cy + reach)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    c, s = math.cos(shape["angle"]), math.sin(shape["angle"])
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    rho = np.sqrt(u * u + v * v)
    # cos(k*theta + phase) as Re(e^{i phase} * w^k) with w = e^{i theta}: no arctan2/cos.
    w = (u + 1j * v) / np.maximum(rho, 1e-6)
    wk = w
    limit = np.ones_like(rho)
    for amp, phase in zip(shape["amps"], shape["phases"]):  # orders 2, 3, 4
        wk = wk * w
        limit += (amp * (math.cos(phase) * wk.real - math.sin(phase) * wk.imag)).astype(np.float32)
    inst = Instance(rho <= limit, x0, y0)
    return inst.tight()


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


class _Canvas:
    """Placed nuclei and a label map of who owns each pixel (first come)."""

    def __init__(self, height: int, width: int, n_target: int):
        self.height, self.width = height, width
        self.owner = np.zeros((height, width), dtype=np.int32)
        self.instances: list[Instance] = []
        self.areas: list[int] = []
        self.overlapping = 0
        self.max_overlapping = int(round(OVERLAPPING_FRACTION * n_target))

    def overlaps(self, inst: Instance) -> tuple[np.ndarray, np.ndarray]:
        """Labels (1-based) of earlier nuclei under `inst` and the shared pixel counts."""
        under = self.owner[inst.y0 : inst.y1, inst.x0 : inst.x1][inst.mask]
        counts = np.bincount(under, minlength=1)
        counts[0] = 0
        labels = np.flatnonzero(counts)
        return labels, counts[labels]

    def add(self, inst: Instance) -> None:
        self.instances.append(inst)
        self.areas.append(inst.area)
        region = self.owner[inst.y0 : inst.y1, inst.x0 : inst.x1]
        region[inst.mask & (region == 0)] = len(self.instances)

    def try_place(self, rng: np.random.Generator, inst: Instance | None, allow_trim: bool = True) -> bool:
        """Accept `inst` as is, as a few allowed overlaps, or trimmed to touch its neighbours."""
        if inst is None or inst.area < MIN_PIXELS:
            return False
        labels, shared = self.overlaps(inst)
        if labels.size == 0:
            self.add(inst)
            return True
        area = inst.area
        others = np.array([self.areas[i - 1] for i in labels])
        light = np.all(shared <= MAX_OVERLAP_FRACTION * np.minimum(area, others))
        if light and shared.sum() >= 5 and self.overlapping + labels.size + 1 <= self.max_overlapping and rng.random() < 0.3:
            self.overlapping += labels.size + 1
            self.add(inst)
            return True
        if not allow_trim:
            return False
        # Clumped nuclei deform against each other: cut the newcomer where it meets
        # the others, which leaves them touching but not sharing pixels.
        region = self.owner[inst.y0 : inst.y1, inst.x0 : inst.x1]
        trimmed = _largest_component(inst.mask & (region == 0))
        if trimmed.sum() < max(MIN_PIXELS, (1.0 - MAX_OVERLAP_FRACTION) * area):
            return False
        cut = Instance(trimmed, inst.x0, inst.y0).tight()
        if cut is None:
            return False
        self.add(cut)
        return True


def _place_seam_nuclei(rng, canvas: _Canvas, lo: int, hi: int, seam_lines: Sequence[int]) -> None:
    h, w = canvas.height, canvas.width
    for c in seam_lines:
        for vertical, extent, along in ((True, w, h), (False, h, w)):
            if not 0 < c < extent:
                continue
            placed = tries = 0
            while placed < SEAM_NUCLEI and tries < 200:
                tries += 1
                shape = _sample_shape(rng, lo, hi)
                offset = rng.uniform(-0.3, 0.3) * shape["b"]
                pos = rng.uniform(0.1, 0.9) * along
                cx, cy = (c + offset, pos) if vertical else (pos, c + offset)
                inst = _draw_shape(shape, cx, cy, h, w)
                if inst is None or not _crosses(inst, c, vertical):
                    continue
                # No trimming: a trim could pull the mask off the line.
                if canvas.try_place(rng, inst, allow_trim=False):
                    placed += 1
            if placed < SEAM_NUCLEI:
                log.warning("only %d nuclei cross the %s line at %d", placed, "vertical" if vertical else "horizontal", c)


def _crosses(inst: Instance, c: int, vertical: bool) -> bool:
    """Whether the mask has pixels on both sides of the cut between c-1 and c."""
    if vertical:
        if not inst.x0 < c < inst.x1:
            return False
        return bool(inst.mask[:, c - 1 - inst.x0].any() and inst.mask[:, c - inst.x0].any())
    if not inst.y0 < c < inst.y1:
        return False
    return bool(inst.mask[c - 1 - inst.y0].any() and inst.mask[c - inst.y0].any())


def _smooth_field(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency noise with features about `cell` pixels wide."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    # PIL's bicubic resize is ~20x faster than ndimage.zoom here, and deterministic.
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; pixels outside count as background."""
    pad = np.pad(mask, 1)
    return pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]


def _render(rng: np.random.Generator, height: int, width: int, instances: list[Instance]) -> np.ndarray:
    eosin = 0.45 + 0.12 * _smooth_field(rng, height, width, 64)
    eosin += 0.08 * ndimage.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 2.5) * 3.0
    haem = 0.06 + 0.03 * _smooth_field(rng, height, width, 48)
    # Pale gaps (lumen, tears) where the low-frequency field is low.
    gaps = _smooth_field(rng, height, width, 40)
    eosin *= np.clip((gaps + 1.8) / 0.6, 0.15, 1.0)

    chromatin = ndimage.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 1.0) * 2.2
    for inst in instances:
        m = inst.mask
        inner = _erode(m)
        inner2 = _erode(inner)
        density = rng.uniform(0.9, 1.8)
        vesicular = rng.uniform(0.0, 0.35)
        texture = rng.uniform(0.15, 0.4)
        # Distance from the centre of mass, to pale the middle of vesicular nuclei.
        ys, xs = np.nonzero(m)
        cy, cx = ys.mean(), xs.mean()
        rr = np.hypot(np.arange(m.shape[0])[:, None] - cy, np.arange(m.shape[1])[None, :] - cx)
        rr = rr / max(rr[m].max(), 1.0)
        conc = density * (1.0 - vesicular * (1.0 - rr**2))
        region = chromatin[inst.y0 : inst.y1, inst.x0 : inst.x1]
        conc = conc * (1.0 + texture * region)
        conc = conc * np.where(inner, np.where(inner2, 1.0, 1.2), 1.4)  # darker rim
        haem[inst.y0 : inst.y1, inst.x0 : inst.x1] += np.where(m, np.maximum(conc, 0.1), 0.0).astype(np.float32)
        e = eosin[inst.y0 : inst.y1, inst.x0 : inst.x1]
        e[m] *= 0.5

    # Optics blur the stain a little; edges should not be pixel-sharp.
    haem = ndimage.gaussian_filter(haem, 0.7)
    eosin = ndimage.gaussian_filter(np.clip(eosin, 0.0, None), 0.7)
    od = haem[..., None] * _HAEMATOXYLIN + eosin[..., None] * _EOSIN
    rgb = 250.0 * np.exp(-od) + rng.normal(0.0, 3.5, size=od.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def synth_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    n_nuclei: int | None = None,
    radius_range: tuple[int, int] = (6, 40),
    seam_lines: Sequence[int] = (),
) -> tuple[np.ndarray, list[Instance]]:
    """RGB uint8 image and its nuclei as Instances (cropped masks, see masks.py).

    `n_nuclei` defaults to one per ~900 px²; it is a target, dense images may get fewer.
    Radii are equal-area radii; the longest semi-axis never exceeds radius_range[1].
    Each c in `seam_lines` gets >= 2 nuclei across x = c and across y = c, on top
    (an orientation whose side is <= c is skipped, for non-square images).
    """
    height, width = int(height), int(width)
    if height < 8 or width < 8:
        raise NucleisegError(f"synthetic image size {height}x{width} is too small (min 8x8)")
    lo, hi = _check_radius_range(radius_range)
    for c in seam_lines:
        if not 0 < int(c) < max(height, width):
            raise NucleisegError(f"seam line {c} lies outside the {height}x{width} image")
    if n_nuclei is None:
        n_nuclei = min(max(1, round(height * width / PIXELS_PER_NUCLEUS)), 5000)
    n_nuclei = int(n_nuclei)
    if n_nuclei < 0:
        raise NucleisegError(f"synthetic n_nuclei={n_nuclei} must be >= 0")

    canvas = _Canvas(height, width, n_nuclei)
    _place_seam_nuclei(rng, canvas, lo, hi, [int(c) for c in seam_lines])
    goal = len(canvas.instances) + n_nuclei
    attempts, max_attempts = 0, 20 * n_nuclei + 100
    while len(canvas.instances) < goal and attempts < max_attempts:
        attempts += 1
        shape = _sample_shape(rng, lo, hi)
        # Centres may sit slightly outside so that nuclei get cut by the border.
        margin = 0.5 * shape["b"]
        cx = rng.uniform(-margin, width + margin)
        cy = rng.uniform(-margin, height + margin)
        canvas.try_place(rng, _draw_shape(shape, cx, cy, height, width))
    if len(canvas.instances) < goal:
        log.debug("placed %d of %d nuclei in %d attempts", len(canvas.instances), goal, attempts)
    image = _render(rng, height, width, canvas.instances)
    return image, canvas.instances


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    # An explicit spawn key makes image k of a split independent of how many others there are.
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(split, index)))


def _save_png(array: np.ndarray, path: Path, mode: str) -> None:
    image = Image.fromarray(array)
    assert image.mode == mode, (image.mode, mode)
    image.save(path, format="PNG", compress_level=1)


def generate_dataset(
    out_dir: str | Path,
    *,
    n_train: int = 6,
    n_test: int = 2,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    radius_range: tuple[int, int] = (6, 40),
    seam_lines: Sequence[int] = (),
) -> Path:
    """Write the dataset; returns out_dir. Refuses (NucleisegError) a non-empty out_dir.

    `size` is one side of a square, or (height, width).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NucleisegError(f"{out} is not empty; pick a new folder or remove it before generating synthetic data")
    height, width = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if n_train < 0 or n_test < 0:
        raise NucleisegError(f"synthetic n_train={n_train}, n_test={n_test} must be >= 0")

    total = 0
    for k in range(n_train):
        image_id = f"synth-train-{k:03d}"
        image, nuclei = synth_image(
            _image_rng(seed, 0, k), height, width, radius_range=radius_range, seam_lines=seam_lines
        )
        (out / "train" / image_id / "images").mkdir(parents=True)
        (out / "train" / image_id / "masks").mkdir()
        _save_png(image, out / "train" / image_id / "images" / f"{image_id}.png", "RGB")
        full = np.zeros((height, width), dtype=np.uint8)
        for j, inst in enumerate(nuclei, start=1):
            full.fill(0)
            full[inst.y0 : inst.y1, inst.x0 : inst.x1][inst.mask] = 255
            _save_png(full, out / "train" / image_id / "masks" / f"mask_{j:04d}.png", "L")
        total += len(nuclei)

    (out / "test").mkdir(parents=True, exist_ok=True)
    ids = []
    for k in range(n_test):
        image_id = f"synth-test-{k:03d}"
        image, _ = synth_image(_image_rng(seed, 1, k), height, width, radius_range=radius_range, seam_lines=seam_lines)
        _save_png(image, out / "test" / f"{image_id}.png", "RGB")
        ids.append({"file_name": f"{image_id}.png", "height": height, "id": k + 1, "width": width})
    (out / "test_img_ids.json").write_text(json.dumps(ids, indent=2) + "\n")
    log.info("wrote %d train images (%d nuclei) and %d test images of %dx%d to %s", n_train, total, n_test, height, width, out)
    return out
