"""`nucleiseg predict`: any image format in, uint16 label TIFFs + overlays + COCO results out.

Label maps and overlays hold the detections at the model's operating point (operating_point.json
next to the model file, or --score-threshold); predictions.json holds every detection. A failure is
one `error:` line, exit 2, and --out is left as it was.
"""

import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import nucleiseg.cli as cli
from nucleiseg.core.config import InferConfig, ModelConfig
from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.masks import Instance, from_rle, paste
from nucleiseg.model.maskrcnn import build_model
from nucleiseg.model.maskrcnn import model_file as model_file_dict
from nucleiseg.predict.predictor import Predictor

torch.set_num_threads(2)

SMALL = dict(
    rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=200,
    box_batch_size_per_image=64, detections_per_img=8,  # the mask head costs ~25 ms per detection on CPU
)
# (file name, height, width): the expected output size per readable image.
IMAGES = [("rgb.png", 70, 90), ("rgba.png", 64, 64), ("gray16.tif", 50, 120), ("photo.jpg", 57, 61)]
FAST = ["--window", "64", "--overlap", "24", "--device", "cpu"]
SRC = Path(cli.__file__).resolve().parents[1]


def save_model(path: Path, backbone: str = "resnet18", config_backbone: str | None = None, infer: InferConfig | None = None) -> Path:
    """A file in the train stage's format (weights + the config they were built with, and with `infer`
    the settings its validation used, as model.model_file writes them), random weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, weights="none", **SMALL)
    saved_cfg = dataclasses.replace(cfg, backbone=config_backbone or backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model_file_dict(build_model(cfg).state_dict(), saved_cfg, best_epoch=1, infer=infer or InferConfig()), path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "model.pt")


def write_images(folder, corrupt: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    tifffile.imwrite(folder / "gray16.tif", rng.integers(0, 65536, (50, 120), dtype=np.uint16))
    Image.fromarray(rng.integers(0, 256, (57, 61, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return folder


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def fail(argv, capsys) -> str:
    """cli.main as the console script runs it: SystemExit(2) and exactly one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(autouse=True)
def _no_params_file(tmp_path, monkeypatch):
    """Run from an empty folder: no params.yaml there, so the Params defaults apply (then the flags)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


# ---------------------------------------------------------------------------------------------- outputs


def test_predict_one_image_with_the_real_predictor(tmp_path, model_file, caplog):
    """One window through the real model and Predictor; no operating point -> infer.score_floor with a warning."""
    image = tmp_path / "in" / "small.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 60, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert cli.main(["predict", str(image), "--model", str(model_file), "--out", str(out), *FAST]) == 0
    assert any("no operating point" in r.getMessage() and "--score-threshold" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "predictions.json", "settings.json", "small_labels.tif", "small_overlay.png"]
    assert json.loads((out / "images.json").read_text()) == [{"id": 1, "file_name": "small.png", "path": str(image), "height": 48, "width": 60}]
    results = json.loads((out / "predictions.json").read_text())
    labels = tifffile.imread(out / "small_labels.tif")
    assert labels.dtype == np.uint16 and labels.shape == (48, 60)
    assert labels.max() == sum(r["score"] >= 0.05 for r in results)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["score_threshold"] == 0.05 and "no operating point" in settings["score_threshold_source"]
    assert (settings["infer"]["window"], settings["infer"]["overlap"], settings["device"]) == (64, 24, "cpu")


@pytest.mark.slow
def test_predict_folder_writes_labels_overlays_and_coco(tmp_path, model_file, caplog):
    """The real Predictor on four formats (several windows each); no operating point -> infer.score_floor with a warning."""
    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert cli.main(["predict", str(images), "--model", str(model_file), "--out", str(out), *FAST]) == 0
    assert any("no operating point" in r.getMessage() and "--score-threshold" in r.getMessage() for r in caplog.records)

    index = json.loads((out / "images.json").read_text())
    by_name = {entry["file_name"]: entry for entry in index}
    assert sorted(by_name) == sorted(name for name, _, _ in IMAGES)
    assert [e["id"] for e in index] == [1, 2, 3, 4]  # input positions, folder sorted by name
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
    settings = json.loads((out / "settings.json").read_text())
    assert settings["score_threshold"] == 0.05 and "no operating point" in settings["score_threshold_source"]
    assert (settings["infer"]["window"], settings["infer"]["overlap"], settings["device"]) == (64, 24, "cpu")
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_label_map_is_the_pasted_instances_best_first(tmp_path, model_file, monkeypatch):
    """Label k = the image's k-th result in predictions.json (best score first); overlaps: the later one wins, like masks.paste."""
    a = Instance(np.ones((10, 12), bool), 5, 4, score=0.4)
    b_mask = np.zeros((15, 15), bool)
    b_mask[2:13, 1:14] = True
    b = Instance(b_mask, 10, 8, score=0.9)  # overlaps a
    c = Instance(np.eye(6, dtype=bool), 40, 30, score=0.7)
    monkeypatch.setattr(Predictor, "predict", lambda self, image: [a, b, c])
    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["predict", str(images / "rgb.png"), "--model", str(model_file), "--out", str(out), *FAST]) == 0
    labels = tifffile.imread(out / "rgb_labels.tif")
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, paste([b, c, a], 70, 90))
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


