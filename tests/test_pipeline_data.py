"""End to end: `dvc repro tile` on tiny synthetic data in a throwaway git + DVC repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nucleiseg.synthetic import generate_dataset

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
def repo(tmp_path) -> tuple[Path, dict]:
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


def test_dvc_repro_tile(repo):
    work, env = repo
    where = _run(["python", "-c", "import nucleiseg; print(nucleiseg.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(work / "src")  # the copied package runs, not /work/main's
    first = _run([DVC, "repro", "tile"], work, env, timeout=300)
    assert "Running stage 'download'" in first.stdout and "Running stage 'tile'" in first.stdout

    split = json.loads((work / "data" / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 3
    ids = sorted(p.name for p in (work / "data" / "raw" / "train").iterdir())
    assert sorted(split["train"] + split["val"]) == ids == [f"synth-train-{k:03d}" for k in range(4)]

    tiles = work / "data" / "tiles"
    from pycocotools.coco import COCO

    for name, n_images in (("train", 3), ("val", 1)):
        doc = json.loads((tiles / f"{name}.json").read_text())
        gt = COCO(str(tiles / f"{name}.json"))
        assert len(gt.getImgIds()) == n_images * 9  # 128 px, windows of 64 overlapping 24 -> 3 x 3
        assert doc["annotations"], name
        sources = {r["source_image"] for r in doc["images"]}
        assert sources == set(split[name])
        assert all((tiles / r["file_name"]).is_file() for r in doc["images"])
    summary = json.loads((tiles / "summary.json").read_text())
    assert summary["train"]["images"] == 3 and summary["val"]["images"] == 1
    assert not list((work / "data").glob(".*tmp-*"))
    assert (work / "dvc.lock").is_file()

    second = _run([DVC, "repro", "tile"], work, env, timeout=300)
    assert "Running stage" not in second.stdout, second.stdout
    assert "Stage 'tile' didn't change, skipping" in second.stdout, second.stdout

    status = _run([DVC, "status", "--with-deps", "tile"], work, env)
    assert "up to date" in status.stdout.lower(), status.stdout


def _stage(tmp_path, name, params):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)


def test_stage_param_errors_are_one_line(tmp_path):
    """An unknown data.synthetic key and data.val_images=0 stop with one 'error:' line, exit 2."""
    bad_key = _stage(tmp_path, "download", {"data": {"source": "synthetic", "synthetic": {"n_trian": 3}}})
    assert bad_key.returncode == 2 and bad_key.stderr.strip().startswith("error:") and "n_trian" in bad_key.stderr
    assert "Traceback" not in bad_key.stderr
    generate_dataset(tmp_path / "data" / "raw", n_train=2, n_test=1, size=64)
    no_val = _stage(tmp_path, "tile", {"data": {"val_images": 0}, "tile": {"size": 64, "overlap": 16}})
    assert no_val.returncode == 2 and "data.val_images must be >= 1" in no_val.stderr and "Traceback" not in no_val.stderr
    assert not (tmp_path / "data" / "tiles").exists()
