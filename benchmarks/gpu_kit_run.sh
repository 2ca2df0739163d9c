#!/usr/bin/env bash
# Real-data figures on a bare GPU machine (no network, no DVC/MLflow): the gpu-kit's data and wheels,
# the pipeline's own stage scripts, plus the loader and train-step benchmarks. From the checkout's root,
# with the kit copied to .kit (see ../shared/gpu-kit/README.md):
#   OUT=/tmp/out bash benchmarks/gpu_kit_run.sh [key=value ...]      # params.yaml overrides
#   OUT=/tmp/out BENCH=0 bash benchmarks/gpu_kit_run.sh train.epochs=40 \
#       --recipe base --recipe gn model.norm=groupnorm --recipe x1.5 model.input_scale=1.5
# Each --recipe NAME [key=value ...] trains at the same time as the others on the one GPU (training
# leaves it mostly idle, see docs/performance.md), from the same tiles, with the loader's workers split between them;
# overrides before the first --recipe apply to all. Each recipe then runs infer, export, evaluate and
# (SWEEP=1) benchmarks/postprocess_sweep.py on its model. A recipe that sets data.fold tiles its own
# split (~21 s on the real data), so folds train side by side:
#   OUT=/tmp/out BENCH=0 bash benchmarks/gpu_kit_run.sh train.epochs=30 train.lr_milestones=[24] \
#       --recipe f0 data.fold=0 --recipe f1 data.fold=1 --recipe f2 data.fold=2
# Env: TRAIN_S (training time limit, default 330 s: SIGTERM, then the stage checkpoints the epoch it is in
# and stops; the best epoch so far is used),
# SKIP_WHEELS=1 (pycocotools/faster-coco-eval already installed), BENCH=0 (skip the benchmarks), BENCH_STEPS and
# BENCH_VARIANTS (benchmarks/train_step.py's timed steps and variants),
# SWEEP=1 (post-processing sweep on val), DEADLINE (seconds since start after which no sweep starts).
# Writes to $OUT: log.txt, gpu.txt (nvidia-smi dmon), and per recipe (the top folder when there is
# no --recipe) log.txt, eval.json, train.json, train.csv, operating_point.csv, sweep.txt. The log has the train
# stage's overhead: its wall time against the time of its epochs and validations.
set -u
SRC=$(pwd); KIT=$SRC/.kit
OUT=${OUT:-$PWD/kit-out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
t0=$SECONDS; mark() { echo "[t=$((SECONDS-t0))s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; nproc
[ "${SKIP_WHEELS:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kit-site "$KIT"/wheels/*.whl || exit 1
# MLflow is the kit's recorder, widened to the client calls track/runs.py makes; a non-local URI keeps the
# SQLite-store code (lock, artifact-location rewrite) out of the way.
rm -rf /tmp/kit-mlflow; cp -r "$KIT/mlflow_recorder" /tmp/kit-mlflow; M=/tmp/kit-mlflow/mlflow
mkdir -p $M/tracking $M/data; echo "from mlflow import MlflowClient" > $M/tracking/__init__.py; : > $M/data/__init__.py
printf 'class CodeDatasetSource:\n    def __init__(self, *a, **kw):\n        pass\n' > $M/data/code_dataset_source.py
printf 'class MetaDataset:\n    def __init__(self, *a, **kw):\n        pass\n' > $M/data/meta_dataset.py
echo "MlflowException.error_code = None" >> $M/exceptions.py
# The train stage logs its model as a models-from-code pyfunc (track/runs.py log_model): recorded, like pytorch's.
printf 'from . import _w\n\n\ndef log_model(name=None, **kw):\n    _w("pyfunc.log_model", name=name, kw=sorted(kw))\n' > $M/pyfunc.py
cat >> $M/__init__.py <<'PY'


class _Object:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __getattr__(self, name):
        return None


class MlflowClient:
    def __init__(self, *a, **kw):
        pass

    def get_experiment_by_name(self, name):
        return _Object(experiment_id="0", name=name, lifecycle_stage="active", tags={}, artifact_location="")

    def get_run(self, run_id):
        return _Object(info=_Object(run_id=run_id, lifecycle_stage="active", experiment_id="0"))

    def __getattr__(self, name):
        return lambda *a, **kw: _w(f"client.{name}")


def log_input(*a, **kw):
    _w("input")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return lambda *a, **kw: _w(name)
PY
export PYTHONPATH=/tmp/kit-site:/tmp/kit-mlflow:$SRC/src MLFLOW_STUB_LOG=$OUT/mlflow_calls.jsonl MLFLOW_TRACKING_URI=http://kit-recorder
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
# Arguments: common overrides, then optional groups "--recipe NAME key=value ...".
common=(); names=(); declare -A recipe_args
current=""
while [ $# -gt 0 ]; do
  if [ "$1" = --recipe ]; then
    [ $# -ge 2 ] || { echo "error: --recipe needs a name"; exit 2; }
    current=$2; names+=("$2"); recipe_args[$2]=""; shift 2; continue
  fi
  if [ -z "$current" ]; then common+=("$1"); else recipe_args[$current]+=" $1"; fi
  shift
done
W=/tmp/kit-work; rm -rf $W /tmp/kit-data; mkdir -p $W
cp -r "$SRC/stages" "$SRC/params.yaml" "$SRC/dvc.yaml" "$SRC/benchmarks" $W/; cd $W
# A stage as DVC runs it: its `cmd` from dvc.yaml (the one place its paths are written), under python3.
stage_cmd() {
  python3 -c 'import sys, yaml; print("python3 " + yaml.safe_load(open("dvc.yaml"))["stages"][sys.argv[1]]["cmd"].removeprefix("python "))' "$1"
}
stage() { local cmd; cmd=$(stage_cmd "$1") && eval "$cmd"; }
python3 "$KIT/unpack.py" "$KIT/data" /tmp/kit-data && mark unpacked || exit 1
python3 "$KIT/setparams.py" data.source=/tmp/kit-data model.weights=none "${common[@]}" || exit 1
stage download && mark download || exit 1
stage tile && mark tile || exit 1
if [ "${BENCH:-1}" = 1 ]; then
  python3 benchmarks/loader.py --tiles data/tiles --samples 60 --previous-samples 6 --workers 12 && mark loader-benchmark
  python3 benchmarks/train_step.py --tiles data/tiles --steps ${BENCH_STEPS:-25} --warmup 5 --batch-size 4 \
    --variants "${BENCH_VARIANTS:-bf16-nhwc,bf16-nhwc-foreach,bf16-nhwc-fused,bf16-nhwc-compile,bf16-nhwc-compile-fused}" && mark train-step-benchmark
fi

# The train stage's time outside its epochs and validation (model build, loader start, checkpoints, MLflow,
# outputs), from its wall time ($1 s) and its own per-epoch timings: metrics/train.json, or the resume
# checkpoint's history when TRAIN_S stopped it.
train_overhead() {
  python3 - "$1" <<'PY'
import json, sys
from pathlib import Path
wall = float(sys.argv[1])
done = Path("metrics/train.json")
if done.is_file():
    m = json.loads(done.read_text())
    epochs, train, val = m["epochs"], m["train_seconds"], m["val_seconds"]
else:
    from nucleiseg.train.checkpoint import load_checkpoint
    found = [p for p in sorted(Path("checkpoints").glob("train-*.pt")) if ".best-" not in p.name]
    if not found:
        raise SystemExit("train stage overhead: no metrics/train.json and no checkpoint")
    rows = load_checkpoint(found[-1], mmap=True)["history"]
    epochs, train, val = len(rows), sum(r["epoch_seconds"] for r in rows), sum(r.get("val_seconds", 0.0) for r in rows)
outside = wall - train - val
print(f"train stage overhead: wall {wall:.1f} s for {epochs} epochs = epochs {train:.1f} s + validation {val:.1f} s "
      f"+ outside {outside:.1f} s ({outside / wall:.0%} of the stage); wall / (epochs + validation) = {wall / (train + val):.2f}")
PY
}

# One recipe, in the current folder: train (stopped by TRAIN_S), infer, export, evaluate, sweep.
run_recipe() {
  local out=$1 started rc
  started=$(date +%s.%N)
  # SIGTERM lets the stage finish the epoch it is in and checkpoint it (SIGINT may be ignored in a background
  # job); -k: a stage that does not stop is killed 120 s later.
  timeout -k 120 -s TERM ${TRAIN_S:-330} $(stage_cmd train); rc=$?; mark "train rc=$rc"
  train_overhead "$(python3 -c "import sys, time; print(time.time() - float(sys.argv[1]))" "$started")"
  mkdir -p models
  if [ ! -f models/model.pt ]; then
    # Stopped by TRAIN_S: the checkpoint's best epoch (tensors only) becomes the model.
    python3 - <<'PY' || return 1
import json
from pathlib import Path
import torch
from nucleiseg.core.config import read_params
from nucleiseg.model.maskrcnn import model_file
from nucleiseg.train.checkpoint import Checkpointer
found = [p for p in sorted(Path("checkpoints").glob("train-*.pt")) if ".best-" not in p.name]
if not found:
    raise SystemExit("training stopped before its first checkpoint: none to use")
ckpt, best = Checkpointer(found[-1]).load()
best_epoch = ckpt["best"]["epoch"] if best is not None else ckpt["epoch"]
params = read_params()
torch.save(model_file(best if best is not None else ckpt["model"], params.model, best_epoch, params.infer), "models/model.pt")
json.dump({"run_id": ckpt["run"].get("mlflow_run_id", "none"), "experiment_id": "0", "tracking_uri": "none"}, open("models/run.json", "w"))
print(f"stopped after epoch {ckpt['epoch']}; using its best epoch {best_epoch}")
PY
  fi
  stage infer && mark infer || return 1
  stage export && stage evaluate && mark evaluate
  cp metrics/eval.json metrics/train.json plots/train.csv plots/operating_point.csv "$out/" 2>/dev/null
  if [ "${SWEEP:-0}" = 1 ] && [ $((SECONDS - t0)) -lt "${DEADLINE:-100000}" ]; then
    python3 benchmarks/postprocess_sweep.py > "$out/sweep.txt" 2>&1; mark "sweep rc=$?"
  fi
  mark done
}

(command -v nvidia-smi >/dev/null && nvidia-smi dmon -s um -d 5 > "$OUT/gpu.txt" 2>&1) & DM=$!
if [ ${#names[@]} -eq 0 ]; then
  run_recipe "$OUT"
else
  # train.workers: auto splits the cores between the recipes' loaders (each recipe has its own folder, so
  # the trainings cannot count each other's lock files: the variable says how many there are).
  export NUCLEISEG_CONCURRENT_TRAININGS=${#names[@]}
  pids=()
  for name in "${names[@]}"; do
    mkdir -p "recipes/$name" "$OUT/$name"
    cp -r stages benchmarks params.yaml dvc.yaml "recipes/$name/"
    if [[ " ${recipe_args[$name]} " == *" data.fold="* ]]; then
      mkdir "recipes/$name/data"; ln -s "$W/data/raw" "recipes/$name/data/raw"  # its own split and tiles
    else
      ln -s "$W/data" "recipes/$name/data"
    fi
    # shellcheck disable=SC2086
    (cd "recipes/$name" && python3 "$KIT/setparams.py" ${recipe_args[$name]} \
      && mark() { echo "[t=$((SECONDS-t0))s] [$name] $*"; } \
      && { [ -L data ] || { stage tile && mark tile; }; } && run_recipe "$OUT/$name") \
      > "$OUT/$name/log.txt" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  for name in "${names[@]}"; do grep -h "^\[t=\|train stage overhead" "$OUT/$name/log.txt"; done
  # Aggregate throughput: the recipes trained side by side, so their windows/s add up (from each train.json).
  python3 - "$OUT" "${names[@]}" <<'PY'
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
rates = {n: json.loads((out / n / "train.json").read_text())["windows_per_second"] for n in names if (out / n / "train.json").is_file()}
print(f"{len(names)} trainings side by side: " + ", ".join(f"{n} {r:.1f}" for n, r in rates.items())
      + f" windows/s; aggregate {sum(rates.values()):.1f} windows/s" + ("" if len(rates) == len(names) else " (some recipes have no train.json)"))
PY
fi
kill $DM 2>/dev/null
mark done
