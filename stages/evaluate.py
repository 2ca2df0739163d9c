"""DVC stage `evaluate`: predictions -> metrics/eval.json, models/operating_point.json, plots/pr.csv,
plots/operating_point.csv, overlays/; logged into the training run."""

import logging
from pathlib import Path

from nucleiseg.core.config import read_params
from nucleiseg.core.errors import main_guard
from nucleiseg.core.io import read_json
from nucleiseg.evaluate.outputs import (
    EvaluateOutputs,
    evaluate_predictions,
    log_evaluation,
)
from nucleiseg.track import runs as tracking

log = logging.getLogger("evaluate")


@main_guard
def main() -> None:
    params = read_params()
    run_id = read_json("models/run.json")["run_id"]
    tracking.check_run(run_id)  # before any output: a missing run is found first, not after writing half
    outputs = EvaluateOutputs()
    metrics = evaluate_predictions(Path("data/raw"), Path("data/split.json"), Path("predictions"), params.evaluate,
                                   params.infer.score_threshold, params.data.test_annotations, outputs)
    log_evaluation(run_id, metrics, outputs, Path("submission/answer.json"))
    log.info("val: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
