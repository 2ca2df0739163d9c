"""The train stage as DVC runs it, stopped and run again: with SIGTERM it checkpoints the epoch it is in before
exiting; with SIGKILL it loses at most the epochs since its last checkpoint. Either way the run again resumes the
same MLflow run and ends with the weights of an uninterrupted training, bit for bit."""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from stage_commands import stage_argv

from nucleiseg.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CMD = stage_argv("train")
# 6 epochs of 2 windows, validated (whole val image) at the last epoch only, with a loader worker process
# (a signal to the process group must not make it print a traceback).
TRAIN = {"epochs": 6, "samples_per_epoch": 2, "val_every": 1000, "workers": 1}


def _env(stage_environment, root: Path) -> dict:
    # One intra-op thread: with two, CPU training of this model is not bit-reproducible from run to run
    # (2 to 93 of its tensors differed in the last bits after 5 epochs, with or without checkpoints).
    return {**stage_environment(root), "OMP_NUM_THREADS": "1"}


def _pipeline_folder(root: Path, tiny_data: Path, make_params, **train) -> Path:
    shutil.copytree(tiny_data / "data", root / "data")
    params = make_params(train={**TRAIN, **train})
    (root / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), sort_keys=False))
    return root


def _model_state(root: Path) -> dict:
    return torch.load(root / "models" / "model.pt", weights_only=True)["model"]


def _checkpoint(root: Path) -> Path:
    (path,) = [p for p in (root / "checkpoints").glob("train-*.pt") if ".best-" not in p.name]
    return path


def _runs(root: Path) -> dict:
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        return dict(db.execute("select run_uuid, status from runs").fetchall())


def _steps(root: Path, run_id: str, key: str) -> list[int]:
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        return sorted(s for (s,) in db.execute("select step from metrics where key = ? and run_uuid = ?", (key, run_id)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_data, make_params, stage_environment):
    """The same training, never interrupted: the weights the interrupted ones must end with."""
    root = _pipeline_folder(tmp_path_factory.mktemp("straight"), tiny_data, make_params)
    done = subprocess.run(CMD, cwd=root, env=_env(stage_environment, root), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _model_state(root)


def _start(root: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(CMD, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _read_until(proc: subprocess.Popen, pattern: str, seen: list[str]) -> None:
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return
        assert time.monotonic() < deadline, f"no {pattern!r} after 300 s"
    raise AssertionError(f"the stage ended before {pattern!r}:\n{''.join(seen)[-3000:]}")


def _run_again(root: Path, env: dict, straight: dict, resume_epoch: int, first_run: str) -> None:
    resumed = subprocess.run(CMD, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {resume_epoch}\n" in resumed.stderr
    trained = re.findall(r"epoch (\d+): ", resumed.stderr)
    assert trained == [str(e) for e in range(resume_epoch, TRAIN["epochs"] + 1)]
    state = _model_state(root)
    assert state.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(state[key], value), key
    assert json.loads((root / "models" / "run.json").read_text())["run_id"] == first_run
    assert _runs(root) == {first_run: "FINISHED"}
    assert _steps(root, first_run, "val/ap50_all") == [TRAIN["epochs"]]  # val_every > epochs: the last epoch is validated
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == [], "checkpoint, best weights or lock left behind"


def test_sigterm_checkpoints_the_current_epoch_and_the_run_again_is_exact(tmp_path, tiny_data, make_params, stage_environment, straight):
    """No periodic checkpoint (checkpoint_every 0, checkpoint_seconds 0): SIGTERM after epoch 1 makes the stage
    finish the epoch it is in, checkpoint it and exit 130 with one line naming the epoch to resume from."""
    root = _pipeline_folder(tmp_path, tiny_data, make_params, checkpoint_every=0, checkpoint_seconds=0)
    env = _env(stage_environment, root)
    proc = _start(root, env)
    seen: list[str] = []
    _read_until(proc, r"epoch 1: ", seen)
    os.killpg(proc.pid, signal.SIGTERM)  # like `dvc exp remove`/job schedulers: the stage and its loader workers
    out, _ = proc.communicate(timeout=300)
    out = "".join(seen) + out
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    interrupted = re.search(r"error: interrupted; epoch (\d+) is checkpointed in .*: running the stage again resumes from epoch (\d+)", out)
    assert interrupted, out[-3000:]
    epoch = int(interrupted.group(1))
    assert 2 <= epoch < TRAIN["epochs"] and int(interrupted.group(2)) == epoch + 1
    assert re.findall(r"epoch (\d+): ", out) == [str(e) for e in range(1, epoch + 1)]
    assert load_checkpoint(_checkpoint(root))["epoch"] == epoch
    assert not (root / "models" / "model.pt").exists()
    ((first_run, status),) = _runs(root).items()
    assert status == "FAILED"
    assert _steps(root, first_run, "train/loss") == list(range(1, epoch + 1))
    _run_again(root, env, straight, epoch + 1, first_run)
    assert _steps(root, first_run, "train/loss") == list(range(1, TRAIN["epochs"] + 1))  # each epoch logged once


def test_sigkill_loses_at_most_the_epochs_since_the_last_checkpoint(tmp_path, tiny_data, make_params, stage_environment, straight):
    """Checkpoints every 2 epochs; SIGKILL (nothing unwinds) after epoch 3: the checkpoint on disk is whole, and the
    run again trains only the epochs after it."""
    root = _pipeline_folder(tmp_path, tiny_data, make_params, checkpoint_every=2, checkpoint_seconds=0)
    env = _env(stage_environment, root)
    proc = _start(root, env)
    seen: list[str] = []
    _read_until(proc, r"epoch 3: ", seen)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    epoch = load_checkpoint(_checkpoint(root))["epoch"]
    assert epoch in (2, 4)  # 4 when epoch 4 ended before the kill landed
    ((first_run, _),) = _runs(root).items()
    _run_again(root, env, straight, epoch + 1, first_run)
