"""End to end: the README's offline demo in a fresh copy of the repository, then a second backbone.

This is the CI's whole-pipeline check: `scripts/demo` (dvc exp run --temp on synthetic data, CPU),
which must leave params.yaml alone, then `scripts/demo -S backbone=resnet18`, which must re-run
train -> evaluate only, and that experiment applied to the workspace. A two-epoch demo model scores near zero, so "metrics in [0, 1]" proves
little: the outputs are checked against each other instead (eval.json recomputed from the
predictions, the answer rebuilt from predictions/test.json, the operating point, the MLflow run
and `dvc exp show` all agreeing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from dvc_experiments import shown_experiments

from nucleiseg.core import coco
from nucleiseg.core.config import read_params
from nucleiseg.data.layout import load_test_index, load_train_sample, val_image_ids
from nucleiseg.evaluate.evaluator import evaluate
from nucleiseg.export.answer import build_answer

pytestmark = pytest.mark.slow

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
    # The demo runs in a temp copy (dvc exp run --temp): the real job's params stay as they were.
    _run(["git", "diff", "--quiet", "params.yaml"], root, env)
    second = _run(["scripts/demo", "-n", "e2e-r18", "-S", "backbone=resnet18"], root, env)
    _run(["git", "diff", "--quiet", "params.yaml"], root, env)
    # Bring the second experiment's outputs and params into the workspace.
    _run(["dvc", "exp", "apply", "e2e-r18"], root, env)
    return root, env, first.stdout + first.stderr, second.stdout + second.stderr


def test_demo_writes_every_output(demo_repo):
    root, _, _, _ = demo_repo
    for rel in ("data/raw/test_img_ids.json", "data/split.json", "data/tiles/train/index.json", "data/tiles/summary.json",
                "models/model.pt", "models/run.json", "metrics/train.json", "plots/train.csv", "predictions/val.json",
                "predictions/test.json", "submission/answer.json", "submission/answer.zip", "metrics/eval.json", "plots/pr.csv",
                "plots/operating_point.csv", "models/operating_point.json"):
        assert (root / rel).is_file(), rel
    assert list((root / "overlays").glob("*.png"))
    metrics = json.loads((root / "metrics/eval.json").read_text())
    for key in EVAL_KEYS:
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    answer = json.loads((root / "submission/answer.json").read_text())
    assert answer and set(answer[0]) == {"image_id", "bbox", "score", "category_id", "segmentation"}


def test_eval_json_is_what_the_predictions_score(demo_repo):
    """metrics/eval.json equals the evaluation recomputed here from predictions/val.json and the val ground truth."""
    root, _, _, _ = demo_repo
    params = read_params(root / "params.yaml")
    names = json.loads((root / "data/split.json").read_text())["val"]
    ids = val_image_ids(names)
    records = []
    for name in names:
        sample = load_train_sample(root / "data/raw", name)
        records.append(coco.ImageRecord(ids[name], f"{name}.png", *sample.image.shape[:2], sample.instances))
    results = json.loads((root / "predictions/val.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(ids.values())
    expected = evaluate(records, results, params.evaluate.max_dets_all, params.evaluate.operating_metric,
                        score_floor=params.infer.score_floor).metrics
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert {k: v for k, v in metrics.items() if k != "test"} == pytest.approx(expected)
    point = json.loads((root / "models/operating_point.json").read_text())
    assert point["score_threshold"] == metrics["score_threshold"] and point["chosen_on"] == "val"
    assert all(r["score"] >= params.infer.score_floor for r in results)


def test_answer_is_the_test_predictions(demo_repo):
    root, _, _, _ = demo_repo
    predictions = json.loads((root / "predictions/test.json").read_text())
    answer = json.loads((root / "submission/answer.json").read_text())
    assert answer == build_answer(predictions, load_test_index(root / "data/raw"), "predictions/test.json")
    assert len(answer) == len(predictions)


def test_second_backbone_reruns_only_train_to_evaluate(demo_repo):
    _, _, _, second = demo_repo
    assert "Running stage 'train'" in second and "Running stage 'evaluate'" in second
    assert "Running stage 'download'" not in second and "Running stage 'tile'" not in second


def test_exp_show_lists_both_experiments_with_metrics(demo_repo):
    root, env, _, _ = demo_repo
    shown = shown_experiments(json.loads(_run(["dvc", "exp", "show", "--json"], root, env).stdout))
    found = {name: (params.get("backbone"), metrics) for name, (params, metrics) in shown.items()}
    assert {"e2e-r50", "e2e-r18"} <= set(found), found.keys()
    assert found["e2e-r50"][0] == "resnet50" and found["e2e-r18"][0] == "resnet18"
    for _, metrics in (found["e2e-r50"], found["e2e-r18"]):
        for key in ("ap50", "ap50_all", "f1", "pq"):
            assert 0.0 <= metrics[key] <= 1.0
    # The workspace holds the last experiment (e2e-r18): exp show reports its eval.json.
    workspace = json.loads((root / "metrics/eval.json").read_text())
    for key in ("ap50", "ap50_all", "f1", "pq"):
        assert found["e2e-r18"][1][key] == pytest.approx(workspace[key])


def test_mlflow_runs_land_in_the_repo_store(demo_repo):
    root, _, _, _ = demo_repo
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        def tag(key: str) -> dict:
            return dict(db.execute("select t.run_uuid, t.value from tags t where t.key = ?", (key,)).fetchall())

        by_exp = {exp: run for run, exp in tag("dvc_exp_name").items()}
        status = dict(db.execute("select run_uuid, status from runs").fetchall())
        names = dict(db.execute("select run_uuid, name from runs").fetchall())
        backbone, source = tag("backbone"), tag("data_source")
        experiments = db.execute("select name, lifecycle_stage, artifact_location from experiments").fetchall()
    # The store lists only the project's experiment, and nothing in it points into the deleted --temp copies.
    assert [name for name, stage, _ in experiments if stage == "active"] == ["nucleiseg"]
    root_uri = (root / "mlruns" / "artifacts").as_uri()
    assert {location for _, _, location in experiments} <= {root_uri, f"{root_uri}/0"}  # MLflow puts Default in <root>/0
    assert set(by_exp) == {"e2e-r50", "e2e-r18"}, by_exp
    for exp, expected in (("e2e-r50", "resnet50"), ("e2e-r18", "resnet18")):
        run = by_exp[exp]
        assert status[run] == "FINISHED" and backbone[run] == expected and source[run] == "synthetic"
        assert names[run].startswith(exp) and "synthetic" in names[run]  # the run name tells demo runs apart
    assert any((root / "mlruns" / "artifacts").rglob("overlays/*.png"))
    # The workspace's run (e2e-r18) holds the evaluate stage's numbers.
    run_id = json.loads((root / "models/run.json").read_text())["run_id"]
    assert run_id == by_exp["e2e-r18"]
    workspace = json.loads((root / "metrics/eval.json").read_text())
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        logged = dict(db.execute("select key, value from latest_metrics where run_uuid = ?", (run_id,)).fetchall())
    for key in ("ap50", "ap50_all", "f1", "pq"):
        assert logged[f"val/{key}"] == pytest.approx(workspace[key]), key


def test_applied_experiment_leaves_the_ignore_files_alone(demo_repo):
    """`dvc exp apply` finds every cached output ignored by the committed .gitignore: git sees only the params,
    dvc.lock and the small outputs meant to be committed (metrics, plots, run.json)."""
    root, env, _, _ = demo_repo
    changed = sorted(line[3:] for line in _run(["git", "status", "--porcelain", "-uall"], root, env).stdout.splitlines())
    assert ".gitignore" not in changed and not [c for c in changed if c.endswith(".gitignore")], changed
    assert not [c for c in changed if c.startswith(("data/", "predictions/", "submission/", "overlays/", "reports/"))], changed
    assert "models/model.pt" not in changed and "params.yaml" in changed


def test_predict_from_the_demo_run_loads_its_tensor_file_with_its_settings(demo_repo, tmp_path):
    """`nucleiseg predict --model runs:/<id>/model` as a user runs it: the run's artifacts/model.pt, the infer settings the
    model was validated with (the demo's 128 px windows), the operating point the evaluate stage logged."""
    root, env, _, _ = demo_repo
    run_id = json.loads((root / "models/run.json").read_text())["run_id"]
    image = sorted((root / "data/raw/test").glob("*.png"))[0]
    out = tmp_path / "out"
    _run([sys.executable, "-m", "nucleiseg", "predict", str(image), "--model", f"runs:/{run_id}/model", "--out", str(out)], root, env)
    settings = json.loads((out / "settings.json").read_text())
    params = read_params(root / "params.yaml")
    assert settings["infer"]["window"] == params.infer.window == 128
    assert settings["infer_source"] == f"the settings runs:/{run_id}/model was validated with"
    point = json.loads((root / "models/operating_point.json").read_text())["score_threshold"]
    assert settings["score_threshold"] == point
    assert settings["score_threshold_source"] == "operating_point.json of the model's MLflow run"


def test_an_edit_marks_only_the_stages_whose_code_or_params_it_touches(demo_repo):
    """`dvc status` in the applied demo, as a user edits: an overlay setting or the overlay code is the evaluate
    stage's alone (never train's); the CLI and the report are no stage's; the metric code is train's (its
    validation scores) and evaluate's. Each edit is undone before the next."""
    root, env, _, _ = demo_repo

    def stale() -> set[str]:
        return set(json.loads(_run(["dvc", "status", "--json"], root, env).stdout or "{}"))

    assert stale() == set(), "the applied demo should be up to date"
    edits = [
        ("params.yaml", lambda text: re.sub(r"(?m)^  overlays: \d+", "  overlays: 3", text), {"evaluate"}),
        ("src/nucleiseg/evaluate/outputs.py", lambda text: text.replace("(0, 230, 0)", "(0, 200, 0)"), {"evaluate"}),
        ("src/nucleiseg/cli.py", lambda text: text + "\n# an edit\n", set()),
        ("src/nucleiseg/track/report.py", lambda text: text + "\n# an edit\n", set()),
        ("src/nucleiseg/evaluate/metrics.py", lambda text: text + "\n# an edit\n", {"train", "evaluate"}),
    ]
    for rel, edit, expected in edits:
        path = root / rel
        before = path.read_text()
        assert edit(before) != before, f"the edit of {rel} changed nothing"
        path.write_text(edit(before))
        try:
            assert stale() == expected, rel
        finally:
            path.write_text(before)
    assert stale() == set()


def test_the_readme_restore_step_brings_back_the_real_job(demo_repo):
    """After `dvc exp apply` of a demo, the README's `git checkout params.yaml` works in a fresh repository
    (dvc.lock is not tracked there, so naming it would fail) and puts the real job's params back: `dvc status`
    then wants the download stage (the real data source) again. The applied demo is restored afterwards."""
    root, env, _, _ = demo_repo
    readme = (REPO / "README.md").read_text()
    assert "`git checkout params.yaml`" in readme and "git checkout params.yaml dvc.lock" not in readme
    applied = (root / "params.yaml").read_text()
    try:
        _run(["git", "checkout", "params.yaml"], root, env)
        assert (root / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
        assert "download" in json.loads(_run(["dvc", "status", "--json"], root, env).stdout or "{}")
    finally:
        (root / "params.yaml").write_text(applied)