def test_operating_point_next_to_the_model_thresholds_the_label_maps(tmp_path, model_file, monkeypatch, caplog):
    """operating_point.json (written by the evaluate stage) decides the label maps and overlays;
    predictions.json keeps every detection; --score-threshold overrides the operating point."""
    found = [Instance(np.ones((6, 6), bool), 9 * k, 5 * k, score=float(s)) for k, s in enumerate(np.linspace(0.95, 0.1, 10))]
    monkeypatch.setattr(Predictor, "predict", lambda self, image: list(found))
    images = write_images(tmp_path / "in")
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    model = model_dir / "model.pt"
    model.symlink_to(model_file)
    argv = ["predict", str(images / "rgb.png"), "--model", str(model), *FAST]

    assert cli.main([*argv, "--out", str(tmp_path / "plain")]) == 0  # no operating point: infer.score_floor 0.05
    (model_dir / "operating_point.json").write_text(json.dumps({"score_threshold": 0.7, "metric": "f1", "value": 0.8, "chosen_on": "val"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli.main([*argv, "--out", str(tmp_path / "op")]) == 0
    assert not [r for r in caplog.records if "no operating point" in r.getMessage()]
    assert cli.main([*argv, "--out", str(tmp_path / "flag"), "--score-threshold", "0.5"]) == 0

    def labels(name):
        return int(tifffile.imread(tmp_path / name / "rgb_labels.tif").max())

    expected_at = {name: sum(inst.score >= t for inst in found) for name, t in (("plain", 0.05), ("op", 0.7), ("flag", 0.5))}
    assert expected_at == {"plain": 10, "op": 3, "flag": 5}
    assert {name: labels(name) for name in expected_at} == expected_at
    for name in expected_at:  # every detection stays in predictions.json
        assert len(json.loads((tmp_path / name / "predictions.json").read_text())) == 10
    settings = json.loads((tmp_path / "op" / "settings.json").read_text())
    assert settings["score_threshold"] == 0.7
    assert settings["score_threshold_source"] == str(model_dir / "operating_point.json")
    assert json.loads((tmp_path / "flag" / "settings.json").read_text())["score_threshold_source"] == "--score-threshold"


def test_a_label_threshold_below_the_floor_is_refused_and_score_floor_lowers_the_floor(tmp_path, model_file, monkeypatch, capsys):
    """Label maps are a prefix of predictions.json: --score-threshold under the detection floor is one error line
    naming both; --score-floor sets the floor (predictions.json) and then the label threshold fits."""
    seen = []
    monkeypatch.setattr(Predictor, "predict", lambda self, image: seen.append(self.cfg.score_floor) or [])
    images = write_images(tmp_path / "in")
    argv = ["predict", str(images / "rgb.png"), "--model", str(model_file), *FAST]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--out", str(tmp_path / "o"), "--score-threshold", "0.01"])
    assert info.value.code == 2 and not (tmp_path / "o").exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the label threshold 0.01 (--score-threshold) is below the detection floor 0.05") and "--score-floor 0.01" in line
    assert cli.main([*argv, "--out", str(tmp_path / "o"), "--score-threshold", "0.01", "--score-floor", "0.01"]) == 0
    assert seen == [0.01]
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert (settings["score_threshold"], settings["score_floor"], settings["infer"]["score_floor"]) == (0.01, 0.01, 0.01)


def test_a_model_without_the_mask_iou_head_refuses_mask_iou_ranking(tmp_path, capsys):
    """Saved infer settings asking for infer.score mask_iou, a model without the head: one error line, nothing written."""
    path = save_model(tmp_path / "model" / "model.pt", infer=InferConfig(score="mask_iou"))
    images = write_images(tmp_path / "in")
    line = fail(["predict", str(images / "rgb.png"), "--model", str(path), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert "infer.score = 'mask_iou' needs a model trained with the MaskIoU head" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mlflow_uri_reads_the_runs_operating_point(tmp_path, caplog):
    """runs:/<id>/model -> the run's operating_point.json artifact; a run without it -> infer.score_floor + warning."""
    import mlflow

    from nucleiseg.track import runs as tracking

    experiment_id = tracking.configure()
    with mlflow.start_run(experiment_id=experiment_id) as with_point:
        mlflow.log_dict({"score_threshold": 0.625, "metric": "f1", "value": 0.5, "chosen_on": "val"}, "operating_point.json")
    with mlflow.start_run(experiment_id=experiment_id) as without:
        pass
    settings = cli.Settings(infer=cli.infer_settings(cli.build_parser().parse_args(["predict", "x", "--out", "o"]), InferConfig(), "x").infer,
                            device="cpu", label_threshold=None)
    threshold, source = cli.label_threshold(f"runs:/{with_point.info.run_id}/model", settings)
    assert (threshold, source) == (0.625, "operating_point.json of the model's MLflow run")
    with caplog.at_level(logging.WARNING):
        threshold, source = cli.label_threshold(f"runs:/{without.info.run_id}/model", settings)
    assert threshold == 0.05 and "no operating point" in source
    assert any("no operating point" in r.getMessage() for r in caplog.records)
    with pytest.raises(NucleisegError, match="run 0123abc is not in mlruns/mlflow.db"):
        cli.load_model("runs:/0123abc/model", "cpu")


def test_mlflow_uri_without_a_store_is_refused_and_creates_none(tmp_path, capsys):
    images = write_images(tmp_path / "in")
    line = fail(["predict", str(images / "rgb.png"), "--model", "runs:/0123abc/model", "--out", str(tmp_path / "out"), *FAST], capsys)
    assert line == ("error: runs:/0123abc/model: no MLflow store at mlruns/mlflow.db; run nucleiseg from the root of the "
                    "repository that trained the model, or set MLFLOW_TRACKING_URI")
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "out").exists()


class _TrappedModule(torch.nn.Module):
    """A module whose pickle runs `open(marker, 'w')` when loaded: what a crafted MLflow pytorch model does."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    return tmp_path_factory.mktemp("repo")  # one MLflow store for the module: creating one takes seconds


@pytest.fixture
def store(store_root, monkeypatch):
    """The project's MLflow store (under DVC_ROOT = store_root); the tracking URI is reset afterwards."""
    import mlflow

    from nucleiseg.track import runs as tracking

    monkeypatch.setenv("DVC_ROOT", str(store_root))
    yield tracking.configure()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_run_whose_model_is_a_crafted_pickle_is_refused_and_never_unpickled(tmp_path, store, capsys):
    """The issue's attack: a run's logged model is an MLflow pytorch pickle that runs code when loaded.
    predict loads only the tensor-only artifacts/model.pt, which this run lacks: one line, nothing run."""
    import mlflow
    import mlflow.pytorch

    marker = tmp_path / "payload-ran"
    with mlflow.start_run(experiment_id=store) as run:
        mlflow.pytorch.log_model(_TrappedModule(str(marker)), name="model", serialization_format="pickle", pip_requirements=[])
    capsys.readouterr()  # MLflow's warnings while logging the trap
    images = write_images(tmp_path / "in")
    uri = f"runs:/{run.info.run_id}/model"
    line = fail(["predict", str(images / "rgb.png"), "--model", uri, "--out", str(tmp_path / "out"), *FAST], capsys)
    assert line.startswith(f"error: {uri}/artifacts/model.pt: not found ("), line
    assert "never a pickled one" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(Exception):  # the trap is real: MLflow's own loader runs it (then fails on what it returns)
        mlflow.pytorch.load_model(uri)
    assert marker.exists()


def test_run_whose_model_file_carries_code_is_refused(tmp_path, store, capsys):
    """A logged model in nucleiseg's layout whose artifacts/model.pt is a pickle with a payload: weights_only refuses it."""
    import mlflow

    from nucleiseg.track import runs as tracking

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "model.pt"
    torch.save({"model": {}, "model_config": {}, "extra": _Payload(str(marker))}, evil)
    with mlflow.start_run(experiment_id=store) as run:
        tracking.log_model(evil)
    capsys.readouterr()
    images = write_images(tmp_path / "in")
    uri = f"runs:/{run.info.run_id}/model"
    line = fail(["predict", str(images / "rgb.png"), "--model", uri, "--out", str(tmp_path / "out"), *FAST], capsys)
    assert line.startswith(f"error: {uri}/artifacts/model.pt: refused: the file holds Python objects"), line
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_logged_model_predicts_like_its_file(tmp_path, store):
    """tracking.log_model's models-from-code model: predict --model runs:/<id>/model and models:/<id> use its tensor file
    and the infer settings saved in it; mlflow.pyfunc (which runs the logged code) gives the same detections."""
    import mlflow

    from nucleiseg.track import runs as tracking

    model = save_model(tmp_path / "models" / "model.pt", infer=InferConfig(window=64, overlap=24, score_floor=0.2))
    with mlflow.start_run(experiment_id=store) as run:
        tracking.log_model(model)
    image = tmp_path / "in" / "small.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(image)
    logged = mlflow.last_logged_model()
    outputs = {}
    for name, uri in (("file", str(model)), ("run", f"runs:/{run.info.run_id}/model"), ("id", f"models:/{logged.model_id}")):
        assert cli.main(["predict", str(image), "--model", uri, "--out", str(tmp_path / name), "--device", "cpu"]) == 0
        outputs[name] = json.loads((tmp_path / name / "predictions.json").read_text())
        settings = json.loads((tmp_path / name / "settings.json").read_text())
        assert (settings["infer"]["window"], settings["infer"]["score_floor"]) == (64, 0.2)
    assert outputs["file"] and outputs["run"] == outputs["file"] == outputs["id"]
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert pyfunc.predict([str(image)]) == outputs["file"]
    folder = Path(urlparse(logged.artifact_location).path)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "code/" not in p.relative_to(folder).as_posix())
    assert files == ["MLmodel", "artifacts/model.pt", "conda.yaml", "mlflow_model.py", "python_env.yaml", "requirements.txt"]
    assert (folder / "code" / "nucleiseg" / "model" / "maskrcnn.py").is_file()  # the package travels with the pyfunc


def test_too_many_instances_for_uint16():
    inst = Instance(np.ones((1, 1), bool), 0, 0)
    with pytest.raises(NucleisegError, match="16-bit"):
        cli.labels_uint16([inst] * 65536, 4, 4)
    assert cli.labels_uint16([inst] * 3, 4, 4).dtype == np.uint16


# ---------------------------------------------------------------------------------------------- settings


def test_params_infer_section_and_device_then_flags(tmp_path):
    (tmp_path / "p.yaml").write_text("device: cpu\ninfer: {window: 128, overlap: 32, tta: d4, score_floor: 0.2}\n")
    parse = cli.build_parser().parse_args
    settings = cli.infer_settings(parse(["predict", "x.png", "--out", "o", "--params", str(tmp_path / "p.yaml"), "--window", "96", "--tta", "flip"]), InferConfig(), "x.png")
    cfg = settings.infer
    assert (cfg.window, cfg.overlap, cfg.tta, cfg.score_floor, settings.device, settings.label_threshold) == (96, 32, "flip", 0.2, "cpu", None)
    settings = cli.infer_settings(parse(["predict", "x.png", "--out", "o", "--params", str(tmp_path / "p.yaml"),
                                        "--device", "auto", "--score-threshold", "0.6"]), InferConfig(), "x.png")
    assert (settings.device, settings.label_threshold, settings.infer.score_floor) == ("auto", 0.6, 0.2)
    (tmp_path / "params.yaml").write_text("device: cpu\ninfer: {window: 256}\n")  # never read unless named
    settings = cli.infer_settings(parse(["predict", "x.png", "--out", "o"]), InferConfig(), "x.png")
    assert (settings.infer.window, settings.device, settings.source) == (512, "auto", "the settings x.png was validated with")
    with pytest.raises(NucleisegError, match="missing.yaml: not found"):
        cli.infer_settings(parse(["predict", "x.png", "--out", "o", "--params", str(tmp_path / "missing.yaml")]), InferConfig(), "x.png")
    (tmp_path / "bad.yaml").write_text("infer: {window: 16}\n")
    with pytest.raises(NucleisegError, match=r"infer.window = 16 is not allowed"):
        cli.infer_settings(parse(["predict", "x.png", "--out", "o", "--params", str(tmp_path / "bad.yaml")]), InferConfig(), "x.png")


def test_the_settings_the_model_was_validated_with_then_flags(tmp_path, monkeypatch):
    """The model file's saved infer settings (the train stage's validation) are predict's defaults; flags win;
    --params FILE replaces them; a params.yaml in the current folder is ignored."""
    validated = InferConfig(window=96, overlap=32, mask_threshold=0.4, min_area=12, score_floor=0.1)
    model = save_model(tmp_path / "m" / "model.pt", infer=validated)
    (tmp_path / "params.yaml").write_text("device: cpu\ninfer: {window: 128, overlap: 48}\n")
    seen = []
    monkeypatch.setattr(Predictor, "predict", lambda self, image: seen.append(self.cfg) or [])
    images = write_images(tmp_path / "in")

    def run(name, *flags):
        assert cli.main(["predict", str(images / "rgb.png"), "--model", str(model), "--out", str(tmp_path / name), "--device", "cpu", *flags]) == 0
        return seen[-1], json.loads((tmp_path / name / "settings.json").read_text())

    cfg, settings = run("saved")
    assert cfg == validated
    assert settings["infer_source"] == f"the settings {model} was validated with"
    cfg, settings = run("flags", "--window", "64", "--overlap", "24")
    assert (cfg.window, cfg.overlap, cfg.mask_threshold, cfg.min_area) == (64, 24, 0.4, 12)
    assert settings["infer_source"] == f"the settings {model} was validated with + nucleiseg predict flags"
    cfg, settings = run("params", "--params", "params.yaml")
    assert (cfg.window, cfg.overlap, cfg.mask_threshold) == (128, 48, 0.5) and settings["infer_source"] == "params.yaml"


def test_flags_that_clash_with_the_models_settings_are_one_line(tmp_path, capsys):
    model = save_model(tmp_path / "m" / "model.pt", infer=InferConfig(window=256, overlap=96))
    images = write_images(tmp_path / "in")
    line = fail(["predict", str(images / "rgb.png"), "--model", str(model), "--out", str(tmp_path / "out"), "--window", "64",
                 "--device", "cpu"], capsys)
    assert line == (f"error: the settings {model} was validated with + nucleiseg predict flags: infer.overlap = 96 must be "
                    "smaller than infer.window = 64")
    assert not (tmp_path / "out").exists()


def test_windows_show_progress_on_large_images(tmp_path, model_file, monkeypatch):
    """nucleiseg predict's Predictor draws a bar over an image's windows when it takes more than one forward pass."""
    import nucleiseg.predict.predictor as predictor_mod

    bars = []

    class Bar:
        def __init__(self, *args, total=None, disable=None, **kwargs):
            self.total, self.disable, self.n = total, disable, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(predictor_mod, "tqdm", Bar)
    monkeypatch.setattr(predictor_mod, "predict_batch", lambda model, tensors, device, floor: [{} for _ in tensors])
    monkeypatch.setattr(Predictor, "_to_instances", lambda self, output, size: [])
    image = np.zeros((150, 150, 3), np.uint8)  # 4x4 windows of 64 px
    Predictor(None, InferConfig(window=64, overlap=24, batch_size=4), progress=True).predict(image)
    Predictor(None, InferConfig(window=64, overlap=24, batch_size=4)).predict(image)
    Predictor(None, InferConfig(window=256, overlap=24, batch_size=4), progress=True).predict(image)
    assert [(b.total, b.n, b.disable) for b in bars] == [(16, 16, None), (16, 16, True), (1, 1, True)]


@pytest.mark.parametrize("flags, message", [
    (["--window", "16"], "error: --window 16 is not allowed; expected an integer from 64 to 4096"),
    (["--window", "100000"], "error: --window 100000 is not allowed; expected an integer from 64 to 4096"),
    (["--window", "64", "--overlap", "64"], "error: nucleiseg predict flags: infer.overlap = 64 must be smaller than infer.window = 64"),
    (["--overlap", "-1"], "error: --overlap -1 is not allowed; expected an integer from 0 to 4095"),
    (["--batch-size", "0"], "error: --batch-size 0 is not allowed; expected an integer from 1 to 256"),
    (["--score-threshold", "1.5"], "error: --score-threshold 1.5 is not allowed; expected a number >= 0 and < 1"),
    (["--mask-threshold", "0"], "error: --mask-threshold 0.0 is not allowed; expected a number > 0 and < 1"),
    (["--device", "gpu"], "error: --device gpu is not allowed; expected one of auto, cpu, cuda, mps"),
    (["--window", "big"], "error: nucleiseg predict: argument --window: invalid int value: 'big' (see --help)"),
    (["--tta", "rotate"], "error: nucleiseg predict: argument --tta: invalid choice: 'rotate' (choose from 'none', 'flip', 'd4') (see --help)"),
])
def test_absurd_flags_are_refused_up_front(tmp_path, capsys, flags, message):
    """Checked by the same field checks as params.yaml before any image is read or the model is touched."""
    line = fail(["predict", str(tmp_path / "not-read.png"), "--model", str(tmp_path / "not-loaded.pt"), "--out", str(tmp_path / "out"), *flags], capsys)
    assert line == message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- failures


def test_missing_input_is_one_line_and_writes_nothing_subprocess(tmp_path, model_file):
    """Through `python -m nucleiseg`, as a user runs it: one `error:` line on stderr, no traceback, exit 2, no outputs."""
    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "nucleiseg", "predict", str(images), str(tmp_path / "nope.png"), "--model", str(model_file), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: input not found: {tmp_path / 'nope.png'}; nothing was written"], proc.stderr
    assert not out.exists()


def test_unreadable_image_refused_before_anything_is_written(tmp_path, model_file, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "load_model", lambda *a: calls.append(a))
    images = write_images(tmp_path / "in", corrupt=True)
    out = tmp_path / "out"
    line = fail(["predict", str(images), "--model", str(model_file), "--out", str(out), *FAST], capsys)
    assert line.startswith("error: 1 of 5 input image(s) cannot be read, nothing was written: ")
    assert str(images / "broken.png") in line and "unreadable" in line
    assert not out.exists() and not calls  # checked before the model is loaded


def test_missing_model_is_one_line(tmp_path, capsys):
    images = write_images(tmp_path / "in")
    line = fail(["predict", str(images), "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")], capsys)
    assert line == f"error: {tmp_path / 'nope.pt'}: no trained model; run the train stage first (dvc repro train) or pass --model"
    assert not (tmp_path / "out").exists()


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: what a booby-trapped model file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_booby_trapped_model_file_is_refused_and_its_payload_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "extra": _Payload(str(marker))}, evil)
    with open(marker.with_name("probe"), "wb") as fh:  # the payload works when unpickled without weights_only
        pickle.dump(_Payload(str(marker.with_name("probe-ran"))), fh)
    with open(marker.with_name("probe"), "rb") as fh:
        pickle.load(fh)
    assert marker.with_name("probe-ran").exists()

    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    line = fail(["predict", str(images / "rgb.png"), "--model", str(evil), "--out", str(out), *FAST], capsys)
    assert line.startswith(f"error: {evil}: refused: the file holds Python objects"), line
    assert not marker.exists()
    assert not out.exists()


