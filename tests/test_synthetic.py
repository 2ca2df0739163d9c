import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.masks import Instance, intersection
from nucleiseg.data.synthetic import generate_dataset, synth_image


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _touch(a: Instance, b: Instance) -> bool:
    """Dilated masks intersect (the masks themselves may or may not share pixels)."""
    grown = Instance(ndimage.binary_dilation(np.pad(a.mask, 1)), a.x0 - 1, a.y0 - 1)
    return intersection(grown, b) > 0


def _pairs(instances):
    """Pairs whose boxes come within one pixel, the only ones that can touch."""
    boxes = np.array([i.box for i in instances])
    for k in range(len(instances)):
        near = (boxes[:, 0] <= boxes[k, 2]) & (boxes[:, 2] >= boxes[k, 0]) & (boxes[:, 1] <= boxes[k, 3]) & (boxes[:, 3] >= boxes[k, 1])
        for j in np.flatnonzero(near):
            if j > k:
                yield instances[k], instances[j]


def test_layout(tmp_path):
    out = generate_dataset(tmp_path / "ds", n_train=2, n_test=3, size=96, seed=1)
    assert out == tmp_path / "ds"
    assert sorted(p.name for p in (out / "train").iterdir()) == ["synth-train-000", "synth-train-001"]
    assert sorted(p.name for p in out.iterdir()) == ["test", "test_img_ids.json", "train"]
    for image_dir in (out / "train").iterdir():
        assert sorted(p.name for p in image_dir.iterdir()) == ["images", "masks"]
        assert [p.name for p in (image_dir / "images").iterdir()] == [f"{image_dir.name}.png"]
        image = Image.open(image_dir / "images" / f"{image_dir.name}.png")
        assert image.mode == "RGB" and image.size == (96, 96)
        names = sorted(p.name for p in (image_dir / "masks").iterdir())
        assert len(names) > 3
        assert names == [f"mask_{k:04d}.png" for k in range(1, len(names) + 1)]
        for name in names:
            mask = Image.open(image_dir / "masks" / name)
            assert mask.mode == "L" and mask.size == (96, 96)
            values = np.unique(np.asarray(mask))
            assert set(values.tolist()) == {0, 255}
            assert (np.asarray(mask) == 255).sum() >= 10
    tests = sorted(p.name for p in (out / "test").iterdir())
    assert tests == ["synth-test-000.png", "synth-test-001.png", "synth-test-002.png"]
    for name in tests:
        image = Image.open(out / "test" / name)
        assert image.mode == "RGB" and image.size == (96, 96)
    ids = json.loads((out / "test_img_ids.json").read_text())
    assert ids == [{"file_name": name, "height": 96, "id": k, "width": 96} for k, name in enumerate(tests, start=1)]


def test_deterministic(tmp_path):
    a = _files(generate_dataset(tmp_path / "a", n_train=2, n_test=1, size=80, seed=3))
    b = _files(generate_dataset(tmp_path / "b", n_train=2, n_test=1, size=80, seed=3))
    assert a == b
    c = _files(generate_dataset(tmp_path / "c", n_train=2, n_test=1, size=80, seed=4))
    image = "train/synth-train-000/images/synth-train-000.png"
    assert a[image] != c[image]
    assert a["test/synth-test-000.png"] != c["test/synth-test-000.png"]


def test_images_independent_of_counts(tmp_path):
    a = _files(generate_dataset(tmp_path / "a", n_train=1, n_test=1, size=64, seed=0))
    b = _files(generate_dataset(tmp_path / "b", n_train=2, n_test=1, size=64, seed=0))
    assert a["test/synth-test-000.png"] == b["test/synth-test-000.png"]


def test_nuclei_sizes_touching_and_overlap():
    rng = np.random.default_rng(0)
    image, nuclei = synth_image(rng, 400, 400)
    assert image.shape == (400, 400, 3) and image.dtype == np.uint8
    assert 120 <= len(nuclei) <= 200  # ~1 per 900 px²
    assert all(n.area >= 10 and n.mask.dtype == bool for n in nuclei)
    inside = [n for n in nuclei if n.x0 > 0 and n.y0 > 0 and n.x1 < 400 and n.y1 < 400]
    radii = np.array([math.sqrt(n.area / math.pi) for n in inside])
    assert radii.min() >= 6 * 0.75 and radii.max() <= 40
    assert np.median(radii) < 15  # skewed to small, like real nuclei
    assert max(max(n.mask.shape) for n in nuclei) <= 2 * 40 + 2

    touching = overlapping = 0
    overlapped = set()
    for a, b in _pairs(nuclei):
        shared = intersection(a, b)
        if shared:
            overlapping += 1
            overlapped.update((id(a), id(b)))
            assert shared <= 0.2 * min(a.area, b.area) + 1
        elif _touch(a, b):
            touching += 1
    assert touching >= 5
    assert overlapping >= 1
    assert len(overlapped) <= 0.08 * len(nuclei)

    dark = image.mean(axis=2)
    labels = np.zeros((400, 400), bool)
    for n in nuclei:
        labels[n.y0 : n.y1, n.x0 : n.x1] |= n.mask
    assert dark[labels].mean() < dark[~labels].mean() - 40  # nuclei are darker than stroma


def test_seam_lines():
    lines = [64, 128, 150]
    image, nuclei = synth_image(np.random.default_rng(5), 200, 300, seam_lines=lines)
    for c in lines:
        vertical = sum(bool(n.x0 < c < n.x1 and n.mask[:, c - 1 - n.x0].any() and n.mask[:, c - n.x0].any()) for n in nuclei)
        horizontal = sum(bool(n.y0 < c < n.y1 and n.mask[c - 1 - n.y0].any() and n.mask[c - n.y0].any()) for n in nuclei)
        assert vertical >= 2 and horizontal >= 2, (c, vertical, horizontal)


def test_default_density_crosses_random_cuts():
    _, nuclei = synth_image(np.random.default_rng(2), 256, 256)
    for c in (40, 97, 180):
        assert sum(n.x0 < c < n.x1 for n in nuclei) >= 3


def test_non_square(tmp_path):
    out = generate_dataset(tmp_path / "ds", n_train=1, n_test=1, size=(200, 300), seed=0, seam_lines=[100])
    image = Image.open(out / "train/synth-train-000/images/synth-train-000.png")
    assert image.size == (300, 200)  # PIL: (width, height)
    mask = Image.open(out / "train/synth-train-000/masks/mask_0001.png")
    assert mask.size == (300, 200)
    ids = json.loads((out / "test_img_ids.json").read_text())
    assert ids[0]["height"] == 200 and ids[0]["width"] == 300


def test_refuses_non_empty_dir(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(NucleisegError, match="not empty"):
        generate_dataset(tmp_path)
    assert (tmp_path / "x.txt").read_text() == "keep me"
    generate_dataset(tmp_path / "empty_ok", n_train=1, n_test=0, size=64)


def test_bad_arguments():
    with pytest.raises(NucleisegError):
        synth_image(np.random.default_rng(0), 64, 64, radius_range=(10, 5))
    with pytest.raises(NucleisegError):
        synth_image(np.random.default_rng(0), 64, 64, seam_lines=[64])
