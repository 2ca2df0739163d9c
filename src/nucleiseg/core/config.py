"""params.yaml -> one typed `Params`, checked in one place.

Every param has a type and a range here; `read_params` refuses unknown keys,
wrong types and out-of-range values with one line naming the key, the value and
what is allowed, before any stage does work. The dataclass defaults are the one
copy of the defaults (a test keeps params.yaml equal to them). The model config
travels inside the model file, so a model can be rebuilt without params.yaml.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from nucleiseg.core.errors import NucleisegError, os_error_text

DRIVE_SOURCE = "gdrive:1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG"
BACKBONES = ("resnet50", "resnet50_v2", "resnet101", "resnet34", "resnet18")
SELECT_METRICS = ("ap50_all", "ap50", "f1", "pq")
OPERATING_METRICS = ("f1", "pq")


# ------------------------------------------------------------------------------------ value checks
# A check takes the raw YAML value and returns the converted value or raises ValueError(what is allowed).


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Callable:
    def check(value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(_range_text("an integer", lo, hi, optional))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(_range_text("an integer", lo, hi, optional))
        return value

    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Callable:
    def check(value):
        if isinstance(value, str):
            # YAML reads 1e-4 (no dot) as a string; a number written that way is still a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(_interval_text(lo, hi, lo_open, hi_open))
        value = float(value)
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise ValueError(_interval_text(lo, hi, lo_open, hi_open))
        return value

    return check


def optional(check: Callable) -> Callable:
    """`check`, or null."""

    def checked(value):
        if value is None:
            return None
        try:
            return check(value)
        except ValueError as exc:
            raise ValueError(f"{exc} or null") from None

    return checked


def boolean(value):
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def choice(*options: str) -> Callable:
    def check(value):
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return check


def int_or_auto(lo: int) -> Callable:
    as_int = integer(lo)

    def check(value):
        if value == "auto":
            return value
        try:
            return as_int(value)
        except ValueError:
            raise ValueError(f"'auto' or an integer >= {lo}") from None

    return check


def list_of(item: Callable, length: int | None = None, min_length: int = 0, what: str = "values") -> Callable:
    def check(value):
        shape = f"exactly {length}" if length is not None else f"at least {min_length}"
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length) or len(value) < min_length:
            raise ValueError(f"a list of {shape} {what}")
        try:
            return [item(v) for v in value]
        except ValueError as exc:
            raise ValueError(f"a list of {shape} {what}, each {exc}") from None

    return check


def fold_index(value):
    """data.fold: a fold number, or 'all' (no val: the final model trains on every training image)."""
    if value == "all":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("an integer >= 0 (a cross-validation fold) or 'all' (train on every training image, no val)")
    return value


def text(optional: bool = False) -> Callable:
    def check(value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError("a non-empty string" + (" or null" if optional else ""))
        return value

    return check


def sha256_hex(value):
    if value is None:
        return None
    if not isinstance(value, str):
        # 64 digits unquoted read as a YAML integer: the check would silently disappear.
        raise ValueError("null or 64 hex characters in quotes (e.g. '0081bd…0e84')")
    digest = value.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError("null or 64 hex characters in quotes (e.g. '0081bd…0e84')")
    return digest


def _range_text(kind: str, lo, hi, optional: bool) -> str:
    parts = [kind]
    if lo is not None and hi is not None:
        parts.append(f"from {lo} to {hi}")
    elif lo is not None:
        parts.append(f">= {lo}")
    elif hi is not None:
        parts.append(f"<= {hi}")
    return " ".join(parts) + (" or null" if optional else "")


def _interval_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return "a number" + (" " + " and ".join(parts) if parts else "")


def param(default, check: Callable):
    """A dataclass field with its check; list defaults are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def section(cls):
    return field(default_factory=cls, metadata={"section": cls})


# ------------------------------------------------------------------------------------ sections


@dataclass
class SyntheticConfig:
    n_train: int = param(6, integer(2, 1000))
    n_test: int = param(2, integer(0, 1000))
    size: int = param(256, integer(64, 4096))
    radius_range: list[int] = param([6, 40], list_of(integer(2, 200), length=2, what="radii"))
    seam_lines: list[int] = param([], list_of(integer(1, 4096), what="pixel positions"))


