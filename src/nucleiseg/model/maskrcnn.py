"""Model registry: Mask R-CNN with FPN backbones, configured for small, dense nuclei.

`build_model(cfg)` is the one place a ModelConfig becomes a network. COCO Mask
R-CNN weights exist only for ResNet-50 (v1, v2); other backbones start from
ImageNet weights. Loading COCO weights keeps the 91-class heads' features and
replaces the box and mask predictors with 2-class ones (background, nucleus).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import (
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
)
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    resize_boxes,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from nucleiseg.core.config import (
    InferConfig,
    ModelConfig,
    model_config_from_dict,
    params_from_dict,
)
from nucleiseg.core.errors import NucleisegError
from nucleiseg.model.mask_scoring import MaskIoUHead, MaskScoringRoIHeads

log = logging.getLogger(__name__)

NUM_CLASSES = 2  # background, nucleus


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    imagenet: object  # torchvision weights enum for the ResNet trunk
    coco: object | None = None  # Mask R-CNN COCO weights, where torchvision has them
    builder: object | None = None  # torchvision Mask R-CNN builder (R50 only)


REGISTRY: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(ResNet50_Weights.IMAGENET1K_V1, tv_mask_rcnn.MaskRCNN_ResNet50_FPN_Weights.COCO_V1, tv_mask_rcnn.maskrcnn_resnet50_fpn),
    "resnet50_v2": BackboneSpec(ResNet50_Weights.IMAGENET1K_V1, tv_mask_rcnn.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, tv_mask_rcnn.maskrcnn_resnet50_fpn_v2),
    "resnet101": BackboneSpec(ResNet101_Weights.IMAGENET1K_V1),
    "resnet34": BackboneSpec(ResNet34_Weights.IMAGENET1K_V1),
    "resnet18": BackboneSpec(ResNet18_Weights.IMAGENET1K_V1),
}

WEIGHT_CHOICES = ("auto", "coco", "imagenet", "none")


class WindowTransform(GeneralizedRCNNTransform):
    """Normalises and batches like torchvision, but resizes only by `input_scale`.

    torchvision's default rescales every input so its short side is 800 px: a 512 px
    window of 8-30 px nuclei would be blown up 1.6x in inference but not in training
    crops. Here a window is scaled by one fixed factor (`model.input_scale`), the same
    in training and inference, and boxes are mapped back by `postprocess`.
    """

    def __init__(self, image_mean, image_std, input_scale: float = 1.0):
        # min_size/max_size are torchvision's resize, which `resize` below replaces.
        super().__init__(512, 100_000, image_mean, image_std)
        self.input_scale = float(input_scale)

    def resize(self, image, target=None):
        if self.input_scale == 1.0:
            return image, target
        height, width = image.shape[-2:]
        size = [max(1, round(height * self.input_scale)), max(1, round(width * self.input_scale))]
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=self.input_scale < 1)[0]
        if target is not None:
            target = dict(target)
            target["boxes"] = resize_boxes(target["boxes"], (height, width), size)
            if "masks" in target:
                target["masks"] = torch.nn.functional.interpolate(target["masks"][:, None].float(), size=size, mode="nearest")[:, 0].byte()
        return image, target


class NucleiMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN plus `detect`, the inference path the predictor uses.

    The model is built with a box score threshold of 0: the detection floor is an argument of
    `detect`, never state that callers must set and restore.
    """

    @property
    def predicts_mask_iou(self) -> bool:
        """Whether it has the MaskIoU head (`model.mask_iou_head`), so `detect` returns `mask_ious`."""
        return isinstance(self.roi_heads, MaskScoringRoIHeads)

    @torch.inference_mode()
    def detect(self, images: list[torch.Tensor], score_floor: float) -> list[dict]:
        """Raw detections per 3 x H x W float image: boxes (in the image's pixels), scores and labels of
        the detections scored above `score_floor`, and `masks` as N x 1 x M x M probabilities, not
        pasted into N full-size maps (`predict.postprocess.detections_to_instances` pastes each in its box).
        With the MaskIoU head (`predicts_mask_iou`), also `mask_ious`: each mask's predicted IoU, in [0, 1].

        Filtering after the box head's NMS and top-k keeps exactly what a detector built with
        `score_floor` as its threshold keeps: a lower-scored box never suppresses a higher one.
        """
        if self.training:
            raise RuntimeError("NucleiMaskRCNN.detect needs eval mode: call model.eval() first")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        heads = self.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, batch.image_sizes)
        kept = [score > score_floor for score in scores]
        boxes = [b[k] for b, k in zip(boxes, kept)]
        scores = [s[k] for s, k in zip(scores, kept)]
        labels = [lab[k] for lab, k in zip(labels, kept)]
        ious = [torch.zeros(0, device=batch.tensors.device) for _ in boxes]
        if not sum(len(b) for b in boxes):
            size = heads.mask_roi_pool.output_size[0] * 2
            masks = [torch.zeros((0, 1, size, size), device=batch.tensors.device) for _ in boxes]
        elif self.predicts_mask_iou:
            masks, ious = heads.masks_and_ious(features, boxes, labels, batch.image_sizes)
        else:
            mask_features = heads.mask_head(heads.mask_roi_pool(features, boxes, batch.image_sizes))
            masks = maskrcnn_inference(heads.mask_predictor(mask_features), labels)
        outputs = []
        for b, s, lab, m, iou, scaled, original in zip(boxes, scores, labels, masks, ious, batch.image_sizes, original_sizes):
            output = {"boxes": resize_boxes(b, scaled, original), "scores": s, "labels": lab, "masks": m}
            if self.predicts_mask_iou:
                output["mask_ious"] = iou
            outputs.append(output)
        return outputs


