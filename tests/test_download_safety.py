"""fetch_dataset refuses unsafe sources with one `error:` line and leaves nothing behind.

Folder sources with links or special files, zips with link members, bombs (declared and
actual sizes), empty zips, malformed or misplaced data.sha256, the offline Drive hint;
plus describe_source and the SOURCE.json record.
"""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nucleiseg.data.download as download
from nucleiseg.core.errors import NucleisegError, main_guard
from nucleiseg.data.download import (
    describe_source,
    fetch_dataset,
    sha256sum,
    verify_sha256,
)
from nucleiseg.data.layout import load_test_index, train_ids
from nucleiseg.data.synthetic import generate_dataset

SMALL = {"n_train": 2, "n_test": 1, "size": 48, "radius_range": (3, 8), "seed": 0}
HOMEWORK_SHA = "0081bdbc5554573c7a9fe38360d604224f23a864f49a77d32c764f6e38f10e84"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("src") / "dataset", **SMALL)


def _files(folder: Path) -> list[tuple[str, Path]]:
    return [(p.relative_to(folder.parent).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]


def _zip_with(path: Path, dataset: Path, extra=()) -> Path:
    """The dataset under dataset/ plus extra members: (ZipInfo | name, bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, p in _files(dataset):
            zf.write(p, name)
        for info, data in extra:
            zf.writestr(info, data)
    return path


def one_line_error(capsys, func, *args, **kwargs) -> str:
    """Run `func` the way a stage does (main_guard): exit 2 with exactly one `error:` line."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as info:
            main_guard(lambda: func(*args, **kwargs))()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    line = errors[0]
    assert ".tmp-" not in line and "extracted/" not in line, line  # never a temp staging path
    return line


def nothing_left(out: Path, parent_existed: bool = False) -> None:
    assert not out.exists()
    if not parent_existed:
        assert not out.parent.exists(), "a parent folder this run created was left behind"
    else:
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


# ---------------------------------------------------------------- folder sources


def _copy_dataset(dataset: Path, dest: Path) -> Path:
    for rel, p in _files(dataset):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    return dest / "dataset"


def test_folder_with_dangling_symlink(dataset, tmp_path, capsys):
    src = _copy_dataset(dataset, tmp_path / "src")
    link = src / "train" / "synth-train-000" / "masks" / "dangling.png"
    link.symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "work" / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(src), out)
    assert str(link) in line and "symbolic link" in line and "cp -L" in line
    nothing_left(out)


def test_folder_with_symlink_to_outside_folder(dataset, tmp_path, capsys):
    src = _copy_dataset(dataset, tmp_path / "src")
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "id_rsa").write_text("do not copy me")
    link = src / "test" / "more"
    link.symlink_to(secret, target_is_directory=True)
    out = tmp_path / "work" / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(src), out)
    assert str(link) in line and str(secret) in line
    nothing_left(out)
    assert not (tmp_path / "work").exists()  # nothing copied, no parent folder left


def test_folder_with_symlinked_file_inside_is_refused_too(dataset, tmp_path, capsys):
    src = _copy_dataset(dataset, tmp_path / "src")
    image = src / "test" / "synth-test-000.png"
    (src / "copy.png").write_bytes(image.read_bytes())
    image.unlink()
    image.symlink_to(src / "copy.png")
    out = tmp_path / "raw"
    line = one_line_error(capsys, fetch_dataset, str(src), out)
    assert str(image) in line
    nothing_left(out, parent_existed=True)


def test_folder_with_fifo(dataset, tmp_path, capsys):
    src = _copy_dataset(dataset, tmp_path / "src")
    fifo = src / "test" / "pipe.png"
    os.mkfifo(fifo)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(src), out)
    assert str(fifo) in line and "not a regular file" in line
    nothing_left(out)


def test_folder_source_may_itself_be_a_link(dataset, tmp_path):
    src = _copy_dataset(dataset, tmp_path / "src")
    link = tmp_path / "linked-dataset"
    link.symlink_to(src, target_is_directory=True)
    out = tmp_path / "raw"
    fetch_dataset(str(link), out)
    assert train_ids(out) == train_ids(dataset)


def test_folder_whose_dataset_folder_is_a_link(dataset, tmp_path, capsys):
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "dataset").symlink_to(_copy_dataset(dataset, tmp_path / "src"), target_is_directory=True)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(wrapper), out)
    assert line.startswith(f"error: {wrapper / 'dataset'}: a symbolic link inside the dataset folder {wrapper}; point data.source at ")
    nothing_left(out)


