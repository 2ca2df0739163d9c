"""Every benchmark runs on tiny input and prints its figures: a benchmark that no longer imports or runs
is found here, not when someone quotes it. Each runs as a subprocess from a folder laid out like the
pipeline's, the way a person runs it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nucleiseg.model.maskrcnn import build_model, model_file

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def run(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stdout


@pytest.fixture
def pipeline_folder(tmp_path, tiny_data, tiny_params, tiny_model_cfg) -> Path:
    """params.yaml (tiny settings), data/ and an untrained tiny models/model.pt."""
    shutil.copytree(tiny_data / "data", tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params.as_dict(), sort_keys=False))
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(model_file(build_model(tiny_model_cfg).state_dict(), tiny_model_cfg, best_epoch=1, infer=tiny_params.infer), tmp_path / "models" / "model.pt")
    return tmp_path


def test_every_benchmark_has_a_smoke_test():
    here = Path(__file__).read_text() + "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for bench in sorted(BENCHMARKS.iterdir()):
        if bench.suffix in (".py", ".sh"):
            assert bench.name in here, f"{bench.name} has no smoke test"


@pytest.mark.slow
def test_seam_oracle_merges_ground_truth_back_exactly(tiny_raw, tmp_path, stage_environment):
    out = run([str(BENCHMARKS / "seam_oracle.py"), "--raw", str(tiny_raw), "--window", "64", "--overlap", "24"], tmp_path,
              stage_environment(tmp_path))
    assert re.search(r"merge_windows: .* AP50_all = 1\.0000", out), out


@pytest.mark.slow
def test_infer_overhead_reports_the_ratio(pipeline_folder, stage_environment):
    out = run([str(BENCHMARKS / "infer_overhead.py"), "--size", "96", "--detections", "5", "--repeats", "1", "--threads", "1"],
              pipeline_folder, stage_environment(pipeline_folder))
    assert re.search(r"ratio predict / forward: wall \d+\.\d+", out), out


@pytest.mark.slow
def test_infer_memory_runs_both_sizes(tmp_path, stage_environment):
    out = run([str(BENCHMARKS / "infer_memory.py"), "--sizes", "128", "256", "--no-tracemalloc"], tmp_path, stage_environment(tmp_path))
    assert "128" in out and "256" in out, out


@pytest.mark.slow
def test_postprocess_sweep_prints_one_row_per_setting(pipeline_folder, stage_environment):
    out = run([str(BENCHMARKS / "postprocess_sweep.py"), "--set", "min_area=0,30"], pipeline_folder, stage_environment(pipeline_folder))
    rows = [line for line in out.splitlines() if line.startswith(("params.yaml", "min_area="))]
    assert [r.split()[0] for r in rows] == ["params.yaml", "min_area=0", "min_area=30"], out


@pytest.mark.slow
def test_loader_benchmark_times_both_paths(tiny_tiles, tmp_path, stage_environment):
    out = run([str(BENCHMARKS / "loader.py"), "--tiles", str(tiny_tiles), "--samples", "4", "--previous-samples", "2"], tmp_path,
              stage_environment(tmp_path))
    assert re.search(r"samples/s", out), out


@pytest.mark.slow
def test_copy_paste_benchmark_times_off_and_on(tiny_tiles, tmp_path, stage_environment):
    out = run([str(BENCHMARKS / "copy_paste.py"), "--tiles", str(tiny_tiles), "--samples", "4", "--repeats", "1", "--max", "5"], tmp_path,
              stage_environment(tmp_path))
    assert re.search(r"^copy_paste 0 +: +\d+\.\d CPU ms per sample \(\d+\.\d wall\)", out, re.MULTILINE), out
    assert re.search(r"^copy_paste 1, copy_paste_max 5 +: +\d+\.\d CPU ms per sample", out, re.MULTILINE), out
    assert re.search(r"^on - off: [+-]\d+\.\d CPU ms per sample", out, re.MULTILINE), out


def test_gpu_kit_run_script_parses():
    done = subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_kit_run.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_train_step_times_each_variant(tmp_path, stage_environment):
    """Optimizer kernels, torch.compile of the backbone + FPN ('eager' backend: the wiring, not the compiler), the MaskIoU head."""
    variants = ["fp32-foreach", "fp32-fused-compile", "fp32-maskiou"]
    out = run([str(BENCHMARKS / "train_step.py"), "--backbone", "resnet18", "--size", "128", "--crop", "64", "--steps", "1", "--warmup", "1",
               "--batch-size", "1", "--workers", "0", "--variants", ",".join(variants), "--compile-backend", "eager"], tmp_path,
              stage_environment(tmp_path))
    rows = re.findall(r"^ *(\S+): +\d+\.\d windows/s, step +\d+ ms, outside steps +\d+\.\d %", out, re.MULTILINE)
    assert rows == variants, out


@pytest.mark.slow
def test_train_overhead_compares_two_epoch_counts(tmp_path, stage_environment):
    tiny = ["backbone=resnet18", "data.synthetic.n_train=3", "data.synthetic.n_test=1", "data.synthetic.size=96", "data.val_images=1",
            "tile.size=64", "tile.overlap=24", "infer.window=64", "infer.overlap=24", "train.augment.crop=0", "train.batch_size=1",
            "train.samples_per_epoch=1"]
    out = run([str(BENCHMARKS / "train_overhead.py"), "--epochs", "1,2", *(arg for item in tiny for arg in ("--set", item))], tmp_path,
              stage_environment(tmp_path), timeout=600)
    assert len(re.findall(r"^ *\d epochs: stage .* s = epochs .* \+ validation .* \+ outside", out, re.MULTILINE)) == 2, out
    assert re.search(r"per extra epoch \(1 -> 2\): stage [+-]\d+\.\d\d s for \+\d+\.\d\d s of epoch \+ validation: ratio -?\d+\.\d\d", out), out