def _resolve_weights(cfg: ModelConfig) -> tuple[object | None, object | None, Path | None]:
    """(COCO detector weights, ImageNet backbone weights, local file) for cfg.weights."""
    spec = REGISTRY[cfg.backbone]
    choice = str(cfg.weights).strip()
    if choice == "auto":
        return (spec.coco, None, None) if spec.coco is not None else (None, spec.imagenet, None)
    if choice == "coco":
        if spec.coco is None:
            have = [name for name, s in REGISTRY.items() if s.coco is not None]
            raise NucleisegError(f"params.yaml: model.weights=coco has no torchvision weights for {cfg.backbone} (only {have}); use 'imagenet' or 'auto'")
        return spec.coco, None, None
    if choice == "imagenet":
        return None, spec.imagenet, None
    if choice in ("none", "None", "null"):
        return None, None, None
    path = Path(os.path.expanduser(choice))
    if not path.is_file():
        raise NucleisegError(f"params.yaml: model.weights={choice!r} is neither {list(WEIGHT_CHOICES)} nor an existing file")
    return None, None, path


def ensure_weights_available(weights, endpoint: tuple[str, int] = ("download.pytorch.org", 443), timeout: float = 5.0) -> None:
    """Fail in seconds, naming the file and where to put it, when weights are neither cached nor downloadable."""
    if weights is None:
        return
    file_name = os.path.basename(urlparse(weights.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if cached.is_file():
        return
    try:
        with socket.create_connection(endpoint, timeout=timeout):
            return
    except OSError:
        raise NucleisegError(
            f"pretrained weights {file_name} are not cached and {endpoint[0]} is unreachable; "
            f"put the file at {cached} (from {weights.url}) or set model.weights=none"
        ) from None


def _common_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=0.0,  # the floor is `detect`'s argument
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
    )


def _set_anchors(model: MaskRCNN, cfg: ModelConfig) -> None:
    """Small anchors for nuclei. Set after building: the v2 builder rejects an anchor keyword."""
    levels = len(cfg.anchor_sizes)
    model.rpn.anchor_generator = AnchorGenerator(tuple((int(s),) for s in cfg.anchor_sizes), (tuple(float(r) for r in cfg.aspect_ratios),) * levels)
    head = model.rpn.head
    num_anchors = len(cfg.aspect_ratios)
    if head.cls_logits.out_channels != num_anchors:
        in_channels = head.cls_logits.in_channels
        conv_depth = len(head.conv)
        model.rpn.head = RPNHead(in_channels, num_anchors, conv_depth=conv_depth)


def _as_nuclei_model(model: MaskRCNN, cfg: ModelConfig) -> NucleiMaskRCNN:
    """The same modules (and so the same weights and state-dict keys) in `NucleiMaskRCNN`, with
    the window transform: torchvision's builders only make plain MaskRCNN objects."""
    heads = model.roi_heads
    out = NucleiMaskRCNN(
        model.backbone, num_classes=None, rpn_anchor_generator=model.rpn.anchor_generator, rpn_head=model.rpn.head,
        box_head=heads.box_head, box_predictor=heads.box_predictor, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
        **_common_kwargs(cfg),
    )
    out.transform = WindowTransform(model.transform.image_mean, model.transform.image_std, input_scale=cfg.input_scale)
    return out


def resolve_norm(cfg: ModelConfig) -> str:
    """The backbone's normalisation that model.norm names. auto: frozen BN over pretrained statistics
    (what torchvision does); GroupNorm from scratch, which beat trainable BN on the real val images
    (docs/recipes.md, the recipe table; frozen identity statistics blow activations up). resnet50_v2 is
    torchvision's design with trainable BN throughout, pretrained or not."""
    coco_weights, imagenet_weights, _ = _resolve_weights(cfg)
    pretrained = coco_weights is not None or imagenet_weights is not None
    if cfg.backbone == "resnet50_v2":
        if cfg.norm not in ("auto", "batchnorm"):
            raise NucleisegError(f"params.yaml: model.norm={cfg.norm} does not fit resnet50_v2, which is built with BatchNorm throughout; use model.norm=auto")
        return "batchnorm"
    if cfg.norm in ("groupnorm", "batchnorm") and pretrained:
        raise NucleisegError(f"params.yaml: model.norm={cfg.norm} cannot hold the pretrained BatchNorm statistics of model.weights={cfg.weights}; use model.norm=auto or model.weights=none")
    if cfg.norm == "auto":
        return "frozen" if pretrained else "groupnorm"
    return cfg.norm


def _norm_layer(norm: str):
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "batchnorm":
        return torch.nn.BatchNorm2d
    # GroupNorm does not depend on the batch: steadier with 2-4 windows per step than BN.
    return lambda channels: torch.nn.GroupNorm(32, channels)


def build_model(cfg: ModelConfig) -> NucleiMaskRCNN:
    """A 2-class Mask R-CNN for `cfg.backbone`, with weights per `cfg.weights`."""
    if cfg.backbone not in REGISTRY:
        raise NucleisegError(f"params.yaml: backbone={cfg.backbone!r} is unknown; choose one of {sorted(REGISTRY)}")
    if len(cfg.anchor_sizes) != 5:
        raise NucleisegError(f"params.yaml: model.anchor_sizes needs 5 sizes (one per FPN level), got {cfg.anchor_sizes}")
    spec = REGISTRY[cfg.backbone]
    coco_weights, imagenet_weights, local_file = _resolve_weights(cfg)
    norm = resolve_norm(cfg)
    ensure_weights_available(coco_weights)
    ensure_weights_available(imagenet_weights)
    kwargs = _common_kwargs(cfg)
    # torchvision's builders: COCO weights load into their exact layout; v2 has its own heads.
    if coco_weights is not None or cfg.backbone == "resnet50_v2":
        model = spec.builder(
            weights=coco_weights,
            weights_backbone=imagenet_weights,
            num_classes=91 if coco_weights is not None else NUM_CLASSES,
            trainable_backbone_layers=cfg.trainable_backbone_layers if (coco_weights or imagenet_weights) else None,
            **kwargs,
        )
    else:
        backbone = resnet_fpn_backbone(
            backbone_name=cfg.backbone.removesuffix("_v2"),
            weights=imagenet_weights,
            norm_layer=_norm_layer(norm),
            trainable_layers=cfg.trainable_backbone_layers if imagenet_weights is not None else 5,
        )
        model = MaskRCNN(backbone, num_classes=NUM_CLASSES, **kwargs)
    if coco_weights is not None:
        box_in = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(box_in, NUM_CLASSES)
        mask_in = model.roi_heads.mask_predictor.conv5_mask.in_channels
        model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_in, 256, NUM_CLASSES)
    _set_anchors(model, cfg)
    model = _as_nuclei_model(model, cfg)
    if cfg.mask_iou_head:
        # Built last: the other layers start from the same random weights with or without it.
        roi_size = model.roi_heads.mask_roi_pool.output_size[0]
        head = MaskIoUHead(model.backbone.out_channels, NUM_CLASSES, roi_size=roi_size)
        model.roi_heads = MaskScoringRoIHeads.extending(model.roi_heads, head)
    if local_file is not None:
        load_weights_file(model, local_file)
    return model