def test_model_whose_config_does_not_match_its_weights_is_one_line(tmp_path, capsys):
    mismatched = save_model(tmp_path / "m" / "model.pt", backbone="resnet18", config_backbone="resnet34")
    images = write_images(tmp_path / "in")
    line = fail(["predict", str(images / "rgb.png"), "--model", str(mismatched), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert line.startswith(f"error: {mismatched}: its weights do not fit the model its config describes"), line
    assert not (tmp_path / "out").exists()


def test_not_a_model_file_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    torch.save({"model": {}, "model_config": ["not", "a", "mapping"]}, junk)
    images = write_images(tmp_path / "in")
    line = fail(["predict", str(images / "rgb.png"), "--model", str(junk), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert str(junk) in line


def test_failure_mid_run_leaves_out_as_it_was(tmp_path, model_file, monkeypatch, capsys):
    """An error on the third image: nothing of this run appears in --out, earlier outputs stay, no temp folder."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("[]")
    (out / "keep.txt").write_text("mine")
    count = iter(range(100))

    def predict(self, image):
        if next(count) == 2:
            raise RuntimeError("CUDA out of memory\nsecond line")
        return [Instance(np.ones((4, 4), bool), 1, 1, score=0.9)]

    monkeypatch.setattr(Predictor, "predict", predict)
    images = write_images(tmp_path / "in")
    line = fail(["predict", str(images), "--model", str(model_file), "--out", str(out), *FAST], capsys)
    assert line == f"error: {images / 'rgb.png'}: RuntimeError: CUDA out of memory second line; nothing was written (-v shows the traceback)"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "predictions.json"]
    assert (out / "predictions.json").read_text() == "[]"


def test_same_stem_twice_is_refused(tmp_path):
    for name in ("a/img.png", "b/img.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(NucleisegError, match="share a name"):
        cli.collect_images([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NucleisegError, match="no images"):
        cli.collect_images([str(tmp_path / "empty")])


def test_files_and_folders_mixed_and_named_twice(tmp_path):
    images = write_images(tmp_path / "in")
    single = tmp_path / "one" / "x.tiff"
    single.parent.mkdir()
    tifffile.imwrite(single, np.zeros((40, 44, 3), np.uint8))
    found = cli.collect_images([str(single), str(images), str(images / "rgba.png")])
    assert [p.name for p in found] == ["x.tiff", "gray16.tif", "photo.jpg", "rgb.png", "rgba.png"]
    assert cli.check_readable(found) == [(40, 44), (50, 120), (57, 61), (70, 90), (64, 64)]
