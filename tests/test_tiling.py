"""Windows cover everything and overlap, cores partition the image, instances are clipped right, RLE matches
pycocotools, and the tile dataset (tiles.write_split) holds every window's pixels and instances."""

import json

import numpy as np
import pytest
from label_maps import window_instances_from_labels
from PIL import Image
from pycocotools import mask as mask_utils

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.masks import Instance, from_full_mask, from_rle, to_rle
from nucleiseg.core.windows import (
    PAD_VALUE,
    Window,
    crop_window,
    window_instances,
    window_starts,
    windows,
)
from nucleiseg.data import tile_store as tiles
from nucleiseg.data.layout import load_train_sample, train_ids
from nucleiseg.data.synthetic import generate_dataset

COMBOS = [
    (64, 64, 16),  # length == size
    (50, 64, 16),  # length < size
    (65, 64, 16),  # length == size + 1
    (100, 32, 8),
    (128, 64, 24),
    (129, 64, 24),
    (1000, 512, 128),
    (1024, 512, 128),
    (7, 3, 1),
    (10, 3, 2),
    (1, 4, 0),
    (33, 8, 0),
    (200, 128, 48),
]


@pytest.mark.parametrize("length, size, overlap", COMBOS)
def test_window_starts(length, size, overlap):
    starts = window_starts(length, size, overlap)
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + size] = True
    assert covered.all()
    if length <= size:
        assert starts == [0]
    else:
        assert starts[-1] == length - size  # flush with the edge, shifted inward
        assert all(0 <= s and s + size <= length for s in starts)  # never past the image
        for a, b in zip(starts, starts[1:]):
            assert a + size - b >= overlap  # consecutive windows share >= overlap pixels
            assert b - a <= size - overlap  # and step at most one stride


@pytest.mark.parametrize("height, width, size, overlap", [(64, 64, 64, 16), (50, 130, 64, 16), (65, 200, 64, 24), (37, 41, 16, 5)])
def test_windows_cover_every_pixel(height, width, size, overlap):
    wins = windows(height, width, size, overlap)
    assert len(wins) == len(window_starts(height, size, overlap)) * len(window_starts(width, size, overlap))
    counts = np.zeros((height, width), int)
    for w in wins:
        assert isinstance(w, Window) and w.size == size
        assert w.x1 == w.x0 + size and w.y1 == w.y0 + size
        counts[w.y0 : w.y1, w.x0 : w.x1] += 1
        if height >= size:
            assert w.y1 <= height
        if width >= size:
            assert w.x1 <= width
    assert (counts >= 1).all()


@pytest.mark.parametrize("size, overlap", [(64, 64), (64, 65), (64, -1), (0, 0), (-8, 0)])
def test_invalid_windows(size, overlap):
    with pytest.raises(NucleisegError, match="overlap"):
        window_starts(100, size, overlap)
    with pytest.raises(NucleisegError):
        windows(100, 100, size, overlap)


def test_crop_window_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, size=(30, 45, 3), dtype=np.uint8)
    (win,) = windows(30, 45, 64, 16)
    crop = crop_window(image, win)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop[:30, :45], image)
    assert (crop[30:] == PAD_VALUE).all() and (crop[:, 45:] == PAD_VALUE).all()
    # 2-D arrays too, and an image that needs padding on one axis only.
    gray = rng.integers(0, 200, size=(30, 100), dtype=np.uint8)
    wins = windows(30, 100, 64, 16)
    assert all(w.y0 == 0 for w in wins) and wins[-1].x1 == 100
    for w in wins:
        crop = crop_window(gray, w)
        assert crop.shape == (64, 64)
        np.testing.assert_array_equal(crop[:30], gray[:, w.x0 : w.x1])
        assert (crop[30:] == PAD_VALUE).all()


def test_crop_window_inside_is_a_plain_crop():
    image = np.arange(100 * 120, dtype=np.int32).reshape(100, 120)
    for w in windows(100, 120, 64, 16):
        np.testing.assert_array_equal(crop_window(image, w), image[w.y0 : w.y0 + 64, w.x0 : w.x0 + 64])


# ---------------------------------------------------------------- window_instances


def _box(x0, y0, w, h) -> Instance:
    return Instance(np.ones((h, w), bool), x0, y0)


def test_window_instances_whole_and_relative():
    blob = np.zeros((5, 6), bool)
    blob[1:5, 0:6] = True
    blob[0, 2] = True
    inside = Instance(blob, 40, 30)
    win = Window(32, 16, 32, (0, 0, 0, 0))
    (kept,) = window_instances([inside], win, min_visible=0.3)
    assert (kept.x0, kept.y0) == (8, 14)  # window-relative
    np.testing.assert_array_equal(kept.mask, blob)
    assert kept.area == inside.area


