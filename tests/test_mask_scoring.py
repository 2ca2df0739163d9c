"""Mask Scoring R-CNN (model.mask_iou_head, infer.score: mask_iou): the IoU targets on hand-made masks, the loss and
its gradients, training and the model file, `detect`'s predicted IoUs, the ranking, and the refusals without the head."""

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from nucleiseg.core.config import InferConfig, params_from_dict
from nucleiseg.core.errors import NucleisegError
from nucleiseg.model import maskrcnn as model_mod
from nucleiseg.model.mask_scoring import (
    MaskIoUHead,
    mask_iou_loss,
    mask_iou_targets,
)
from nucleiseg.model.maskrcnn import build_model, load_trained
from nucleiseg.predict.postprocess import detections_to_instances
from nucleiseg.predict.predictor import Predictor
from nucleiseg.train.hooks import WholeImageValidator

M = 28  # the mask grid


@pytest.fixture(scope="module")
def head_cfg(tiny_model_cfg):
    return dataclasses.replace(tiny_model_cfg, mask_iou_head=True)


@pytest.fixture(scope="module")
def head_model(head_cfg):
    torch.manual_seed(0)
    return build_model(head_cfg).eval()


def square_gt(size: int = 40) -> torch.Tensor:
    """One ground-truth nucleus: the 10 x 10 square at rows and columns 10-19."""
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 10:20, 10:20] = 1
    return masks


def targets(probs: torch.Tensor, box: list[float], gt: torch.Tensor) -> torch.Tensor:
    return mask_iou_targets(probs, [torch.tensor([box])], [gt], [torch.tensor([0])])


