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

from nucleiseg.data import load_train_sample, split_ids, train_ids
from nucleiseg.synthetic import generate_dataset
from nucleiseg.tiling import tile_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def stage_dir(tmp_path):
    raw = generate_dataset(tmp_path / "data" / "raw", n_train=3, n_test=1, size=96, radius_range=(4, 10))
    split = split_ids(train_ids(raw), 1, 0)
    for name, names in split.items():
        tile_split((load_train_sample(raw, n) for n in names), tmp_path / "data" / "tiles", name, 64, 24, 0.3)
    (tmp_path / "data" / "split.json").write_text(json.dumps(split))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["backbone"] = "resnet18"
    params["model"].update(weights="none", rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                           rpn_post_nms_top_n_test=100, box_batch_size_per_image=16, detections_per_img=20)
    params["train"].update(epochs=4, samples_per_epoch=2, warmup_iters=2, lr_drop_epoch=0, workers=0, device="cpu",
                           augment={"crop": 0, "scale": [1.0, 1.0], "flip": False, "rot90": False, "color_jitter": 0.0})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _env(root: Path) -> dict:
    env = {**os.environ, "DVC_ROOT": str(root), "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _runs(root: Path) -> dict:
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        return dict(db.execute("select run_uuid, status from runs").fetchall())


def test_killed_train_stage_resumes_its_checkpoint_and_mlflow_run(stage_dir):
    cmd = [sys.executable, str(REPO / "stages" / "train.py")]
    proc = subprocess.Popen(cmd, cwd=stage_dir, env=_env(stage_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = stage_dir / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("train-*.pt")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert not (stage_dir / "models" / "model.pt").exists()
    (first_run, status), = _runs(stage_dir).items()
    assert status == "FAILED"

    resumed = subprocess.run(cmd, cwd=stage_dir, env=_env(stage_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert json.loads((stage_dir / "models" / "run.json").read_text())["run_id"] == first_run
    assert _runs(stage_dir) == {first_run: "FINISHED"}
    with sqlite3.connect(stage_dir / "mlruns" / "mlflow.db") as db:
        steps = sorted(s for (s,) in db.execute("select step from metrics where key = 'train/loss' and run_uuid = ?", (first_run,)))
    assert steps == [1, 2, 3, 4]
    assert not list(checkpoints.glob("train-*.pt")), "the resume file is removed once training finished"