def test_window_instances_partial():
    cut = _box(60, 5, 10, 10)  # columns 60..69; window [0, 62) keeps 2 of 10 columns = 20%
    win = Window(0, 0, 62, (0, 0, 0, 0))
    assert window_instances([cut], win, min_visible=0.3) == []
    (kept,) = window_instances([cut], win, min_visible=0.1)
    assert (kept.x0, kept.y0, kept.mask.shape, kept.area) == (60, 5, (10, 2), 20)
    # From a window that starts inside the instance, coordinates are clipped to 0.
    (right,) = window_instances([cut], Window(62, 0, 62, (0, 0, 0, 0)), min_visible=0.3)
    assert (right.x0, right.y0, right.area) == (0, 5, 80)


def test_window_instances_outside_and_order():
    a, b, c = _box(1, 1, 3, 3), _box(100, 100, 4, 4), _box(10, 2, 2, 5)
    kept = window_instances([a, b, c], Window(0, 0, 64, (0, 0, 0, 0)), min_visible=0.5)
    assert [(k.x0, k.y0, k.area) for k in kept] == [(1, 1, 9), (10, 2, 10)]


# ---------------------------------------------------------------- RLE


def _rle_cases():
    cases = []
    h, w = 7, 13
    single = np.zeros((h, w), bool)
    single[3, 5] = True
    cases.append(("7x13-one-pixel", single))
    for name, (y, x) in {"tl": (0, 0), "tr": (0, w - 1), "bl": (h - 1, 0), "br": (h - 1, w - 1)}.items():
        m = np.zeros((h, w), bool)
        m[y, x] = True
        cases.append((f"7x13-corner-{name}", m))
    for name, slc in {
        "top": np.s_[0, 2:9],
        "bottom": np.s_[h - 1, 1:12],
        "left": np.s_[1:6, 0],
        "right": np.s_[0:h, w - 1],
        "left-cols": np.s_[:, 0:3],
        "right-cols": np.s_[:, 10:],
    }.items():
        m = np.zeros((h, w), bool)
        m[slc] = True
        cases.append((f"7x13-border-{name}", m))
    cases.append(("7x13-full", np.ones((h, w), bool)))
    cases.append(("13x7-full", np.ones((w, h), bool)))
    cases.append(("1x1-full", np.ones((1, 1), bool)))
    rng = np.random.default_rng(3)
    for k, (hh, ww) in enumerate([(7, 13), (13, 7), (1, 9), (9, 1), (31, 17)]):
        cases.append((f"random-{hh}x{ww}", rng.random((hh, ww)) > 0.6))
    blob = np.zeros((20, 11), bool)
    blob[4:15, 0:11] = True
    blob[9, :] = False
    cases.append(("20x11-wide-split", blob))
    return cases


@pytest.mark.parametrize("name, full", _rle_cases(), ids=[c[0] for c in _rle_cases()])
def test_rle_round_trip(name, full):
    h, w = full.shape
    inst = from_full_mask(full)
    assert inst is not None
    rle = to_rle(inst, h, w)
    assert rle["size"] == [h, w]
    assert isinstance(rle["counts"], str)
    expected = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
    assert rle["counts"] == expected["counts"].decode()
    decoded = mask_utils.decode({"size": [h, w], "counts": rle["counts"].encode()}).astype(bool)
    np.testing.assert_array_equal(decoded, full)
    back = from_rle(rle)
    assert (back.x0, back.y0) == (inst.x0, inst.y0)
    np.testing.assert_array_equal(back.mask, inst.mask)
    assert int(mask_utils.area(expected)) == inst.area
    # Loose crops (with empty margins) and uncompressed counts give the same thing.
    loose = Instance(np.pad(inst.mask, ((0, 1), (0, 1))), inst.x0, inst.y0)
    assert to_rle(loose, h, w) == rle
    uncompressed = {"size": [h, w], "counts": [int(c) for c in _runs(full)]}
    np.testing.assert_array_equal(from_rle(uncompressed).mask, inst.mask)


def _runs(full: np.ndarray) -> list[int]:
    flat = full.ravel(order="F")
    runs, current, n = [], False, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    return runs


def test_rle_instance_partly_outside_image():
    inst = _box(-2, 5, 6, 4)  # sticks out left and bottom of a 7x13 image
    rle = to_rle(inst, 7, 13)
    full = np.zeros((7, 13), bool)
    full[5:7, 0:4] = True
    assert rle["counts"] == mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))["counts"].decode()


def test_rle_empty():
    rle = to_rle(Instance(np.zeros((2, 2), bool), 1, 1), 7, 13)
    assert rle["counts"] == mask_utils.encode(np.zeros((7, 13), np.uint8, order="F"))["counts"].decode()
    assert from_rle(rle) is None


# ---------------------------------------------------------------- the tile dataset (tiles.write_split)


SIZE, OVERLAP = 128, 48


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    raw = generate_dataset(root / "raw", n_train=2, n_test=0, size=(200, 300), seed=1, radius_range=(4, 12))
    names = train_ids(raw)
    samples = [load_train_sample(raw, name) for name in names]
    out = root / "tiles"
    summary = tiles.write_split(raw, names, out, "train", SIZE, OVERLAP, min_visible=0.3)
    return samples, out, summary