def one_nucleus_target(size: int = 64) -> dict:
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 12:30, 14:28] = 1
    return {"boxes": torch.tensor([[14.0, 12.0, 28.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}


def test_iou_target_of_hand_made_masks():
    """The box is the square; a mask covering its left half (10 x 5 of 10 x 10) scores 0.5, the ground truth's own grid
    1, an empty mask 0. On the 28 x 28 grid up to a grid cell: torchvision samples targets half a pixel off the box."""
    gt, box = square_gt(), [10.0, 10.0, 20.0, 20.0]
    half = torch.zeros(1, M, M)
    half[0, :, : M // 2] = 1.0
    assert targets(half, box, gt).item() == pytest.approx(0.5, abs=0.02)
    own_grid = project_masks_on_boxes(gt, torch.tensor([box]), torch.tensor([0]), M)
    assert targets(own_grid, box, gt).item() == pytest.approx(1.0)
    assert targets(torch.zeros(1, M, M), box, gt).item() == 0.0
    # Probabilities are binarised at 0.5.
    assert targets(half * 0.6, box, gt).item() == targets(half, box, gt).item()
    assert targets(half * 0.4, box, gt).item() == 0.0


def test_iou_target_counts_the_whole_nucleus_not_only_the_part_in_the_box():
    """A box over the left half of the square, its mask filling the box: the mask covers half the nucleus (IoU 0.5),
    although it matches the ground truth inside the box almost exactly."""
    full = torch.ones(1, M, M)
    assert targets(full, [10.0, 10.0, 15.0, 20.0], square_gt()).item() == pytest.approx(0.5, abs=0.02)


def test_loss_is_zero_where_the_prediction_is_right_and_without_positives():
    predicted = torch.tensor([[0.0, 0.3], [0.0, 0.8]], requires_grad=True)
    labels = torch.tensor([1, 1])
    assert mask_iou_loss(predicted, labels, torch.tensor([0.3, 0.8])).item() == pytest.approx(0.0)
    loss = mask_iou_loss(predicted, labels, torch.tensor([0.5, 0.4]))
    assert loss.item() == pytest.approx((0.2**2 + 0.4**2) / 2)
    loss.backward()
    assert predicted.grad[:, 0].abs().sum() == 0  # only the label's column is trained
    none = mask_iou_loss(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert none.item() == 0.0
    none.backward()


def test_head_shapes():
    head = MaskIoUHead(in_channels=8, num_classes=2)
    out = head(torch.rand(3, 8, 14, 14), torch.rand(3, 28, 28))
    assert out.shape == (3, 2)
    assert head(torch.rand(0, 8, 14, 14), torch.rand(0, 28, 28)).shape == (0, 2)


def test_training_adds_a_finite_loss_whose_gradients_train_the_head_not_the_masks(head_cfg):
    torch.manual_seed(0)
    model = build_model(head_cfg).train()
    losses = model([torch.rand(3, 64, 64)], [one_nucleus_target()])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_mask_iou", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_mask_iou"] > 0  # an untrained head predicts ~0, the masks overlap their nucleus
    losses["loss_mask_iou"].backward()
    head_grads = [p.grad for p in model.roi_heads.mask_iou_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads) and any(g.abs().sum() > 0 for g in head_grads)
    # The predicted mask enters the head detached: this loss leaves the mask branch's own layers alone.
    assert all(p.grad is None for p in model.roi_heads.mask_predictor.parameters())
    assert all(p.grad is None for p in model.roi_heads.mask_head.parameters())
    assert any(p.grad is not None for p in model.backbone.parameters())  # the RoI features it reads are the backbone's


def test_the_head_adds_only_its_own_weights_and_leaves_the_rest_as_without_it(tiny_model_cfg, head_cfg):
    torch.manual_seed(0)
    plain = build_model(tiny_model_cfg).state_dict()
    torch.manual_seed(0)
    with_head = build_model(head_cfg).state_dict()
    added = set(with_head) - set(plain)
    assert set(plain) <= set(with_head) and added and all(k.startswith("roi_heads.mask_iou_head.") for k in added)
    for key, value in plain.items():
        assert torch.equal(with_head[key], value), key


def test_a_model_file_with_the_head_round_trips(head_model, head_cfg, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model_mod.model_file(head_model.state_dict(), head_cfg, best_epoch=1, infer=InferConfig(score="mask_iou")), path)
    loaded, ckpt = load_trained(path)
    assert loaded.predicts_mask_iou and ckpt["model_config"]["mask_iou_head"] is True
    for key, value in head_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert model_mod.saved_infer_config(ckpt, str(path)).score == "mask_iou"


@pytest.mark.slow
def test_a_tiny_model_with_the_head_trains_logs_its_loss_per_epoch_and_keeps_it_in_its_model_file(head_cfg, tiny_tiles, make_params, tmp_path):
    """The engine's loop (3 steps): the head's loss is a per-epoch metric like the others (MLflow's train/loss_mask_iou),
    the head learns, and the trained weights load back with it."""
    from nucleiseg.train.loop import fit
    from nucleiseg.train.samples import TileDataset
    from nucleiseg.train.stage import epoch_metrics

    torch.manual_seed(0)
    model = build_model(head_cfg)
    initial = {k: v.clone() for k, v in model.roi_heads.mask_iou_head.state_dict().items()}
    cfg = make_params(train={"epochs": 1, "samples_per_epoch": 3}).train
    result = fit(model, TileDataset(tiny_tiles, "train", cfg.augment, seed=0), cfg, torch.device("cpu"), seed=0, show_progress=False)
    (row,) = result.history
    assert np.isfinite(row["train_loss_mask_iou"]) and "train/loss_mask_iou" in epoch_metrics(row)
    assert any(not torch.equal(v, initial[k]) for k, v in model.roi_heads.mask_iou_head.state_dict().items())
    path = tmp_path / "model.pt"
    torch.save(model_mod.model_file(result.best_state, head_cfg, result.best_epoch, InferConfig(score="mask_iou")), path)
    loaded, _ = load_trained(path)
    for key, value in result.best_state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_model_file_without_the_key_loads_as_before(tiny_model_cfg, tmp_path):
    """Files written before the head existed have no `mask_iou_head` in their config: they load without it."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    saved = model_mod.model_file(model.state_dict(), tiny_model_cfg, best_epoch=1, infer=InferConfig())
    del saved["model_config"]["mask_iou_head"]
    path = tmp_path / "old.pt"
    torch.save(saved, path)
    loaded, _ = load_trained(path)
    assert not loaded.predicts_mask_iou and "mask_ious" not in loaded.detect([torch.rand(3, 64, 64)], 0.0)[0]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_detect_returns_one_predicted_iou_per_detection(head_model):
    """In [0, 1], and the same as the model's own inference path (`forward` in eval mode) gives."""
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 64), torch.rand(3, 80, 72)]
    raw = head_model.detect(images, 0.0)
    with torch.no_grad():
        reference = head_model(images)
    assert sum(len(out["boxes"]) for out in raw) > 0
    for out, ref in zip(raw, reference):
        assert out["mask_ious"].shape == out["scores"].shape
        assert (out["mask_ious"] >= 0).all() and (out["mask_ious"] <= 1).all()
        torch.testing.assert_close(out["mask_ious"], ref["mask_ious"])
        torch.testing.assert_close(out["scores"], ref["scores"])
    (nothing,) = head_model.detect(images[:1], 1.0)
    assert nothing["mask_ious"].shape == (0,)


def hand_made_detection(scores: list[float], ious: list[float]) -> dict:
    """Disjoint square detections in a 64 px window, one per score."""
    boxes = torch.tensor([[2.0 + 20 * i, 2.0, 16.0 + 20 * i, 16.0] for i in range(len(scores))])
    return {"boxes": boxes, "scores": torch.tensor(scores), "labels": torch.ones(len(scores), dtype=torch.long),
            "masks": torch.ones(len(scores), 1, M, M), "mask_ious": torch.tensor(ious)}


def test_mask_iou_score_is_detector_score_times_predicted_iou():
    detection = hand_made_detection([0.9, 0.6], [0.2, 0.9])
    first, second = detections_to_instances(detection, 64, 64, score_mode="mask_iou")
    assert (first.score, second.score) == (pytest.approx(0.18), pytest.approx(0.54))
    assert (first.extra["detector_score"], second.extra["detector_score"]) == (pytest.approx(0.9), pytest.approx(0.6))
    del detection["mask_ious"]
    with pytest.raises(ValueError, match="MaskIoU head"):
        detections_to_instances(detection, 64, 64, score_mode="mask_iou")


class ScriptedDetector:
    """`detect` answers the hand-made detections in every window; has the MaskIoU head's output."""

    predicts_mask_iou = True

    def __init__(self, detection: dict):
        self.detection = detection

    def detect(self, images, score_floor):
        return [dict(self.detection) for _ in images]


def test_predictor_ranks_by_detector_score_times_predicted_iou():
    """Through the predictor (window, post-processing, stitching): the low-IoU detection drops behind."""
    model = ScriptedDetector(hand_made_detection([0.9, 0.6, 0.5], [0.2, 0.9, 0.7]))
    cfg = InferConfig(window=64, overlap=0, score="mask_iou", min_area=0)
    found = Predictor(model, cfg).predict(np.zeros((64, 64, 3), np.uint8))
    assert [round(inst.score, 4) for inst in found] == [0.54, 0.35, 0.18]
    assert [round(inst.extra["detector_score"], 4) for inst in found] == [0.6, 0.5, 0.9]
    detector_ranked = Predictor(model, dataclasses.replace(cfg, score="detector")).predict(np.zeros((64, 64, 3), np.uint8))
    assert [round(inst.score, 4) for inst in detector_ranked] == [0.9, 0.6, 0.5]


def test_mask_iou_without_the_head_is_refused_in_one_line(tiny_model_cfg, make_params):
    # params.yaml: the model section says there is no head.
    with pytest.raises(NucleisegError, match=r"infer.score = 'mask_iou'.*model.mask_iou_head is false") as info:
        make_params(infer={"score": "mask_iou"})
    assert "\n" not in str(info.value)
    assert make_params(infer={"score": "mask_iou"}, model={"mask_iou_head": True}).infer.score == "mask_iou"
    # The infer section alone (a model file's saved settings, predict's flags) is checked where the model is loaded.
    assert params_from_dict({"infer": {"score": "mask_iou"}}).infer.score == "mask_iou"
    with pytest.raises(NucleisegError, match="needs a model trained with the MaskIoU head") as info:
        Predictor(build_model(tiny_model_cfg).eval(), InferConfig(score="mask_iou"))
    assert "\n" not in str(info.value)


def test_whole_image_validation_ranks_by_the_head(head_model, tiny_data, tiny_split, make_params):
    """The train stage's validation uses infer.score: with mask_iou it runs through the head, and the evaluator
    reports the detector-score ranking beside it."""
    from nucleiseg.data.layout import load_train_sample

    params = make_params(model={"mask_iou_head": True}, infer={"score": "mask_iou", "score_floor": 0.0, "min_area": 0})
    samples = [load_train_sample(tiny_data / "data" / "raw", name) for name in tiny_split["val"]]
    metrics = WholeImageValidator(samples, params.infer, params.evaluate, torch.device("cpu"))(head_model)
    assert 0.0 <= metrics["ap50_all"] <= 1.0
    assert "ap50_detector_score" in metrics
