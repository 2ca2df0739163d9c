"""Torch dataset over the tile stage's windows, with on-the-fly augmentation.

Augmentations use torchvision.transforms.v2 so the image, the masks and the
boxes move together. Each sample draws its randomness from a seed made of
(seed, epoch, index): the same sample gets the same augmentation whatever the
worker count, and a resumed run replays exactly the epochs it missed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from .config import AugmentConfig
from .errors import NucleisegError
from .tiling import PAD_VALUE

MIN_MASK_PIXELS = 4  # crops can leave slivers of a nucleus: too small to learn from


class RandomRot90(v2.Transform):
    """Rotate by a random multiple of 90 degrees (nuclei have no up)."""

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt, params):
        if params["k"] == 0:
            return inpt
        return self._call_kernel(v2.functional.rotate, inpt, 90.0 * params["k"], expand=True)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from [low, high]: nuclei sizes vary between slides."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt, params):
        return self._call_kernel(v2.functional.resize, inpt, params["size"], antialias=True)


def build_augmentation(cfg: AugmentConfig | None) -> v2.Compose | None:
    if cfg is None:
        return None
    steps: list = []
    if cfg.scale and (cfg.scale[0] != 1.0 or cfg.scale[1] != 1.0):
        steps.append(RandomScale(float(cfg.scale[0]), float(cfg.scale[1])))
    if cfg.crop:
        steps.append(v2.RandomCrop(int(cfg.crop), pad_if_needed=True, fill={tv_tensors.Image: PAD_VALUE, "others": 0}))
    if cfg.flip:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if cfg.rot90:
        steps.append(RandomRot90())
    if cfg.color_jitter:
        j = float(cfg.color_jitter)
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 4))
    return v2.Compose(steps) if steps else None


class TileDataset(torch.utils.data.Dataset):
    """Windows of one split (`<tiles_dir>/<split>.json`): image tensor [0, 1] and a Mask R-CNN target."""

    def __init__(self, tiles_dir: str | Path, split: str, augment: AugmentConfig | None = None, seed: int = 0):
        self.tiles_dir = Path(tiles_dir)
        doc_path = self.tiles_dir / f"{split}.json"
        if not doc_path.is_file():
            raise NucleisegError(f"{doc_path}: missing; run the tile stage first (dvc repro tile)")
        self.doc = json.loads(doc_path.read_text())
        self.images = self.doc["images"]
        by_image: dict[int, list[dict]] = {img["id"]: [] for img in self.images}
        for ann in self.doc["annotations"]:
            by_image[ann["image_id"]].append(ann)
        self.annotations = by_image
        self.transform = build_augmentation(augment)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int):
        info = self.images[index]
        image = np.array(Image.open(self.tiles_dir / info["file_name"]).convert("RGB"))
        anns = self.annotations[info["id"]]
        if anns:
            rles = [{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode("ascii")} for a in anns]
            masks = np.ascontiguousarray(np.moveaxis(mask_utils.decode(rles), -1, 0))
        else:
            masks = np.zeros((0,) + image.shape[:2], dtype=np.uint8)
        return info, torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(masks)

    def __getitem__(self, index: int):
        info, image, masks = self._load(index)
        image = tv_tensors.Image(image)
        masks = tv_tensors.Mask(masks)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**63))
                image, masks = self.transform(image, masks)
        keep = masks.flatten(1).sum(1) >= MIN_MASK_PIXELS if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
        masks = masks[keep]
        boxes = masks_to_boxes(masks) if masks.shape[0] else torch.zeros((0, 4))
        # masks_to_boxes gives inclusive max coordinates; +1 makes the box cover the last pixel.
        boxes[:, 2:] += 1
        target = {
            "boxes": boxes.float(),
            "labels": torch.ones(masks.shape[0], dtype=torch.int64),
            "masks": masks.as_subclass(torch.Tensor).to(torch.uint8),
            "image_id": int(info["id"]),
        }
        return image.as_subclass(torch.Tensor).float().div_(255.0), target


def collate(batch):
    return tuple(zip(*batch))
