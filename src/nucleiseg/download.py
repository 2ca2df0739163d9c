"""Fetch the dataset into a folder: Google Drive (gdown), a local zip/folder, or synthetic.

Everything is built in a temporary sibling folder and renamed into place at the
end, so a failure never leaves a half-extracted dataset behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .errors import NucleisegError

log = logging.getLogger(__name__)

# (host, port) probed before gdown starts, so an offline machine fails in seconds, not minutes.
DRIVE_ENDPOINT = ("drive.google.com", 443)
CONNECT_TIMEOUT_S = 5.0
_DRIVE_URL_ID = re.compile(r"(?:/d/|[?&]id=)([A-Za-z0-9_-]{10,})")
ALTERNATIVES = "set data.source to a local copy (e.g. -S data.source=../shared/data/nuclei-hw3-train.zip) or to 'synthetic'"


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


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> None:
    if not expected:
        return
    actual = sha256sum(path)
    if actual.lower() != expected.lower().removeprefix("sha256:"):
        raise NucleisegError(f"{path}: sha256 is {actual}, params.yaml data.sha256 expects {expected}; fix data.sha256 or the file")


def _check_reachable(endpoint: tuple[str, int]) -> None:
    try:
        with socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise NucleisegError(f"cannot reach Google Drive ({endpoint[0]}:{endpoint[1]}: {exc}); offline? {ALTERNATIVES}") from None


def download_drive(file_id: str, out_path: Path, endpoint: tuple[str, int] | None = None) -> Path:
    """Download a public Drive file with gdown (progress bar on stderr)."""
    _check_reachable(endpoint or DRIVE_ENDPOINT)
    import gdown

    try:
        result = gdown.download(id=file_id, output=str(out_path), quiet=False)
    except Exception as exc:  # gdown raises many types (FileURLRetrievalError, requests errors)
        raise NucleisegError(f"Google Drive download of {file_id} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {ALTERNATIVES}") from None
    if result is None or not out_path.is_file():
        raise NucleisegError(f"Google Drive download of {file_id} failed; {ALTERNATIVES}")
    return out_path


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip, refusing members that would land outside `target`."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise NucleisegError(f"{archive}: not a zip file (a Drive quota/HTML page?); download it again or use a local copy") from None
    with zf:
        root = target.resolve()
        for member in zf.infolist():
            name = member.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise NucleisegError(f"{archive}: member {name!r} escapes the target folder; refusing to extract this archive")
            if not (root / name).resolve().is_relative_to(root):
                raise NucleisegError(f"{archive}: member {name!r} escapes the target folder; refusing to extract this archive")
        try:
            zf.extractall(target)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise NucleisegError(f"{archive}: extraction failed ({exc}); the zip is damaged, fetch it again") from None


def dataset_root(folder: Path) -> Path:
    """The folder holding train/ (accepts a top-level 'dataset/' or any single wrapping folder)."""
    if (folder / "train").is_dir():
        return folder
    children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("__MACOSX", "."))]
    if len(children) == 1 and (children[0] / "train").is_dir():
        return children[0]
    raise NucleisegError(f"{folder}: no train/ folder found (expected train/, test/, test_img_ids.json, optionally inside dataset/)")


@contextmanager
def _staging(out_dir: Path):
    """A temp folder next to out_dir; removed on failure, renamed into out_dir by the caller."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(root: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(root, out_dir)


def fetch_dataset(source: str, out_dir: str | Path, sha256: str | None = None, synthetic_options: dict | None = None) -> Path:
    """Put the dataset named by `source` into `out_dir` (replacing it), atomically."""
    from .data import load_test_index, train_ids

    out_dir = Path(out_dir)
    source = str(source).strip()
    with _staging(out_dir) as staging:
        if source == "synthetic":
            from .synthetic import generate_dataset

            root = generate_dataset(staging / "dataset", **(synthetic_options or {}))
        else:
            file_id = drive_file_id(source)
            if file_id is not None:
                archive = download_drive(file_id, staging / "download.zip")
                verify_sha256(archive, sha256)
                safe_extract(archive, staging / "extracted")
                archive.unlink()
                root = dataset_root(staging / "extracted")
            else:
                local = Path(os.path.expanduser(source))
                if not local.exists():
                    raise NucleisegError(f"data.source: {local} does not exist; give a zip, a dataset folder, a gdrive:<id>, or 'synthetic'")
                if local.is_dir():
                    root = staging / "copy"
                    shutil.copytree(dataset_root(local), root)
                else:
                    verify_sha256(local, sha256)
                    safe_extract(local, staging / "extracted")
                    root = dataset_root(staging / "extracted")
        train_ids(root)
        tests = load_test_index(root)
        _publish(root, out_dir)
    log.info("dataset ready in %s (%d training images, %d test images)", out_dir, len(train_ids(out_dir)), len(tests))
    return out_dir
