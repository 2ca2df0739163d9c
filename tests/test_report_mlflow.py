"""MLflow side: the results table from the store's runs, and the store as `mlflow ui` serves it (REST API)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nucleiseg.cli import main as cli_main
from nucleiseg.core.errors import NucleisegError
from nucleiseg.track import runs as tracking
from nucleiseg.track.report import format_duration, write_report

RUNS = {
    # name: (backbone, weights, epochs, metrics)
    # exp-r101 is an older run: no train/stage_seconds, no data_source tag (only the data.source param).
    "exp-r101": ("resnet101", "imagenet", 40, {"val/ap50": 0.2346, "val/ap50_all": 0.61, "val/f1": 0.7, "val/aji": 0.55, "val/pq": 0.5,
                                                "train/best_epoch": 31, "train/train_seconds": 3725.0}),
    "exp-r50": ("resnet50", "coco", 80, {"val/ap50": 0.2512, "val/ap50_all": 0.7, "val/f1": 0.8, "val/aji": 0.6, "val/pq": 0.65,
                                          "train/best_epoch": 77, "train/train_seconds": 754.0, "train/stage_seconds": 800.0}),
}
DATA = {  # name: (data.source param, data_source tag or None)
    "exp-r101": ("/home/someone/data/nuclei-hw3-train.zip", None),
    "exp-r50": ("synthetic", "synthetic"),
}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh project store under tmp_path/mlruns, as the stages make it (DVC_ROOT = tmp_path)."""
    import mlflow

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    # configure() -> set_tracking_uri exported MLFLOW_TRACKING_URI into this process: undo it for later tests.
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def log_runs(with_artifacts: bool, tmp_path: Path) -> dict[str, str]:
    """The runs the train + evaluate stages would leave (tiny artifacts); returns {name: run_id}."""
    import mlflow

    ids = {}
    for name, (backbone, weights, epochs, metrics) in RUNS.items():
        source, source_tag = DATA[name]
        tags = {"backbone": backbone} | ({"data_source": source_tag} if source_tag else {})
        with tracking.active_run(name=name, tags=tags) as run:
            tracking.log_params({"backbone": backbone, "model.weights": weights, "train.epochs": epochs, "data.source": source})
            mlflow.log_metrics(metrics)
            if with_artifacts:
                weights_file = tmp_path / "model.pt"
                weights_file.write_bytes(b"weights")  # the real Mask R-CNN is 120+ MB; logging does not read it
                tracking.log_model(weights_file)
                overlay = tmp_path / "overlay.png"
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(overlay)
                mlflow.log_artifact(str(overlay), artifact_path="overlays")
            ids[name] = run.info.run_id
    return ids


def test_report_table_from_runs(store, capsys, monkeypatch, caplog):
    import logging

    import mlflow

    ids = log_runs(False, store)
    # Not in the table: a failed run, and a finished run never evaluated (no val/ap50).
    with pytest.raises(RuntimeError):
        with tracking.active_run(name="crashed", tags={"backbone": "resnet50"}):
            mlflow.log_metrics({"val/ap50": 0.9})
            raise RuntimeError("boom")
    with tracking.active_run(name="not-evaluated", tags={"backbone": "resnet18"}):
        mlflow.log_metrics({"train/best_epoch": 3})

    monkeypatch.chdir(store)
    with caplog.at_level(logging.INFO):
        assert cli_main(["report"]) == 0  # default --out: reports/results.md
    experiment_id = tracking.configure()
    assert (f"MLflow runs table: mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db (from the repository root), then open "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?viewStateShareKey=nucleiseg") in caplog.messages
    text = (store / "reports/results.md").read_text()
    assert capsys.readouterr().out == text
    assert [p.name for p in (store / "reports").iterdir()] == ["results.md"]  # no temp files left
    assert "R50 **0.206**" in text and "R101 **0.142**" in text
    rows = [line for line in text.splitlines() if line.startswith("| exp-") or line.startswith("| crashed") or line.startswith("| not-")]
    assert len(rows) == 2
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "run", "run id", "data", "backbone", "weights", "epochs", "best epoch", "AP50", "AP50 (all dets)", "F1", "AJI", "PQ",
        "train stage time", "finished"]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    # Full run ids (for runs:/<id>/model); data from the data_source tag, else the data.source param's file name.
    assert all(len(ids[name]) == 32 for name in ids)
    assert cells[0][:12] == ["exp-r50", f"`{ids['exp-r50']}`", "synthetic", "resnet50", "coco", "80", "77",
                             "0.251", "0.700", "0.800", "0.600", "0.650"]
    assert cells[1][:12] == ["exp-r101", f"`{ids['exp-r101']}`", "nuclei-hw3-train.zip", "resnet101", "imagenet", "40", "31",
                             "0.235", "0.610", "0.700", "0.550", "0.500"]
    # The stage's wall time when logged; an older run's loop time says so.
    assert (cells[0][12], cells[1][12]) == ("13m 20s", "1h 02m (loops only)")
    assert all(len(c[13]) == len("2026-01-01 12:00") for c in cells)
    assert "/home/someone" not in text


