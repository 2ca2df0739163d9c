"""tracking: the experiment's UI tags and shared view, no stray Default experiment, clear errors for a broken or
missing store, run tags."""

import os

import pytest

from nucleiseg.core.errors import NucleisegError
from nucleiseg.data.sources import describe_source
from nucleiseg.track import runs as tracking

MISSING_RUN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A fresh repository root (DVC_ROOT and cwd) without an MLflow store."""
    import mlflow

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    # configure() -> set_tracking_uri exported MLFLOW_TRACKING_URI into this process: undo it for later tests.
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_experiment_opens_the_classic_runs_view(repo):
    from mlflow.tracking import MlflowClient

    experiment_id = tracking.configure()
    experiment = MlflowClient(tracking.tracking_uri()).get_experiment(experiment_id)
    assert experiment.name == tracking.EXPERIMENT
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "val/ap50" in experiment.tags["mlflow.note.content"]
    assert experiment.artifact_location == (repo / "mlruns" / "artifacts").as_uri()
    assert tracking.configure() == experiment_id  # the second call finds it


def test_existing_experiment_gets_missing_tags_and_keeps_edited_ones(repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.local_store_uri())  # an experiment made before these tags existed
    experiment_id = client.create_experiment(tracking.EXPERIMENT, tags={"mlflow.note.content": "my notes"})
    assert tracking.configure() == experiment_id
    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == "my notes"


def test_corrupt_store_is_one_clear_error(repo):
    (repo / "mlruns").mkdir()
    (repo / "mlruns" / "mlflow.db").write_bytes(b"\x00garbage, not SQLite" * 200)
    for call in (tracking.configure, lambda: tracking.check_run(MISSING_RUN)):
        with pytest.raises(NucleisegError) as info:
            call()
        message = str(info.value)
        assert message.startswith("mlruns/mlflow.db: cannot open the MLflow store (file is not a database)")
        assert "mv mlruns/mlflow.db mlruns/mlflow.db.broken" in message and "\n" not in message


def test_missing_store_is_not_created_when_reopening_a_run(repo):
    with pytest.raises(NucleisegError, match=rf"run {MISSING_RUN} is not in mlruns/mlflow.db: the store does not exist .*dvc repro -f train"):
        tracking.check_run(MISSING_RUN)
    with pytest.raises(NucleisegError, match="the store does not exist"):
        with tracking.active_run(MISSING_RUN):
            pytest.fail("the run must not start")
    assert not (repo / "mlruns" / "mlflow.db").exists()


def test_unknown_or_deleted_run_is_one_clear_error(repo):
    import mlflow
    from mlflow.tracking import MlflowClient

    with tracking.active_run(name="kept") as run:
        mlflow.log_metric("x", 1.0)
    tracking.check_run(run.info.run_id)  # known: no error
    with pytest.raises(NucleisegError, match=rf"^run {MISSING_RUN} is not in mlruns/mlflow.db \(deleted or moved store\?\); .*dvc repro -f train$"):
        tracking.check_run(MISSING_RUN)
    with pytest.raises(NucleisegError, match="is not in mlruns/mlflow.db"):
        tracking.check_run("not-a-run-id")
    MlflowClient(tracking.tracking_uri()).delete_run(run.info.run_id)
    with pytest.raises(NucleisegError, match=rf"run {run.info.run_id} is deleted .*mlflow runs restore --run-id {run.info.run_id}"):
        tracking.check_run(run.info.run_id)
    with pytest.raises(NucleisegError, match="delete checkpoints/"):
        tracking.check_run(MISSING_RUN, fix="delete checkpoints/ to train afresh")


def test_data_source_labels_are_short():
    label = describe_source
    assert label("synthetic") == "synthetic"
    assert label("gdrive:1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG") == "gdrive:1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG"
    assert label("https://drive.google.com/file/d/1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG/view") == "gdrive:1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG"
    assert label("/home/someone/data/nuclei-hw3-train.zip") == "nuclei-hw3-train.zip"
    assert label("../shared/data/hw3/") == "hw3"
    assert label(None) == "" and label("") == ""


def test_run_tags_and_name_carry_the_data_source(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    tags = tracking.run_tags("resnet50", "cpu", data_source="/data/nuclei-hw3-train.zip")
    assert tags["data_source"] == "nuclei-hw3-train.zip" and tags["backbone"] == "resnet50"
    assert "data_source" not in tracking.run_tags("resnet50", "cpu")  # the old signature still works
    assert tracking.run_name("resnet50") == "resnet50"
    assert tracking.run_name("resnet50", "synthetic") == "resnet50 · synthetic"
    monkeypatch.setenv("DVC_EXP_NAME", "nodal-tuba")
    assert tracking.run_name("resnet50") == "nodal-tuba"
    assert tracking.run_name("resnet50", "gdrive:abc") == "nodal-tuba · resnet50 · gdrive:abc"


def test_log_dataset_names_the_data_in_the_runs_table(repo):
    import mlflow

    with tracking.active_run(name="with data") as run:
        tracking.log_dataset("/home/someone/data/nuclei-hw3-train.zip")
        tracking.log_dataset("/home/someone/data/nuclei-hw3-train.zip")  # a resumed run logs it again
    (logged,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "nuclei-hw3-train.zip" and "/home/someone" not in logged.dataset.source
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "training"


def test_experiment_opens_the_runs_table_with_the_comparing_columns(repo):
    """The shared-view tag MLflow 3's UI restores from ?viewStateShareKey=nucleiseg, and the URL that does it."""
    import json

    from mlflow.tracking import MlflowClient

    experiment_id = tracking.configure()
    tags = MlflowClient(tracking.tracking_uri()).get_experiment(experiment_id).tags
    view = json.loads(tags["mlflow.sharedViewState.nucleiseg"])
    assert view == {"selectedColumns": ["params.`backbone`", "params.`data.source`", "metrics.`val/ap50`", "metrics.`val/ap50_all`",
                                        "metrics.`val/f1`", "metrics.`val/pq`"],
                    "orderByKey": "metrics.`val/ap50`", "orderByAsc": False}
    assert tracking.ui_url(experiment_id) == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?viewStateShareKey=nucleiseg"


def test_a_store_made_in_a_temp_copy_keeps_no_default_experiment_pointing_there(repo, tmp_path, monkeypatch):
    """`dvc exp run --temp`: the stage's cwd is a copy deleted afterwards, DVC_ROOT the repository. MLflow's
    Default experiment would keep that copy's folder as its artifact location; the project's store hides it."""
    import shutil

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    copy = tmp_path / ".dvc" / "tmp" / "exps" / "run"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    experiment_id = tracking.configure()
    shutil.rmtree(copy)
    client = MlflowClient(tracking.tracking_uri())
    assert [e.name for e in client.search_experiments()] == [tracking.EXPERIMENT]
    root = (repo / "mlruns" / "artifacts").as_uri()
    for experiment in client.search_experiments(view_type=ViewType.ALL):  # MLflow puts Default in <root>/0
        assert experiment.artifact_location in (root, f"{root}/0"), experiment.name
    assert tracking.configure() == experiment_id


def test_a_default_experiment_with_runs_is_kept(repo):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.local_store_uri())
    run = client.create_run("0")  # someone logged into Default before nucleiseg opened the store
    client.set_terminated(run.info.run_id)
    tracking.configure()
    assert client.get_experiment("0").lifecycle_stage == "active"
    assert mlflow.get_run(run.info.run_id).info.experiment_id == "0"
