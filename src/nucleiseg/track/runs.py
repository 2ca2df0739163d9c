"""MLflow: one run per trained model; later stages log into the same run.

All state lives under `<repo>/mlruns/` (a SQLite store `mlflow.db` plus an
`artifacts/` folder), resolved from DVC_ROOT so `dvc exp run --temp/--queue`,
which run in a throw-away copy, still land their runs in the real repository.
A set MLFLOW_TRACKING_URI (e.g. a team server) wins.

Four things MLflow does not do for a per-repository SQLite store, done here:

- Safe first use. MLflow creates and migrates a missing SQLite store in whichever
  process opens it first, without a lock: two stages (or `dvc exp run --queue` jobs)
  starting together both migrate, and one fails (`duplicate column name: step`) or the
  store is left half-migrated. `configure()` opens the store and finds or creates the
  experiment while holding an exclusive `flock` on `mlruns/.store.lock`.
- Clear errors. A corrupt `mlflow.db`, or a run id the store does not know, is one
  NucleisegError that says what to do, not a SQLAlchemy traceback (`check_run`).
- Artifacts stay in the repository, through MLflow's API only. MLflow stores absolute artifact
  locations (in the experiment, and in each run when it is created) and has no API to change
  them. In a copied or moved repository the store still names the original's
  `mlruns/artifacts`: `configure()` then renames that experiment (`nucleiseg (copied from
  <path>)`, its runs browsable as they are) and makes a fresh `nucleiseg` here, so new runs
  log into this repository; a stage that would reopen one of those older runs refuses in one
  line (`check_run`) instead of writing into the other repository.
- No stray experiment. A new store is created with this repository's artifact root, so the
  `Default` experiment MLflow puts in it points here; empty, it is deleted (`_retire_default`),
  so the UI lists the project's alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; first use is then unguarded, as in plain MLflow
    fcntl = None

from nucleiseg.core.errors import NucleisegError, os_error_text, redact
from nucleiseg.core.io import repo_root
from nucleiseg.data.sources import describe_source

log = logging.getLogger(__name__)

EXPERIMENT = "nucleiseg"

# Experiment tags set at creation (and added to an existing experiment when missing).
# `mlflow.experimentKind`: without it MLflow 3's UI guesses the kind from the contents and
# may open the GenAI view (traces, prompts); this value opens the classic "Runs" table
# with the model-training side bar. `mlflow.note.content`: the experiment's description,
# shown above the runs table.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "Nuclei instance segmentation with Mask R-CNN: one run per trained model. The train stage "
        "creates the run (params, per-epoch train/ metrics, the model with its weights); the evaluate stage adds "
        "val/ metrics (val/ap50 = leaderboard-style AP50 with the top 100 detections per image; "
        "val/ap50_all, val/f1, val/aji, val/pq) and overlays.\n\n"
        "Run names read `<DVC experiment> · <backbone> · <data source>` (`<backbone> · <data source>` outside DVC "
        "experiments); the Dataset column names the data too. `nucleiseg report` prints the URL that opens "
        "this table with backbone, data.source, val/ap50, val/ap50_all, val/f1 and val/pq as columns, best "
        "val/ap50 first, and writes the results table to reports/results.md. "
        "Runs with data_source=synthetic are the offline demo, not results on the homework data."
    ),
}

# MLflow 3's runs table shows no params or metrics until columns are picked. It restores a shared
# view from the experiment tag `mlflow.sharedViewState.<key>` when the URL carries
# `?viewStateShareKey=<key>` (`ui_url`): the columns that compare runs, best val/ap50 first.
VIEW_KEY = "nucleiseg"
RUNS_VIEW = {
    "selectedColumns": ["params.`backbone`", "params.`data.source`", "metrics.`val/ap50`", "metrics.`val/ap50_all`",
                        "metrics.`val/f1`", "metrics.`val/pq`"],
    "orderByKey": "metrics.`val/ap50`",
    "orderByAsc": False,
}
EXPERIMENT_TAGS[f"mlflow.sharedViewState.{VIEW_KEY}"] = json.dumps(RUNS_VIEW)
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
UI_COMMAND = "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"


def ui_url(experiment_id: str) -> str:
    """The experiment's runs table with the shared view's columns: in `mlflow ui` on this store, or
    on the tracking server when MLFLOW_TRACKING_URI names one."""
    uri = tracking_uri()
    address = uri.rstrip("/") if not uses_local_store() and uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{address}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def store_dir() -> Path:
    return repo_root() / "mlruns"


def store_db() -> Path:
    return store_dir() / "mlflow.db"


def artifact_root_uri() -> str:
    """Where this repository's runs keep their artifacts: file:///<repo>/mlruns/artifacts."""
    return (store_dir() / "artifacts").as_uri()


