"""Copy-paste augmentation (`train.augment.copy_paste`): whole nuclei of another training window pasted on a window.

Known answers on tiny synthetic windows: a pasted disc is exactly one new target with its pixels and box; covered
pixels leave the masks under them and a mostly covered instance is dropped; each pasted nucleus is a whole nucleus
of its source, pixel for pixel, under one of the window's flips and turns; off, samples are what they were.
"""

import dataclasses
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from stage_commands import stage_argv

from nucleiseg.core.config import AugmentConfig
from nucleiseg.data.tile_store import read_window
from nucleiseg.train.loop import build_loader
from nucleiseg.train.samples import (
    MIN_MASK_PIXELS,
    PASTE_MIN_VISIBLE,
    EpochBatches,
    EpochSampler,
    PastedNucleus,
    TileDataset,
    augment,
    content_box,
    draw_params,
    draw_pastes,
    expand_masks,
    label_targets,
    orient,
    paste_nuclei,
    whole_nuclei,
)

REPO = Path(__file__).resolve().parents[1]
# No scale, flips, turns or colour: pasted pixels stay the source's, bit for bit.
PLAIN = AugmentConfig(crop=0, scale=[1.0, 1.0], flip=False, rot90=False, color_jitter=0.0, copy_paste=1.0, copy_paste_max=50)


def disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def patch(height: int, width: int, value: int = 0) -> PastedNucleus:
    """A rectangle of one colour: a nucleus whose mask is its whole box."""
    return PastedNucleus(np.full((3, height, width), value, np.uint8), np.ones((height, width), bool), 0, 0)


def at(paste: PastedNucleus, top: int, left: int) -> PastedNucleus:
    return dataclasses.replace(paste, top=top, left=left)


def placed(paste: PastedNucleus, size: int) -> np.ndarray:
    """size x size bool: where `paste` lands."""
    out = np.zeros((size, size), bool)
    out[paste.top : paste.top + paste.mask.shape[0], paste.left : paste.left + paste.mask.shape[1]] = paste.mask
    return out


def test_a_disc_pasted_into_an_empty_window_is_one_target_with_its_pixels_and_box():
    mask = disc(4)  # 9 x 9, touching its box on all four sides
    source = np.random.default_rng(0).integers(0, 256, (3, 9, 9), dtype=np.uint8)
    pixels = np.full((3, 32, 32), 200, np.uint8)
    before = pixels.copy()
    paste = PastedNucleus(source, mask, top=10, left=12)
    out_pixels, labels = paste_nuclei(pixels, np.zeros((1, 32, 32), np.uint16), [paste])
    target = expand_masks(label_targets(labels))
    where = placed(paste, 32)
    assert target["masks"].shape == (1, 32, 32)
    assert np.array_equal(target["masks"][0].numpy().astype(bool), where)
    assert target["boxes"].tolist() == [[12.0, 10.0, 21.0, 19.0]]  # x0, y0, x1, y1 (exclusive end)
    assert np.array_equal(out_pixels[:, where], source[:, mask])
    assert np.array_equal(out_pixels[:, ~where], before[:, ~where])


def test_a_pasted_nucleus_takes_the_pixels_it_covers_and_a_mostly_covered_instance_is_dropped():
    labels = np.zeros((1, 40, 40), np.uint16)
    labels[0, 5:15, 5:15] = 1  # its 4 left columns covered: 60 % shows, kept, box shrinks
    labels[0, 20:30, 20:30] = 2  # its 8 left columns covered: 20 % shows (< PASTE_MIN_VISIBLE), dropped
    _, out = paste_nuclei(np.zeros((3, 40, 40), np.uint8), labels, [at(patch(10, 4), 5, 5), at(patch(10, 8), 20, 20)])
    target = label_targets(out)
    assert 0.2 < PASTE_MIN_VISIBLE <= 0.6
    assert target["instance_ids"].tolist() == [1, 3, 4]  # pasted nuclei take the labels after the window's largest
    assert target["boxes"].tolist() == [[9, 5, 15, 15], [5, 5, 9, 15], [20, 20, 28, 30]]
    assert expand_masks(target)["masks"].sum(dim=(1, 2)).tolist() == [60, 40, 80]
    assert not (out == 2).any()