def _load_tensors(path: Path, what: str):
    """torch.load restricted to tensors and plain data: a model file never runs code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc) and "not an allowed global" not in str(exc):
            # torch's text here advises weights_only=False, the one thing never to do with a file of unknown origin.
            raise NucleisegError(f"{path}: cannot load it: not a file of tensors that torch.load can read (damaged, or another "
                                 f"kind of file); use a {what}") from None
        raise NucleisegError(f"{path}: refused: the file holds Python objects besides tensors and plain data, and loading it could run code; "
                             f"use a {what} written by nucleiseg (or a plain state dict)") from None
    except Exception as exc:
        raise NucleisegError(f"{path}: cannot load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); is it a {what}?") from None


def load_weights_file(model: MaskRCNN, path: Path) -> None:
    """Weights from a file: a checkpoint dict ('model' key) or a bare state dict; heads of other shapes are skipped."""
    state = _load_tensors(path, "weights file (.pt/.pth)")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise NucleisegError(f"{path}: not a state dict or a checkpoint with a 'model' entry")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and torch.is_tensor(v) and own[k].shape == v.shape}
    if not usable:
        raise NucleisegError(f"{path}: no tensor matches this {type(model).__name__}; is it a Mask R-CNN checkpoint of the same backbone?")
    skipped = sorted(set(state) - set(usable))
    if skipped:
        log.warning("%s: %d tensors of other shapes or names skipped (e.g. %s)", path, len(skipped), skipped[:3])
    model.load_state_dict(usable, strict=False)


def _state_mismatch(own: dict, state: dict) -> str | None:
    """The first difference between a model's state dict and a saved one, in words."""
    for key, tensor in own.items():
        if key not in state:
            return f"missing {key}"
        if not torch.is_tensor(state[key]) or state[key].shape != tensor.shape:
            return f"{key} is {tuple(getattr(state[key], 'shape', ()))}, the model needs {tuple(tensor.shape)}"
    extra = sorted(set(state) - set(own))
    return f"unexpected {extra[0]}" if extra else None


