"""A stage's files, named on its command line by its `cmd` in dvc.yaml: the one place the paths are written."""

from __future__ import annotations

import argparse
from pathlib import Path


def stage_paths(description: str, *names: str) -> argparse.Namespace:
    """`--name PATH` for each of `names`, all required, as Paths (`pr_curve` is given as `--pr-curve`)."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    for name in names:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, metavar="PATH")
    return parser.parse_args()