def test_every_layer_loses_the_covered_pixels_and_a_later_paste_covers_an_earlier_one():
    labels = np.zeros((2, 20, 20), np.uint16)
    labels[0, 0:10, 0:10] = 1
    labels[1, 5:15, 5:15] = 2  # overlaps 1: stored in the second layer
    _, out = paste_nuclei(np.zeros((3, 20, 20), np.uint8), labels, [at(patch(6, 6, 50), 4, 4), at(patch(6, 6, 90), 4, 4)])
    target = label_targets(out)
    assert target["instance_ids"].tolist() == [1, 2, 4]  # 3, the first paste, is wholly under 4
    assert expand_masks(target)["masks"].sum(dim=(1, 2)).tolist() == [100 - 36, 100 - 25, 36]
    assert not (out[:, 4:10, 4:10] == 1).any() and not (out[:, 5:10, 5:10] == 2).any()


def test_whole_nuclei_leaves_out_those_the_window_edge_cuts():
    labels = np.zeros((2, 16, 16), np.uint16)
    labels[0, 0:4, 5:9] = 1  # touches the top edge
    labels[0, 5:9, 5:9] = 2
    labels[0, 10:14, 12:16] = 3  # touches the right edge
    labels[1, 6:10, 6:10] = 4
    assert [(layer, label, box) for layer, label, box in whole_nuclei(labels)] == [
        (0, 2, (slice(5, 9), slice(5, 9))), (1, 4, (slice(6, 10), slice(6, 10)))]


def source_window(tiny_tiles):
    ds = TileDataset(tiny_tiles, "train", PLAIN)
    index = max(range(len(ds)), key=lambda i: ds.entries[i].instances)
    return read_window(ds.split_dir, ds.entries[index])


def orientations(pixels: np.ndarray, mask: np.ndarray, turns_too: bool):
    for hflip, vflip, turns in itertools.product((False, True), (False, True), range(4) if turns_too else (0,)):
        yield orient(pixels, hflip, vflip, turns), orient(mask, hflip, vflip, turns)


@pytest.mark.parametrize("flips", [False, True])
def test_each_pasted_nucleus_is_a_whole_nucleus_of_the_source_pixel_for_pixel(tiny_tiles, flips):
    image, labels = source_window(tiny_tiles)
    size = labels.shape[-1]
    cfg = dataclasses.replace(PLAIN, flip=flips, rot90=flips)
    candidates = [(image[box].transpose(2, 0, 1), labels[layer][box] == label) for layer, label, box in whole_nuclei(labels)]
    assert len(candidates) >= 3
    drawn = 0
    for draw in range(10):
        rng = np.random.default_rng([1, draw])
        p = draw_params(rng, size, cfg)
        for paste in draw_pastes(rng, image, labels, p, size, cfg):
            drawn += 1
            assert 0 <= paste.top and paste.top + paste.mask.shape[0] <= size and 0 <= paste.left and paste.left + paste.mask.shape[1] <= size
            assert any(np.array_equal(paste.pixels, pixels) and np.array_equal(paste.mask, mask)
                       for source_pixels, source_mask in candidates
                       for pixels, mask in orientations(source_pixels, source_mask, flips))
    assert drawn > 10


def test_pasted_nuclei_are_scaled_like_the_window_and_land_off_the_padding(tiny_tiles):
    image, labels = source_window(tiny_tiles)
    size = labels.shape[-1]
    doubled = dataclasses.replace(PLAIN, scale=[2.0, 2.0])
    rng = np.random.default_rng(0)
    p = draw_params(rng, size, doubled)
    masks = [labels[layer][box] == label for layer, label, box in whole_nuclei(labels)]
    pastes = draw_pastes(rng, image, labels, p, size, doubled)
    assert pastes
    for paste in pastes:  # nearest neighbour, exactly twice the size
        assert any(np.array_equal(paste.mask, np.kron(mask, np.ones((2, 2), bool))) for mask in masks)
    # A 96 px crop of a 64 px window is padding around it: pasted nuclei land on the window only.
    padded = dataclasses.replace(PLAIN, crop=96)
    for draw in range(5):
        rng = np.random.default_rng([2, draw])
        p = draw_params(rng, size, padded)
        top, left, bottom, right = content_box(p, size)
        assert (bottom - top, right - left) == (size, size)
        for paste in draw_pastes(rng, image, labels, p, size, padded):
            assert top <= paste.top and paste.top + paste.mask.shape[0] <= bottom
            assert left <= paste.left and paste.left + paste.mask.shape[1] <= right


