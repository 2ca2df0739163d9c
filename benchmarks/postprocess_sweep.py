"""Post-processing settings tuned on val: whole-image val metrics of one trained model per setting.

    python benchmarks/postprocess_sweep.py --model models/model.pt                 # the default grid below
    python benchmarks/postprocess_sweep.py --model models/model.pt --set mask_threshold=0.4,0.5,0.6 --set min_area=0,10,30

Run from a pipeline folder (params.yaml, data/raw, data/split.json). Each setting of the infer
section runs the infer stage's predictor over the val images and the evaluate stage's metrics
(operating point chosen on val, like `evaluate`); one setting changes at a time from params.yaml's
`infer` section, so every row compares against the first (the current params). Val only: choose
here, then set the winner in params.yaml; the test images are never looked at.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import yaml

from nucleiseg.core.config import params_from_dict, read_params
from nucleiseg.core.io import read_json
from nucleiseg.core.runtime import resolve_device
from nucleiseg.data.layout import load_train_sample
from nucleiseg.model.maskrcnn import load_trained
from nucleiseg.train.hooks import WholeImageValidator

DEFAULT_GRID = {"mask_threshold": [0.4, 0.6], "min_area": [0, 30], "dedup_iou": [0.2, 0.5], "fill_holes": [False]}
COLUMNS = ("ap50_all", "ap50", "f1", "pq", "aji", "score_threshold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2", help="infer.KEY values to try (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = read_params()
    grid = {k: [yaml.safe_load(v) for v in vs.split(",")] for k, vs in (item.split("=", 1) for item in args.set)} or DEFAULT_GRID
    device = resolve_device(params.device)
    model, _ = load_trained(args.model, device)
    samples = [load_train_sample("data/raw", name) for name in read_json("data/split.json")["val"]]
    settings = [("params.yaml", params.infer)]
    for key, values in grid.items():
        for value in values:
            # Checked like params.yaml: a value out of range is refused before any work.
            infer = params_from_dict({**params.as_dict(), "infer": {**dataclasses.asdict(params.infer), key: value}}).infer
            settings.append((f"{key}={value}", infer))
    print(f"{len(samples)} val images; model {args.model}; device {device}")
    print(f"{'setting':<22}" + "".join(f"{c:>16}" for c in COLUMNS) + f"{'seconds':>9}")
    for name, infer in settings:
        started = time.perf_counter()
        metrics = WholeImageValidator(samples, infer, params.evaluate, device)(model)
        print(f"{name:<22}" + "".join(f"{metrics[c]:>16.4f}" for c in COLUMNS) + f"{time.perf_counter() - started:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
