"""Read and validate the dataset layout (the homework's Drive zip, or the synthetic one).

```
train/<ID>/images/<ID>.png       RGB image
train/<ID>/masks/*.png           one mask per nucleus
test/*.png                       unannotated test images
test_img_ids.json                [{"file_name", "height", "id", "width"}, ...]
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.io import read_json
from nucleiseg.core.masks import Instance, from_full_mask

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

# Images are refused above this size, read from the file's header before anything is decoded:
# a PNG of zeros 30000 px on a side is 875 KB on disk and 2.7 GB decoded. The homework's images
# are 1 Mpx; whole-slide images need the limit raised (`nucleiseg predict --max-megapixels`, or
# this environment variable for the stages).
MAX_MEGAPIXELS_ENV = "NUCLEISEG_MAX_MEGAPIXELS"
DEFAULT_MAX_MEGAPIXELS = 64.0
# PIL's own bomb check warns above 89 Mpx and raises (a traceback) above 179 Mpx, before the
# size can be read; the check above replaces it, with the limit the user set.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class Sample:
    name: str
    image: np.ndarray  # H x W x 3 uint8
    instances: list[Instance]


@dataclass
class TestImage:
    id: int
    file_name: str
    path: Path
    height: int
    width: int

    @property
    def name(self) -> str:
        return Path(self.file_name).stem


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # 16-bit (or wider) integers: scale the dtype's range down to 8 bits.
    top = np.iinfo(array.dtype).max if array.max(initial=0) > 255 else 255
    return np.clip(array.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def megapixel_limit(value: float | None = None) -> float:
    """The image size limit: `value` when given, else $NUCLEISEG_MAX_MEGAPIXELS, else the default."""
    if value is None:
        text = os.environ.get(MAX_MEGAPIXELS_ENV)
        if not text:
            return DEFAULT_MAX_MEGAPIXELS
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value > 0:
            raise NucleisegError(f"{MAX_MEGAPIXELS_ENV}={text[:40]!r}: not a number of megapixels > 0 (inf: no limit); "
                                 f"e.g. {MAX_MEGAPIXELS_ENV}=400")
    return value


def _check_size(path: Path, width: int, height: int, frames: int, limit: float) -> None:
    megapixels = width * height * frames / 1e6
    if megapixels > limit:
        pages = f" x {frames} pages" if frames > 1 else ""
        raise NucleisegError(f"{path}: {width} x {height} pixels{pages} ({megapixels:.3g} Mpx), more than the limit of {limit:g} Mpx; "
                             f"for a whole-slide image raise it (nucleiseg predict --max-megapixels N, or {MAX_MEGAPIXELS_ENV}=N "
                             "for the pipeline's stages)")


# EXIF/TIFF orientation (tag 274) -> how to turn the stored rows and columns upright (as PIL's exif_transpose).
_ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
ORIENTATION_TAG = 274


def upright(array: np.ndarray, orientation) -> np.ndarray:
    """An H x W (x C) array as its orientation tag says it is to be shown (a tag that is no orientation: as stored)."""
    turn = _ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
    return np.ascontiguousarray(turn(array)) if turn else array


def _read_tiff(path: Path, limit: float) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        sizes = dict(zip(series.axes, series.shape))
        height, width = sizes.get("Y", 1), sizes.get("X", 1)
        # Everything that is not a colour channel multiplies the decoded size (pages, planes, ...).
        frames = math.prod(n for axis, n in sizes.items() if axis not in "YXSC")
        _check_size(path, width, height, frames, limit)
        array = np.asarray(series.asarray())
        orientation = tif.pages[0].tags.get(ORIENTATION_TAG)
    if orientation is None or series.axes not in ("YX", "YXS"):
        return array
    return upright(array, orientation.value)


def read_array(path: Path, max_megapixels: float | None = None) -> np.ndarray:
    """The pixels of a PNG/TIFF/JPEG as stored (any dtype), upright; images over `max_megapixels`
    (default: `megapixel_limit()`) are refused from their header, before decoding."""
    limit = megapixel_limit(max_megapixels)
    if not path.is_file():
        raise NucleisegError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _read_tiff(path, limit)
        with Image.open(path) as img:
            _check_size(path, *img.size, 1, limit)
            img.load()
            orientation = img.getexif().get(ORIENTATION_TAG)
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            return upright(np.asarray(img), orientation)
    except NucleisegError:
        raise
    except FileNotFoundError:
        raise NucleisegError(f"{path}: removed while it was being read; restore it and run again") from None
    except Exception as exc:  # a damaged or crafted file: PIL and tifffile raise all kinds (OSError, struct.error, IndexError, ...)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise NucleisegError(f"{path}: unreadable or truncated image ({detail}); replace the file") from None


def read_rgb(path: str | Path, max_megapixels: float | None = None) -> np.ndarray:
    """Any PNG/TIFF/JPEG (RGB, RGBA, gray, 16-bit) as H x W x 3 uint8, upright (EXIF orientation);
    size-limited as `read_array`."""
    path = Path(path)
    array = read_array(path, max_megapixels)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # channel-first TIFF
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 2:  # gray + alpha
        array = np.repeat(array[..., :1], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] >= 4:
        array = array[..., :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise NucleisegError(f"{path}: unsupported image shape {array.shape}; expected H x W, H x W x 3 or H x W x 4")
    return np.ascontiguousarray(_to_uint8(array))


def read_mask(path: str | Path) -> np.ndarray:
    """A binary mask: 0/255, 0/1 or anti-aliased (thresholded at half the range); as read_rgb, upright and size-limited."""
    path = Path(path)
    array = read_array(path)
    if array.ndim == 3:
        array = array[..., 0]
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return array >= 0.5 * (1.0 if array.max(initial=0) <= 1.0 else 255.0)
    top = array.max(initial=0)
    if top <= 1:
        return array > 0
    # Like _to_uint8: wide integers holding values <= 255 are 8-bit masks (a 16-bit 0/255 mask is not empty).
    full = np.iinfo(array.dtype).max if top > 255 else 255
    return array >= full / 2


def train_ids(raw_dir: str | Path) -> list[str]:
    train_dir = Path(raw_dir) / "train"
    if not train_dir.is_dir():
        raise NucleisegError(f"{train_dir}: missing; the dataset needs train/<ID>/images and train/<ID>/masks (run the download stage)")
    ids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not ids:
        raise NucleisegError(f"{train_dir}: no image folders in it")
    return ids


def train_image_path(raw_dir: str | Path, name: str) -> Path:
    """train/<ID>/images/<ID>.<png|tif|tiff|jpg|jpeg>."""
    images_dir = Path(raw_dir) / "train" / name / "images"
    if not images_dir.is_dir():
        raise NucleisegError(f"{images_dir}: missing 'images/' folder; each train/<ID>/ needs images/<ID>.png")
    candidates = [images_dir / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES]
    image_path = next((p for p in candidates if p.is_file()), None)
    if image_path is None:
        raise NucleisegError(f"{images_dir / (name + '.png')}: image not found; put the image there")
    return image_path


def _mask_paths(raw_dir: str | Path, name: str) -> list[Path]:
    masks_dir = Path(raw_dir) / "train" / name / "masks"
    return sorted(p for p in masks_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if masks_dir.is_dir() else []


def _check_mask_size(path: Path, mask: np.ndarray, image: np.ndarray) -> None:
    if mask.shape != image.shape[:2]:
        raise NucleisegError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}; masks must match their image size"
        )


def load_train_sample(raw_dir: str | Path, name: str, workers: int = 4) -> Sample:
    """One training image and its nuclei; empty masks are skipped with a warning."""
    image = read_rgb(train_image_path(raw_dir, name))
    masks_dir = Path(raw_dir) / "train" / name / "masks"
    mask_paths = _mask_paths(raw_dir, name)
    # Decoding ~1,000 PNGs per image is zlib-bound and releases the GIL: threads help.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        masks = list(pool.map(read_mask, mask_paths))
    instances, empty = [], 0
    for path, mask in zip(mask_paths, masks):
        _check_mask_size(path, mask, image)
        inst = from_full_mask(mask)
        if inst is None:
            empty += 1
        else:
            inst.extra["file"] = path.name
            instances.append(inst)
    if empty:
        log.warning("%s: skipped %d empty mask(s)", masks_dir, empty)
    return Sample(name, image, instances)


def load_test_index(raw_dir: str | Path) -> list[TestImage]:
    """The test images with their ids; every test file must be listed exactly once."""
    raw_dir = Path(raw_dir)
    ids_path = raw_dir / "test_img_ids.json"
    entries = read_json(ids_path, missing="missing; it maps each test file to its image id")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"file_name", "id"} <= set(e) for e in entries):
        raise NucleisegError(f"{ids_path}: expected a list of {{'file_name', 'id', 'height', 'width'}} objects")
    seen_ids, seen_files, out = set(), set(), []
    for entry in entries:
        if entry["id"] in seen_ids:
            raise NucleisegError(f"{ids_path}: image id {entry['id']} is listed twice; give each test image its own id")
        if entry["file_name"] in seen_files:
            raise NucleisegError(f"{ids_path}: file {entry['file_name']} is listed twice")
        seen_ids.add(entry["id"])
        seen_files.add(entry["file_name"])
        path = raw_dir / "test" / entry["file_name"]
        if not path.is_file():
            raise NucleisegError(f"{path}: listed in {ids_path.name} but missing from test/")
        out.append(TestImage(int(entry["id"]), entry["file_name"], path, int(entry.get("height", 0)), int(entry.get("width", 0))))
    test_dir = raw_dir / "test"
    if test_dir.is_dir():
        for path in sorted(test_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.name not in seen_files:
                raise NucleisegError(f"{path}: test image missing from {ids_path}; add an entry with its id")
    return out


def checked_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, checked to its last byte: a PNG's chunks are all read with their
    CRCs (a truncated or damaged file fails) without inflating the pixels, ~100x faster than decoding;
    other formats are decoded."""
    if path.suffix.lower() != ".png":
        return read_array(path).shape[:2]
    if not path.is_file():
        raise NucleisegError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
            _check_size(path, width, height, 1, megapixel_limit())
            img.verify()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise NucleisegError(f"{path}: unreadable or truncated image ({exc}); replace the file") from None
    return height, width


