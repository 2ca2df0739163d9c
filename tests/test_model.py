"""Model registry: every backbone builds and runs, nuclei-sized settings hold, weights fail fast offline, norm and
input_scale choices, raw masks, model files round-trip."""

import dataclasses
import time

import pytest
import torch

import nucleiseg.model.maskrcnn as model_mod
from nucleiseg.core.config import InferConfig, ModelConfig
from nucleiseg.core.errors import NucleisegError
from nucleiseg.model.maskrcnn import (
    REGISTRY,
    WindowTransform,
    build_model,
    load_trained,
)
from nucleiseg.predict.postprocess import detections_to_instances

DETECTIONS = 20  # tiny_model_cfg's detections_per_img


@pytest.fixture(scope="module")
def small_cfg(tiny_model_cfg):
    """small_cfg(backbone, **overrides): the tiny model settings (conftest) for any backbone."""
    assert tiny_model_cfg.detections_per_img == DETECTIONS

    def make(backbone: str = "resnet18", **overrides) -> ModelConfig:
        return dataclasses.replace(tiny_model_cfg, backbone=backbone, **overrides)

    return make


def one_nucleus_target(size: int = 64) -> dict:
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 12:30, 14:28] = 1
    return {"boxes": torch.tensor([[14.0, 12.0, 28.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}


@pytest.fixture(scope="module")
def r18(small_cfg):
    torch.manual_seed(0)
    return build_model(small_cfg("resnet18")).eval()


def test_registry_lists_the_documented_backbones():
    assert set(REGISTRY) == {"resnet18", "resnet34", "resnet50", "resnet50_v2", "resnet101"}


@pytest.mark.parametrize(
    "backbone",
    [
        "resnet18",
        "resnet34",
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("resnet50_v2", marks=pytest.mark.slow),
        pytest.param("resnet101", marks=pytest.mark.slow),
    ],
)
def test_every_backbone_builds_and_runs(backbone, small_cfg):
    torch.manual_seed(0)
    model = build_model(small_cfg(backbone))
    image = torch.rand(3, 64, 64)
    model.eval()
    with torch.no_grad():
        (out,) = model([image])
    assert set(out) >= {"boxes", "labels", "scores", "masks"}
    assert out["masks"].shape[1:] == (1, 64, 64)
    assert out["boxes"].shape[0] <= DETECTIONS
    model.train()
    losses = model([image], [one_nucleus_target()])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_from_scratch_backbones_use_groupnorm(small_cfg):
    """norm auto from scratch: GroupNorm (it beat BN on real val); frozen BN with identity statistics would blow
    activations up, and trainable BN stays a choice."""
    body = build_model(small_cfg("resnet18")).backbone.body
    assert isinstance(body.bn1, torch.nn.GroupNorm) and isinstance(body.layer4[1].bn2, torch.nn.GroupNorm)
    assert all(p.requires_grad for p in body.parameters())
    assert isinstance(build_model(small_cfg("resnet18", norm="batchnorm")).backbone.body.bn1, torch.nn.BatchNorm2d)


def test_norm_resolution(small_cfg, tmp_path):
    """What auto means per weights (no download needed to decide), and the choices that cannot work."""
    assert model_mod.resolve_norm(small_cfg("resnet18")) == "groupnorm"
    assert model_mod.resolve_norm(small_cfg("resnet18", weights="imagenet")) == "frozen"
    assert model_mod.resolve_norm(small_cfg("resnet50", weights="coco")) == "frozen"
    assert model_mod.resolve_norm(small_cfg("resnet50_v2")) == "batchnorm"  # torchvision's v2 design, pretrained or not
    local = tmp_path / "w.pt"
    torch.save({}, local)
    assert model_mod.resolve_norm(small_cfg("resnet18", weights=str(local))) == "groupnorm"
    with pytest.raises(NucleisegError, match="model.norm=groupnorm cannot hold"):
        model_mod.resolve_norm(small_cfg("resnet50", weights="coco", norm="groupnorm"))
    with pytest.raises(NucleisegError, match="resnet50_v2"):
        model_mod.resolve_norm(small_cfg("resnet50_v2", norm="groupnorm"))


def test_nuclei_settings(r18, small_cfg):
    cfg = small_cfg("resnet18", anchor_sizes=[4, 8, 16, 32, 64], detections_per_img=37)
    model = build_model(cfg).eval()
    assert model.rpn.anchor_generator.sizes == ((4,), (8,), (16,), (32,), (64,))
    assert model.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert model.rpn.head.cls_logits.out_channels == 3
    assert model.roi_heads.detections_per_img == 37
    assert model.roi_heads.nms_thresh == pytest.approx(0.3)
    assert ModelConfig().anchor_sizes == [8, 16, 32, 64, 128]

    # No resize: a 100x100 input stays 100x100 (only padded to a multiple of 32 for the batch).
    assert isinstance(r18.transform, WindowTransform)
    image = torch.rand(3, 100, 100)
    images, _ = r18.transform([image])
    assert images.image_sizes == [(100, 100)]
    assert images.tensors.shape[-2:] == (128, 128)
    with torch.no_grad():
        (out,) = r18([image])
    boxes = out["boxes"]
    assert out["masks"].shape[-2:] == (100, 100)
    if boxes.numel():
        assert boxes.min() >= 0 and boxes[:, 2].max() <= 100 and boxes[:, 3].max() <= 100


def test_anchor_sizes_need_five_levels(small_cfg):
    with pytest.raises(NucleisegError, match="5 sizes"):
        build_model(small_cfg("resnet18", anchor_sizes=[8, 16, 32]))


@pytest.mark.parametrize("backbone, weights", [("resnet50", "coco"), ("resnet18", "auto"), ("resnet34", "imagenet")])
def test_offline_weights_fail_fast_and_say_where_to_put_them(backbone, weights, monkeypatch, tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(model_mod.socket, "create_connection", offline)
    started = time.perf_counter()
    with pytest.raises(NucleisegError) as info:
        build_model(ModelConfig(backbone=backbone, weights=weights))
    assert time.perf_counter() - started < 5
    message = str(info.value)
    file_name = {"resnet50": "maskrcnn_resnet50_fpn_coco", "resnet18": "resnet18-", "resnet34": "resnet34-"}[backbone]
    assert file_name in message and ".pth" in message
    assert "hub/checkpoints" in message
    assert "model.weights=none" in message


def test_bad_weights_and_backbone_choices(tmp_path, small_cfg):
    with pytest.raises(NucleisegError, match="coco"):
        build_model(ModelConfig(backbone="resnet101", weights="coco"))
    with pytest.raises(NucleisegError, match="/no/such/file"):
        build_model(ModelConfig(backbone="resnet18", weights="/no/such/file"))
    with pytest.raises(NucleisegError, match="resnet152"):
        build_model(ModelConfig(backbone="resnet152", weights="none"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(NucleisegError, match="cannot load"):
        build_model(small_cfg("resnet18", weights=str(junk)))


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "checkpoint"])
def test_weights_from_a_local_file(r18, tmp_path, wrapped, small_cfg):
    path = tmp_path / "weights.pth"
    state = r18.state_dict()
    torch.save({"model": state, "epoch": 3} if wrapped else state, path)
    torch.manual_seed(123)  # a different init: every tensor must come from the file
    loaded = build_model(small_cfg("resnet18", weights=str(path))).state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_detect_gives_raw_masks_above_the_floor_like_a_detector_built_with_it(small_cfg):
    """`detect(images, score_floor)` keeps exactly the boxes a detector with that threshold keeps (same NMS
    and top-k), with raw M x M masks that paste inside the image, and leaves the model unchanged."""
    torch.manual_seed(0)
    images = [torch.rand(3, 80, 96), torch.rand(3, 64, 64)]
    model = build_model(small_cfg("resnet18", detections_per_img=50)).eval()
    assert model.roi_heads.score_thresh == 0.0
    with torch.no_grad():
        everything = model(images)
    scores = torch.cat([out["scores"] for out in everything])
    floor = float(scores.median())  # a floor that really drops detections
    raw = model.detect(images, floor)
    assert model.roi_heads.score_thresh == 0.0 and not model.training
    model.roi_heads.score_thresh = floor
    with torch.no_grad():
        reference = model(images)
    for out, ref, image in zip(raw, reference, images):
        torch.testing.assert_close(out["boxes"], ref["boxes"])
        torch.testing.assert_close(out["scores"], ref["scores"])
        assert out["masks"].shape == (len(ref["boxes"]), 1, 28, 28)
        height, width = image.shape[-2:]
        for inst in detections_to_instances(out, height, width, mask_threshold=0.3):
            assert 0 <= inst.x0 < inst.x1 <= width and 0 <= inst.y0 < inst.y1 <= height and inst.mask.any()
    assert 0 < sum(len(out["boxes"]) for out in raw) < len(scores)
    (nothing,) = model.detect(images[:1], 1.0)
    assert nothing["boxes"].shape == (0, 4) and nothing["masks"].shape == (0, 1, 28, 28)


def test_norm_choices(small_cfg):
    gn = build_model(small_cfg("resnet18", norm="groupnorm"))
    assert isinstance(gn.backbone.body.bn1, torch.nn.GroupNorm)
    frozen = build_model(small_cfg("resnet18", norm="frozen"))
    assert type(frozen.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
    with pytest.raises(NucleisegError, match="model.norm"):
        build_model(small_cfg("resnet18", norm="groupnorm", weights="imagenet"))


def test_input_scale_resizes_windows_and_maps_outputs_back(small_cfg):
    """input_scale 2: the backbone sees a 128 px window, boxes and masks come back in 64 px coordinates."""
    torch.manual_seed(0)
    model = build_model(small_cfg("resnet18", input_scale=2.0, detections_per_img=5)).eval()
    image = torch.rand(3, 64, 64)
    images, _ = model.transform([image])
    assert images.image_sizes == [(128, 128)]
    with torch.no_grad():
        (out,) = model([image])
    (raw,) = model.detect([image], 0.0)
    assert out["boxes"].shape[0] > 0 and out["masks"].shape[-2:] == (64, 64)
    assert out["boxes"].max() <= 64 and raw["boxes"].max() <= 64
    torch.testing.assert_close(raw["boxes"], out["boxes"])
    # Training targets are scaled with the window.
    model.train()
    target = one_nucleus_target()
    _, scaled = model.transform([image], [target])
    torch.testing.assert_close(scaled[0]["boxes"], target["boxes"] * 2)
    assert scaled[0]["masks"].shape[-2:] == (128, 128)


def test_trained_model_file_round_trips(r18, small_cfg, tmp_path):
    """load_trained: the train stage's file (weights + config) rebuilds the same network, in eval mode."""
    path = tmp_path / "model.pt"
    torch.save(model_mod.model_file(r18.state_dict(), small_cfg("resnet18"), best_epoch=3, infer=InferConfig()), path)
    model, ckpt = load_trained(path)
    assert not model.training and ckpt["best_epoch"] == 3 and ckpt["format"] == model_mod.MODEL_FILE_FORMAT
    for key, value in r18.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.roi_heads.detections_per_img == DETECTIONS


def test_model_file_keeps_the_resolved_norm(small_cfg, tmp_path):
    """A model file names its norm (never `auto`), so it reloads the same layers whatever auto means later."""
    saved = model_mod.model_file({}, small_cfg("resnet18"), best_epoch=2, infer=InferConfig(window=256, overlap=96))
    assert saved["model_config"]["norm"] == "groupnorm" and saved["best_epoch"] == 2
    assert model_mod.saved_infer_config(saved, "m.pt") == InferConfig(window=256, overlap=96)  # what predict starts from
    with pytest.raises(NucleisegError, match="infer_config is missing"):
        model_mod.saved_infer_config({"model": {}}, "m.pt")
    with pytest.raises(NucleisegError, match=r"m.pt \(saved infer settings\): infer.window = 8 is not allowed"):
        model_mod.saved_infer_config({"infer_config": {"window": 8}}, "m.pt")
    torch.manual_seed(0)
    for norm in ("batchnorm", "frozen", "groupnorm"):
        model = build_model(small_cfg("resnet18", norm=norm))
        path = tmp_path / f"{norm}.pt"
        torch.save(model_mod.model_file(model.state_dict(), small_cfg("resnet18", norm=norm), best_epoch=1, infer=InferConfig()), path)
        loaded, _ = load_trained(path)
        assert type(loaded.backbone.body.bn1) is type(model.backbone.body.bn1), norm
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_trained_model_file_errors(r18, small_cfg, tmp_path):
    with pytest.raises(NucleisegError, match="dvc repro train"):
        load_trained(tmp_path / "missing.pt")
    bare = tmp_path / "bare.pt"
    torch.save(r18.state_dict(), bare)
    with pytest.raises(NucleisegError, match="model_config"):
        load_trained(bare)
    # A file of the format before versions (no "format"): named, with the fix; no guessing from its weights.
    old = tmp_path / "old.pt"
    torch.save({"model": r18.state_dict(), "model_config": dataclasses.asdict(small_cfg()), "best_epoch": 1}, old)
    with pytest.raises(NucleisegError, match=r"format 1, this version reads format 2; retrain it \(dvc repro -f train\)"):
        load_trained(old)
    # A config another version wrote (unknown key) or weights that do not fit it: retrain.
    odd = tmp_path / "odd.pt"
    torch.save({**model_mod.model_file(r18.state_dict(), small_cfg(), 1, InferConfig()), "model_config": {**dataclasses.asdict(small_cfg()), "anchors": 3}}, odd)
    with pytest.raises(NucleisegError, match="retrain"):
        load_trained(odd)
    other = tmp_path / "other.pt"
    torch.save(model_mod.model_file(r18.state_dict(), small_cfg("resnet34"), 1, InferConfig()), other)
    with pytest.raises(NucleisegError, match="do not fit") as info:
        load_trained(other)
    assert "\n" not in str(info.value)


def test_hand_made_detection_becomes_one_instance():
    detection = {
        "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 1, 28, 28),
    }
    (inst,) = detections_to_instances(detection, 64, 64, score_mode="detector")
    assert inst.score == pytest.approx(0.8)
    assert abs(inst.x0 - 10) <= 1 and abs(inst.y0 - 10) <= 1
    assert abs(inst.x1 - 30) <= 2 and abs(inst.y1 - 30) <= 2
    assert inst.area >= 0.9 * 20 * 20
    (weighted,) = detections_to_instances(detection, 64, 64, score_mode="mask_weighted")
    assert weighted.score <= 0.8 + 1e-6
    (shifted,) = detections_to_instances(detection, 64, 64, score_mode="detector", offset=(100, 200))
    assert (shifted.x0, shifted.y0) == (inst.x0 + 100, inst.y0 + 200)
    # Clipped at the image edge: a box running past a 20x20 image stays inside it.
    (clipped,) = detections_to_instances(detection, 20, 20, score_mode="detector")
    assert clipped.x1 <= 20 and clipped.y1 <= 20
    with pytest.raises(ValueError):
        detections_to_instances(detection, 64, 64, score_mode="bogus")
