"""The all-data model (data.fold: all): every training image trained on, the last epoch's weights kept, test-only
predictions, and an evaluate stage that says there is no val and uses evaluate.score_threshold as the operating point."""

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from stage_commands import stage_argv

from nucleiseg.core.config import EvaluateConfig, params_from_dict
from nucleiseg.core.errors import NucleisegError
from nucleiseg.evaluate.outputs import EvaluateOutputs, evaluate_predictions
from nucleiseg.track import runs as tracking
from nucleiseg.train import stage as training

REPO = Path(__file__).resolve().parents[1]


def _outputs(root: Path) -> EvaluateOutputs:
    return EvaluateOutputs(metrics=root / "metrics/eval.json", pr_curve=root / "plots/pr.csv", sweep=root / "plots/operating_point.csv",
                           overlays=root / "overlays", operating_point=root / "models/operating_point.json")


def _no_val(root: Path) -> None:
    split = json.loads((root / "data/split.json").read_text())
    (root / "data/split.json").write_text(json.dumps({"train": sorted(split["train"] + split["val"]), "val": []}))


def test_evaluate_without_val_uses_the_given_operating_point(repo):
    _no_val(repo)
    (repo / "predictions").mkdir()
    (repo / "predictions/test.json").write_text("[]")
    outputs = _outputs(repo)
    with pytest.raises(NucleisegError, match="no val images .* set evaluate.score_threshold"):
        evaluate_predictions(repo / "data/raw", repo / "data/split.json", repo / "predictions", EvaluateConfig(), 0.05, None, outputs)
    assert not outputs.metrics.exists() and not outputs.operating_point.exists()

    metrics = evaluate_predictions(repo / "data/raw", repo / "data/split.json", repo / "predictions",
                                   EvaluateConfig(score_threshold=0.35), 0.05, None, outputs)
    assert metrics == {"val_images": 0, "score_threshold": 0.35} == json.loads(outputs.metrics.read_text())
    point = json.loads(outputs.operating_point.read_text())
    assert point == {"score_threshold": 0.35, "metric": "f1", "value": None, "chosen_on": "evaluate.score_threshold"}
    assert outputs.pr_curve.read_text().splitlines() == ["recall,precision"]
    assert outputs.sweep.read_text().splitlines() == ["score_threshold,precision,recall,f1,pq,aji"]
    assert list(outputs.overlays.iterdir()) == []


@pytest.mark.slow
def test_training_without_val_keeps_the_last_epoch(repo, make_params, monkeypatch):
    """No val images: the model file holds the weights after the last epoch (not the lowest-loss epoch's), and the run
    is tagged fold 'all' with the recipe of the same params' fold runs."""
    _no_val(repo)
    after_last_epoch = {}
    real_fit = training.fit

    def recording_fit(model, *args, **kwargs):
        result = real_fit(model, *args, **kwargs)
        after_last_epoch.update({k: v.clone() for k, v in model.state_dict().items()})
        return result

    monkeypatch.setattr(training, "fit", recording_fit)
    params = make_params(train={"epochs": 3}, data={"fold": "all"}, evaluate={"score_threshold": 0.3})
    out = training.TrainOutputs(model=repo / "models/model.pt", run=repo / "models/run.json",
                                metrics=repo / "metrics/train.json", curves=repo / "plots/train.csv")
    ins = training.TrainInputs(tiles=repo / "data/tiles", split=repo / "data/split.json", raw=repo / "data/raw")
    metrics = training.run_training(params, ins, out, show_progress=False)

    saved = torch.load(out.model, weights_only=True)
    assert saved["best_epoch"] == metrics["best_epoch"] == 3
    assert set(saved["model"]) == set(after_last_epoch)
    assert all(torch.equal(saved["model"][k], after_last_epoch[k]) for k in after_last_epoch)
    assert not any(k in metrics for k in (*training.VAL_CURVES, "val_score_threshold"))

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking.tracking_uri()).get_run(json.loads(out.run.read_text())["run_id"])
    fold0 = dataclasses.replace(params, data=dataclasses.replace(params.data, fold=0), seed=5,
                                evaluate=dataclasses.replace(params.evaluate, score_threshold=None))
    assert run.data.tags["fold"] == "all" and run.data.tags["recipe"] == tracking.recipe_id(fold0.flat())
    assert run.data.params["data.fold"] == "all" and run.data.params["val_images"] == "0"


def _stage(name: str, root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(stage_argv(name), cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_all_data_pipeline_through_the_stage_scripts(repo, tiny_params, stage_environment):
    """tile -> train -> infer -> export -> evaluate with data.fold: all: every image is tiled, infer writes only
    test predictions, evaluate says there is no val and writes the given operating point, which `predict` reads."""
    values = tiny_params.as_dict()
    values["data"]["fold"] = "all"
    values["evaluate"]["score_threshold"] = 0.3
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    shutil.rmtree(repo / "data/tiles")
    env = stage_environment(repo)
    for name in ("tile", "train", "infer", "export", "evaluate"):
        done = _stage(name, repo, env)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    assert "no val images (data.fold: all): nothing to score on val" in done.stderr

    split = json.loads((repo / "data/split.json").read_text())
    assert split["val"] == [] and len(split["train"]) == 3
    assert json.loads((repo / "data/tiles/summary.json").read_text())["train"]["images"] == 3
    assert torch.load(repo / "models/model.pt", weights_only=True)["best_epoch"] == tiny_params.train.epochs
    assert sorted(p.name for p in (repo / "predictions").iterdir()) == ["test.json"]
    assert (repo / "submission/answer.json").is_file()
    assert json.loads((repo / "metrics/eval.json").read_text()) == {"val_images": 0, "score_threshold": 0.3}
    assert json.loads((repo / "models/operating_point.json").read_text())["chosen_on"] == "evaluate.score_threshold"

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking.tracking_uri()).get_run(json.loads((repo / "models/run.json").read_text())["run_id"])
    assert run.data.tags["fold"] == "all"
    assert not any(k.startswith("val/") for k in run.data.metrics)  # the report's fold means stay folds only
    assert "operating_point.json" in {a.path for a in MlflowClient(tracking.tracking_uri()).list_artifacts(run.info.run_id)}


def test_recipe_ignores_the_fold_the_seed_and_run_settings():
    base = params_from_dict({})
    same = params_from_dict({"seed": 3, "device": "cpu", "data": {"fold": 2}, "train": {"workers": 1}, "evaluate": {"overlays": 0}})
    other = params_from_dict({"train": {"epochs": 30}})
    assert tracking.recipe_id(base.flat()) == tracking.recipe_id(same.flat()) != tracking.recipe_id(other.flat())
    assert tracking.recipe_tags(same) == {"fold": "2", "recipe": tracking.recipe_id(base.flat())}
    # From the strings MLflow logged, the same hash: old runs can be grouped by recomputing it.
    assert tracking.recipe_id({k: str(v) for k, v in other.flat().items()}) == tracking.recipe_id(other.flat())
