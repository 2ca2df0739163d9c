"""The train stage as DVC runs it: killed with SIGTERM mid-run, run again, it resumes the same MLflow run."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def stage_dir(repo, make_params):
    """The tiny pipeline folder with 4 epochs of 2 windows, validated (whole val image) at the last epoch only,
    with a loader worker process (a SIGTERM to the process group must not make it print a traceback)."""
    params = make_params(train={"epochs": 4, "samples_per_epoch": 2, "val_every": 1000, "workers": 1})
    (repo / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), sort_keys=False))
    return repo


def _runs(root: Path) -> dict:
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        return dict(db.execute("select run_uuid, status from runs").fetchall())


@pytest.mark.slow
def test_killed_train_stage_resumes_its_checkpoint_and_mlflow_run(stage_dir, stage_environment):
    cmd = [sys.executable, str(REPO / "stages" / "train.py")]
    env = stage_environment(stage_dir)
    proc = subprocess.Popen(cmd, cwd=stage_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    checkpoints = stage_dir / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("train-*.pt")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # like `dvc exp remove`/job schedulers: the stage and its loader workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert "error: interrupted" in out
    assert not (stage_dir / "models" / "model.pt").exists()
    (first_run, status), = _runs(stage_dir).items()
    assert status == "FAILED"

    resumed = subprocess.run(cmd, cwd=stage_dir, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert json.loads((stage_dir / "models" / "run.json").read_text())["run_id"] == first_run
    assert _runs(stage_dir) == {first_run: "FINISHED"}
    with sqlite3.connect(stage_dir / "mlruns" / "mlflow.db") as db:
        steps = sorted(s for (s,) in db.execute("select step from metrics where key = 'train/loss' and run_uuid = ?", (first_run,)))
        val_steps = sorted(s for (s,) in db.execute("select step from metrics where key = 'val/ap50_all' and run_uuid = ?", (first_run,)))
    assert steps == [1, 2, 3, 4]
    assert val_steps == [4]  # val_every > epochs: the last epoch is validated
    metrics = json.loads((stage_dir / "metrics" / "train.json").read_text())
    assert metrics["best_epoch"] == 4 and 0.0 <= metrics["val_ap50_all"] <= 1.0
    assert not list(checkpoints.glob("train-*.pt")), "the resume file is removed once training finished"
