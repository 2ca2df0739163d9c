"""`nucleiseg predict`: any image format in, uint16 label TIFFs + overlays + COCO results out; bad files skipped."""

import dataclasses
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import nucleiseg.cli as cli
from nucleiseg.config import ModelConfig
from nucleiseg.errors import NucleisegError
from nucleiseg.masks import Instance, from_rle, paste
from nucleiseg.model import build_model
from nucleiseg.predictor import Predictor

torch.set_num_threads(2)

SMALL = dict(
    rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=200,
    box_batch_size_per_image=64, detections_per_img=8,  # the mask head costs ~25 ms per detection on CPU
)
# (file name, height, width): the expected output size per readable image.
IMAGES = [("rgb.png", 70, 90), ("rgba.png", 64, 64), ("gray16.tif", 50, 120), ("photo.jpg", 57, 61)]
FAST = ["--window", "64", "--overlap", "24", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A file in the train stage's format (weights + the config they were built with), random weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", weights="none", **SMALL)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": build_model(cfg).state_dict(), "model_config": dataclasses.asdict(cfg)}, path)
    return path


def write_images(folder, corrupt: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    tifffile.imwrite(folder / "gray16.tif", rng.integers(0, 65536, (50, 120), dtype=np.uint16))
    Image.fromarray(rng.integers(0, 256, (57, 61, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return folder


@pytest.fixture(autouse=True)
def _no_params_file(tmp_path, monkeypatch):
    """Run from an empty folder: no params.yaml there, so InferConfig defaults apply (then the flags)."""
    monkeypatch.chdir(tmp_path)


def test_predict_folder_writes_labels_overlays_and_coco(tmp_path, model_file, caplog):
    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["predict", str(images), "--model", str(model_file), "--out", str(out), *FAST]
    with caplog.at_level(logging.ERROR):
        code = cli.main(argv)
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("broken.png" in e and "unreadable" in e for e in errors), errors
    assert any(e.startswith("1 of 5 image(s) failed") for e in errors), errors

    index = json.loads((out / "images.json").read_text())
    by_name = {entry["file_name"]: entry for entry in index}
    assert sorted(by_name) == sorted(name for name, _, _ in IMAGES)
    # Ids are input positions (folder sorted by name): broken.png is 1, so the others keep stable ids 2..5.
    assert [e["id"] for e in index] == [2, 3, 4, 5]
    results = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in results} <= {e["id"] for e in index}
    for name, height, width in IMAGES:
        stem = name.rsplit(".", 1)[0]
        entry = by_name[name]
        assert (entry["height"], entry["width"]) == (height, width)
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        assert labels.dtype == np.uint16 and labels.shape == (height, width)
        mine = [r for r in results if r["image_id"] == entry["id"]]
        assert labels.max() <= len(mine)
        assert all(r["segmentation"]["size"] == [height, width] for r in mine)
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (width, height)
    assert not (out / "broken_labels.tif").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_predict_clean_inputs_exit_0_and_files_mix(tmp_path, model_file):
    """Files and folders mixed; no failure -> 0. The RGBA file named twice (alone and via its folder) runs once."""
    images = write_images(tmp_path / "in", corrupt=False)
    (images / "rgb.png").unlink()
    (images / "gray16.tif").unlink()
    (images / "photo.jpg").unlink()
    single = tmp_path / "one" / "x.tiff"
    single.parent.mkdir()
    tifffile.imwrite(single, np.zeros((40, 44, 3), np.uint8))
    out = tmp_path / "out"
    code = cli.main(["predict", str(single), str(images), str(images / "rgba.png"), "--model", str(model_file), "--out", str(out), *FAST])
    assert code == 0
    index = json.loads((out / "images.json").read_text())
    assert [(e["id"], e["file_name"], e["height"], e["width"]) for e in index] == [(1, "x.tiff", 40, 44), (2, "rgba.png", 64, 64)]


def test_label_map_is_the_pasted_instances_best_first(tmp_path, model_file, monkeypatch):
    """Label k = the image's k-th result in predictions.json (best score first); overlaps: the later one wins, like masks.paste."""
    a = Instance(np.ones((10, 12), bool), 5, 4, score=0.4)
    b_mask = np.zeros((15, 15), bool)
    b_mask[2:13, 1:14] = True
    b = Instance(b_mask, 10, 8, score=0.9)  # overlaps a
    c = Instance(np.eye(6, dtype=bool), 40, 30, score=0.7)
    monkeypatch.setattr(Predictor, "predict", lambda self, image: [a, b, c])
    images = write_images(tmp_path / "in", corrupt=False)
    out = tmp_path / "out"
    assert cli.main(["predict", str(images / "rgb.png"), "--model", str(model_file), "--out", str(out), *FAST]) == 0
    labels = tifffile.imread(out / "rgb_labels.tif")
    expected = paste([b, c, a], 70, 90)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    results = json.loads((out / "predictions.json").read_text())
    assert [r["score"] for r in results] == [0.9, 0.7, 0.4]
    for result, inst in zip(results, [b, c, a]):
        decoded, tight = from_rle(result["segmentation"]), inst.tight()
        assert (decoded.x0, decoded.y0) == (tight.x0, tight.y0)
        np.testing.assert_array_equal(decoded.mask, tight.mask)
    with Image.open(out / "rgb_overlay.png") as overlay:
        drawn = np.asarray(overlay)
    assert (drawn[4, 5:17] == (0, 230, 0)).all()  # top edge of a is outlined in green


def test_too_many_instances_for_uint16():
    inst = Instance(np.ones((1, 1), bool), 0, 0)
    with pytest.raises(NucleisegError, match="16-bit"):
        cli.labels_uint16([inst] * 65536, 4, 4)
    assert cli.labels_uint16([inst] * 3, 4, 4).dtype == np.uint16


def test_same_stem_twice_is_refused(tmp_path):
    for name in ("a/img.png", "b/img.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(NucleisegError, match="share a name"):
        cli.collect_images([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NucleisegError, match="no images"):
        cli.collect_images([str(tmp_path / "empty")])


def test_params_infer_section_then_flags(tmp_path):
    (tmp_path / "p.yaml").write_text("infer: {window: 128, overlap: 32, tta: true, score_threshold: 0.2}\ntrain: {device: cpu}\n")
    args = cli.build_parser().parse_args(["predict", "x.png", "--out", "o", "--params", str(tmp_path / "p.yaml"), "--window", "96", "--no-tta"])
    cfg, device = cli.infer_settings(args)
    assert (cfg.window, cfg.overlap, cfg.tta, cfg.score_threshold, device) == (96, 32, False, 0.2, "cpu")
    args = cli.build_parser().parse_args(["predict", "x.png", "--out", "o", "--window", "64", "--overlap", "64"])
    with pytest.raises(NucleisegError, match="overlap"):
        cli.infer_settings(args)
    args = cli.build_parser().parse_args(["predict", "x.png", "--out", "o", "--params", str(tmp_path / "missing.yaml")])
    with pytest.raises(NucleisegError, match="missing.yaml: not found"):
        cli.infer_settings(args)


def test_missing_model_is_one_error_line_exit_2(tmp_path):
    """Through `python -m nucleiseg`: an expected error is one line on stderr, no traceback."""
    images = write_images(tmp_path / "in", corrupt=False)
    proc = subprocess.run(
        [sys.executable, "-m", "nucleiseg", "predict", str(images), "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.pt" in lines[0], proc.stderr
    assert not (tmp_path / "out" / "predictions.json").exists()
