"""scripts/demo and scripts/quickstart without running the pipeline: a stub `dvc` records what the script asks of DVC.

Both must run as `dvc exp run --temp` (params.yaml and the workspace stay as they are), pass extra
arguments on, and their -S overrides must be params that exist and pass config.py's checks. The
real runs are tests/test_demo_e2e.py (the demo, and the quick start on a tiny synthetic zip).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from nucleiseg.core.config import params_from_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo"
QUICKSTART = REPO / "scripts" / "quickstart"

STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["DEMO_RECORD"], "w") as fh:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "pythonpath": os.environ.get("PYTHONPATH")}, fh)
"""


@pytest.fixture()
def run_demo(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text(STUB)
    (bin_dir / "dvc").chmod(0o755)
    record = tmp_path / "record.json"

    def run(*extra: str, pythonpath: str | None = None, script: Path = DEMO) -> dict:
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DEMO_RECORD": str(record)}
        env.pop("PYTHONPATH", None)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        subprocess.run([str(script), *extra], cwd=tmp_path, env=env, check=True, timeout=60)
        return json.loads(record.read_text())

    return run


def overrides(argv: list[str]) -> dict[str, object]:
    pairs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-S"]
    return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def test_demo_is_a_temp_experiment_with_extra_args_passed_on(run_demo):
    seen = run_demo("-S", "backbone=resnet101", "-n", "my-demo")
    argv = seen["argv"]
    assert argv[:3] == ["exp", "run", "--temp"]
    assert argv[-4:] == ["-S", "backbone=resnet101", "-n", "my-demo"]  # last, so they win over the demo's own -S
    assert Path(seen["cwd"]).resolve() == REPO  # from anywhere: DVC runs at the repository root
    # Stages import nucleiseg from the temp copy's src/ (relative: resolved in the copy's cwd).
    assert seen["pythonpath"] == "src"
    assert run_demo(pythonpath="/elsewhere")["pythonpath"] == "src:/elsewhere"


def applied(values: dict[str, object]):
    """params.yaml with the -S overrides applied, checked by config.py."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in values.items():  # -S only works on keys that exist in params.yaml
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node[part]
        assert leaf in node, f"-S {key}: not a key of params.yaml"
        node[leaf] = value
    return params_from_dict(params, "script overrides")


def test_demo_overrides_are_valid_params_and_cheap(run_demo):
    values = overrides(run_demo()["argv"])
    assert "train.device" not in values and values["device"] == "cpu"
    assert values["data.source"] == "synthetic" and values["data.sha256"] is None
    checked = applied(values)
    assert checked.model.weights == "none"
    assert checked.train.epochs <= 2 and checked.train.val_every > checked.train.epochs  # one validation, after the last epoch
    assert checked.infer.window < checked.data.synthetic.size  # several windows per image: stitching runs


def test_quickstart_trains_a_small_model_on_the_zip_where_it_lies(run_demo, tmp_path):
    """The zip is passed as an absolute path (the stages run in a temp copy), never copied; the overrides are valid
    params sized for ~30 min on 2 cores; extra arguments come last so they win."""
    archive = tmp_path / "data" / "nuclei-hw3-train.zip"
    archive.parent.mkdir()
    archive.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    seen = run_demo("data/nuclei-hw3-train.zip", "-S", "train.epochs=2", "-n", "qs", script=QUICKSTART)
    argv = seen["argv"]
    assert argv[:3] == ["exp", "run", "--temp"] and argv[-4:] == ["-S", "train.epochs=2", "-n", "qs"]
    assert Path(seen["cwd"]).resolve() == REPO and seen["pythonpath"] == "src"
    values = overrides(argv[:-4])
    assert values["data.source"] == str(archive)
    checked = applied(values)
    assert checked.device == "cpu" and checked.backbone == "resnet18" and checked.model.weights == "none"
    assert checked.model.norm == "groupnorm" and checked.model.input_scale == 1.0
    assert checked.train.samples_per_epoch <= 200 and checked.train.augment.crop <= 192 and checked.train.epochs <= 6
    assert checked.train.val_every > checked.train.epochs and checked.model.rpn_post_nms_top_n_test <= 1000
    assert checked.data.sha256 == "0081bdbc5554573c7a9fe38360d604224f23a864f49a77d32c764f6e38f10e84"


@pytest.mark.parametrize("argv, says", [([], "usage: scripts/quickstart /path/to/nuclei-hw3-train.zip"),
                                        (["-S", "x=1"], "usage: scripts/quickstart"),
                                        (["missing.zip"], "error: missing.zip: no such file")])
def test_quickstart_without_a_zip_is_one_line(tmp_path, argv, says):
    done = subprocess.run([str(QUICKSTART), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().startswith(says) and len(done.stderr.strip().splitlines()) == 1