def local_store_uri() -> str:
    """The project's own store: SQLite under <repo>/mlruns."""
    return f"sqlite:///{store_db()}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri()


def _move_credentials(uri: str) -> str:
    """`uri` without its user:password, which go to MLFLOW_TRACKING_USERNAME/PASSWORD instead.

    MLflow sends those as the same basic auth, and it prints its tracking URI (the run link
    on stdout, the text of every failed request): with the credentials in it, the password.
    """
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) wait about 4 minutes
# for a server that is down, with a warning per retry. The first request to a tracking server
# uses these instead (values set in the environment win) and retries quietly; later requests
# keep MLflow's retries, so that a long training rides out a short outage of the server.
FIRST_CONTACT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def _first_contact():
    added = [name for name in FIRST_CONTACT_HTTP if name not in os.environ]
    os.environ.update({name: FIRST_CONTACT_HTTP[name] for name in added})
    retries = logging.getLogger("urllib3.connectionpool")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        yield
    finally:
        retries.setLevel(level)
        for name in added:
            os.environ.pop(name, None)


def uses_local_store() -> bool:
    return tracking_uri() == local_store_uri()


def store_label() -> str:
    """The store as the user sees it: `mlruns/mlflow.db` from the repo root, else its full path."""
    if not uses_local_store():
        from urllib.parse import urlparse

        parsed = urlparse(tracking_uri())  # no credentials or paths of a server URI in messages
        return f"the tracking server {parsed.scheme}://{parsed.hostname or ''}{f':{parsed.port}' if parsed.port else ''}"
    try:
        return str(store_db().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(store_db())


@contextmanager
def store_lock():
    """Exclusive flock on mlruns/.store.lock: one process at a time creates/migrates the store.

    flock is released by the kernel when the process dies, so a killed stage never leaves
    the store locked.
    """
    try:
        store_dir().mkdir(parents=True, exist_ok=True)
        handle = open(store_dir() / ".store.lock", "a")
    except OSError as exc:
        raise NucleisegError(f"cannot use the MLflow store folder: {os_error_text(exc)} "
                             "(or set MLFLOW_TRACKING_URI to a tracking server)") from None
    with handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _broken_store(reason: str) -> NucleisegError:
    label = store_label()
    return NucleisegError(
        f"{label}: cannot open the MLflow store ({reason}); move it aside to start a fresh store "
        f"(mv {label} {label}.broken; the runs in it are then no longer listed)"
    )


def _store_error(exc: Exception) -> NucleisegError:
    """One line for an exception raised while MLflow opens (creates, migrates) the store."""
    text = redact(str(getattr(exc, "orig", None) or exc).strip())
    first = text.splitlines()[0][:400] if text else type(exc).__name__
    if "out-of-date database schema" in text:  # an older MLflow's store, or a half-finished migration
        label = store_label()
        return NucleisegError(
            f"{label}: the MLflow store's schema is not the one this MLflow uses; back it up and upgrade it "
            f"(mlflow db upgrade {redact(tracking_uri())}), or move it aside to start a fresh store (mv {label} {label}.broken)"
        )
    if not uses_local_store():
        # MLflow wraps urllib3's reason ("[Errno 111] Connection refused") in 400 characters of URLs.
        reason = re.search(r"\[Errno -?\d+\] [^\"')]+", first)
        return NucleisegError(f"cannot reach {store_label()} (MLFLOW_TRACKING_URI): {reason[0] if reason else first}; check that the server runs, "
                              "or unset MLFLOW_TRACKING_URI to use the repository's mlruns/ store")
    return _broken_store(first)


def _experiment(client, name: str):
    """Find or create experiment `name`; a concurrent creator's RESOURCE_ALREADY_EXISTS means re-read it."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(
                name, artifact_location=artifact_root_uri() if uses_local_store() else None, tags=EXPERIMENT_TAGS
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise NucleisegError(
            f"MLflow experiment '{name}' in {store_label()} is deleted; restore it: "
            f"mlflow experiments restore --experiment-id {experiment.experiment_id}"
        )
    return experiment


def _retire_default(client) -> None:
    """Hide the empty `Default` experiment MLflow puts in every new store.

    MLflow creates experiment 0 with each store (`_create_store` gives it this repository's artifact
    root). nucleiseg logs only into its own experiment, so an empty Default is deleted (`mlflow
    experiments restore --experiment-id 0` brings it back); the UI then lists only the project's
    experiment. One with runs is left alone.
    """
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    try:
        default = client.get_experiment("0")
    except MlflowException:  # removed from the database by hand: nothing to hide
        return
    if default.lifecycle_stage != "active" or client.search_runs(["0"], run_view_type=ViewType.ALL, max_results=1):
        return
    client.delete_experiment("0")


def _add_missing_tags(client, experiment) -> None:
    """Experiments made before EXPERIMENT_TAGS existed get them; tags a user edited are kept."""
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)


def _copied_from(location: str) -> str | None:
    """The other repository whose `mlruns/artifacts` an experiment location names, or None (this
    repository's, or a location set on purpose, e.g. S3)."""
    if location == artifact_root_uri() or not (location.startswith("file://") and location.endswith("/mlruns/artifacts")):
        return None
    return location.removeprefix("file://").removesuffix("/mlruns/artifacts")


def follow_repository(client, experiment, name: str):
    """This repository's experiment `name`: when the store came with a copied or moved repository,
    the experiment naming the other repository's artifacts is renamed (its runs stay browsable) and
    a fresh one is made here, so new runs never write into the other repository."""
    origin = _copied_from(experiment.artifact_location)
    if origin is None:
        return experiment
    kept = f"{name} (copied from {origin})"
    log.warning("MLflow store made in %s: its runs are kept as experiment '%s'; new runs go to a new '%s' here", origin, kept, name)
    client.rename_experiment(experiment.experiment_id, kept)
    return _experiment(client, name)


def _create_store(uri: str) -> None:
    """Create a new local store with this repository's artifact root, so even MLflow's Default
    experiment points here (MlflowClient would resolve it from the working folder)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, artifact_root_uri())


def configure(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at this project's store; returns the experiment id.

    Locally, the store is opened (created and migrated on first use) and the experiment
    found or created under `store_lock()`, so concurrent stages cannot corrupt a new store.
    """
    import mlflow

    uri = _move_credentials(tracking_uri())
    # Note: set_tracking_uri also exports MLFLOW_TRACKING_URI to this process's environment.
    mlflow.set_tracking_uri(uri)
    if not uses_local_store():
        with _first_contact():
            return _open(uri, experiment).experiment_id
    with store_lock():
        if not store_db().is_file():
            try:
                _create_store(uri)
            except Exception as exc:  # sqlalchemy / alembic errors
                raise _store_error(exc) from exc
        found = _open(uri, experiment)
    return found.experiment_id


def _open(uri: str, name: str):
    """The experiment, with MLflow's store errors as NucleisegError.

    The first MlflowClient for `uri` in a process builds the store (MLflow caches it):
    creates the tables, migrates, checks the schema version.
    """
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        found = _experiment(client, name)
        if uri == local_store_uri():
            found = follow_repository(client, found, name)
        _add_missing_tags(client, found)
        if uri == local_store_uri():
            _retire_default(client)
    except NucleisegError:
        raise
    except Exception as exc:  # sqlalchemy / alembic / MlflowException / connection errors
        raise _store_error(exc) from exc
    return found


RERUN_TRAIN = "re-run the train stage to make a new run: dvc repro -f train"


def check_run(run_id: str, fix: str = RERUN_TRAIN) -> None:
    """Fail with one clear line if run `run_id` cannot be reopened; never creates a store.

    Stages that log into an earlier stage's run (evaluate: models/run.json) call this
    before writing any output, so a deleted or moved store fails fast instead of MLflow
    creating an empty store and then raising `Run with id=... not found`. `fix` says what
    to do instead (the default suits evaluate).
    """
    if uses_local_store() and not store_db().is_file():
        raise NucleisegError(f"run {run_id} is not in {store_label()}: the store does not exist (deleted or moved?); {fix}")
    configure()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise _store_error(exc) from exc
        where = f"{store_label()} (deleted or moved store?)" if uses_local_store() else f"{store_label()} (MLFLOW_TRACKING_URI)"
        raise NucleisegError(f"run {run_id} is not in {where}; {fix}") from None
    if run.info.lifecycle_stage != "active":
        raise NucleisegError(
            f"run {run_id} is deleted in {store_label()}; restore it (mlflow runs restore --run-id {run_id}) or {fix}"
        )
    origin = _copied_from(run.info.artifact_uri.rsplit("/", 2)[0]) if uses_local_store() else None
    if origin is not None:
        raise NucleisegError(f"run {run_id} keeps its artifacts in {origin} (this repository is a copy of it): logging into it "
                             f"would write there; {fix}")


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_tags(backbone: str, device: str, data_source: str | None = None) -> dict[str, str]:
    """Tags of a new training run.

    In the MLflow UI's runs table, tags can be shown as columns (Columns button) and used to
    group and filter runs: `backbone`, `data_source` (e.g. 'synthetic' for the offline demo,
    the zip's name, 'gdrive:<id>' for the homework data; `sources.describe_source` shortens a
    path), `device`, the DVC experiment name/baseline revision and the git commit (which
    the UI shows as the run's source version). The run page lists them all.
    """
    import torch
    import torchvision

    tags = {
        "backbone": backbone,
        "data_source": describe_source(data_source),
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


# Params a recipe is not: what cross-validation varies (the fold, and the seed that shuffles the folds);
# the fixed operating point, which the all-data model (data.fold: all) must set and its fold runs leave to
# their val (so they share a recipe); and what cannot change a model or its val metrics (where it runs,
# loader processes, how many overlays are drawn, the optional test ground truth).
RECIPE_EXCLUDED = ("data.fold", "seed", "evaluate.score_threshold", "device", "train.workers", "evaluate.overlays",
                   "data.test_annotations")


def recipe_id(flat_params: dict) -> str:
    """A short hash of every param except RECIPE_EXCLUDED: the runs of one recipe over folds (and seeds) share it.

    Values are hashed as MLflow logs them (str), so it can be recomputed from a run's logged params.
    """
    kept = {k: str(v) for k, v in flat_params.items() if k not in RECIPE_EXCLUDED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def recipe_tags(params) -> dict[str, str]:
    """`fold` (a number, or 'all' for the final model) and `recipe`: group by them in the MLflow UI."""
    return {"fold": str(params.data.fold), "recipe": recipe_id(params.flat())}


def run_name(backbone: str, data_source: str | None = None) -> str:
    """The DVC experiment name when there is one, else the backbone; with `data_source`,
    '<name> · <backbone> · <data label>', so the UI's always-visible Run Name column tells
    demo runs from real ones without picking columns."""
    name = os.environ.get("DVC_EXP_NAME") or backbone
    if not data_source:
        return name
    parts = [name] + ([backbone] if name != backbone else []) + [describe_source(data_source)]
    return " · ".join(parts)


def log_dataset(data_source: str) -> None:
    """Record the data as the run's training dataset (call inside the run).

    The MLflow UI's runs table shows a Dataset column by default (tags and metrics only
    when picked), so this puts 'synthetic' / 'nuclei-hw3-train.zip' / 'gdrive:<id>' on the
    first screen. A metadata-only dataset: nothing is uploaded. Logging it again (resumed
    run) adds nothing.
    """
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    label = describe_source(data_source)
    mlflow.log_input(MetaDataset(CodeDatasetSource({"data_source": label}), name=label), context="training")


@contextmanager
def active_run(run_id: str | None = None, name: str | None = None, tags: dict | None = None, fix: str = RERUN_TRAIN):
    """Start (or reopen by id) a run; an exception marks it FAILED and propagates.

    Reopening checks the run first (`check_run(run_id, fix)`): a missing store is an
    error, never silently created empty.
    """
    import mlflow

    if run_id:
        check_run(run_id, fix)
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


# What the logged model's code imports (nucleiseg's predict path): pinned to the versions installed here.
MODEL_REQUIREMENTS = ("torch", "torchvision", "numpy", "scipy", "pillow", "tifffile", "pycocotools", "pyyaml", "tqdm")
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # the models-from-code file (see its docstring)
MODEL_FILE = "artifacts/model.pt"  # the tensor-only model file inside a logged model; what `nucleiseg predict` loads


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def log_model(model_file: Path, name: str = "model") -> None:
    """The run's logged model (MLflow's "Logged models"): models-from-code, never a pickle.

    It holds the tensor-only model file (`artifacts/model.pt`, models/model.pt as the train stage
    wrote it), `mlflow_model.py` and the nucleiseg package as code, and pinned requirements.
    `nucleiseg predict --model runs:/<id>/model` downloads only artifacts/model.pt and loads it with
    torch.load(weights_only=True); `mlflow.pyfunc.load_model` runs the logged code, as any pyfunc
    does, so it is for runs whose store you trust.
    """
    import warnings

    import mlflow.pyfunc

    # MLflow draws a download bar while it copies the weights into the model: noise in the stage's log.
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():  # MLflow asks for an input example; an image path list has none worth storing
            warnings.filterwarnings("ignore", message=".*(input example|signature).*", category=UserWarning)
            mlflow.pyfunc.log_model(
                name=name, python_model=str(MODEL_CODE), artifacts={"model": str(model_file)},
                code_paths=[str(Path(__file__).resolve().parents[1])], pip_requirements=pip_requirements(),
            )
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous

