"""Hostile inputs, tried as a hostile user would: each gives one `error:` line and exit 2 (EXIF orientation:
upright outputs), prints no secret, overwrites no input and decodes no bomb. Bombs are built here from a few KB."""

import errno
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageOps
from stage_commands import stage_argv

import nucleiseg.cli as cli
from nucleiseg.core.config import InferConfig, ModelConfig, read_params
from nucleiseg.core.errors import NucleisegError, main_guard, redact
from nucleiseg.data.layout import (
    DEFAULT_MAX_MEGAPIXELS,
    MAX_MEGAPIXELS_ENV,
    read_mask,
    read_rgb,
)
from nucleiseg.model.maskrcnn import build_model
from nucleiseg.model.maskrcnn import model_file as model_file_dict
from nucleiseg.predict.predictor import Predictor
from nucleiseg.track import runs as tracking
from nucleiseg.train.loop import build_loader, next_batch
from nucleiseg.train.samples import EpochBatches, EpochSampler, TileDataset

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3tPW"
FAST = ["--window", "64", "--overlap", "24", "--device", "cpu"]


def one_error_line(func, capsys, code: int = 2) -> str:
    """Run `func` as an entry point does (main_guard): exit `code`, exactly one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main_guard(func)()
    assert exit_info.value.code == code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def predict_fails(argv, capsys) -> str:
    return one_error_line(lambda: cli.main(["predict", *argv]), capsys)


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grey PNG of zeros: width x height pixels from ~100 KB (30000^2) on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = max(1, (1 << 20) // len(row))
    compressor, parts, left = zlib.compressobj(9), [], height
    while left:
        n = min(left, rows_per_block)
        parts.append(compressor.compress(row * n))
        left -= n
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def tiff_bomb(path: Path, side: int, tile: int = 1024) -> Path:
    """A valid tiled zlib TIFF of zeros, side x side: one tile compressed once, written (side/tile)^2 times (~400 KB)."""
    encoded = zlib.compress(bytes(tile * tile), 9)
    count = (-(-side // tile)) ** 2
    tifffile.imwrite(path, (encoded for _ in range(count)), shape=(side, side), dtype=np.uint8, tile=(tile, tile), compression="zlib")
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MAX_MEGAPIXELS_ENV, raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A model file in the train stage's format: a small resnet18 Mask R-CNN with random weights."""
    cfg = ModelConfig(backbone="resnet18", weights="none", rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=100,
                      detections_per_img=4)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(model_file_dict(build_model(cfg).state_dict(), cfg, best_epoch=1, infer=InferConfig()), path)
    return path


@pytest.fixture
def dummy_model(tmp_path) -> Path:
    """A file where --model wants one; the checks under test fail before it is loaded."""
    path = tmp_path / "model.pt"
    path.write_bytes(b"never loaded")
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(cli, "load_model", refuse)


# ---------------------------------------------------------------------------------------------- secrets


def test_redact_removes_the_credentials_of_every_uri():
    text = "API request to http://alice:s3cr3tPW@127.0.0.1:9/api/2.0/x failed; s3://k:v@bucket/p and http://host/a@b stay"
    assert redact(text) == "API request to http://***@127.0.0.1:9/api/2.0/x failed; s3://***@bucket/p and http://host/a@b stay"


def test_no_secret_in_error_lines_log_records_or_tracebacks(capsys, caplog):
    uri = f"http://alice:{SECRET}@127.0.0.1:9"
    log = logging.getLogger("nucleiseg.test")

    def logs_then_fails():
        log.warning("retrying %s", uri)
        raise NucleisegError(f"cannot reach {uri}")

    with pytest.raises(SystemExit):
        main_guard(logs_then_fails)()
    err = capsys.readouterr().err
    assert err == "error: cannot reach http://***@127.0.0.1:9\n"
    assert [r.getMessage() for r in caplog.records] == ["retrying http://***@127.0.0.1:9"]  # whatever handler prints it

    def bug():
        raise RuntimeError(f"unexpected, at {uri}")

    with pytest.raises(SystemExit) as exit_info:
        main_guard(bug)()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" in err and "RuntimeError: unexpected, at http://***@" in err
    assert SECRET not in err