def sample_arrays(sample) -> tuple[np.ndarray, np.ndarray, list[int]]:
    pixels, target = sample
    return pixels.numpy(), target["label_map"].numpy(), target["instance_ids"].tolist()


def test_off_the_samples_are_bit_identical_to_the_path_without_copy_paste(tiny_tiles):
    cfg = AugmentConfig(crop=48, stain=0.1)  # every other augmentation on, at its default
    assert cfg.copy_paste == 0.0
    ds = TileDataset(tiny_tiles, "train", cfg, seed=5)
    for key in [(1, 0), (1, 3), (2, 5), (7, 7)]:
        epoch, index = key
        image, labels = read_window(ds.split_dir, ds.entries[index])
        pixels, out_labels = augment(image, labels, draw_params(ds.rng(epoch, index), ds.entries[index].size, cfg))
        got_pixels, got_target = ds[key]
        assert torch.equal(got_pixels, pixels.float().div_(255.0))
        assert torch.equal(got_target["label_map"], label_targets(out_labels)["label_map"])
        assert torch.equal(got_target["boxes"], label_targets(out_labels)["boxes"])


def test_on_only_the_pixels_under_pasted_nuclei_change_and_the_windows_instances_lose_just_those(tiny_tiles):
    off_cfg = AugmentConfig(crop=48, color_jitter=0.0)  # flips, turns, scale: the window's own draws stay the same
    on_cfg = dataclasses.replace(off_cfg, copy_paste=1.0, copy_paste_max=8)
    off, on = TileDataset(tiny_tiles, "train", off_cfg, seed=2), TileDataset(tiny_tiles, "train", on_cfg, seed=2)
    pasted_any = False
    for index in range(len(on)):
        off_pixels, off_labels, off_ids = sample_arrays(off[(3, index)])
        on_pixels, on_labels, on_ids = sample_arrays(on[(3, index)])
        rng = on.rng(3, index)
        p = draw_params(rng, on.entries[index].size, on_cfg)
        covered = np.zeros(off_labels.shape[-2:], bool)
        for paste in on.pastes(rng, index, p):
            covered |= placed(paste, covered.shape[0])
        assert np.array_equal(off_pixels[:, ~covered], on_pixels[:, ~covered])
        own = [i for i in on_ids if i in off_ids]
        pasted = [i for i in on_ids if i not in off_ids]
        assert all(i > max(off_ids, default=0) for i in pasted)
        pasted_any |= bool(pasted)
        for i in off_ids:
            before = (off_labels == i).any(0)
            after = (on_labels == i).any(0)
            if i in own:
                assert np.array_equal(after, before & ~covered)
            else:  # dropped: too little of it shows
                shows = (before & ~covered).sum()
                assert shows < PASTE_MIN_VISIBLE * before.sum() or shows < MIN_MASK_PIXELS
    assert pasted_any


def test_loader_workers_give_the_samples_a_fresh_dataset_gives(tiny_tiles):
    """No state shared across workers: a sample depends on (seed, epoch, index) and the tile store alone."""
    cfg = AugmentConfig(crop=48, copy_paste=1.0, copy_paste_max=8)
    ds = TileDataset(tiny_tiles, "train", cfg, seed=4)
    loader = build_loader(ds, EpochBatches(EpochSampler(len(ds), seed=4), 4, 1, 1), workers=2, pin_memory=False)
    seen = 0
    for images, targets in loader:
        for image, target in zip(images, targets):
            again_image, again_target = TileDataset(tiny_tiles, "train", cfg, seed=4)[(1, target["window"])]
            assert torch.equal(image, again_image) and torch.equal(target["label_map"], again_target["label_map"])
            seen += 1
    assert seen == len(ds)


@pytest.mark.slow
def test_the_train_stage_runs_with_copy_paste_on(tmp_path, tiny_data, make_params, stage_environment):
    """The train stage as DVC runs it, every window pasted on, through a loader worker process."""
    shutil.copytree(tiny_data / "data", tmp_path / "data")
    params = make_params(train={"epochs": 1, "batch_size": 2, "samples_per_epoch": 2, "workers": 1,
                                "augment": {"copy_paste": 1.0, "copy_paste_max": 6}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), sort_keys=False))
    done = subprocess.run(stage_argv("train"), cwd=tmp_path, env=stage_environment(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert metrics["epochs"] == 1 and np.isfinite(metrics["final_train_loss"])
    assert (tmp_path / "models" / "model.pt").is_file()
