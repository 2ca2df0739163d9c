"""params.yaml → typed configs, built in one place.

Each stage reads its own section; the model config travels inside the
checkpoint so a model can be rebuilt without params.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import NucleisegError


@dataclass
class TileConfig:
    size: int = 512
    overlap: int = 192
    min_visible: float = 0.3


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    weights: str = "auto"
    anchor_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 3000
    rpn_post_nms_top_n_test: int = 3000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.3
    detections_per_img: int = 1000
    min_size: int | None = None
    max_size: int | None = None
    trainable_backbone_layers: int = 5


@dataclass
class AugmentConfig:
    crop: int = 384
    scale: list[float] = field(default_factory=lambda: [0.8, 1.25])
    flip: bool = True
    rot90: bool = True
    color_jitter: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 80
    batch_size: int = 2
    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_drop_epoch: int = 60
    lr_drop_factor: float = 0.1
    warmup_iters: int = 200
    grad_clip: float = 10.0
    amp: bool = True
    device: str = "auto"
    gpus: int = 1
    workers: int = 2
    samples_per_epoch: int | None = None
    val_every: int = 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class InferConfig:
    window: int = 512
    overlap: int = 192
    batch_size: int = 2
    score_threshold: float = 0.05
    mask_threshold: float = 0.5
    min_area: int = 10
    fill_holes: bool = True
    dedup_iou: float = 0.3
    dedup_ios: float = 0.6
    tta: bool = False
    whole_image: bool = False
    score: str = "mask_weighted"


def _build(cls, values: dict | None, where: str):
    """A dataclass from a params section; unknown keys are an error (a typo would be silently ignored)."""
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise NucleisegError(f"params.yaml: unknown key(s) {unknown} under '{where}'; known: {sorted(known)}")
    for name, value in values.items():
        default_factory = known[name].default_factory
        if isinstance(value, dict) and default_factory is not dataclasses.MISSING:
            nested_cls = type(default_factory())
            if dataclasses.is_dataclass(nested_cls):
                values[name] = _build(nested_cls, value, f"{where}.{name}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise NucleisegError(f"params.yaml: bad '{where}' section: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NucleisegError(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise NucleisegError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return params


def tile_config(params: dict) -> TileConfig:
    return _build(TileConfig, params.get("tile"), "tile")


def model_config(params: dict) -> ModelConfig:
    return _build(ModelConfig, {"backbone": params.get("backbone", "resnet50"), **(params.get("model") or {})}, "model")


def train_config(params: dict) -> TrainConfig:
    return _build(TrainConfig, params.get("train"), "train")


def infer_config(params: dict) -> InferConfig:
    return _build(InferConfig, params.get("infer"), "infer")


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}, for MLflow params."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
