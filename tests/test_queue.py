"""Several trainings at once, the DVC way: two queued experiments and `dvc queue start -j 2`.

Each queued experiment runs the whole pipeline in its own temp copy under .dvc/tmp/exps/; both train
stages keep their resume checkpoints (keyed by their params) and lock files in the repository's
checkpoints/ (through DVC_ROOT) and log to the repository's MLflow store. The two must train at the same
time, finish, and leave two experiments and two finished MLflow runs; `train.workers: auto` splits the
cores between them (NUCLEISEG_CONCURRENT_TRAININGS=2 where the queue starts).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dvc_experiments import shown_experiments

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"queued-a": "1.0e-4", "queued-b": "5.0e-5"}  # train.lr: different params, so different checkpoint files


def _run(cmd, cwd, env, timeout=600):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


# The tests' tiny settings (conftest.TINY_PARAMS) as -S overrides, 4 epochs of 2 windows, validated after the last,
# with automatic loader workers. (train.amp stays 'auto': DVC would write a bare `off`, which YAML reads as false.)
OVERRIDES = [
    "backbone=resnet18", "device=cpu",
    "data.source=synthetic", "data.val_images=1", "data.synthetic.n_train=3", "data.synthetic.n_test=1", "data.synthetic.size=96",
    "data.synthetic.radius_range=[4,10]",
    "tile.size=64", "tile.overlap=24",
    "model.weights=none", "model.input_scale=1.0", "model.rpn_pre_nms_top_n_train=200", "model.rpn_post_nms_top_n_train=200",
    "model.rpn_pre_nms_top_n_test=200", "model.rpn_post_nms_top_n_test=200", "model.rpn_batch_size_per_image=64",
    "model.box_batch_size_per_image=16", "model.detections_per_img=20",
    "train.epochs=4", "train.batch_size=1", "train.samples_per_epoch=2", "train.warmup_iters=2", "train.lr_milestones=[]",
    "train.val_every=1000", "train.workers=auto", "train.augment.crop=0", "train.augment.scale=[1.0,1.0]", "train.augment.flip=false",
    "train.augment.rot90=false", "train.augment.color_jitter=0.0",
    "infer.window=64", "infer.overlap=24", "evaluate.max_dets_all=100", "evaluate.overlays=1",
    # A 4-step model is near random: keep its every detection, so that export has an answer to write.
    "infer.score_floor=0.0", "infer.mask_threshold=0.1", "infer.min_area=0",
]


@pytest.fixture(scope="module")
def queued_repo(tmp_path_factory):
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if dvc is None:
        pytest.skip("dvc is not installed")
    root = tmp_path_factory.mktemp("queue") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, tracked):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    env = {**os.environ, "PYTHONPATH": "src", "NUCLEISEG_CONCURRENT_TRAININGS": "2", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        env.pop(name, None)
    _run(["git", "init", "-q", "-b", "main"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    for name, lr in EXPERIMENTS.items():
        _run(["dvc", "exp", "run", "--queue", "-n", name, *(arg for o in OVERRIDES for arg in ("-S", o)), "-S", f"train.lr={lr}"], root, env)
    _run(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 900
    try:
        while True:
            status = _run(["dvc", "queue", "status"], root, env)
            if not any(state in status for state in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, f"the queue did not finish in 15 min:\n{status}"
            time.sleep(5)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=root, env=env, capture_output=True, timeout=120)
    logs = {name: _run(["dvc", "queue", "logs", name], root, env) for name in EXPERIMENTS}
    return root, env, status, logs


def test_both_experiments_succeed(queued_repo):
    _, _, status, logs = queued_repo
    for name in EXPERIMENTS:
        assert f"{name}" in status and "Failed" not in status, status
        assert "Running stage 'train'" in logs[name] and "Traceback" not in logs[name], logs[name][-3000:]


def test_each_training_split_the_cores_and_cleaned_up(queued_repo):
    root, _, _, logs = queued_repo
    for name in EXPERIMENTS:
        assert "2 trainings share this machine" in logs[name], logs[name][-3000:]
    assert list((root / "checkpoints").iterdir()) == [], "a checkpoint, best-weights file or lock was left behind"


def test_two_finished_mlflow_runs_that_overlapped(queued_repo):
    root, _, _, _ = queued_repo
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        runs = db.execute("select r.run_uuid, r.status, r.start_time, r.end_time, t.value from runs r "
                          "join tags t on t.run_uuid = r.run_uuid and t.key = 'dvc_exp_name'").fetchall()
        lrs = dict(db.execute("select run_uuid, value from params where key = 'train.lr'").fetchall())
    assert sorted(name for *_, name in runs) == sorted(EXPERIMENTS), runs
    assert {status for _, status, *_ in runs} == {"FINISHED"}
    assert sorted(float(lrs[run]) for run, *_ in runs) == sorted(float(lr) for lr in EXPERIMENTS.values())
    (_, _, start_a, end_a, _), (_, _, start_b, end_b, _) = runs
    assert start_a < end_b and start_b < end_a, "the two trainings did not run at the same time"


def test_exp_show_lists_both_with_their_metrics(queued_repo):
    root, env, _, _ = queued_repo
    shown = shown_experiments(json.loads(_run(["dvc", "exp", "show", "--json"], root, env)))
    found = {name: (params.get("train", {}).get("lr"), metrics) for name, (params, metrics) in shown.items()}
    assert set(EXPERIMENTS) <= set(found), found.keys()
    for name, lr in EXPERIMENTS.items():
        assert found[name][0] == pytest.approx(float(lr))
        assert 0.0 <= found[name][1]["ap50"] <= 1.0
