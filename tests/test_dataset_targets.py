"""The label-map loader produces the same training targets as decoding one mask per nucleus.

The reference path is the previous loader's: every instance of the window as a full-size
mask, torchvision's resize of the whole window (nearest for masks), then crop, flips and
quarter turns, boxes from the masks. Same augmentation draw, same targets.
"""

import dataclasses

import numpy as np
import pytest
import torch
from label_maps import window_instances_from_labels
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import functional as TF

from nucleiseg.core.config import AugmentConfig
from nucleiseg.core.masks import Instance, iou
from nucleiseg.core.windows import PAD_VALUE, Window, window_instances
from nucleiseg.data.synthetic import synth_image
from nucleiseg.data.tile_store import label_layers
from nucleiseg.train.samples import (
    HED_FROM_RGB,
    MIN_MASK_PIXELS,
    EpochBatches,
    EpochSampler,
    TileDataset,
    augment,
    draw_params,
    expand_masks,
    label_targets,
    padding,
    stain_jitter,
)

SIZE = 128


def reference_targets(instances: list[Instance], p) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks, boxes) through the old path: N full masks, resize whole window, crop, orient."""
    masks = torch.zeros((len(instances), SIZE, SIZE), dtype=torch.uint8)
    for k, inst in enumerate(instances):
        masks[k, inst.y0 : inst.y1, inst.x0 : inst.x1] = torch.from_numpy(inst.mask.astype(np.uint8))
    masks = TF.resize(masks, [p.scaled, p.scaled], interpolation=TF.InterpolationMode.NEAREST)
    masks = TF.crop(masks, p.top, p.left, p.crop, p.crop)
    if p.hflip:
        masks = masks.flip(-1)
    if p.vflip:
        masks = masks.flip(-2)
    if p.rot90:
        masks = torch.rot90(masks, p.rot90, dims=(-2, -1))
    keep = masks.flatten(1).sum(1) >= MIN_MASK_PIXELS
    masks = masks[keep]
    boxes = masks_to_boxes(masks).float()
    boxes[:, 2:] += 1
    return masks, boxes


def window_of(seed: int):
    rng = np.random.default_rng(seed)
    image, nuclei = synth_image(rng, 256, 256)
    window = Window(64, 64, SIZE, (0, 0, 0, 0))
    instances = window_instances(nuclei, window, 0.3)
    return image[64 : 64 + SIZE, 64 : 64 + SIZE], instances


@pytest.mark.parametrize("seed", range(6))
def test_targets_match_the_per_mask_path(seed):
    image, instances = window_of(seed)
    labels = np.stack(label_layers(instances, SIZE))
    cfg = AugmentConfig(crop=96, scale=[0.8, 1.25], flip=True, rot90=True, color_jitter=0.1)
    for draw in range(8):
        p = draw_params(np.random.default_rng([seed, draw]), SIZE, cfg)
        pixels, out_labels = augment(image, labels, p)
        target = expand_masks(label_targets(out_labels))
        ref_masks, ref_boxes = reference_targets(instances, p)
        assert pixels.shape == (3, 96, 96)
        assert target["masks"].shape[0] == ref_masks.shape[0]
        # Same instance order: label k is the k-th instance, and both keep them in order.
        for mine, ref in zip(target["masks"], ref_masks):
            a = Instance(mine.numpy().astype(bool), 0, 0)
            b = Instance(ref.numpy().astype(bool), 0, 0)
            assert iou(a, b) >= 0.95
        assert torch.allclose(target["boxes"], ref_boxes, atol=1.0)


def test_overlapping_instances_survive_in_layers():
    a = Instance(np.ones((10, 10), bool), 5, 5)
    b = Instance(np.ones((10, 10), bool), 10, 10)  # overlaps a by 25 px
    c = Instance(np.ones((4, 4), bool), 40, 40)
    layers = label_layers([a, b, c], 64)
    assert len(layers) == 2
    back = window_instances_from_labels(np.stack(layers))
    assert [(i.x0, i.y0, i.area) for i in back] == [(5, 5, 100), (10, 10, 100), (40, 40, 16)]
    target = expand_masks(label_targets(np.stack(layers)))
    assert target["masks"].shape == (3, 64, 64)
    assert target["masks"].sum(dim=(1, 2)).tolist() == [100, 100, 16]


def test_padding_when_crop_exceeds_the_window():
    image, instances = window_of(1)
    labels = np.stack(label_layers(instances, SIZE))
    cfg = AugmentConfig(crop=160, scale=[1.0, 1.0], flip=False, rot90=False, color_jitter=0.0)
    p = draw_params(np.random.default_rng(3), SIZE, cfg)
    pixels, out = augment(image, labels, p)
    assert pixels.shape == (3, 160, 160) and out.shape[-2:] == (160, 160)
    # Every instance is whole inside the padded crop.
    assert len(label_targets(out)["instance_ids"]) == sum(inst.area >= MIN_MASK_PIXELS for inst in instances)


def test_same_key_same_sample_and_epochs_differ(tiny_tiles):
    ds = TileDataset(tiny_tiles, "train", AugmentConfig(crop=48), seed=3)
    a, ta = ds[(2, 1)]
    b, tb = ds[(2, 1)]
    c, _ = ds[(3, 1)]
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert not torch.equal(a, c)


def test_epoch_sampler_splits_ranks_and_reseeds():
    full = [EpochSampler(10, seed=0).indices(1) for _ in range(2)]
    assert full[0] == full[1] and sorted(full[0]) == list(range(10))
    assert EpochSampler(10, seed=0).indices(2) != full[0]
    ranks = [EpochSampler(10, seed=0, rank=r, world_size=3) for r in range(3)]
    drawn = [i for s in ranks for i in s.indices(1)]
    assert len(drawn) == 12 and set(drawn) == set(range(10))
    s = EpochSampler(10, seed=0, samples_per_epoch=25)
    assert len(s.indices(2)) == 25 == len(s)


def test_epoch_batches_cover_each_epoch_in_order():
    batches = list(EpochBatches(EpochSampler(10, seed=0), batch_size=4, first=2, last=3))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert {e for b in batches[:3] for e, _ in b} == {2} and {e for b in batches[3:] for e, _ in b} == {3}


# ----------------------------------------------------------------------------- stain jitter, scale sampling


def _densities(pixels: np.ndarray) -> np.ndarray:
    """3 x H x W: the H, E and D optical densities (natural log) of 3 x H x W uint8 pixels."""
    density = -np.log(np.maximum(pixels.astype(np.float64) / 255.0, 1e-6))
    return np.einsum("chw,cd->dhw", density, HED_FROM_RGB.astype(np.float64))


def test_stain_jitter_identity_is_exact_and_scales_each_stains_density():
    image, _ = window_of(2)
    pixels = np.ascontiguousarray(image.transpose(2, 0, 1))
    assert np.array_equal(stain_jitter(pixels, ((1.0, 0.0),) * 3), pixels)
    # Haematoxylin x 1.3 + 0.05, eosin x 0.8, DAB unchanged: the output's densities are exactly that, up to
    # 8-bit rounding, wherever no channel saturates.
    out = stain_jitter(pixels, ((1.3, 0.05), (0.8, 0.0), (1.0, 0.0)))
    expected = _densities(pixels) * np.array([1.3, 0.8, 1.0])[:, None, None] + np.array([0.05, 0, 0])[:, None, None]
    unsaturated = (out >= 40).all(axis=0) & (out <= 250).all(axis=0)
    assert unsaturated.mean() > 0.5
    assert np.abs(_densities(out) - expected)[:, unsaturated].max() < 0.05


def test_stain_draws_come_last_and_leave_labels_and_padding_alone():
    image, instances = window_of(3)
    labels = np.stack(label_layers(instances, SIZE))
    plain = AugmentConfig(crop=160, scale=[0.8, 1.25], flip=True, rot90=True, color_jitter=0.0)
    stained = dataclasses.replace(plain, stain=0.2)
    for draw in range(4):
        p = draw_params(np.random.default_rng([7, draw]), SIZE, plain)
        q = draw_params(np.random.default_rng([7, draw]), SIZE, stained)
        assert p.stain == () and len(q.stain) == 3 and dataclasses.replace(q, stain=()) == p
        assert all(0.8 <= f <= 1.2 and -0.2 <= b <= 0.2 for f, b in q.stain)
        plain_pixels, plain_labels = augment(image, labels, p)
        pixels, out_labels = augment(image, labels, q)
        assert np.array_equal(out_labels, plain_labels)
        pad = padding(q, SIZE)
        assert pad.any() and (~pad).any()  # a 160 crop of a window scaled to at most 160 px is partly padding
        assert (pixels.numpy()[:, pad] == PAD_VALUE).all() and np.array_equal(plain_pixels.numpy()[:, pad], pixels.numpy()[:, pad])
        assert not np.array_equal(plain_pixels.numpy()[:, ~pad], pixels.numpy()[:, ~pad])


def test_log_uniform_scale_zooms_in_and_out_equally():
    cfg = AugmentConfig(crop=0, scale=[0.5, 2.0], flip=False, rot90=False, color_jitter=0.0)
    rng = np.random.default_rng(0)
    uniform = np.array([draw_params(rng, 1000, cfg).scaled for _ in range(2000)]) / 1000
    log_uniform = np.array([draw_params(rng, 1000, dataclasses.replace(cfg, scale_sampling="log_uniform")).scaled
                            for _ in range(2000)]) / 1000
    for factors in (uniform, log_uniform):
        assert 0.5 <= factors.min() and factors.max() <= 2.0
    assert abs(np.median(uniform) - 1.25) < 0.05  # uniform on [0.5, 2]: zooms in 2 times out of 3
    assert abs(np.median(log_uniform) - 1.0) < 0.05 and abs((log_uniform < 1).mean() - 0.5) < 0.04