MODEL_FILE_FORMAT = 2  # 2: the norm stored resolved, the infer settings validation used, no box_score_thresh/min_size/max_size
# A model_config key added since (mask_iou_head) takes its default when a file lacks it, which rebuilds what that file
# was trained as: no new format.


def model_file(state: dict, cfg: ModelConfig, best_epoch: int, infer: InferConfig) -> dict:
    """What models/model.pt holds (read back by `load_trained`). Its config keeps the norm resolved,
    so that loading rebuilds the same layers whatever `auto` means then, and without downloading
    the weights training started from. `infer` is what the train stage's validation predicted with
    (`saved_infer_config`): `nucleiseg predict` starts from it, so a model is used as it was judged."""
    config = dataclasses.asdict(dataclasses.replace(cfg, norm=resolve_norm(cfg)))
    return {"format": MODEL_FILE_FORMAT, "model": state, "model_config": config, "best_epoch": best_epoch,
            "infer_config": dataclasses.asdict(infer)}


def saved_infer_config(ckpt: dict, source: str) -> InferConfig:
    """The infer settings the model was validated with, saved in its file; checked like params.yaml's."""
    values = ckpt.get("infer_config")
    if not isinstance(values, dict):
        raise NucleisegError(f"{source}: its infer_config is missing or not a mapping; the file is damaged or was edited, retrain it")
    return params_from_dict({"infer": values}, f"{source} (saved infer settings)").infer


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[NucleiMaskRCNN, dict]:
    """The model saved by the train stage (weights + the config it was built with), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise NucleisegError(f"{path}: no trained model; run the train stage first (dvc repro train)")
    ckpt = _load_tensors(path, "nucleiseg model file (models/model.pt)")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_config"), dict):
        raise NucleisegError(f"{path}: not a nucleiseg model file (needs a 'model' state dict and a 'model_config' mapping)")
    if ckpt.get("format") != MODEL_FILE_FORMAT:
        raise NucleisegError(f"{path}: model file format {ckpt.get('format', 1)}, this version reads format {MODEL_FILE_FORMAT}; "
                             "retrain it (dvc repro -f train)")
    saved = ckpt["model_config"]
    cfg = model_config_from_dict({**saved, "weights": "none"}, str(path))
    model = build_model(cfg)
    problem = _state_mismatch(model.state_dict(), ckpt["model"])
    if problem:
        raise NucleisegError(f"{path}: its weights do not fit the model its config describes ({problem}); the file is damaged or was edited, retrain it")
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, ckpt