@dataclass
class DataConfig:
    source: str = param(DRIVE_SOURCE, text())
    sha256: str | None = param(None, sha256_hex)
    val_images: int = param(4, integer(1, 1000))
    fold: int | str = param(0, fold_index)
    test_annotations: str | None = param(None, text(optional=True))
    synthetic: SyntheticConfig = section(SyntheticConfig)


@dataclass
class TileConfig:
    size: int = param(512, integer(64, 4096))
    overlap: int = param(192, integer(0, 4095))
    min_visible: float = param(0.3, number(0, 1, lo_open=True))


@dataclass
class ModelConfig:
    """What builds a network; saved inside the model file (plain data, loadable with weights_only)."""

    backbone: str = param("resnet50", choice(*BACKBONES))
    weights: str = param("auto", text())
    norm: str = param("auto", choice("auto", "batchnorm", "groupnorm", "frozen"))
    input_scale: float = param(1.5, number(0.5, 4))
    anchor_sizes: list[int] = param([8, 16, 32, 64, 128], list_of(integer(1, 1024), length=5, what="anchor sizes (one per FPN level)"))
    aspect_ratios: list[float] = param([0.5, 1.0, 2.0], list_of(number(0, 10, lo_open=True), min_length=1, what="ratios"))
    rpn_pre_nms_top_n_train: int = param(2000, integer(1, 100_000))
    rpn_post_nms_top_n_train: int = param(2000, integer(1, 100_000))
    rpn_pre_nms_top_n_test: int = param(3000, integer(1, 100_000))
    rpn_post_nms_top_n_test: int = param(3000, integer(1, 100_000))
    rpn_batch_size_per_image: int = param(256, integer(1, 100_000))
    box_batch_size_per_image: int = param(512, integer(1, 100_000))
    box_nms_thresh: float = param(0.3, number(0, 1, lo_open=True))
    detections_per_img: int = param(1000, integer(1, 100_000))
    trainable_backbone_layers: int = param(5, integer(0, 5))
    mask_iou_head: bool = param(False, boolean)  # Mask Scoring R-CNN's MaskIoU head (model/mask_scoring.py)


@dataclass
class AugmentConfig:
    crop: int = param(384, integer(0, 4096))
    scale: list[float] = param([0.8, 1.25], list_of(number(0.25, 4), length=2, what="factors"))
    flip: bool = param(True, boolean)
    rot90: bool = param(True, boolean)
    color_jitter: float = param(0.1, number(0, 1))
    stain: float = param(0.0, number(0, 1))  # HED stain jitter strength (train/samples.py)
    scale_sampling: str = param("uniform", choice("uniform", "log_uniform"))
    # Copy-paste (train/samples.py): the share of windows that get whole nuclei of another training window pasted in,
    # and at most how many per window.
    copy_paste: float = param(0.0, number(0, 1))
    copy_paste_max: int = param(20, integer(1, 1000))


@dataclass
class TrainConfig:
    epochs: int = param(80, integer(1, 100_000))
    batch_size: int = param(4, integer(1, 1024))
    optimizer: str = param("adam", choice("adam", "adamw", "sgd"))
    lr: float = param(2.0e-4, number(0, 1, lo_open=True))
    momentum: float = param(0.9, number(0, 1, hi_open=True))
    weight_decay: float = param(1.0e-4, number(0, 1))
    lr_milestones: list[int] = param([60], list_of(integer(1, 100_000), what="epochs"))
    lr_gamma: float = param(0.1, number(0, 1, lo_open=True))
    warmup_iters: int = param(200, integer(0, 1_000_000))
    grad_clip: float = param(10.0, number(0))
    amp: str = param("auto", choice("auto", "bf16", "fp16", "off"))
    channels_last: bool = param(True, boolean)
    gpus: int = param(1, integer(1, 64))
    workers: int | str = param("auto", int_or_auto(0))
    samples_per_epoch: int | None = param(None, integer(1, 10_000_000, optional=True))
    val_every: int = param(10, integer(1, 100_000))
    checkpoint_every: int = param(10, integer(0, 100_000))
    checkpoint_seconds: float = param(600.0, number(0))
    select_metric: str = param("ap50_all", choice(*SELECT_METRICS))
    augment: AugmentConfig = section(AugmentConfig)


