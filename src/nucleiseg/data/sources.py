"""Names for a data source (data.source): the Drive file id, and a short label without local paths.

Kept apart from download.py so the stages and tracking can name a source without importing
the downloader (and so without depending on it in dvc.yaml).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nucleiseg.core.errors import NucleisegError

_DRIVE_URL_ID = re.compile(r"(?:/d/|[?&]id=)([A-Za-z0-9_-]{10,})")


def drive_file_id(source: str) -> str | None:
    """The Drive file id of 'gdrive:<id>' / 'gdown:<id>' or a Drive URL; None for other sources."""
    for prefix in ("gdrive:", "gdown:"):
        if source.startswith(prefix):
            return source[len(prefix) :]
    if "drive.google.com" in source:
        match = _DRIVE_URL_ID.search(source)
        if not match:
            raise NucleisegError(f"data.source: cannot find a file id in the Drive URL {source!r}")
        return match.group(1)
    return None


def describe_source(source: str) -> str:
    """A short label for a data source: 'synthetic', 'gdrive:<id>', or the zip/folder's name ('' for none)."""
    if not source:
        return ""
    source = str(source).strip()
    if source == "synthetic":
        return "synthetic"
    try:
        file_id = drive_file_id(source)
    except NucleisegError:
        return "gdrive"
    if file_id is not None:
        return f"gdrive:{file_id}"
    path = Path(os.path.expanduser(source))
    name = path.name
    if not name:  # '.', '..', '/'
        try:
            name = path.resolve().name
        except OSError:
            name = ""
    return name or str(path)