def test_report_without_runs_is_a_clear_error(store, tmp_path):
    with pytest.raises(NucleisegError, match="no MLflow store yet"):
        write_report(tmp_path / "out.md")
    tracking.configure()
    with pytest.raises(NucleisegError, match="no finished run with val/ap50"):
        write_report(tmp_path / "out.md")
    assert not (tmp_path / "out.md").exists()


def test_format_duration():
    assert [format_duration(s) for s in (None, 0, 42.4, 754, 3725)] == ["", "0s", "42s", "12m 34s", "1h 02m"]


# ---------------------------------------------------------------------------------------------- mlflow ui


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, body: dict | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_mlflow_ui_serves_the_project_store(store):
    """The README's command, run in the repo root, shows both backbones' runs with params, metrics and artifacts."""
    ids = log_runs(True, store)
    port = free_port()
    # The README's command (+ port, one worker; no background job runner, which it does not need).
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///mlruns/mlflow.db", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_file = open(store / "server.log", "wb")
    server = subprocess.Popen(cmd, cwd=store, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = os.getpgid(server.pid)
    base = f"http://127.0.0.1:{port}"
    api = f"{base}/api/2.0/mlflow"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not come up: {(store / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

        experiment = get_json(f"{api}/experiments/get-by-name?experiment_name={tracking.EXPERIMENT}")["experiment"]
        assert experiment["artifact_location"] == (store / "mlruns" / "artifacts").as_uri()
        # The UI opens the classic runs table (not the GenAI view) and shows the description.
        experiment_tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
        assert "val/ap50" in experiment_tags["mlflow.note.content"]
        assert json.loads(experiment_tags["mlflow.sharedViewState.nucleiseg"]) == tracking.RUNS_VIEW  # ?viewStateShareKey=nucleiseg
        listed = get_json(f"{api}/experiments/search", {"max_results": 10})["experiments"]
        assert [e["name"] for e in listed] == [tracking.EXPERIMENT]  # no empty Default beside it
        runs = get_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        by_backbone = {}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            by_backbone[tags["backbone"]] = run
        assert set(by_backbone) == {"resnet50", "resnet101"}
        for name, (backbone, weights, epochs, metrics) in RUNS.items():
            run = by_backbone[backbone]
            assert run["info"]["run_id"] == ids[name] and run["info"]["status"] == "FINISHED"
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert params["model.weights"] == weights and params["train.epochs"] == str(epochs)
            logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert logged["val/ap50"] == pytest.approx(metrics["val/ap50"])
            run_id = ids[name]
            files = get_json(f"{api}/artifacts/list?run_id={run_id}")["files"]
            assert "overlays" in {f["path"] for f in files}
            overlays = get_json(f"{api}/artifacts/list?run_id={run_id}&path=overlays")["files"]
            assert [f["path"] for f in overlays] == ["overlays/overlay.png"]
            # MLflow 3: the logged model is its own entity (not under the run's artifacts), linked as a run output.
            model_ids = [o["model_id"] for o in run["outputs"]["model_outputs"]]
            assert len(model_ids) == 1
            model = get_json(f"{api}/logged-models/{model_ids[0]}")["model"]["info"]
            assert model["name"] == "model" and model["source_run_id"] == run_id and model["status"] == "LOGGED_MODEL_READY"
            model_files = get_json(f"{api}/logged-models/{model_ids[0]}/artifacts/directories?{urllib.parse.urlencode({'artifact_directory_path': ''})}")
            assert {"MLmodel", "mlflow_model.py", "artifacts"} <= {f["path"] for f in model_files["files"]}  # the weights are in artifacts/
        found = get_json(f"{api}/logged-models/search", {"experiment_ids": [experiment["experiment_id"]]})["models"]
        assert {m["info"]["source_run_id"] for m in found} == set(ids.values())
        with urllib.request.urlopen(f"{base}/", timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            server.wait(timeout=30)
        deadline = time.monotonic() + 30
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            time.sleep(1)
        log_file.close()
    assert not group_alive(pgid), "mlflow ui left processes behind"


# ---------------------------------------------------------------------------------------------- recipes over folds


def _fold_run(name: str, params, metrics: dict | None) -> str:
    """A run as the train + evaluate stages leave it for `params` (its fold and recipe tags); metrics None: not evaluated."""
    import mlflow

    with tracking.active_run(name=name, tags={"backbone": params.backbone, "data_source": "synthetic", **tracking.recipe_tags(params)}) as run:
        tracking.log_params(params.flat())
        if metrics is not None:
            mlflow.log_metrics({f"val/{k}": v for k, v in metrics.items()})
    return run.info.run_id


def _scores(ap50_all, ap50, f1, pq, aji, threshold):
    return {"ap50_all": ap50_all, "ap50": ap50, "f1": f1, "pq": pq, "aji": aji, "score_threshold": threshold}


def test_report_shows_each_recipes_mean_and_sd_over_its_folds(store, capsys, monkeypatch):
    from nucleiseg.core.config import params_from_dict

    def recipe(fold, epochs=80, seed=0):
        point = {"score_threshold": 0.45} if fold == "all" else {}
        return params_from_dict({"seed": seed, "data": {"fold": fold}, "train": {"epochs": epochs}, "evaluate": point})

    _fold_run("a0-old", recipe(0), _scores(0.1, 0.1, 0.1, 0.1, 0.1, 0.1))  # fold 0 ran twice: the newer run counts
    _fold_run("a0", recipe(0), _scores(0.70, 0.24, 0.75, 0.55, 0.56, 0.40))
    _fold_run("a1", recipe(1), _scores(0.74, 0.22, 0.77, 0.59, 0.60, 0.50))
    _fold_run("a-final", recipe("all"), None)  # the all-data model: no val metrics, named in its recipe's row
    _fold_run("b0", recipe(0, epochs=30), _scores(0.65, 0.20, 0.70, 0.50, 0.52, 0.45))
    _fold_run("b1", recipe(1, epochs=30), _scores(0.66, 0.21, 0.71, 0.51, 0.53, 0.45))
    _fold_run("c1", recipe(1, epochs=120, seed=1), _scores(0.80, 0.25, 0.81, 0.62, 0.63, 0.55))

    monkeypatch.chdir(store)
    assert cli_main(["report"]) == 0
    text = (store / "reports/results.md").read_text()
    assert capsys.readouterr().out == text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| recipe |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "recipe", "data", "differs from the defaults", "folds", "val ap50_all", "val ap50 (top 100)", "val F1", "val PQ", "val AJI",
        "score threshold", "all-data run"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| `")]
    recipe_a, recipe_b, recipe_c = (tracking.recipe_id(recipe(0, e).flat()) for e in (80, 30, 120))
    # Best mean val ap50_all first; mean ± sample sd (0.70 and 0.74: 0.720 ± 0.028); one fold: sd '-'.
    assert rows == [
        [f"`{recipe_c}`", "synthetic", "train.epochs=120", "1", "0.800 ± -", "0.250 ± -", "0.810 ± -", "0.620 ± -", "0.630 ± -",
         "0.550", ""],
        [f"`{recipe_a}`", "synthetic", "defaults", "2", "0.720 ± 0.028", "0.230 ± 0.014", "0.760 ± 0.014", "0.570 ± 0.028",
         "0.580 ± 0.028", "0.450", "a-final"],
        [f"`{recipe_b}`", "synthetic", "train.epochs=30", "2", "0.655 ± 0.007", "0.205 ± 0.007", "0.705 ± 0.007", "0.505 ± 0.007",
         "0.525 ± 0.007", "0.450", ""],
    ]
    runs_header = next(line for line in lines if line.startswith("| run |"))
    assert lines.index("## Cross-validated recipes") < lines.index(header) < lines.index("## Runs") < lines.index(runs_header)

    # The decision rule, fold by fold against a baseline: B loses 0.05 and 0.08 to A (mean -0.065, SE 0.015).
    text = write_report(store / "vs_a.md", baseline=recipe_a[:6])
    rows = {line.split("|")[1].strip(): line.strip("|").split("|")[-1].strip() for line in text.splitlines() if line.startswith("| `")}
    assert rows[f"`{recipe_a}`"] == "baseline"
    assert rows[f"`{recipe_b}`"] == "-0.065 ± 0.030 (2 folds): no"
    assert rows[f"`{recipe_c}`"] == "no common folds"  # seed 1's fold 1 is another split than seed 0's
    with pytest.raises(NucleisegError, match="--baseline ffff matches no recipe"):
        write_report(store / "x.md", baseline="ffff")


def test_gain_over_folds_adopts_only_beyond_twice_its_standard_error():
    from nucleiseg.track.report import Recipe, Row, gain_cell

    def runs(values):
        return Recipe("r", [Row("", "", "", "", "", "", None, {"ap50_all": v}, None, None, seed="0", fold=str(k))
                            for k, v in enumerate(values)])

    base = runs([0.70, 0.72, 0.74, 0.71])
    assert gain_cell(runs([0.73, 0.75, 0.77, 0.74]), base) == "+0.030 ± 0.000 (4 folds): yes"  # the same gain on every fold
    assert gain_cell(runs([0.75, 0.70, 0.78, 0.70]), base) == "+0.015 ± 0.035 (4 folds): no"  # mixed: within noise
    assert gain_cell(runs([0.80]), base) == "+0.100 (1 fold: no standard error)"