def test_write_split_index_and_windows(tiled):
    samples, out, summary = tiled
    entries = tiles.read_index(out, "train")
    assert summary["images"] == 2
    assert len(entries) == summary["windows"] == 2 * 2 * 4  # (200, 300) -> 2 x 4 windows each
    assert sum(e.instances for e in entries) == summary["instances"] > 0
    assert len({e.image for e in entries}) == len(entries)
    names = {s.name: s for s in samples}
    split_dir = out / "train"
    for entry in entries:
        sample = names[entry.source_image]
        x0, y0 = entry.origin
        assert entry.size == SIZE
        assert 0 <= x0 <= 300 - SIZE and 0 <= y0 <= 200 - SIZE
        with Image.open(split_dir / entry.image) as img:
            assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        pixels, labels = tiles.read_window(split_dir, entry)
        np.testing.assert_array_equal(pixels, sample.image[y0 : y0 + SIZE, x0 : x0 + SIZE])
        assert labels.dtype == np.uint16 and labels.shape == (len(entry.labels), SIZE, SIZE)
        # The label layers hold exactly the window's instances (clipped, min_visible), in order.
        window = Window(x0, y0, SIZE, (0, 0, 0, 0))
        expected = window_instances(sample.instances, window, 0.3)
        stored = window_instances_from_labels(labels)
        assert entry.instances == len(expected) == len(stored)
        for a, b in zip(stored, expected):
            assert (a.x0, a.y0) == (b.x0, b.y0)
            np.testing.assert_array_equal(a.mask, b.mask)
    # The synthetic nuclei overlap a little: such windows get a second label layer, losing nothing.
    assert summary["windows_with_overlaps"] == sum(len(e.labels) > 1 for e in entries)


def test_every_instance_whole_in_some_window(tiled):
    samples, out, _ = tiled
    split_dir = out / "train"
    entries = tiles.read_index(out, "train")
    stored = {e.image: window_instances_from_labels(tiles.read_window(split_dir, e)[1]) for e in entries}
    for sample in samples:
        assert sample.instances
        mine = [e for e in entries if e.source_image == sample.name]
        for inst in sample.instances:
            assert max(inst.mask.shape) < OVERLAP  # nuclei are smaller than the overlap
            holders = []
            for entry in mine:
                x0, y0 = entry.origin
                if not (x0 <= inst.x0 and inst.x1 <= x0 + SIZE and y0 <= inst.y0 and inst.y1 <= y0 + SIZE):
                    continue
                for kept in stored[entry.image]:
                    if (kept.x0 + x0, kept.y0 + y0) == (inst.x0, inst.y0) and np.array_equal(kept.mask, inst.mask):
                        holders.append(entry.image)
            assert holders, f"{sample.name}: nucleus at {inst.box} is whole in no window"


def test_write_split_in_worker_processes_gives_the_same_dataset(tiled, tmp_path):
    samples, out, summary = tiled
    raw = out.parent / "raw"
    again = tiles.write_split(raw, [s.name for s in samples], tmp_path, "train", SIZE, OVERLAP, 0.3, workers=2)
    assert again == summary
    assert tiles.read_index(tmp_path, "train") == tiles.read_index(out, "train")
    for entry in tiles.read_index(out, "train"):
        for name in (entry.image, *entry.labels):
            assert (tmp_path / "train" / name).read_bytes() == (out / "train" / name).read_bytes(), name


def test_read_index_refuses_missing_stale_or_broken(tmp_path):
    with pytest.raises(NucleisegError, match="run the tile stage"):
        tiles.read_index(tmp_path, "train")
    (tmp_path / "train").mkdir()
    index = tmp_path / "train" / tiles.INDEX
    index.write_text("{not json")
    with pytest.raises(NucleisegError, match="not valid JSON"):
        tiles.read_index(tmp_path, "train")
    index.write_text(json.dumps({"version": 1, "windows": []}))  # the COCO-era layout
    with pytest.raises(NucleisegError, match="another version"):
        tiles.read_index(tmp_path, "train")


# ---------------------------------------------------------------- cores


@pytest.mark.parametrize("height, width, size, overlap", [(300, 260, 96, 40), (64, 64, 64, 16), (50, 130, 64, 16), (1000, 1000, 512, 192)])
def test_window_cores_cover_every_pixel_once(height, width, size, overlap):
    count = np.zeros((height, width), int)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    rng = np.random.default_rng(0)
    for w in windows(height, width, size, overlap):
        cx0, cy0, cx1, cy1 = w.core
        assert w.x0 <= cx0 < cx1 <= min(w.x1, width) and w.y0 <= cy0 < cy1 <= min(w.y1, height)  # a core lies in its window
        inside = (xs >= cx0) & (xs < cx1) & (ys >= cy0) & (ys < cy1)
        for y, x in rng.integers(0, (height, width), size=(200, 2)):  # Window.owns is the same rule
            assert w.owns(x + 0.5, y + 0.5) == inside[y, x]
        count += inside
    assert (count == 1).all()
