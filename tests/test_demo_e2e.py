"""End to end: the README's offline demo in a fresh copy of the repository, then a second backbone.

This is the CI's whole-pipeline check: `scripts/demo` (dvc exp run on synthetic data, CPU),
then `dvc exp run -S backbone=resnet18`, which must re-run train -> evaluate only, and
`dvc exp show` must list both experiments with metrics in range.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("ap50", "ap50_all", "ap", "ap75", "precision", "recall", "f1", "aji", "pq", "dq", "sq")


def _run(cmd, cwd, env, timeout=900):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    if shutil.which("dvc", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")) is None:
        pytest.skip("dvc is not installed")
    root = tmp_path_factory.mktemp("demo") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, tracked):
        src = REPO / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    _run(["git", "init", "-q", "-b", "main"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    first = _run(["scripts/demo", "-n", "e2e-r50"], root, env)
    second = _run(["dvc", "exp", "run", "-n", "e2e-r18", "-S", "backbone=resnet18"], root, env)
    return root, env, first.stdout + first.stderr, second.stdout + second.stderr


def test_demo_writes_every_output(demo_repo):
    root, _, _, _ = demo_repo
    for rel in ("data/raw/test_img_ids.json", "data/split.json", "data/tiles/train.json", "data/tiles/val.json",
                "models/model.pt", "models/run.json", "metrics/train.json", "plots/train.csv", "predictions/val.json",
                "predictions/test.json", "submission/answer.json", "submission/answer.zip", "metrics/eval.json", "plots/pr.csv"):
        assert (root / rel).is_file(), rel
    assert list((root / "overlays").glob("*.png"))
    metrics = json.loads((root / "metrics/eval.json").read_text())
    for key in EVAL_KEYS:
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    answer = json.loads((root / "submission/answer.json").read_text())
    assert answer and set(answer[0]) == {"image_id", "bbox", "score", "category_id", "segmentation"}


def test_second_backbone_reruns_only_train_to_evaluate(demo_repo):
    _, _, _, second = demo_repo
    assert "Running stage 'train'" in second and "Running stage 'evaluate'" in second
    assert "Running stage 'download'" not in second and "Running stage 'tile'" not in second


def test_exp_show_lists_both_experiments_with_metrics(demo_repo):
    root, env, _, _ = demo_repo
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root, env).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("metrics/eval.json", {}).get("data", {})
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                found[rev.get("name") or exp.get("name")] = (params.get("backbone"), metrics)
    assert {"e2e-r50", "e2e-r18"} <= set(found), found.keys()
    assert found["e2e-r50"][0] == "resnet50" and found["e2e-r18"][0] == "resnet18"
    for _, metrics in (found["e2e-r50"], found["e2e-r18"]):
        for key in ("ap50", "ap50_all", "f1", "pq"):
            assert 0.0 <= metrics[key] <= 1.0


def test_mlflow_runs_land_in_the_repo_store(demo_repo):
    root, _, _, _ = demo_repo
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        runs = dict(db.execute("select name, status from runs").fetchall())
        tags = dict(db.execute("select r.name, t.value from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'backbone'").fetchall())
    assert runs.get("e2e-r50") == "FINISHED" and runs.get("e2e-r18") == "FINISHED", runs
    assert tags == {"e2e-r50": "resnet50", "e2e-r18": "resnet18"}
    assert any((root / "mlruns" / "artifacts").rglob("overlays/*.png"))
