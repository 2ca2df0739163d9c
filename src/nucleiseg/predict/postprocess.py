"""From model outputs to Instances: masks pasted into their own box only.

torchvision pastes every 28x28 mask into a full-window probability map
(N x H x W floats: ~1 GB for 1000 detections on a 512 window). Here the model
returns the raw 28x28 masks (`NucleiMaskRCNN.detect`) and each one is resized into its
box, so memory grows with the nuclei, not with window area x detections.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from nucleiseg.core.masks import Instance

SCORE_MODES = ("detector", "mask_weighted", "mask_iou")


def detections_to_instances(
    detection: dict,
    height: int,
    width: int,
    mask_threshold: float = 0.5,
    score_mode: str = "mask_weighted",
    min_area: int = 0,
    fill_holes: bool = False,
    offset: tuple[int, int] = (0, 0),
) -> list[Instance]:
    """Instances (cropped masks, image coordinates = window + offset) from one output dict.

    `detection['masks']` are raw N x 1 x M x M probabilities (from `NucleiMaskRCNN.detect`).
    score_mode 'mask_weighted' multiplies the detector score by the mean mask
    probability inside the mask: confident, crisp masks rank first. 'mask_iou' multiplies it
    by the mask's predicted IoU (`detection['mask_ious']`, from a model with the MaskIoU head).
    The detector score is kept as the instance's `detector_score`.
    """
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score mode {score_mode!r} not in {SCORE_MODES}")
    if score_mode == "mask_iou" and "mask_ious" not in detection:
        raise ValueError("score mode 'mask_iou' needs the detections' predicted mask IoUs ('mask_ious'): a model with the MaskIoU head")
    boxes = detection["boxes"].detach().float().cpu()
    scores = detection["scores"].detach().float().cpu()
    masks = detection["masks"].detach().float().cpu()
    mask_ious = detection["mask_ious"].detach().float().cpu() if score_mode == "mask_iou" else None
    if boxes.shape[0] == 0:
        return []
    # Same geometry as torchvision's paste_masks_in_image: one pixel of padding around the mask.
    masks, scale = expand_masks(masks, padding=1)
    boxes = expand_boxes(boxes, scale).to(torch.int64)
    out = []
    for i in range(boxes.shape[0]):
        bx0, by0, bx1, by1 = boxes[i].tolist()
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        prob = F.interpolate(masks[i][None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        cx0, cy0 = max(bx0, 0), max(by0, 0)
        cx1, cy1 = min(bx0 + w, width), min(by0 + h, height)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        prob = prob[cy0 - by0 : cy1 - by0, cx0 - bx0 : cx1 - bx0]
        binary = (prob > mask_threshold).numpy()
        if fill_holes:
            binary = ndimage.binary_fill_holes(binary)
        if binary.sum() < max(min_area, 1):
            continue
        score = float(scores[i])
        if score_mode == "mask_weighted":
            score *= float(prob.numpy()[binary].mean())
        elif score_mode == "mask_iou":
            score *= float(mask_ious[i])
        inst = Instance(binary, cx0, cy0, score, {"detector_score": float(scores[i])}).tight()
        if inst is not None:
            out.append(inst.shifted(*offset))
    return out


def predict_batch(model, images: list[torch.Tensor], device, score_floor: float) -> list[dict]:
    """Raw detections (on CPU) for a batch of 3 x H x W float images; `model.detect` is the protocol
    (`NucleiMaskRCNN.detect`: boxes, scores, labels, N x 1 x M x M mask probabilities)."""
    outputs = model.detect([img.to(device, non_blocking=True) for img in images], score_floor)
    return [{k: v.cpu() for k, v in out.items()} for out in outputs]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """3 x H x W float [0, 1]; the pixels are copied (images read by PIL are read-only arrays)."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
