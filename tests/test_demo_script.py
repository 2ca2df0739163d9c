"""scripts/demo without running the pipeline: a stub `dvc` records what the script asks of DVC.

The demo must run as `dvc exp run --temp` (params.yaml and the workspace stay as they are), pass
extra arguments on, and its -S overrides must be params that exist and pass config.py's checks.
The real run is tests/test_demo_e2e.py.
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

    def run(*extra: str, pythonpath: str | None = None) -> dict:
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DEMO_RECORD": str(record)}
        env.pop("PYTHONPATH", None)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        subprocess.run([str(DEMO), *extra], cwd=tmp_path, env=env, check=True, timeout=60)
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


def test_demo_overrides_are_valid_params_and_cheap(run_demo):
    values = overrides(run_demo()["argv"])
    assert "train.device" not in values and values["device"] == "cpu"
    assert values["data.source"] == "synthetic" and values["data.sha256"] is None
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in values.items():  # -S only works on keys that exist in params.yaml
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node[part]
        assert leaf in node, f"-S {key}: not a key of params.yaml"
        node[leaf] = value
    checked = params_from_dict(params, "demo overrides")
    assert checked.model.weights == "none"
    assert checked.train.epochs <= 2 and checked.train.val_every > checked.train.epochs  # one validation, after the last epoch
    assert checked.infer.window < checked.data.synthetic.size  # several windows per image: stitching runs