def test_output_inside_the_source_folder(dataset, tmp_path, capsys):
    src = _copy_dataset(dataset, tmp_path / "src")
    out = src / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(src), out)
    assert line.startswith(f"error: {src}: the output is built inside this dataset folder")
    nothing_left(out)


def test_folder_validation_names_the_source_folder(dataset, tmp_path, capsys):
    src = _copy_dataset(dataset, tmp_path / "src")
    (src / "test_img_ids.json").unlink()
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(src), out)
    assert f"error: {src / 'test_img_ids.json'}: missing" in line
    nothing_left(out)


# ---------------------------------------------------------------- zip sources


def _symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (0o120777 << 16)
    return info


def test_zip_symlink_member(dataset, tmp_path, capsys):
    archive = _zip_with(tmp_path / "links.zip", dataset, [(_symlink_member("dataset/test/evil.png", "/etc/passwd"), b"/etc/passwd")])
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line == (
        f"error: {archive}: member 'dataset/test/evil.png' is a symbolic link; links are not extracted: "
        "re-create the zip without them (zip without --symlinks)"
    )
    nothing_left(out)


def test_zip_over_total_limit_is_refused_before_extracting(dataset, tmp_path, capsys, monkeypatch):
    archive = _zip_with(tmp_path / "data.zip", dataset)
    total = sum(i.file_size for i in zipfile.ZipFile(archive).infolist())
    monkeypatch.setattr(download, "MAX_TOTAL_BYTES", total - 1)
    written = []
    monkeypatch.setattr(download, "_extract_member", lambda *a, **k: written.append(a))
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line.startswith(f"error: {archive}: unpacks to ") and "MAX_TOTAL_BYTES" in line and "zip bomb" in line
    assert not written, "declared sizes must be checked before anything is extracted"
    nothing_left(out)


def test_zip_member_over_size_limit(dataset, tmp_path, capsys, monkeypatch):
    archive = _zip_with(tmp_path / "data.zip", dataset, [("dataset/big.bin", os.urandom(100_000))])
    monkeypatch.setattr(download, "MAX_MEMBER_BYTES", 50_000)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line.startswith(f"error: {archive}: member 'dataset/big.bin' unpacks to 97.7 KiB, over the 48.8 KiB limit per file "
        "(nucleiseg.data.download.MAX_MEMBER_BYTES); refusing a possible zip bomb")
    nothing_left(out)


def _bomb(path: Path, dataset: Path, size: int) -> Path:
    """The dataset plus one member of `size` zero bytes, streamed (deflate: about 1000:1)."""
    _zip_with(path, dataset)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("dataset/zeros.bin", "w", force_zip64=True) as fh:
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                fh.write(block)
    return path


def test_zip_bomb_with_default_limits(dataset, tmp_path, capsys):
    """The issue's case: a ~212 KB zip holding a 200 MB member; refused by its ratio, nothing written."""
    archive = _bomb(tmp_path / "bomb.zip", dataset, 200 << 20)
    assert archive.stat().st_size < 400_000
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line.startswith(f"error: {archive}: member 'dataset/zeros.bin' unpacks ")
    assert "200.0 MiB" in line and "MAX_RATIO" in line
    nothing_left(out)


def test_zip_ratio_limit_spares_small_members(dataset, tmp_path, monkeypatch):
    """A 2 MiB member of zeros (ratio ~500:1) is fine below RATIO_MIN_BYTES, refused above it."""
    archive = _bomb(tmp_path / "zeros.zip", dataset, 2 << 20)
    out = tmp_path / "raw"
    fetch_dataset(str(archive), out)
    assert (out / "zeros.bin").stat().st_size == 2 << 20
    monkeypatch.setattr(download, "RATIO_MIN_BYTES", 1 << 20)
    with pytest.raises(NucleisegError, match="MAX_RATIO"):
        fetch_dataset(str(archive), tmp_path / "raw2")