def check_train_sample(raw_dir: str | Path, name: str, workers: int = 4, decode: bool = True) -> None:
    """What load_train_sample would refuse, without keeping the masks: the image decodes, every mask is
    readable (decoded, or with decode=False checked by `checked_size`) and has its image's size.
    NucleisegError names the first bad file."""
    image = read_rgb(train_image_path(raw_dir, name))

    def check(path: Path) -> None:
        if decode:
            _check_mask_size(path, read_mask(path), image)
        else:
            _check_mask_size(path, np.empty(checked_size(path), dtype=bool), image)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(check, _mask_paths(raw_dir, name)):
            pass


def check_test_images(raw_dir: str | Path) -> int:
    """Every test image is listed once in test_img_ids.json, decodes, and has the size listed there; returns the count."""
    entries = load_test_index(raw_dir)
    for entry in entries:
        height, width = read_rgb(entry.path).shape[:2]
        if (entry.height and entry.height != height) or (entry.width and entry.width != width):
            raise NucleisegError(f"{entry.path}: image is {width}x{height} but test_img_ids.json lists {entry.width}x{entry.height}; "
                                 "fix the entry or replace the image")
    return len(entries)


def check_dataset(raw_dir: str | Path, names: list[str] | None = None, workers: int = 4, decode: bool = True) -> int:
    """Check the training images `names` (all when None) with their masks (`check_train_sample`), and
    the test images: bad data is refused before any output, not when a later stage first reads the file.
    Returns the number of test images. Decoding the real data's 14,598 masks takes ~40 s on 2 busy
    cores, checking them with decode=False under 1 s."""
    for name in train_ids(raw_dir) if names is None else names:
        check_train_sample(raw_dir, name, workers, decode)
    return check_test_images(raw_dir)


