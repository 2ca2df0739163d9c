"""Fetch the dataset into a folder: Google Drive (gdown), a local zip/folder, or synthetic.

Everything is built in a locked temp folder beside the output (`io.atomic_path`) and
renamed into place at the end, so a failure never leaves a half-extracted dataset (or a
parent folder this run created) behind, and the temp folders of a killed run are cleared
by the next one. Zips are checked before anything is written (member names, links,
declared sizes) and counted again while extracting; folder sources must hold only real
files and folders. The published folder holds `SOURCE.json`: which data it came from.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import zipfile
from pathlib import Path, PurePosixPath

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.io import atomic_path
from nucleiseg.data.sources import describe_source, drive_file_id  # noqa: F401 (part of this module's API)

log = logging.getLogger(__name__)

# (host, port) probed before gdown starts, so an offline machine fails in seconds, not minutes.
DRIVE_ENDPOINT = ("drive.google.com", 443)
CONNECT_TIMEOUT_S = 5.0

# The homework's data (see the data README): named in the offline hint.
HOMEWORK_DRIVE_ID = "1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG"
HOMEWORK_ZIP_NAME = "nuclei-hw3-train.zip"
HOMEWORK_SHA256 = "0081bdbc5554573c7a9fe38360d604224f23a864f49a77d32c764f6e38f10e84"

# Zip limits, checked on the declared sizes before extracting and on the bytes written while
# extracting. The real zip: 67 MB holding 14,629 files, 111 MB unpacked, largest file 2.4 MB,
# highest ratio 24:1 (a small mask PNG). Tests lower these with monkeypatch.
MAX_TOTAL_BYTES = 2 * 1024**3  # all members together
MAX_MEMBER_BYTES = 512 * 1024**2  # any one member
MAX_RATIO = 100  # unpacked / packed, for members of at least RATIO_MIN_BYTES
RATIO_MIN_BYTES = 64 * 1024**2  # smaller members may compress well (uncompressed TIFF masks do)
MAX_MEMBERS = 1_000_000

# Written into the published dataset folder; readers look only at train/, test/, test_img_ids.json.
SOURCE_FILE = "SOURCE.json"

_S_IFLNK = 0o120000
_CHUNK = 1 << 20


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def normalize_sha256(expected) -> str | None:
    """data.sha256 as 64 lower-case hex characters ('sha256:' prefix allowed); None when unset."""
    if expected is None:
        return None
    digest = expected.strip().lower().removeprefix("sha256:") if isinstance(expected, str) else None
    if digest is None or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise NucleisegError(
            f"data.sha256 = {expected!r} is not a SHA-256: give the zip's 64 hex characters in quotes "
            f"(sha256sum file.zip; the homework zip's is '{HOMEWORK_SHA256}') or null"
        )
    return digest


def verify_sha256(path: Path, expected, where: str | None = None) -> str:
    """The file's sha256; NucleisegError when `expected` is set and differs (or is malformed)."""
    digest = normalize_sha256(expected)
    actual = sha256sum(path)
    if digest is not None and actual != digest:
        raise NucleisegError(
            f"{where or path}: sha256 is {actual}, but data.sha256 expects {digest}; "
            "the file is a different or damaged copy: fetch it again, or fix data.sha256"
        )
    return actual


def _offline_hint(file_id: str, expected: str | None) -> str:
    """What to do without Drive: fetch the zip by hand and point data.source at it, or go synthetic."""
    homework = file_id == HOMEWORK_DRIVE_ID
    digest = expected or (HOMEWORK_SHA256 if homework else None)
    command = f"dvc exp run -S data.source=/path/to/{HOMEWORK_ZIP_NAME if homework else 'the-file.zip'}"
    if digest:
        command += f" -S data.sha256={digest}"
    command += " -S model.weights=none"  # offline, the pretrained weights cannot be downloaded either
    return (
        f"download the zip yourself from https://drive.google.com/file/d/{file_id}, then run "
        f"`{command}` (a GPU job; on a CPU: scripts/quickstart /path/to/the.zip), or use data.source=synthetic for the offline demo"
    )


def _check_reachable(endpoint: tuple[str, int], file_id: str, expected: str | None) -> None:
    try:
        with socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise NucleisegError(
            f"cannot reach Google Drive ({endpoint[0]}:{endpoint[1]}: {reason}); offline? {_offline_hint(file_id, expected)}"
        ) from None


