"""The stages as DVC runs them: each stage's `cmd` from dvc.yaml, the one place its paths are written."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def stage_argv(name: str, checkout: Path = REPO) -> list[str]:
    """The `cmd` of stage `name` in `checkout`'s dvc.yaml, run by this interpreter with the script of that
    checkout; its data paths stay relative, to the folder the command runs in (as under DVC)."""
    cmd = yaml.safe_load((checkout / "dvc.yaml").read_text())["stages"][name]["cmd"]
    python, script, *args = shlex.split(cmd)
    assert python == "python" and script == f"stages/{name}.py", cmd
    return [sys.executable, str(checkout / script), *args]
