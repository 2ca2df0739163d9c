"""The train stage's time outside its epochs and validation: what one more epoch costs the stage.

    python benchmarks/train_overhead.py                                # 2 and 14 demo epochs, this checkout
    python benchmarks/train_overhead.py --checkout /tmp/old-checkout   # the same for another checkout (before/after)
    python benchmarks/train_overhead.py --epochs 1,2 --set backbone=resnet18 --set data.synthetic.size=128

Runs the checkout's own stages (`stages/download.py`, `stages/tile.py` once, then `stages/train.py`
per epoch count) as subprocesses in a scratch folder, on synthetic data with the offline demo's
settings (scripts/demo: R50 without pretrained weights, 96 px crops, validation only after the last
epoch) and one step of 4 crops per epoch. An untimed 1-epoch training first creates the MLflow store
and warms the caches. Per run it prints the stage's wall time (the process, imports included), its
epochs' and validations' time (metrics/train.json) and the rest; then, between the smallest and the
largest epoch count, the time per extra epoch over the epoch + validation time it adds: 1.00 means
the stage costs nothing beyond its epochs (issue 16's goal: <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# scripts/demo's overrides, with one 4-crop step per epoch; no lr or checkpoint keys, so that checkouts
# from before and after their renaming read the same file.
DEMO = {
    "device": "cpu",
    "data.source": "synthetic", "data.sha256": None, "data.val_images": 2,
    "tile.size": 128, "tile.overlap": 48,
    "model.weights": "none", "model.input_scale": 1.0, "model.detections_per_img": 50, "model.box_batch_size_per_image": 128,
    "model.rpn_pre_nms_top_n_train": 300, "model.rpn_post_nms_top_n_train": 300,
    "model.rpn_pre_nms_top_n_test": 300, "model.rpn_post_nms_top_n_test": 300,
    "train.batch_size": 4, "train.samples_per_epoch": 4, "train.warmup_iters": 4, "train.val_every": 1000, "train.workers": 0,
    "train.augment.crop": 96,
    "infer.window": 128, "infer.overlap": 48,
    "evaluate.max_dets_all": 1000,
}


def set_param(params: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    node = params
    for key in head:
        node = node[key]
    if last not in node:
        raise SystemExit(f"error: {dotted} is not a key of the checkout's params.yaml")
    node[last] = value


def write_params(folder: Path, checkout: Path, overrides: dict) -> None:
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    for key, value in overrides.items():
        set_param(params, key, value)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(folder: Path, checkout: Path, name: str, env: dict) -> float:
    started = time.perf_counter()
    # The stage's cmd from the checkout's dvc.yaml (its paths are written only there), run by this interpreter.
    _, script, *args = shlex.split(yaml.safe_load((checkout / "dvc.yaml").read_text())["stages"][name]["cmd"])
    done = subprocess.run([sys.executable, str(checkout / script), *args], cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: stage {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def train_once(folder: Path, checkout: Path, overrides: dict, epochs: int, env: dict) -> dict:
    write_params(folder, checkout, {**overrides, "train.epochs": epochs})
    wall = run_stage(folder, checkout, "train", env)
    metrics = json.loads((folder / "metrics" / "train.json").read_text())
    for out in ("models", "metrics", "plots"):
        shutil.rmtree(folder / out, ignore_errors=True)
    inside = metrics["train_seconds"] + metrics["val_seconds"]
    return {"epochs": epochs, "wall": wall, "train": metrics["train_seconds"], "val": metrics["val_seconds"], "inside": inside,
            "outside": wall - inside}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose stages and src/ run (default: this one)")
    parser.add_argument("--epochs", default="2,14", help="comma-separated epoch counts (default 2,14)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per epoch count; the figures use each count's fastest")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override (value read as YAML)")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    counts = sorted({int(e) for e in args.epochs.split(",")})
    if len(counts) < 2:
        raise SystemExit("error: --epochs needs two different counts, e.g. 2,14")
    overrides = dict(DEMO)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
    print(f"checkout {checkout} ({commit or 'not a git checkout'}), {os.cpu_count()} cores, torch threads as the stage sets them", flush=True)
    with tempfile.TemporaryDirectory(prefix="nucleiseg-overhead-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "DVC_ROOT": str(folder)}
        env.pop("MLFLOW_TRACKING_URI", None)
        write_params(folder, checkout, {**overrides, "train.epochs": 1})
        for stage in ("download", "tile"):
            run_stage(folder, checkout, stage, env)
        train_once(folder, checkout, overrides, 1, env)  # untimed: MLflow store creation, file caches
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for epochs in counts:
                run = train_once(folder, checkout, overrides, epochs, env)
                print(f"{epochs:3d} epochs: stage {run['wall']:6.1f} s = epochs {run['train']:6.1f} s + validation {run['val']:5.1f} s "
                      f"+ outside {run['outside']:5.1f} s ({run['outside'] / run['wall']:.0%})", flush=True)
                if epochs not in best or run["wall"] < best[epochs]["wall"]:
                    best[epochs] = run
    low, high = best[counts[0]], best[counts[-1]]
    extra = high["epochs"] - low["epochs"]
    per_epoch = (high["wall"] - low["wall"]) / extra
    adds = (high["inside"] - low["inside"]) / extra
    print(f"per extra epoch ({low['epochs']} -> {high['epochs']}): stage +{per_epoch:.2f} s for +{adds:.2f} s of epoch + validation: "
          f"ratio {per_epoch / adds:.2f}")


if __name__ == "__main__":
    main()
