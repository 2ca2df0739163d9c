"""The label-map loader produces the same training targets as decoding one mask per nucleus.

The reference path is the previous loader's: every instance of the window as a full-size
mask, torchvision's resize of the whole window (nearest for masks), then crop, flips and
quarter turns, boxes from the masks. Same augmentation draw, same targets.
"""

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import functional as TF

from nucleiseg.core.config import AugmentConfig
from nucleiseg.core.masks import Instance, iou
from nucleiseg.core.windows import Window, window_instances
from nucleiseg.data.synthetic import synth_image
from nucleiseg.data.tile_store import label_layers, window_instances_from_labels
from nucleiseg.train.samples import (
    MIN_MASK_PIXELS,
    EpochBatches,
    EpochSampler,
    TileDataset,
    augment,
    draw_params,
    expand_masks,
    label_targets,
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
