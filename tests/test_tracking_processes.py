"""The MLflow store as separate stage processes use it: first use by concurrent processes, and a copied repository.

Each step runs in its own Python process (like DVC stages): MLflow caches stores per process,
and the races under test are between processes.
"""

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import mlflow
    from nucleiseg.track import runs as tracking

    index, sync = sys.argv[1], Path(sys.argv[2])
    (sync / f"ready-{index}").touch()
    deadline = time.monotonic() + 60
    while not (sync / "go").exists() and time.monotonic() < deadline:  # all start configure() together
        time.sleep(0.005)
    with tracking.active_run(name=f"worker-{index}") as run:
        mlflow.log_metric("worker", float(index))
    print(run.info.run_id)
    """
)


def env_for(root: Path) -> dict:
    env = {**os.environ, "DVC_ROOT": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)  # an earlier test's configure() may have exported one
    return env


@pytest.mark.slow
def test_concurrent_first_use_of_a_new_store(tmp_path):
    """Processes that all find no store create it once; every run lands (issue 11)."""
    workers = 3
    repo, sync = tmp_path / "repo", tmp_path / "sync"
    repo.mkdir(parents=True)
    sync.mkdir(parents=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(sync)], cwd=repo, env=env_for(repo),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(workers)
    ]
    deadline = time.monotonic() + 60
    while len(list(sync.glob("ready-*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    (sync / "go").touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    run_ids = {out.strip().splitlines()[-1] for _, out, _ in results}
    assert len(run_ids) == workers

    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as conn:
        experiments = conn.execute("SELECT experiment_id FROM experiments WHERE name = 'nucleiseg'").fetchall()
        rows = conn.execute(
            "SELECT r.run_uuid, r.status, m.value FROM runs r JOIN metrics m ON m.run_uuid = r.run_uuid AND m.key = 'worker'"
        ).fetchall()
    assert len(experiments) == 1
    assert {run_id for run_id, _, _ in rows} == run_ids
    assert {status for _, status, _ in rows} == {"FINISHED"}
    assert sorted(value for _, _, value in rows) == [float(i) for i in range(workers)]


STEP = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import mlflow
    from nucleiseg.track import runs as tracking

    reopen, payload = sys.argv[1] or None, Path(sys.argv[2])
    with tracking.active_run(reopen, name=None if reopen else "step") as run:
        mlflow.log_artifact(str(payload), artifact_path="files")
        if not reopen:
            mlflow.initialize_logged_model(name="model")  # a logged model's own artifact location
    print(json.dumps({"run_id": run.info.run_id, "artifact_uri": mlflow.get_run(run.info.run_id).info.artifact_uri}))
    """
)


def step(root: Path, payload: Path, reopen: str = "") -> dict:
    import json

    done = subprocess.run([sys.executable, "-c", STEP, reopen, str(payload)], cwd=root, env=env_for(root),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_copied_repository_logs_into_itself_and_never_into_the_original(tmp_path):
    """A repo copied to B: new runs log into B/mlruns/artifacts in a fresh `nucleiseg` experiment, the copied
    runs stay browsable in the renamed one, reopening one of them is one error line, and nothing is written
    into A. Only MLflow's API is used (no SQL on its tables)."""
    from mlflow.tracking import MlflowClient

    repo_a, repo_b = tmp_path / "a", tmp_path / "b"
    repo_a.mkdir()
    first = step(repo_a, _payload(tmp_path, "first.txt"))
    assert first["artifact_uri"].startswith((repo_a / "mlruns" / "artifacts").as_uri() + "/")
    shutil.copytree(repo_a, repo_b)
    before = snapshot(repo_a)

    second = step(repo_b, _payload(tmp_path, "second.txt"))
    artifacts_b = repo_b / "mlruns" / "artifacts"
    assert (artifacts_b / second["run_id"] / "artifacts" / "files" / "second.txt").read_text() == "second.txt"
    done = subprocess.run([sys.executable, "-c", STEP, first["run_id"], str(_payload(tmp_path, "third.txt"))], cwd=repo_b,
                          env=env_for(repo_b), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"run {first['run_id']} keeps its artifacts in {repo_a}" in done.stderr
    assert snapshot(repo_a) == before, "something was written into the original repository"

    client = MlflowClient(f"sqlite:///{repo_b / 'mlruns' / 'mlflow.db'}")
    current = client.get_experiment_by_name("nucleiseg")
    kept = client.get_experiment_by_name(f"nucleiseg (copied from {repo_a})")
    assert current.artifact_location == artifacts_b.as_uri() and kept is not None
    assert [r.info.run_id for r in client.search_runs([kept.experiment_id])] == [first["run_id"]]
    assert [r.info.run_id for r in client.search_runs([current.experiment_id])] == [second["run_id"]]
    assert client.get_experiment("0").lifecycle_stage == "deleted"


def _payload(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "payloads" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(name)
    return path


@pytest.mark.slow
def test_concurrent_first_use_many_times(tmp_path):
    """The race is timing-dependent: repeat it (pytest -m slow)."""
    for i in range(10):
        test_concurrent_first_use_of_a_new_store(tmp_path / str(i))