def download_drive(file_id: str, out_path: Path, endpoint: tuple[str, int] | None = None, expected_sha256: str | None = None) -> Path:
    """Download a public Drive file with gdown (progress bar on stderr)."""
    _check_reachable(endpoint or DRIVE_ENDPOINT, file_id, expected_sha256)
    import gdown

    hint = _offline_hint(file_id, expected_sha256)
    try:
        result = gdown.download(id=file_id, output=str(out_path), quiet=False)
    except Exception as exc:  # gdown raises many types (FileURLRetrievalError, requests errors)
        first = str(exc).splitlines()[0] if str(exc) else ""
        first = first.replace(str(out_path.parent), "<temp>")
        raise NucleisegError(f"Google Drive download of {file_id} failed ({type(exc).__name__}: {first}); {hint}") from None
    if result is None or not out_path.is_file():
        raise NucleisegError(f"Google Drive download of {file_id} failed; {hint}")
    return out_path


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member must not be extracted, judged from its entry alone; None when fine."""
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        return "escapes the target folder; refusing to extract this archive"
    if (info.external_attr >> 16) & 0o170000 == _S_IFLNK:
        return "is a symbolic link; links are not extracted: re-create the zip without them (zip without --symlinks)"
    if info.flag_bits & 0x1:
        return "is encrypted; use a zip without a password"
    if info.file_size > MAX_MEMBER_BYTES:
        return (
            f"unpacks to {_size(info.file_size)}, over the {_size(MAX_MEMBER_BYTES)} limit per file "
            "(nucleiseg.data.download.MAX_MEMBER_BYTES); refusing a possible zip bomb"
        )
    if info.file_size >= RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        return (
            f"unpacks {_size(info.compress_size)} to {_size(info.file_size)}, more than {MAX_RATIO}:1 "
            "(nucleiseg.data.download.MAX_RATIO); refusing a possible zip bomb"
        )
    return None


def _check_members(infos: list[zipfile.ZipInfo], where: str) -> None:
    if not infos:
        raise NucleisegError(f"{where}: the zip is empty; expected train/, test/ and test_img_ids.json (optionally inside dataset/)")
    if len(infos) > MAX_MEMBERS:
        raise NucleisegError(f"{where}: {len(infos)} members, over the limit of {MAX_MEMBERS} (nucleiseg.data.download.MAX_MEMBERS); refusing this archive")
    total = 0
    for info in infos:
        problem = _member_problem(info)
        if problem:
            raise NucleisegError(f"{where}: member {info.filename!r} {problem}")
        total += info.file_size
    if total > MAX_TOTAL_BYTES:
        raise NucleisegError(
            f"{where}: unpacks to {_size(total)} in all, over the {_size(MAX_TOTAL_BYTES)} limit "
            "(nucleiseg.data.download.MAX_TOTAL_BYTES); refusing a possible zip bomb"
        )


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, total: int, where: str) -> int:
    """Stream one member to `dest`, counting bytes (declared sizes can lie); returns the new total."""
    written = 0
    with zf.open(info) as src, open(dest, "wb") as dst:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            total += len(chunk)
            if written > info.file_size or written > MAX_MEMBER_BYTES:
                raise NucleisegError(
                    f"{where}: member {info.filename!r} unpacks to more than its declared {_size(info.file_size)} "
                    f"(or over the {_size(MAX_MEMBER_BYTES)} limit per file); refusing a damaged or hostile zip"
                )
            if total > MAX_TOTAL_BYTES:
                raise NucleisegError(
                    f"{where}: member {info.filename!r} takes the unpacked size over the {_size(MAX_TOTAL_BYTES)} limit "
                    "(nucleiseg.data.download.MAX_TOTAL_BYTES); refusing a possible zip bomb"
                )
            dst.write(chunk)
    return total


def safe_extract(archive: Path, target: Path, where: str | None = None) -> None:
    """Extract a zip into `target`: members checked first (paths, links, sizes), bytes counted while writing.

    `where` names the zip in messages (default: its path).
    """
    archive, target = Path(archive), Path(target)
    where = where or str(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise NucleisegError(f"{where}: not a zip file (a Drive quota/HTML page?); download it again or use a local copy") from None
    except OSError as exc:
        raise NucleisegError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    with zf:
        infos = zf.infolist()
        _check_members(infos, where)
        target.mkdir(parents=True, exist_ok=True)
        made = {target}
        total = 0
        for info in infos:
            # Names were checked (no absolute path, drive or '..'; no links): dest stays inside target.
            parts = [p for p in PurePosixPath(info.filename.replace("\\", "/")).parts if p not in ("", ".")]
            if not parts:
                continue
            dest = target.joinpath(*parts)
            try:
                folder = dest if info.is_dir() else dest.parent
                if folder not in made:
                    folder.mkdir(parents=True, exist_ok=True)
                    made.add(folder)
                if not info.is_dir():
                    total = _extract_member(zf, info, dest, total, where)
            except NotImplementedError as exc:
                raise NucleisegError(f"{where}: member {info.filename!r}: {exc}; re-create the zip with deflate compression") from None
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise NucleisegError(
                        f"{where}: no space left on the disk while extracting member {info.filename!r}; "
                        f"free about {_size(sum(i.file_size for i in infos))} next to the output folder"
                    ) from None
                raise NucleisegError(f"{where}: member {info.filename!r} cannot be extracted ({exc.strerror or exc}); the zip is damaged, fetch it again") from None
            except (zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as exc:
                # Bad CRC, truncated data (zlib.error is an Exception subclass: caught below).
                raise NucleisegError(f"{where}: member {info.filename!r} cannot be extracted ({exc}); the zip is damaged, fetch it again") from None
            except NucleisegError:
                raise
            except Exception as exc:  # zlib.error, lzma.LZMAError, ...
                raise NucleisegError(
                    f"{where}: member {info.filename!r} cannot be extracted ({type(exc).__name__}: {exc}); the zip is damaged, fetch it again"
                ) from None


def dataset_root(folder: Path, where: str | None = None) -> Path:
    """The folder holding train/ (accepts a top-level 'dataset/' or any single wrapping folder).

    `where` names the folder in messages (default: its path), e.g. the zip it came from.
    """
    folder = Path(folder)
    if (folder / "train").is_dir():
        return folder
    children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("__MACOSX", "."))] if folder.is_dir() else []
    if len(children) == 1 and (children[0] / "train").is_dir():
        return children[0]
    raise NucleisegError(
        f"{where or folder}: no train/ folder found; expected train/, test/ and test_img_ids.json, at the top or inside one folder such as dataset/"
    )


def _copy_folder(source: Path, dest: Path) -> Path:
    """Copy a dataset folder, refusing links and special files; returns the source's dataset root."""
    src_root = dataset_root(source)
    if dest.resolve().is_relative_to(src_root.resolve()):
        raise NucleisegError(f"{src_root}: the output is built inside this dataset folder (in {dest.parent.parent}); keep the output outside data.source")
    if src_root != source and src_root.is_symlink():
        raise NucleisegError(
            f"{src_root}: a symbolic link inside the dataset folder {source}; point data.source at {src_root.resolve()} instead"
        )

    def unreadable(err: OSError) -> None:
        raise NucleisegError(f"{err.filename or src_root}: cannot read it ({err.strerror or err}); fix its permissions")

    for dirpath, dirnames, filenames in os.walk(src_root, onerror=unreadable):
        here = Path(dirpath)
        target = dest / here.relative_to(src_root)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(dirnames + filenames):
            path = here / name
            try:
                mode = path.lstat().st_mode
            except OSError as exc:
                unreadable(exc)
            if stat.S_ISLNK(mode):
                raise NucleisegError(
                    f"{path}: a symbolic link (-> {os.readlink(path)}) inside the dataset folder {src_root}; "
                    "links are not followed: replace it with a copy of what it points to (cp -L), or remove it"
                )
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise NucleisegError(f"{path}: not a regular file (a pipe, socket or device) inside the dataset folder {src_root}; remove it")
        for name in sorted(filenames):
            try:
                shutil.copyfile(here / name, target / name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise NucleisegError(f"{here / name}: no space left on the disk while copying the dataset folder; free some space next to the output folder") from None
                raise NucleisegError(f"{here / name}: cannot copy it ({exc.strerror or exc})") from None
    return src_root


def _relabel(exc: NucleisegError, root: Path, name_for) -> NucleisegError:
    """Rewrite the temp paths under `root` in a message as the names the user can find."""
    pattern = re.compile(re.escape(str(root)) + r"((?:/[^\s:;,'\"()]+)*)")
    return NucleisegError(pattern.sub(lambda m: name_for(m.group(1).lstrip("/")), str(exc)))


def _validate(root: Path, name_for) -> int:
    """Check the layout and every image and mask (all training images, whatever the split later holds out,
    and the test images; PNG masks to their last byte without decoding, the tile stage decodes them);
    messages name the source, not the temp copy."""
    from nucleiseg.data.layout import check_dataset

    try:
        return check_dataset(root, decode=False)
    except NucleisegError as exc:
        raise _relabel(exc, root, name_for) from None


def _source_kind(source: str) -> tuple[str, str | None, Path | None]:
    """('synthetic' | 'gdrive' | 'zip' | 'folder', Drive id, local path); a missing local path fails here."""
    if source == "synthetic":
        return "synthetic", None, None
    file_id = drive_file_id(source)
    if file_id is not None:
        return "gdrive", file_id, None
    local = Path(os.path.expanduser(source))
    if not local.exists():
        raise NucleisegError(f"data.source: {local} does not exist; give a zip, a dataset folder, a gdrive:<id>, or 'synthetic'")
    if local.is_dir():
        return "folder", None, local
    if not local.is_file():
        raise NucleisegError(f"data.source: {local} is neither a zip file nor a folder; give a zip, a dataset folder, a gdrive:<id>, or 'synthetic'")
    return "zip", None, local


def fetch_dataset(source: str, out_dir: str | Path, sha256: str | None = None, synthetic_options: dict | None = None) -> Path:
    """Put the dataset named by `source` into `out_dir` (replacing it), atomically.

    `out_dir/SOURCE.json` records the source's label (describe_source) and, for zips, their sha256.
    """
    out_dir = Path(out_dir)
    source = str(source).strip()
    expected = normalize_sha256(sha256)
    kind, file_id, local = _source_kind(source)
    if expected is not None and kind in ("synthetic", "folder"):
        what = "'synthetic'" if kind == "synthetic" else f"the folder {local}"
        raise NucleisegError(
            f"data.sha256 is set but data.source is {what}: a checksum applies to a zip only; "
            "remove data.sha256 (-S data.sha256=null) or point data.source at the zip"
        )
    record = {"source": describe_source(source), "kind": kind}
    with atomic_path(out_dir) as tmp:
        work = tmp.parent  # the locked temp folder: scratch space, removed afterwards
        try:
            if kind == "synthetic":
                from nucleiseg.data.synthetic import generate_dataset

                root = generate_dataset(work / "synthetic" / "dataset", **(synthetic_options or {}))
                n_test = _validate(root, lambda rel: f"synthetic dataset {rel}")
            elif kind == "folder":
                root = work / "copy"
                src_root = _copy_folder(local, root)
                n_test = _validate(root, lambda rel: str(src_root / rel) if rel else str(src_root))
            else:
                if kind == "gdrive":
                    where = f"Google Drive file {file_id}"
                    archive = download_drive(file_id, work / "download.zip", expected_sha256=expected)
                else:
                    where, archive = str(local), local
                record["sha256"] = verify_sha256(archive, expected, where)
                extracted = work / "extracted"
                safe_extract(archive, extracted, where)
                if kind == "gdrive":
                    archive.unlink()
                root = dataset_root(extracted, where)
                prefix = root.relative_to(extracted).as_posix()
                n_test = _validate(root, lambda rel: f"{where} member {'/'.join(p for p in (prefix, rel) if p and p != '.') or '/'}")
            (root / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            os.replace(root, tmp)
        except NucleisegError as exc:
            if str(work) in str(exc):  # a temp path the user cannot find: name the output instead
                raise NucleisegError(str(exc).replace(str(work), f"{out_dir} (temp copy)")) from None
            raise
    from nucleiseg.data.layout import train_ids

    log.info("dataset ready in %s from %s (%d training images, %d test images)", out_dir, record["source"], len(train_ids(out_dir)), n_test)
    return out_dir
