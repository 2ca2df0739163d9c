"""Mask Scoring R-CNN (Huang et al., CVPR 2019): a MaskIoU head that predicts how well each mask fits its nucleus.

The leaderboard keeps the 100 highest-scoring detections per image, so the ranking decides the score. The box
classifier's score says whether a box holds a nucleus, not whether its mask is good; the MaskIoU head regresses the
IoU between the predicted mask and its ground-truth mask, and `infer.score: mask_iou` ranks by detector score x
predicted IoU.

- `MaskIoUHead`: the paper's head. Input: the mask branch's RoI features (the 14 x 14 RoIAlign output that the mask
  head reads) concatenated with the predicted mask of the RoI's class, max-pooled from 28 x 28 to 14 x 14; 4 convs
  (the last with stride 2), 2 fully connected layers, one IoU per class.
- `mask_iou_targets`: per positive RoI, the IoU of its predicted mask binarised at 0.5 with its whole matched
  ground-truth mask (not only the part inside the RoI: a box that cuts a nucleus in half holds a poor mask).
- `MaskScoringRoIHeads`: torchvision's `RoIHeads` (box and mask branches, their losses and outputs unchanged) plus
  the head, its L2 loss `loss_mask_iou` on positive RoIs (weight 1, as in the paper) and, at inference, `mask_ious`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
    project_masks_on_boxes,
)

MASK_BINARY_THRESHOLD = 0.5  # the predicted mask is binarised here for its IoU target (the paper's)


class MaskIoUHead(nn.Module):
    """Predicted mask IoU per class from RoI features (N x C x S x S) and the RoI class's mask probabilities (N x 2S x 2S)."""

    def __init__(self, in_channels: int, num_classes: int, roi_size: int = 14, conv_channels: int = 256, fc_channels: int = 1024):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.Conv2d(in_channels + 1 if i == 0 else conv_channels, conv_channels, 3, stride=2 if i == 3 else 1, padding=1))
            layers.append(nn.ReLU(inplace=True))
        self.convs = nn.Sequential(*layers)
        pooled = (roi_size - 1) // 2 + 1  # after the stride-2 conv
        self.fcs = nn.Sequential(
            nn.Flatten(),
            nn.Linear(conv_channels * pooled * pooled, fc_channels), nn.ReLU(inplace=True),
            nn.Linear(fc_channels, fc_channels), nn.ReLU(inplace=True),
        )
        self.iou = nn.Linear(fc_channels, num_classes)
        for layer in self.convs:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        # Starts near 0: an untrained head ranks every mask alike rather than at random.
        nn.init.normal_(self.iou.weight, std=0.01)
        nn.init.zeros_(self.iou.bias)

    def forward(self, roi_features: Tensor, mask_probs: Tensor) -> Tensor:
        pooled_masks = F.max_pool2d(mask_probs[:, None].to(roi_features.dtype), kernel_size=2, stride=2)
        return self.iou(self.fcs(self.convs(torch.cat([roi_features, pooled_masks], dim=1))))


def gt_share_inside(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor) -> Tensor:
    """For each box, the share of its matched ground-truth mask's pixels (centres) that lie inside it."""
    height, width = gt_masks.shape[-2:]
    boxes = boxes.float()  # pixel positions past 256 are not exact in bfloat16 (proposals under autocast)
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    rows = ((ys >= boxes[:, 1:2]) & (ys < boxes[:, 3:4])).to(gt_masks.dtype)  # P x H
    cols = ((xs >= boxes[:, 0:1]) & (xs < boxes[:, 2:3])).to(gt_masks.dtype)  # P x W
    matched = gt_masks[matched_idxs]
    inside = ((matched * cols[:, None, :]).sum(dim=2) * rows).sum(dim=1)
    return inside.float() / matched.sum(dim=(1, 2)).float().clamp(min=1)


