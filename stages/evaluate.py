"""DVC stage `evaluate`: predictions -> metrics/eval.json, models/operating_point.json, plots/pr.csv,
plots/operating_point.csv, overlays/; logged into the training run."""

import logging
from pathlib import Path

from nucleiseg import tracking
from nucleiseg.config import read_params
from nucleiseg.errors import main_guard
from nucleiseg.evaluation import EvaluateOutputs, evaluate_predictions
from nucleiseg.io import read_json

log = logging.getLogger("evaluate")


@main_guard
def main() -> None:
    params = read_params()
    run_id = read_json("models/run.json")["run_id"]
    tracking.check_run(run_id)  # before any output: a missing run is found first, not after writing half
    outputs = EvaluateOutputs()
    metrics = evaluate_predictions(Path("data/raw"), Path("data/split.json"), Path("predictions"), params.evaluate,
                                   params.infer.score_threshold, params.data.test_annotations, outputs)
    tracking.log_evaluation(run_id, metrics, outputs, Path("submission/answer.json"))
    log.info("val: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
