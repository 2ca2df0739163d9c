"""End to end: `dvc repro tile` on tiny synthetic data in a throwaway git + DVC repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stage_commands import stage_argv

from nucleiseg.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
# Prefer the dvc installed beside this Python (a pyenv shim needs the real HOME to resolve).
_LOCAL_DVC = Path(sys.executable).parent / "dvc"
DVC = str(_LOCAL_DVC) if _LOCAL_DVC.is_file() else shutil.which("dvc")

pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not on PATH")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def dvc_repo(tmp_path) -> tuple[Path, dict]:
    work = tmp_path / "repo"
    work.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, work / name)
    shutil.copytree(REPO / "stages", work / "stages", ignore=ignore)
    shutil.copytree(REPO / "src", work / "src", ignore=ignore)

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["source"] = "synthetic"
    params["data"]["val_images"] = 1
    params["data"]["synthetic"].update({"n_train": 4, "n_test": 1, "size": 128})
    params["tile"].update({"size": 64, "overlap": 24})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(
        PYTHONPATH=str(work / "src"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        DVC_NO_ANALYTICS="1",
        HOME=str(tmp_path / "home"),  # no user-level git/dvc config leaks in
        GIT_CONFIG_NOSYSTEM="1",
    )
    (tmp_path / "home").mkdir()
    git = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test", "-c", "init.defaultBranch=main"]
    _run(git + ["init", "-q"], work, env)
    _run([DVC, "init", "-q"], work, env)
    _run([DVC, "config", "core.autostage", "false"], work, env)
    _run(git + ["add", "-A"], work, env)
    _run(git + ["commit", "-q", "-m", "init"], work, env)
    return work, env


@pytest.mark.slow
def test_dvc_repro_tile(dvc_repo):
    work, env = dvc_repo
    where = _run(["python", "-c", "import nucleiseg; print(nucleiseg.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(work / "src")  # the copied package runs, not /work/main's
    first = _run([DVC, "repro", "tile"], work, env, timeout=300)
    assert "Running stage 'download'" in first.stdout and "Running stage 'tile'" in first.stdout

    split = json.loads((work / "data" / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 3
    ids = sorted(p.name for p in (work / "data" / "raw" / "train").iterdir())
    assert sorted(split["train"] + split["val"]) == ids == [f"synth-train-{k:03d}" for k in range(4)]

    from nucleiseg.data.tile_store import read_index

    tiles = work / "data" / "tiles"
    entries = read_index(tiles, "train")
    assert len(entries) == 3 * 9  # 128 px, windows of 64 overlapping 24 -> 3 x 3 per train image
    assert {e.source_image for e in entries} == set(split["train"])  # val images are never tiled
    assert sum(e.instances for e in entries) > 0
    assert all((tiles / "train" / name).is_file() for e in entries for name in (e.image, *e.labels))
    assert sorted(p.name for p in tiles.iterdir()) == ["summary.json", "train"]
    summary = json.loads((tiles / "summary.json").read_text())
    assert summary["train"]["images"] == 3 and summary["train"]["windows"] == 27
    assert summary["val_images"] == split["val"]
    assert summary["tile"] == {"size": 64, "overlap": 24, "min_visible": 0.3}
    assert summary["data"]["source"] == "synthetic"
    assert not list((work / "data").glob(".*tmp-*"))
    assert (work / "dvc.lock").is_file()

    second = _run([DVC, "repro", "tile"], work, env, timeout=300)
    assert "Running stage" not in second.stdout, second.stdout
    assert "Stage 'tile' didn't change, skipping" in second.stdout, second.stdout

    status = _run([DVC, "status", "--with-deps", "tile"], work, env)
    assert "up to date" in status.stdout.lower(), status.stdout


def _stage(tmp_path, name, params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DVC_ROOT": str(tmp_path)}
    return subprocess.run(stage_argv(name), cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)


def _one_error_line(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.slow
def test_stage_param_errors_are_one_line(tmp_path):
    """An unknown data.synthetic key, data.val_images=0 and more val images than there are stop with one
    'error:' line, exit 2, before any output."""
    _one_error_line(_stage(tmp_path, "download", {"data": {"source": "synthetic", "synthetic": {"n_trian": 3}}}), "data.synthetic.n_trian")
    assert not (tmp_path / "data").exists()
    generate_dataset(tmp_path / "data" / "raw", n_train=2, n_test=1, size=64)
    _one_error_line(_stage(tmp_path, "tile", {"data": {"val_images": 0}, "tile": {"size": 64, "overlap": 16}}), "data.val_images = 0")
    _one_error_line(_stage(tmp_path, "tile", {"data": {"val_images": 2}, "tile": {"size": 64, "overlap": 16}}), "data.val_images=2")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


@pytest.mark.slow
def test_tile_stage_folds_hold_out_disjoint_pairs_and_refuse_a_fold_out_of_range(tmp_path):
    """6 training images, data.val_images 2: `stages/tile.py` with data.fold 0, 1, 2 holds out three disjoint pairs
    covering all 6 (never tiling them); data.fold 3 stops with one `error:` line and leaves the outputs as they were."""
    generate_dataset(tmp_path / "data" / "raw", n_train=6, n_test=1, size=64)
    ids = sorted(p.name for p in (tmp_path / "data" / "raw" / "train").iterdir())
    held_out = []
    for fold in range(3):
        done = _stage(tmp_path, "tile", {"data": {"val_images": 2, "fold": fold}, "tile": {"size": 64, "overlap": 16}})
        assert done.returncode == 0, done.stderr
        split = json.loads((tmp_path / "data" / "split.json").read_text())
        assert len(split["val"]) == 2 and sorted(split["train"] + split["val"]) == ids
        tiled = json.loads((tmp_path / "data" / "tiles" / "summary.json").read_text())
        assert tiled["val_images"] == split["val"] and tiled["train"]["images"] == 4
        held_out += split["val"]
    assert sorted(held_out) == ids  # disjoint pairs, every image held out once
    before = {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()}
    _one_error_line(_stage(tmp_path, "tile", {"data": {"val_images": 2, "fold": 3}, "tile": {"size": 64, "overlap": 16}}),
                    "data.fold = 3 is out of range: 6 training images with data.val_images = 2 make 3 fold(s), 0 to 2")
    assert {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()} == before
