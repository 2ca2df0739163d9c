"""Atomic writes: outputs appear whole or not at all.

`atomic_path` builds an output in a temp folder beside it (`.<name>.tmp-XXXXXXXX`) and
renames it into place. While a temp folder is in use, its owner holds an exclusive
`flock` on the lock file inside it, so the next run of a stage can tell the temp folders
an interrupted run left behind (SIGKILL, power loss: nothing unwinds) from those of a
stage that is running right now, and removes only the former.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temp folders are then left alone
    fcntl = None

log = logging.getLogger(__name__)

# Inside each temp folder; held with flock(LOCK_EX) by the run that uses the folder.
LOCK_NAME = ".nucleiseg-in-use.lock"
# A temp folder without a lock file (left by an older version, or killed in the instant
# between creating the folder and locking it) counts as stale only when nothing in it has
# changed for this long.
STALE_UNLOCKED_AGE_S = 3600.0


def _temp_pattern(name: str) -> re.Pattern:
    # tempfile.mkdtemp's suffix: 8 characters of [a-z0-9_].
    return re.compile(re.escape(f".{name}.tmp-") + r"[a-z0-9_]+")


def _newest_mtime(folder: Path) -> float:
    """The newest mtime of the folder and its direct entries (without following links)."""
    newest = folder.lstat().st_mtime
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _remove_if_stale(folder: Path) -> bool:
    """Remove a temp folder whose owner is gone; leave one that is in use (or may be)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        try:
            age = time.time() - _newest_mtime(folder)
        except OSError:
            return False
        if age < STALE_UNLOCKED_AGE_S:
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live run (or the file system has no flock: keep it)
            return False
        shutil.rmtree(folder, ignore_errors=True)  # while holding the lock
        return True
    finally:
        os.close(fd)


def clear_stale_temps(path: str | Path) -> list[Path]:
    """Remove the `.<name>.tmp-*` siblings of `path` that interrupted runs left behind.

    Only temp folders of this target name, and only those no live process holds.
    Returns the folders removed.
    """
    if fcntl is None:
        return []
    path = Path(path)
    pattern = _temp_pattern(path.name)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        folder = Path(entry.path)
        if _remove_if_stale(folder):
            log.info("removed %s (a temp folder left by an interrupted run)", folder)
            removed.append(folder)
    return removed


def _lock_folder(folder: Path) -> int | None:
    """Take the in-use lock of a fresh temp folder; the lock file appears already locked."""
    if fcntl is None:
        return None
    pending = folder / (LOCK_NAME + ".new")
    fd = os.open(pending, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass  # no flock here: others cannot take it either, so they keep this folder
    os.write(fd, f"{os.getpid()}\n".encode())
    os.rename(pending, folder / LOCK_NAME)
    return fd


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of `path` that do not exist yet, deepest first."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success it replaces `path` (file or folder).

    The temp path lives in a locked `.<name>.tmp-XXXXXXXX` folder; `tmp.parent` is free
    scratch space for the caller. Stale temp folders of the same name are removed first.
    On failure nothing is left behind: neither the temp folder nor parent folders this
    call created.
    """
    path = Path(path)
    created = _missing_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    published = False
    fd = None
    work = None
    try:
        clear_stale_temps(path)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        fd = _lock_folder(work)
        tmp = work / path.name
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif tmp.is_dir() and (path.is_symlink() or path.exists()):
            path.unlink()  # a file or link where a folder goes: rename cannot replace it
        os.replace(tmp, path)
        published = True
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if fd is not None:
            os.close(fd)
        if not published:
            for folder in created:  # deepest first; stop at one that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))


def read_json(path: str | Path, missing: str = "not found; run the stage that makes it first (dvc repro)", fix: str = ""):
    """A JSON file's content; one error line naming the file when it is absent (`missing` says why it
    matters) or not JSON (`fix`, when given, says what to do)."""
    from nucleiseg.core.errors import NucleisegError

    path = Path(path)
    if not path.is_file():
        raise NucleisegError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NucleisegError(f"{path}: not valid JSON ({exc}){'; ' + fix if fix else ''}") from None


def repo_root() -> Path:
    """The real repository root: DVC_ROOT under `dvc exp run --temp/--queue`, else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