def _server_uri_env(monkeypatch, port: int) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@127.0.0.1:{port}")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # restored to unset afterwards


def test_report_with_a_password_in_the_tracking_uri_never_prints_it(mlflow_store, closed_port, monkeypatch, capsys):
    """The credentials move out of the URI (MLflow prints its URI: run links, request errors) into
    MLflow's basic-auth variables; the error line names the server without them."""
    _server_uri_env(monkeypatch, closed_port)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # set by the user: kept (and the test stays fast)
    line = one_error_line(lambda: cli.main(["report"]), capsys)
    assert line.startswith(f"error: cannot reach the tracking server http://127.0.0.1:{closed_port}") and "Connection refused" in line
    assert SECRET not in line and "alice" not in line
    assert os.environ["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{closed_port}"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", SECRET)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the first-contact settings are undone
    assert not (mlflow_store / "reports").exists()


@pytest.mark.slow
def test_unreachable_tracking_server_fails_within_seconds(mlflow_store, closed_port, monkeypatch, capsys):
    """MLflow's defaults retried for about 254 s here, with a warning per retry."""
    _server_uri_env(monkeypatch, closed_port)
    started = time.perf_counter()
    line = one_error_line(lambda: cli.main(["report"]), capsys)
    assert time.perf_counter() - started < 20
    assert "Connection refused" in line and SECRET not in line


# ---------------------------------------------------------------------------------------------- predict: inputs and --out


def test_predict_refuses_an_out_folder_that_holds_its_inputs(tmp_path, dummy_model, no_model_loading, capsys):
    """`predict d --out d` would overwrite d/slide_overlay.png (an input) with slide.png's overlay, and the next
    run would read its own outputs as inputs."""
    folder = tmp_path / "d"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("slide.png", "slide_overlay.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for inputs, out in (([str(folder)], str(folder)), ([str(folder / "slide.png")], str(folder)), (["d"], "./d/")):
        line = predict_fails([*inputs, "--model", str(dummy_model), "--out", out, *FAST], capsys)
        assert "holds input images" in line and "slide" in line, line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_predict_refuses_an_out_folder_it_cannot_write_before_loading_the_model(tmp_path, dummy_model, no_model_loading,
                                                                                  monkeypatch, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: answer as the file system answers any other user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    line = predict_fails([str(tmp_path / "a.png"), "--model", str(dummy_model), "--out", str(locked / "out"), *FAST], capsys)
    assert f"{locked} is not writable" in line
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("name", ["predictions.json", "settings.json", "images.json", "a_labels.tif"])
def test_disk_full_while_predict_writes_is_one_line_and_leaves_out_as_it_was(tmp_path, model_file, monkeypatch, capsys, name):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(Predictor, "predict", lambda self, image: [])
    real_write_text, real_imwrite = Path.write_text, tifffile.imwrite

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: full(self) if self.name == name else real_write_text(self, *a, **k))
    monkeypatch.setattr(tifffile, "imwrite", lambda path, *a, **k: full(path) if Path(path).name == name else real_imwrite(path, *a, **k))
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    line = predict_fails([str(tmp_path / "a.png"), "--model", str(model_file), "--out", str(out), *FAST], capsys)
    assert f"--out {out}: cannot write the outputs" in line and name in line and "No space left on device" in line
    assert "free some space" in line and "nothing was written" in line
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]  # no temp folder, no partial output


def test_predict_interrupted_says_nothing_was_written(tmp_path, model_file, monkeypatch, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")

    def interrupt(self, image):
        raise KeyboardInterrupt

    monkeypatch.setattr(Predictor, "predict", interrupt)
    line = one_error_line(lambda: cli.main(["predict", str(tmp_path / "a.png"), "--model", str(model_file), "--out", "out", *FAST]),
                          capsys, code=130)
    assert line == "error: interrupted; nothing was written (outputs appear only when complete)"
    assert not (tmp_path / "out").exists()


def test_weak_messages_name_the_real_cause(tmp_path, capsys):
    """A folder given as the model, random bytes as the model (torch's advice: reload with weights_only=False)."""
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "models").mkdir()
    line = predict_fails(["a.png", "--model", "models", "--out", "out", *FAST], capsys)
    assert "--model models: a folder; pass the model file itself" in line
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    line = predict_fails(["a.png", "--model", "random.pt", "--out", "out", *FAST], capsys)
    assert "random.pt: cannot load it: not a file of tensors" in line and "weights_only" not in line


# ---------------------------------------------------------------------------------------------- image size limits


@pytest.mark.parametrize("make, size", [
    (lambda p: png_bomb(p / "bomb.png", 30000, 30000), "30000 x 30000 pixels (900 Mpx)"),
    (lambda p: tiff_bomb(p / "bomb.tif", 20000), "20000 x 20000 pixels (400 Mpx)"),
    (lambda p: png_bomb(p / "big.png", 12000, 12000), "12000 x 12000 pixels (144 Mpx)"),  # between PIL's warning and error
], ids=["png-bomb", "tiff-bomb", "png-144Mpx"])
def test_predict_refuses_images_over_the_size_limit_from_their_header(tmp_path, dummy_model, no_model_loading, capsys, make, size):
    path = make(tmp_path)
    assert path.stat().st_size < 500_000
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would be an error here
        line = predict_fails([str(path), "--model", str(dummy_model), "--out", "out", *FAST], capsys)
    assert time.perf_counter() - started < 1.0  # nothing was decoded
    assert f"{path}: {size}, more than the limit of {DEFAULT_MAX_MEGAPIXELS:g} Mpx" in line
    assert "--max-megapixels" in line and MAX_MEGAPIXELS_ENV in line


def test_the_size_limit_applies_to_every_reader_and_can_be_raised(tmp_path, dummy_model, no_model_loading, monkeypatch, capsys):
    """40 x 40 = 1600 px: over a limit of 0.001 Mpx, under 0.002. The flag raises it for predict, the
    environment variable for the stages' readers (images, masks, tile windows)."""
    rng = np.random.default_rng(0)
    jpeg = tmp_path / "a.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(jpeg)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(mask)
    line = predict_fails([str(jpeg), "--model", str(dummy_model), "--out", "out", "--max-megapixels", "0.001", *FAST], capsys)
    assert "40 x 40 pixels (0.0016 Mpx), more than the limit of 0.001 Mpx" in line
    assert read_rgb(jpeg, max_megapixels=0.002).shape == (40, 40, 3)
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "0.001")
    for reader, path in ((read_rgb, jpeg), (read_mask, mask)):
        with pytest.raises(NucleisegError, match="more than the limit of 0.001 Mpx"):
            reader(path)
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "0.002")
    assert read_mask(mask).all()
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "lots")
    with pytest.raises(NucleisegError, match=f"{MAX_MEGAPIXELS_ENV}='lots': not a number"):
        read_rgb(jpeg)


