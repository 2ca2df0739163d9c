"""fetch_dataset: local zips/folders, sha256, unsafe or damaged archives, offline Drive, the stage CLI."""

import json
import os
import subprocess
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml
from stage_commands import stage_argv

import nucleiseg.data.download as download
from nucleiseg.core.errors import NucleisegError
from nucleiseg.data.download import drive_file_id, fetch_dataset, sha256sum
from nucleiseg.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
DRIVE_ID = "1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG"
SMALL = {"n_train": 2, "n_test": 1, "size": 48, "radius_range": (3, 8), "seed": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny dataset in the Drive layout: <tmp>/dataset/{train,test,test_img_ids.json}."""
    return generate_dataset(tmp_path_factory.mktemp("src") / "dataset", **SMALL)


def _zip(folder: Path, archive: Path, with_top: bool) -> Path:
    base = folder.parent if with_top else folder
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(base).as_posix())
    return archive


def _tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes by relative path, except the SOURCE.json that fetch_dataset adds."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != download.SOURCE_FILE
    }


def _assert_layout(out: Path, source: Path) -> None:
    assert (out / "train").is_dir() and (out / "test").is_dir() and (out / "test_img_ids.json").is_file()
    assert _tree(out) == _tree(source)


def _no_leftovers(out: Path) -> None:
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("with_top", [True, False], ids=["dataset-folder", "flat"])
def test_fetch_local_zip(dataset, tmp_path, with_top):
    archive = _zip(dataset, tmp_path / "data.zip", with_top)
    out = tmp_path / "data" / "raw"
    assert fetch_dataset(str(archive), out) == out
    _assert_layout(out, dataset)
    _no_leftovers(out)


def test_fetch_replaces_existing_out_dir(dataset, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    fetch_dataset(str(_zip(dataset, tmp_path / "d.zip", True)), out)
    _assert_layout(out, dataset)


def test_fetch_extracted_folder(dataset, tmp_path):
    out = tmp_path / "data" / "raw"
    fetch_dataset(str(dataset), out)
    _assert_layout(out, dataset)
    # The wrapping folder is accepted too.
    out2 = tmp_path / "data" / "raw2"
    fetch_dataset(str(dataset.parent), out2)
    _assert_layout(out2, dataset)
    _no_leftovers(out)


def test_sha256_match(dataset, tmp_path):
    archive = _zip(dataset, tmp_path / "data.zip", True)
    digest = sha256sum(archive)
    fetch_dataset(str(archive), tmp_path / "raw", sha256=digest)
    fetch_dataset(str(archive), tmp_path / "raw2", sha256="sha256:" + digest.upper())
    _assert_layout(tmp_path / "raw2", dataset)


def test_sha256_mismatch_leaves_nothing(dataset, tmp_path):
    archive = _zip(dataset, tmp_path / "data.zip", True)
    out = tmp_path / "data" / "raw"
    with pytest.raises(NucleisegError, match="sha256"):
        fetch_dataset(str(archive), out, sha256="0" * 64)
    assert not out.exists()
    _no_leftovers(out)


def test_sha256_mismatch_keeps_previous_out_dir(dataset, tmp_path):
    archive = _zip(dataset, tmp_path / "data.zip", True)
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("previous data")
    with pytest.raises(NucleisegError, match="sha256"):
        fetch_dataset(str(archive), out, sha256="f" * 64)
    assert _tree(out) == {"keep.txt": b"previous data"}
    _no_leftovers(out)


def _evil_zip(path: Path, dataset: Path, bad_name: str) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(dataset.rglob("*")):
            if p.is_file():
                zf.write(p, "dataset/" + p.relative_to(dataset).as_posix())
        zf.writestr(bad_name, b"pwned")
    with zipfile.ZipFile(path) as zf:  # the member name survived as written
        assert bad_name in zf.namelist()
    return path


def test_zip_slip_relative(dataset, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    archive = _evil_zip(tmp_path / "evil.zip", dataset, "../evil.txt")
    out = work / "data" / "raw"
    with pytest.raises(NucleisegError, match="escapes"):
        fetch_dataset(str(archive), out)
    assert not out.exists()
    assert not list(tmp_path.rglob("evil.txt"))
    _no_leftovers(out)


def test_zip_slip_nested_relative(dataset, tmp_path):
    archive = _evil_zip(tmp_path / "evil.zip", dataset, "dataset/train/../../../evil2.txt")
    out = tmp_path / "a" / "b" / "raw"
    with pytest.raises(NucleisegError):
        fetch_dataset(str(archive), out)
    assert not out.exists()
    assert not list(tmp_path.rglob("evil2.txt"))


def test_zip_absolute_member(dataset, tmp_path):
    target = Path(f"/tmp/nucleiseg-test-evil-{uuid.uuid4().hex}")
    archive = _evil_zip(tmp_path / "abs.zip", dataset, str(target))
    out = tmp_path / "data" / "raw"
    with pytest.raises(NucleisegError, match="escapes"):
        fetch_dataset(str(archive), out)
    assert not target.exists()
    assert not out.exists()
    assert not list(tmp_path.rglob(target.name))
    _no_leftovers(out)


def test_corrupt_zip(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(os.urandom(4096))
    out = tmp_path / "data" / "raw"
    with pytest.raises(NucleisegError, match="data.zip"):
        fetch_dataset(str(archive), out)
    assert not out.exists()
    _no_leftovers(out)


def test_zip_with_damaged_member(dataset, tmp_path):
    """A readable directory but a member whose bytes fail the CRC check."""
    payload = b"A" * 4000
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("dataset/train/x/images/x.png", payload)
    raw = archive.read_bytes()
    assert raw.count(payload) == 1
    archive.write_bytes(raw.replace(payload, b"B" * 4000))
    out = tmp_path / "raw"
    with pytest.raises(NucleisegError, match="data.zip"):
        fetch_dataset(str(archive), out)
    assert not out.exists()
    _no_leftovers(out)


def test_zip_without_train_folder(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("something/readme.txt", "hi")
    out = tmp_path / "raw"
    with pytest.raises(NucleisegError, match="train"):
        fetch_dataset(str(archive), out)
    assert not out.exists()
    _no_leftovers(out)


def test_missing_local_source(tmp_path):
    out = tmp_path / "raw"
    with pytest.raises(NucleisegError, match="nope.zip"):
        fetch_dataset(str(tmp_path / "nope.zip"), out)
    assert not out.exists()


def test_offline_drive_fails_fast(tmp_path, monkeypatch, closed_port):
    monkeypatch.setattr(download, "DRIVE_ENDPOINT", ("127.0.0.1", closed_port))
    import gdown

    def no_network(*args, **kwargs):  # the reachability probe must stop us before gdown
        raise AssertionError("gdown.download must not be called when Drive is unreachable")

    monkeypatch.setattr(gdown, "download", no_network)
    out = tmp_path / "data" / "raw"
    start = time.monotonic()
    with pytest.raises(NucleisegError) as info:
        fetch_dataset("gdrive:abc", out)
    assert time.monotonic() - start < 8
    message = str(info.value)
    assert "synthetic" in message
    assert ".zip" in message and "data.source" in message
    assert "\n" not in message
    assert "../shared" not in message and "dvc exp run -S data.source=" in message
    assert not out.parent.exists()  # no empty data/ folder left behind


@pytest.mark.parametrize(
    "source, expected",
    [
        ("gdrive:abc", "abc"),
        (f"gdrive:{DRIVE_ID}", DRIVE_ID),
        (f"gdown:{DRIVE_ID}", DRIVE_ID),
        (f"https://drive.google.com/file/d/{DRIVE_ID}/view", DRIVE_ID),
        (f"https://drive.google.com/file/d/{DRIVE_ID}/view?usp=sharing", DRIVE_ID),
        (f"https://drive.google.com/uc?id={DRIVE_ID}", DRIVE_ID),
        (f"https://drive.google.com/uc?export=download&id={DRIVE_ID}", DRIVE_ID),
        (f"https://drive.google.com/open?id={DRIVE_ID}", DRIVE_ID),
        ("synthetic", None),
        ("data/nuclei.zip", None),
        ("/abs/path/dataset", None),
    ],
)
def test_drive_file_id(source, expected):
    assert drive_file_id(source) == expected


def test_drive_url_without_id():
    with pytest.raises(NucleisegError, match="file id"):
        drive_file_id("https://drive.google.com/drive/my-drive")


def test_synthetic_source(tmp_path):
    out = tmp_path / "data" / "raw"
    fetch_dataset("synthetic", out, synthetic_options=dict(SMALL))
    assert sorted(p.name for p in (out / "train").iterdir()) == ["synth-train-000", "synth-train-001"]
    ids = json.loads((out / "test_img_ids.json").read_text())
    assert [e["file_name"] for e in ids] == ["synth-test-000.png"]
    assert (out / "test" / "synth-test-000.png").is_file()
    _no_leftovers(out)
    # Same options, same bytes (seeded).
    out2 = tmp_path / "again"
    fetch_dataset(" synthetic ", out2, synthetic_options=dict(SMALL))
    assert _tree(out) == _tree(out2)


def _run_stage(stage: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT",)}
    return subprocess.run(
        stage_argv(stage), cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_download_stage_error_is_one_line(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = "missing/nuclei-data.zip"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = _run_stage("download", tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "nuclei-data.zip" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "data" / "raw").exists()


def test_download_stage_without_params(tmp_path):
    result = _run_stage("download", tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "params.yaml" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_download_stage_synthetic(tmp_path):
    params = {"seed": 3, "data": {"source": "synthetic", "sha256": None, "synthetic": {"n_train": 2, "n_test": 1, "size": 64}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = _run_stage("download", tmp_path)
    assert result.returncode == 0, result.stderr
    raw = tmp_path / "data" / "raw"
    assert (raw / "train" / "synth-train-000" / "images" / "synth-train-000.png").is_file()
    assert (raw / "test_img_ids.json").is_file()
    _no_leftovers(raw)