def mask_iou_targets(mask_probs: Tensor, boxes: list[Tensor], gt_masks: list[Tensor], matched_idxs: list[Tensor]) -> Tensor:
    """IoU of each predicted mask (P x M x M probabilities of the positive RoIs, all images) binarised at 0.5 with its
    matched ground-truth mask, on the M x M grid of its box: the ground truth's grid area is scaled up by the share of
    its pixels inside the box, so that the union counts the whole nucleus (the official implementation's `mask_ratios`)."""
    size = mask_probs.shape[-1]
    in_box = torch.cat([project_masks_on_boxes(m, b, i, size) for m, b, i in zip(gt_masks, boxes, matched_idxs)]) >= 0.5
    share = torch.cat([gt_share_inside(m, b, i) for m, b, i in zip(gt_masks, boxes, matched_idxs)])
    predicted = mask_probs.detach() > MASK_BINARY_THRESHOLD
    overlap = (predicted & in_box).sum(dim=(1, 2)).float()
    gt_area = in_box.sum(dim=(1, 2)).float() / share.clamp(min=1e-6)
    union = predicted.sum(dim=(1, 2)).float() + gt_area - overlap
    return overlap / union.clamp(min=1)


def mask_iou_loss(predicted: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """L2 between the predicted IoU of each positive RoI's class and its target; 0 (still a graph) without positives."""
    if targets.numel() == 0:
        return predicted.sum() * 0
    chosen = predicted[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.mse_loss(chosen.float(), targets)


class MaskScoringRoIHeads(RoIHeads):
    """torchvision's RoIHeads plus `mask_iou_head` (the state dict gains `mask_iou_head.*`, nothing else moves).

    Training adds `loss_mask_iou` to torchvision's losses; inference adds `mask_ious` (N, in [0, 1]) to each result.
    Keypoints are not supported (a nuclei model has none). The predicted mask enters the head detached: the IoU
    regression learns to judge masks, and leaves learning them to the mask loss.
    """

    def __init__(self, *args, mask_iou_head: MaskIoUHead, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_iou_head = mask_iou_head

    @classmethod
    def extending(cls, heads: RoIHeads, mask_iou_head: MaskIoUHead) -> MaskScoringRoIHeads:
        """`heads`' own modules and settings, plus `mask_iou_head`."""
        if heads.has_keypoint() or not heads.has_mask():
            raise ValueError("the MaskIoU head needs RoI heads with a mask branch and no keypoint branch")
        return cls(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
            mask_iou_head=mask_iou_head,
        )

    def masks_and_ious(self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
                       image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: the detections' N x 1 x M x M mask probabilities (of their labels) and predicted mask IoUs in [0, 1]."""
        roi_features = self.mask_roi_pool(features, boxes, image_shapes)
        masks = maskrcnn_inference(self.mask_predictor(self.mask_head(roi_features)), labels)
        all_labels = torch.cat(labels)
        predicted = self.mask_iou_head(roi_features, torch.cat(masks)[:, 0])
        ious = predicted[torch.arange(all_labels.shape[0], device=all_labels.device), all_labels].float().clamp(0, 1)
        return masks, list(ious.split([len(b) for b in boxes]))

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
            boxes, scores, labels = self.postprocess_detections(*self.box_predictor(box_features), proposals, image_shapes)
            masks, ious = self.masks_and_ious(features, boxes, labels, image_shapes)
            results = [{"boxes": b, "labels": lab, "scores": s, "masks": m, "mask_ious": i}
                       for b, lab, s, m, i in zip(boxes, labels, scores, masks, ious)]
            return results, {}
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        # As torchvision: the mask branch trains on the positive RoIs only.
        positive = [torch.where(lab > 0)[0] for lab in labels]
        mask_proposals = [p[k] for p, k in zip(proposals, positive)]
        positive_matches = [m[k] for m, k in zip(matched_idxs, positive)]
        roi_features = self.mask_roi_pool(features, mask_proposals, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(roi_features))
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        loss_mask = maskrcnn_loss(mask_logits, mask_proposals, gt_masks, gt_labels, positive_matches)
        positive_labels = torch.cat([gl[m] for gl, m in zip(gt_labels, positive_matches)])
        mask_probs = mask_logits[torch.arange(positive_labels.shape[0], device=positive_labels.device), positive_labels].sigmoid().detach()
        iou_targets = mask_iou_targets(mask_probs, mask_proposals, gt_masks, positive_matches)
        loss_mask_iou = mask_iou_loss(self.mask_iou_head(roi_features, mask_probs), positive_labels, iou_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask, "loss_mask_iou": loss_mask_iou}
        return [], losses