def test_tile_windows_are_read_with_the_limit_too(tiny_tiles, monkeypatch):
    dataset = TileDataset(tiny_tiles, "train")
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "0.001")  # the windows are 64 x 64
    with pytest.raises(NucleisegError, match="more than the limit of 0.001 Mpx.*run it again"):
        dataset[0]


# ---------------------------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_orientation_tag_is_honoured_like_pil_does(tmp_path, suffix):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}{suffix}"
        if suffix == ".tif":
            tifffile.imwrite(path, pixels, extratags=[(274, "H", 1, orientation, True)])
        else:
            exif = Image.Exif()
            exif[274] = orientation
            Image.fromarray(pixels).save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
        with Image.open(path) as img:
            upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        got = read_rgb(path)
        assert got.shape == ((30, 50, 3) if orientation < 5 else (50, 30, 3))
        np.testing.assert_array_equal(got, upright)


def test_predict_outputs_follow_the_exif_orientation(tmp_path, model_file, monkeypatch):
    exif = Image.Exif()
    exif[274] = 6  # stored 40 wide x 30 high, shown turned 90 degrees clockwise: 30 wide x 40 high
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    monkeypatch.setattr(Predictor, "predict", lambda self, image: [])
    assert cli.main(["predict", "phone.jpg", "--model", str(model_file), "--out", "out", *FAST]) == 0
    assert [(e["height"], e["width"]) for e in json.loads((tmp_path / "out" / "images.json").read_text())] == [(40, 30)]
    assert tifffile.imread(tmp_path / "out" / "phone_labels.tif").shape == (40, 30)