@dataclass
class InferConfig:
    window: int = param(512, integer(64, 4096))
    overlap: int = param(192, integer(0, 4095))
    batch_size: int = param(4, integer(1, 256))
    score_floor: float = param(0.05, number(0, 1, hi_open=True))
    mask_threshold: float = param(0.5, number(0, 1, lo_open=True, hi_open=True))
    min_area: int = param(30, integer(0, 1_000_000))
    fill_holes: bool = param(True, boolean)
    dedup_iou: float = param(0.3, number(0, 1, lo_open=True))
    dedup_ios: float = param(0.6, number(0, 1, lo_open=True))
    tta: str = param("none", choice("none", "flip", "d4"))  # predict/tta.py
    whole_image: bool = param(False, boolean)
    score: str = param("detector", choice("detector", "mask_weighted", "mask_iou"))


@dataclass
class EvaluateConfig:
    max_dets_all: int = param(3000, integer(100, 1_000_000))
    overlays: int = param(8, integer(0, 10_000))
    operating_metric: str = param("f1", choice(*OPERATING_METRICS))
    # null: chosen on val (maximising operating_metric); a number: used as is (required without val, data.fold: all)
    score_threshold: float | None = param(None, optional(number(0, 1, hi_open=True)))


@dataclass
class Params:
    """All of params.yaml. `model.backbone` is the top-level `backbone` (what `-S backbone=` sets)."""

    backbone: str = param("resnet50", choice(*BACKBONES))
    seed: int = param(0, integer(0, 2**31 - 1))
    device: str = param("auto", choice("auto", "cpu", "cuda", "mps"))
    data: DataConfig = section(DataConfig)
    tile: TileConfig = section(TileConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(TrainConfig)
    infer: InferConfig = section(InferConfig)
    evaluate: EvaluateConfig = section(EvaluateConfig)

    def as_dict(self) -> dict[str, Any]:
        """params.yaml's shape (model without backbone, which is top-level)."""
        out = dataclasses.asdict(self)
        out["model"].pop("backbone")
        return out

    def flat(self) -> dict[str, Any]:
        """{'train.lr': 2e-4, ...}: every param once, for MLflow."""
        return flatten(self.as_dict())


# ------------------------------------------------------------------------------------ building

# What a message quotes of a value: params.yaml may hold anything (a 1,000,000-item list,
# an alias that expands to gigabytes), and a message stays one short line.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict, _QUOTE.maxtuple, _QUOTE.maxstring, _QUOTE.maxother = 2, 4, 4, 4, 60, 60
QUOTE_CHARS = 80


def quote(value) -> str:
    """repr(value), cut short."""
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def _build(cls, values, where: str, source: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise NucleisegError(f"{source}: '{where}' must be a mapping of keys, got {quote(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in values if k not in fields), key=str)  # YAML keys may be numbers, null, ...
    if unknown:
        name = str(unknown[0])[:QUOTE_CHARS]
        key = f"{where}.{name}" if where else name
        raise NucleisegError(f"{source}: unknown key '{key}'; known under '{where or 'top level'}': {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        f = fields[name]
        key = f"{where}.{name}" if where else name
        if "section" in f.metadata:
            kwargs[name] = _build(f.metadata["section"], value, key, source)
            continue
        try:
            kwargs[name] = f.metadata["check"](value)
        except ValueError as exc:
            raise NucleisegError(f"{source}: {key} = {quote(value)} is not allowed; expected {exc}") from None
    return cls(**kwargs)


def _cross_checks(p: Params, source: str, model_given: bool) -> None:
    """Settings that do not fit together. `model_given`: the values describe the model too (params.yaml); the infer
    section alone (a model file's saved settings, `nucleiseg predict` flags) is checked against its model where the
    model is loaded (`Predictor`)."""

    def refuse(message: str):
        raise NucleisegError(f"{source}: {message}")

    if p.tile.overlap >= p.tile.size:
        refuse(f"tile.overlap = {p.tile.overlap} must be smaller than tile.size = {p.tile.size}")
    if p.infer.overlap >= p.infer.window:
        refuse(f"infer.overlap = {p.infer.overlap} must be smaller than infer.window = {p.infer.window}")
    lo, hi = p.train.augment.scale
    if lo > hi:
        refuse(f"train.augment.scale = {[lo, hi]}: the first factor must not exceed the second")
    r_lo, r_hi = p.data.synthetic.radius_range
    if r_lo > r_hi:
        refuse(f"data.synthetic.radius_range = {[r_lo, r_hi]}: the first radius must not exceed the second")
    if p.data.fold == "all" and p.evaluate.score_threshold is None:
        refuse("data.fold = 'all' holds out no val images, so no operating point can be chosen on val; set evaluate.score_threshold "
               "(the folds' mean, column 'score threshold' of `python -m nucleiseg report`)")
    if p.data.sha256 and p.data.source == "synthetic":
        refuse("data.sha256 is set but data.source is 'synthetic': a checksum applies to a zip only; set data.sha256 to null")
    if model_given and p.infer.score == "mask_iou" and not p.model.mask_iou_head:
        refuse("infer.score = 'mask_iou' ranks by the MaskIoU head's predicted mask IoU, but model.mask_iou_head is false; "
               "set model.mask_iou_head: true (a model trained with the head) or infer.score: detector")


def params_from_dict(values: dict, source: str = "params.yaml") -> Params:
    """A checked Params from a params.yaml-shaped dict; NucleisegError names the first bad key."""
    values = dict(values or {})
    model = values.get("model")
    if isinstance(model, dict) and "backbone" in model:
        raise NucleisegError(f"{source}: model.backbone is not a key; set the top-level 'backbone' (dvc exp run -S backbone=...)")
    if "backbone" in values:
        values["model"] = {**(model if isinstance(model, dict) else {}), "backbone": values["backbone"]}
    params = _build(Params, values, "", source)
    _cross_checks(params, source, model_given="model" in values)
    return params


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping, as DVC does (PyYAML keeps the last).

    Pure Python on purpose: libyaml's composer (CSafeLoader) recurses in C and crashes the
    process (SIGSEGV) on a few hundred KB of nested brackets, where Python's raises RecursionError.
    """

    def construct_mapping(self, node, deep=False):
        first_at = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = first_at.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class refuses it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {quote(key)} given twice (first at line {first.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


# The project's params.yaml holds about 100 values in 5 KB. Larger files are refused before
# parsing: PyYAML takes seconds and 400 MB for a 3 MB list. YAML aliases count as often as they expand.
MAX_PARAMS_BYTES = 32_000
MAX_PARAMS_VALUES = 10_000


def _more_values_than(values, limit: int) -> bool:
    """Whether `values`, aliases expanded, holds more than `limit` values; stops counting there
    (an alias bomb expands to billions, and a self-referencing alias never ends)."""
    stack, count = [values], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """': reason', or ' at line L, column C: reason' (PyYAML's str() spreads them over several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else f": {problem}"


def read_params(path: str | Path = "params.yaml") -> Params:
    """params.yaml, parsed and checked; the one place stages read their configuration.

    Read as strictly as DVC reads it: UTF-8, no key twice, not empty; besides, the file and its
    aliases expanded have a size limit, and messages quote values cut short.
    """
    path = Path(path)
    if path.is_dir():
        raise NucleisegError(f"{path}: a folder, not the params file; run from the repository root (where dvc.yaml and params.yaml are)")
    if not path.is_file():
        raise NucleisegError(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    try:
        if path.stat().st_size > MAX_PARAMS_BYTES:
            raise NucleisegError(f"{path}: {path.stat().st_size / 1e3:.0f} KB, more than a params file can be "
                                 f"({MAX_PARAMS_BYTES / 1e3:.0f} KB; the project's is 5 KB)")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NucleisegError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise NucleisegError(f"cannot read the params file: {os_error_text(exc)}") from None
    try:
        values = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise NucleisegError(f"{path}: not valid YAML{_yaml_problem(exc)}") from None
    except RecursionError:
        raise NucleisegError(f"{path}: not valid YAML: nested too deeply") from None
    sections = "backbone, seed, data, tile, model, train, infer, evaluate"
    if values is None:
        raise NucleisegError(f"{path}: holds no settings; it needs the sections {sections} (git checkout {path.name} restores the project's)")
    if not isinstance(values, dict):
        raise NucleisegError(f"{path}: expected a mapping of sections ({sections})")
    if _more_values_than(values, MAX_PARAMS_VALUES):
        raise NucleisegError(f"{path}: holds more than {MAX_PARAMS_VALUES} values (YAML aliases counted as often as they expand); "
                             "the project's params.yaml holds about 100")
    return params_from_dict(values, str(path))


def model_config_from_dict(values: dict, source: str) -> ModelConfig:
    """A ModelConfig saved inside a model file; checked like params.yaml's section."""
    try:
        return _build(ModelConfig, values, "model", source)
    except NucleisegError as exc:
        raise NucleisegError(f"{exc}; the model file was written by another version, retrain it") from None


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
