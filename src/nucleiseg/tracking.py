"""MLflow: one run per trained model; later stages log into the same run.

All state lives under `<repo>/mlruns/` (a SQLite store plus an artifacts
folder), resolved from DVC_ROOT so `dvc exp run --temp/--queue`, which run in a
throw-away copy, still land their runs in the real repository. A set
MLFLOW_TRACKING_URI (e.g. a team server) wins.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from contextlib import contextmanager
from pathlib import Path

from .io import repo_root

log = logging.getLogger(__name__)

EXPERIMENT = "nucleiseg"


def store_dir() -> Path:
    return repo_root() / "mlruns"


def local_store_uri() -> str:
    """The project's own store: SQLite under <repo>/mlruns."""
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri()


def uses_local_store() -> bool:
    return tracking_uri() == local_store_uri()


def configure(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at this project's store; returns the experiment id."""
    import mlflow

    uri = tracking_uri()
    local_store = uses_local_store()
    if local_store:
        store_dir().mkdir(parents=True, exist_ok=True)
    # Note: set_tracking_uri also exports MLFLOW_TRACKING_URI to this process's environment.
    mlflow.set_tracking_uri(uri)
    # Absolute: the default (./mlruns of the cwd) is lost with dvc exp run --temp's copy.
    artifact_location = (store_dir() / "artifacts").as_uri() if local_store else None
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        return existing.experiment_id
    return mlflow.create_experiment(experiment, artifact_location=artifact_location)


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_tags(backbone: str, device: str) -> dict[str, str]:
    import torch
    import torchvision

    tags = {
        "backbone": backbone,
        "device": device,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }
    commit = git_commit(Path.cwd()) or git_commit(repo_root())
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return {k: v for k, v in tags.items() if v != ""}


def run_name(backbone: str) -> str:
    """The DVC experiment name when there is one, else the backbone."""
    return os.environ.get("DVC_EXP_NAME") or backbone


@contextmanager
def active_run(run_id: str | None = None, name: str | None = None, tags: dict | None = None):
    """Start (or reopen by id) a run; an exception marks it FAILED and propagates."""
    import mlflow

    experiment_id = configure()
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=name, tags=tags)
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_params(params: dict) -> None:
    import mlflow

    # MLflow caps a value at 6000 chars and rejects re-logging a different value for a key.
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def pip_requirements() -> list[str]:
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}", "numpy"]


def log_model(model, name: str = "model") -> None:
    """The model as an MLflow pytorch flavour (pickle: the default pt2 export fails on Mask R-CNN)."""
    import mlflow.pytorch

    mlflow.pytorch.log_model(model.cpu(), name=name, serialization_format="pickle", pip_requirements=pip_requirements())