# ---------------------------------------------------------------------------------------------- params.yaml


def alias_bomb(levels: int) -> str:
    """YAML whose last alias expands to 9**levels strings, in a few KB."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ntile: {{size: *a{levels}}}\n"


PARAMS_FILES = {
    "alias-bomb": (alias_bomb(9), "holds more than 10000 values (YAML aliases counted as often as they expand)"),
    "long-list": ("tile:\n  size: [" + ", ".join(["0"] * 1_000_000) + "]\n", "3000 KB, more than a params file can be"),
    "list-under-the-byte-cap": ("tile:\n  size: [" + ",".join(["0"] * 12_000) + "]\n", "holds more than 10000 values"),
    "duplicate-key": ("seed: 0\ntile:\n  size: 256\n  overlap: 32\n  size: 512\n",
                      "not valid YAML at line 5, column 3: key 'size' given twice (first at line 3)"),
    "empty": ("", "holds no settings"),
    "comments-only": ("# nothing here\n", "holds no settings"),
    "latin-1": ("seed: 0\ndata:\n  source: caf\xe9.zip\n", "not UTF-8 text (byte 0xe9 at offset 27); save it as UTF-8"),
    "syntax": ("seed: 0\ntile:\n  size: 512\n overlap: [1\n", "not valid YAML at line 4, column 2:"),
    "nested-mappings": ("a: " + "{a: " * 3000 + "}" * 3000 + "\n", "not valid YAML: nested too deeply"),  # libyaml: SIGSEGV
    "long-string": ("tile:\n  size: " + "x" * 5000 + "\n", "tile.size = 'xxxxxxxx"),
}


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_params_yaml_is_read_strictly_in_one_short_line(tmp_path, capsys, name):
    text, needle = PARAMS_FILES[name]
    path = tmp_path / "params.yaml"
    path.write_bytes(text.encode("latin-1" if name == "latin-1" else "utf-8"))
    started = time.perf_counter()
    line = one_error_line(lambda: read_params(path), capsys)
    assert time.perf_counter() - started < 2.5
    assert line.startswith(f"error: {path}: ") and needle in line, line
    assert len(line) < 300, line


def test_params_yaml_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "params.yaml").mkdir()
    assert "params.yaml: a folder, not the params file" in one_error_line(lambda: read_params(tmp_path / "params.yaml"), capsys)


def test_params_yaml_keeps_what_is_legal(tmp_path):
    """Small aliases, and merge keys (`<<`) whose keys are given again on purpose, are YAML that DVC reads too."""
    path = tmp_path / "params.yaml"
    path.write_text("tile: {size: &s 256, overlap: 32}\ninfer:\n  <<: {window: *s, overlap: 16}\n  overlap: 32\n")
    params = read_params(path)
    assert (params.infer.window, params.infer.overlap) == (256, 32)


@pytest.mark.slow
def test_tile_stage_with_a_hostile_params_yaml_writes_nothing(tmp_path, tiny_data, stage_environment):
    """Under `python stages/tile.py`: the alias bomb took 77 s and 4 GB and ended in a MemoryError traceback;
    duplicate keys and an empty file were accepted and data/tiles replaced."""
    shutil.copytree(tiny_data / "data", tmp_path / "data")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")}
    for name in ("alias-bomb", "duplicate-key", "empty"):
        text, needle = PARAMS_FILES[name]
        (tmp_path / "params.yaml").write_bytes(text.encode("latin-1" if name == "latin-1" else "utf-8"))
        done = subprocess.run(stage_argv("tile"), cwd=tmp_path, env=stage_environment(tmp_path),
                              capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], (name, done.stderr)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")} == before


# ---------------------------------------------------------------------------------------------- OS errors


def test_os_errors_are_one_line_naming_the_file_and_the_fix(tmp_path, capsys):
    def read_missing():
        open(tmp_path / "gone.json").read()

    assert one_error_line(read_missing, capsys) == f"error: {tmp_path / 'gone.json'}: No such file or directory; " \
                                                   "it is gone (removed while running?); restore it and run again"

    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics/eval.json")

    assert one_error_line(disk_full, capsys) == "error: metrics/eval.json: No space left on device; free some space and run again"


def test_mlflow_store_folder_that_cannot_be_used_is_one_line(mlflow_store, monkeypatch, capsys):
    """mlruns/ not writable (the train stage opened mlruns/.store.lock with a PermissionError traceback), or not a folder."""
    real_open = open

    def denied(path, *args, **kwargs):
        if Path(path).name == ".store.lock":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(tracking, "open", denied, raising=False)
    line = one_error_line(tracking.configure, capsys)
    assert f"cannot use the MLflow store folder: {mlflow_store / 'mlruns' / '.store.lock'}: Permission denied" in line
    assert "MLFLOW_TRACKING_URI" in line
    monkeypatch.delattr(tracking, "open")
    shutil.rmtree(mlflow_store / "mlruns")
    (mlflow_store / "mlruns").write_text("not a folder")
    line = one_error_line(tracking.configure, capsys)
    assert f"cannot use the MLflow store folder: {mlflow_store / 'mlruns'}: File exists; it is in the way" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_tiles_removed_while_training_is_one_line(tiny_tiles, tmp_path, workers):
    """`rm -rf data/tiles` under a running train stage: a FileNotFoundError traceback from the loader
    (from a worker process: with the worker's traceback as the message)."""
    tiles = tmp_path / "tiles"
    shutil.copytree(tiny_tiles, tiles)
    dataset = TileDataset(tiles, "train")  # reads the index: the train stage is running
    shutil.rmtree(tiles)
    batches = iter(build_loader(dataset, EpochBatches(EpochSampler(len(dataset), 0), 1, 1, 1), workers, pin_memory=False))
    with pytest.raises(NucleisegError) as info:
        next_batch(batches)
    message = str(info.value)
    del info, batches  # this frame and the traceback in `info` form a cycle: keep the loader's worker out of it
    assert "\n" not in message and message.startswith(str(tiles / "train")), message
    assert "file not found" in message and "dvc repro -f tile" in message


@pytest.mark.slow
def test_a_loader_worker_error_ends_the_process(tiny_tiles, tmp_path, stage_environment):
    """torch re-raised the worker's error from a reference cycle that kept the loader alive: at exit the
    process waited forever for its worker, which ignores SIGTERM."""
    tiles = tmp_path / "tiles"
    shutil.copytree(tiny_tiles, tiles)
    script = (
        "import shutil, sys\n"
        "from nucleiseg.train.samples import EpochBatches, EpochSampler, TileDataset\n"
        "from nucleiseg.train.loop import build_loader, next_batch\n"
        "from nucleiseg.core.errors import main_guard\n"
        "def train():\n"
        "    dataset = TileDataset(sys.argv[1], 'train')\n"
        "    shutil.rmtree(sys.argv[1])\n"
        "    next_batch(iter(build_loader(dataset, EpochBatches(EpochSampler(len(dataset), 0), 1, 1, 1), 1, pin_memory=False)))\n"
        "main_guard(train)()\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tiles)], env=stage_environment(tmp_path), capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "file not found" in lines[0], done.stderr
