"""DVC stage `evaluate`: predictions -> metrics/eval.json, models/operating_point.json, plots/pr.csv,
plots/operating_point.csv, overlays/; logged into the training run. Without val images (data.fold: all) the
operating point is evaluate.score_threshold and only test metrics (with data.test_annotations) are computed."""

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
                                   params.infer.score_floor, params.data.test_annotations, outputs)
    log_evaluation(run_id, metrics, outputs, Path("submission/answer.json"))
    if metrics.get("val_images") == 0:
        log.warning("no val images (data.fold: all): nothing to score on val; the folds' runs hold the val metrics "
                    "(python -m nucleiseg report); operating point evaluate.score_threshold = %g", metrics["score_threshold"])
    else:
        log.info("val: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