def _shrink_declared_size(archive: Path, name: str, new_size: int) -> None:
    """Make the central directory (and local header) under-declare a member's unpacked size."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    raw = bytearray(archive.read_bytes())
    encoded = name.encode()
    # Central directory record: signature, ..., uncompressed size at offset 24, name at 46.
    pos = raw.find(b"PK\x01\x02" + bytes(0))
    while pos != -1:
        name_len = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + name_len] == encoded:
            struct.pack_into("<I", raw, pos + 24, new_size)
            break
        pos = raw.find(b"PK\x01\x02", pos + 4)
    else:
        raise AssertionError("member not found")
    struct.pack_into("<I", raw, info.header_offset + 22, new_size)
    archive.write_bytes(bytes(raw))


def test_zip_with_lying_declared_size(dataset, tmp_path, capsys):
    archive = _zip_with(tmp_path / "liar.zip", dataset, [("dataset/test/liar.png", bytes(300_000))])
    _shrink_declared_size(archive, "dataset/test/liar.png", 10)
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("dataset/test/liar.png").file_size == 10
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line.startswith(f"error: {archive}: member 'dataset/test/liar.png' cannot be extracted")
    nothing_left(out)


def test_extraction_counts_bytes_even_if_the_reader_does_not(dataset, tmp_path, capsys, monkeypatch):
    """If a member's stream yields more than its declared size, extraction stops at once."""
    archive = _zip_with(tmp_path / "data.zip", dataset)
    real_open = zipfile.ZipFile.open

    def open_longer(self, member, *args, **kwargs):
        if isinstance(member, zipfile.ZipInfo) and member.filename.endswith("test_img_ids.json"):
            return io.BytesIO(bytes(member.file_size + 5 * (1 << 20)))
        return real_open(self, member, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_longer)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line.startswith(f"error: {archive}: member 'dataset/test_img_ids.json' unpacks to more than its declared ")
    nothing_left(out)


def test_extraction_counts_the_total(dataset, tmp_path, capsys, monkeypatch):
    archive = _zip_with(tmp_path / "data.zip", dataset)
    infos = zipfile.ZipFile(archive).infolist()
    declared = sum(i.file_size for i in infos)
    checks = iter([None])

    # The declared total passes; then the limit drops below it (as if the declared sizes lied).
    real_check = download._check_members

    def check_then_lower(infos, where):
        real_check(infos, where)
        next(checks)
        monkeypatch.setattr(download, "MAX_TOTAL_BYTES", declared // 2)

    monkeypatch.setattr(download, "_check_members", check_then_lower)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert "takes the unpacked size over the" in line and "MAX_TOTAL_BYTES" in line
    nothing_left(out)


def test_empty_zip(tmp_path, capsys):
    archive = tmp_path / "empty.zip"
    zipfile.ZipFile(archive, "w").close()
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line == f"error: {archive}: the zip is empty; expected train/, test/ and test_img_ids.json (optionally inside dataset/)"
    nothing_left(out)


@pytest.mark.parametrize("members", [["dataset/"], ["dataset/readme.txt"], ["a/train/x.png", "b/train/y.png"]])
def test_zip_without_train_folder_names_the_zip(tmp_path, capsys, members):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in members:
            zf.writestr(name, "" if name.endswith("/") else "hi")
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line.startswith(f"error: {archive}: no train/ folder found; expected train/, test/ and test_img_ids.json")
    nothing_left(out)


def test_zip_validation_names_the_member(dataset, tmp_path, capsys):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, p in _files(dataset):
            if not name.endswith("test_img_ids.json"):
                zf.write(p, name)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line.startswith(f"error: {archive} member dataset/test_img_ids.json: missing")
    nothing_left(out)


def test_zip_encrypted_member(dataset, tmp_path, capsys):
    archive = _zip_with(tmp_path / "data.zip", dataset, [("dataset/secret.txt", b"x")])
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("dataset/secret.txt")
    central = raw.rfind(b"PK\x01\x02")  # the last central record is the extra member's
    struct.pack_into("<H", raw, central + 8, struct.unpack_from("<H", raw, central + 8)[0] | 1)
    struct.pack_into("<H", raw, info.header_offset + 6, struct.unpack_from("<H", raw, info.header_offset + 6)[0] | 1)
    archive.write_bytes(bytes(raw))
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line == f"error: {archive}: member 'dataset/secret.txt' is encrypted; use a zip without a password"
    nothing_left(out)


# ---------------------------------------------------------------- broken images and masks (whatever the split)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _save_array(shape):
    return lambda path: Image.fromarray(np.full(shape, 255, np.uint8)).save(path)


# case: (file under dataset/, how it is broken, what the error line says after the member's name)
BROKEN = {
    "truncated image": ("train/synth-train-001/images/synth-train-001.png", _truncate, "unreadable or truncated image"),
    "missing image": ("train/synth-train-001/images/synth-train-001.png", lambda p: p.rename(p.with_name("other.png")),
                      "image not found"),
    "truncated mask": ("train/synth-train-001/masks/mask_0002.png", _truncate, "unreadable or truncated image"),
    "wrong-size mask": ("train/synth-train-001/masks/mask_0002.png", _save_array((20, 30)),
                        "mask is 30x20 but its image is 48x48; masks must match their image size"),
    "truncated test image": ("test/synth-test-000.png", _truncate, "unreadable or truncated image"),
    "test image of another size": ("test/synth-test-000.png", _save_array((40, 48, 3)),
                                   "image is 48x40 but test_img_ids.json lists 48x48"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_image_or_mask_is_refused_naming_the_member(dataset, tmp_path, capsys, case):
    """Every training image is checked (the tile stage's split later holds some out as val images, which
    nothing else reads before training) and every test image: one line naming the zip member, nothing written."""
    rel, breaks, says = BROKEN[case]
    src = _copy_dataset(dataset, tmp_path / "src")
    breaks(src / rel)
    archive = _zip_with(tmp_path / "data.zip", src)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out)
    assert line.startswith(f"error: {archive} member dataset/{rel}: {says}"), line
    nothing_left(out)


def test_broken_mask_in_a_folder_source_names_the_source_file(dataset, tmp_path, capsys):
    src = _copy_dataset(dataset, tmp_path / "src")
    _truncate(src / "train/synth-train-000/masks/mask_0001.png")
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(src), out)
    assert line.startswith(f"error: {src / 'train/synth-train-000/masks/mask_0001.png'}: unreadable or truncated image"), line
    nothing_left(out)


# ---------------------------------------------------------------- data.sha256


@pytest.mark.parametrize("value", [12345, True, 1.5, "abc", "0" * 63, "0" * 65, "g" * 64, "", ["0" * 64]])
def test_verify_sha256_refuses_malformed_values(tmp_path, value):
    target = tmp_path / "f.zip"
    target.write_bytes(b"x")
    with pytest.raises(NucleisegError) as info:
        verify_sha256(target, value)
    message = str(info.value)
    assert message.startswith(f"data.sha256 = {value!r} is not a SHA-256: give the zip's 64 hex characters in quotes")
    assert "\n" not in message


def test_malformed_sha256_fails_before_any_work(dataset, tmp_path, capsys):
    archive = _zip_with(tmp_path / "data.zip", dataset)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out, sha256=123)
    assert line.startswith("error: data.sha256 = 123 is not a SHA-256")
    nothing_left(out)