def val_image_ids(names: list[str]) -> dict[str, int]:
    """Image ids of the val images in predictions/val.json and in the val ground truth."""
    return {name: i for i, name in enumerate(names, start=1)}


def fold_count(n_images: int, val_images: int) -> int:
    return n_images // val_images


def split_ids(ids: list[str], val_images: int, seed: int, fold: int | str = 0) -> dict[str, list[str]]:
    """Hold out fold `fold`'s `val_images` whole images; they never reach training.

    The images are shuffled once with `seed`; fold k holds out the k-th block of `val_images`
    of that order, so the n // val_images folds hold out disjoint sets (fold 0 is the first block,
    the split this function made before folds existed). When val_images does not divide n, the
    last n % val_images images of the order are never held out. fold 'all' holds out nothing.
    """
    if fold == "all":
        return {"train": sorted(ids), "val": []}
    if not 1 <= val_images < len(ids):
        raise NucleisegError(f"params.yaml: data.val_images={val_images} must be between 1 and {len(ids) - 1} (there are {len(ids)} training images)")
    folds = fold_count(len(ids), val_images)
    if not 0 <= fold < folds:
        raise NucleisegError(
            f"params.yaml: data.fold = {fold} is out of range: {len(ids)} training images with data.val_images = {val_images} "
            f"make {folds} fold(s), 0 to {folds - 1}; set data.fold to one of them (or 'all' for the final model)"
        )
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    val = sorted(shuffled[fold * val_images : (fold + 1) * val_images])
    return {"train": sorted(set(ids) - set(val)), "val": val}


def source_record(raw_dir: str | Path) -> dict:
    """What the download stage recorded about the data in `raw_dir` (SOURCE.json): its source label
    and, for zips, their sha256; {'source': 'unknown'} for a folder made some other way."""
    path = Path(raw_dir) / "SOURCE.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"source": "unknown"}
    return record if isinstance(record, dict) and "source" in record else {"source": "unknown"}
