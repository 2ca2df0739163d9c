"""DVC stage `evaluate`: the predictions -> metrics, PR and operating-point curves, the operating point
(next to the model file) and overlays; logged into the training run. Without val images (data.fold: all)
the operating point is evaluate.score_threshold and only test metrics (with data.test_annotations) are computed."""

import logging

from nucleiseg.core.config import read_params
from nucleiseg.core.errors import main_guard
from nucleiseg.core.io import read_json
from nucleiseg.core.stage_args import stage_paths
from nucleiseg.evaluate.outputs import (
    EvaluateOutputs,
    evaluate_predictions,
    log_evaluation,
)
from nucleiseg.track import runs as tracking

log = logging.getLogger("evaluate")


@main_guard
def main() -> None:
    paths = stage_paths(__doc__, "raw", "split", "predictions", "answer", "run",
                        "metrics", "pr_curve", "sweep", "overlays", "operating_point")
    params = read_params()
    run_id = read_json(paths.run)["run_id"]
    tracking.check_run(run_id)  # before any output: a missing run is found first, not after writing half
    outputs = EvaluateOutputs(paths.metrics, paths.pr_curve, paths.sweep, paths.overlays, paths.operating_point)
    metrics = evaluate_predictions(paths.raw, paths.split, paths.predictions, params.evaluate,
                                   params.infer.score_floor, params.data.test_annotations, outputs)
    log_evaluation(run_id, metrics, outputs, paths.answer)
    if metrics.get("val_images") == 0:
        log.warning("no val images (data.fold: all): nothing to score on val; the folds' runs hold the val metrics "
                    "(python -m nucleiseg report); operating point evaluate.score_threshold = %g", metrics["score_threshold"])
    else:
        log.info("val: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