def test_verify_sha256_returns_the_digest(tmp_path):
    target = tmp_path / "f.zip"
    target.write_bytes(b"abc")
    digest = sha256sum(target)
    assert verify_sha256(target, None) == digest
    assert verify_sha256(target, "SHA256:" + digest.upper()) == digest


def test_sha256_for_a_folder_source(dataset, tmp_path, capsys):
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(dataset), out, sha256=HOMEWORK_SHA)
    assert line == (
        f"error: data.sha256 is set but data.source is the folder {dataset}: a checksum applies to a zip only; "
        "remove data.sha256 (-S data.sha256=null) or point data.source at the zip"
    )
    nothing_left(out)


def test_sha256_for_synthetic(tmp_path, capsys):
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, "synthetic", out, sha256=HOMEWORK_SHA, synthetic_options=dict(SMALL))
    assert line == (
        "error: data.sha256 is set but data.source is 'synthetic': a checksum applies to a zip only; "
        "remove data.sha256 (-S data.sha256=null) or point data.source at the zip"
    )
    nothing_left(out)


def test_sha256_mismatch_names_the_zip(dataset, tmp_path, capsys):
    archive = _zip_with(tmp_path / "data.zip", dataset)
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, str(archive), out, sha256="f" * 64)
    assert line == (
        f"error: {archive}: sha256 is {sha256sum(archive)}, but data.sha256 expects {'f' * 64}; "
        "the file is a different or damaged copy: fetch it again, or fix data.sha256"
    )
    nothing_left(out)


# ---------------------------------------------------------------- offline Drive


