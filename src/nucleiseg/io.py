"""Atomic writes: outputs appear whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success it replaces `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))


def read_json(path: str | Path):
    from .errors import NucleisegError

    path = Path(path)
    if not path.is_file():
        raise NucleisegError(f"{path}: not found; run the stage that makes it first (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NucleisegError(f"{path}: not valid JSON ({exc})") from None


def repo_root() -> Path:
    """The real repository root: DVC_ROOT under `dvc exp run --temp/--queue`, else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