def test_offline_drive_message(tmp_path, capsys, monkeypatch, closed_port):
    port = closed_port
    monkeypatch.setattr(download, "DRIVE_ENDPOINT", ("127.0.0.1", port))
    out = tmp_path / "data" / "raw"
    line = one_line_error(capsys, fetch_dataset, f"gdrive:{download.HOMEWORK_DRIVE_ID}", out)
    assert line == (
        f"error: cannot reach Google Drive (127.0.0.1:{port}: Connection refused); offline? "
        "download the zip yourself from https://drive.google.com/file/d/1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG, "
        "then run `dvc exp run -S data.source=/path/to/nuclei-hw3-train.zip "
        f"-S data.sha256={HOMEWORK_SHA} -S model.weights=none` (a GPU job; on a CPU: scripts/quickstart /path/to/the.zip), "
        "or use data.source=synthetic for the offline demo"
    )
    assert "../shared" not in line
    nothing_left(out)


def test_offline_drive_other_file_keeps_its_sha(tmp_path, monkeypatch, closed_port):
    monkeypatch.setattr(download, "DRIVE_ENDPOINT", ("127.0.0.1", closed_port))
    with pytest.raises(NucleisegError) as info:
        fetch_dataset("https://drive.google.com/file/d/abcdefghijklmn/view", tmp_path / "raw", sha256="A" * 64)
    message = str(info.value)
    assert "https://drive.google.com/file/d/abcdefghijklmn," in message
    assert f"-S data.source=/path/to/the-file.zip -S data.sha256={'a' * 64} -S model.weights=none`" in message
    assert HOMEWORK_SHA not in message


def test_offline_stage_like_run_leaves_no_data_folder(tmp_path, closed_port):
    """As `dvc repro` runs it: a fresh process, cwd = repo, data/ absent before and after."""
    code = (
        "import nucleiseg.data.download as d; from nucleiseg.core.errors import main_guard\n"
        f"d.DRIVE_ENDPOINT = ('127.0.0.1', {closed_port})\n"
        "main_guard(lambda: d.fetch_dataset(d.HOMEWORK_DRIVE_ID and 'gdrive:' + d.HOMEWORK_DRIVE_ID, 'data/raw'))()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach Google Drive"), result.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- describe_source, SOURCE.json


@pytest.mark.parametrize(
    "source, label",
    [
        ("synthetic", "synthetic"),
        (" synthetic ", "synthetic"),
        ("gdrive:1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG", "gdrive:1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG"),
        ("gdown:abcdefghijkl", "gdrive:abcdefghijkl"),
        ("https://drive.google.com/file/d/1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG/view?usp=sharing", "gdrive:1nEJ7NTtHcCHNQqUXaoPk55VH3Uwh4QGG"),
        ("https://drive.google.com/drive/my-drive", "gdrive"),
        ("/home/someone/Downloads/very/long/path/nuclei-hw3-train.zip", "nuclei-hw3-train.zip"),
        ("../data/nuclei-hw3-train.zip", "nuclei-hw3-train.zip"),
        ("~/datasets/nuclei/", "nuclei"),
        ("/mnt/data/dataset", "dataset"),
    ],
)
def test_describe_source(source, label):
    assert describe_source(source) == label


def test_describe_source_of_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert describe_source(".") == tmp_path.name


def test_source_json_for_a_zip(dataset, tmp_path):
    archive = _zip_with(tmp_path / "nuclei-hw3-train.zip", dataset)
    out = tmp_path / "data" / "raw"
    fetch_dataset(str(archive), out)
    record = json.loads((out / "SOURCE.json").read_text())
    assert record == {"source": "nuclei-hw3-train.zip", "kind": "zip", "sha256": sha256sum(archive)}
    # Readers ignore it.
    assert train_ids(out) == ["synth-train-000", "synth-train-001"]
    assert [t.file_name for t in load_test_index(out)] == ["synth-test-000.png"]


def test_source_json_for_a_folder_and_synthetic(dataset, tmp_path):
    fetch_dataset(str(dataset), tmp_path / "a")
    assert json.loads((tmp_path / "a" / "SOURCE.json").read_text()) == {"source": "dataset", "kind": "folder"}
    fetch_dataset("synthetic", tmp_path / "b", synthetic_options=dict(SMALL))
    assert json.loads((tmp_path / "b" / "SOURCE.json").read_text()) == {"source": "synthetic", "kind": "synthetic"}
    assert train_ids(tmp_path / "b") == train_ids(dataset)
