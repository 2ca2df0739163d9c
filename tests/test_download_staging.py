"""io.atomic_path (and so fetch_dataset): stale temp folders of killed runs are cleared,
those of running stages are not, and a failed run leaves no parent folder it created."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nucleiseg.core.io as nio
from nucleiseg.core.io import LOCK_NAME, atomic_path, clear_stale_temps
from nucleiseg.data.download import fetch_dataset

SMALL = {"n_train": 1, "n_test": 1, "size": 32, "radius_range": (3, 6), "seed": 0}

HOLDER = """
import sys
from pathlib import Path
from nucleiseg.core.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.mkdir()
    (tmp / "part").write_text("being written")
    print(tmp.parent, flush=True)
    sys.stdin.readline()  # hold the temp folder until the test says so
    (tmp / "done").write_text("yes")
"""


def _start_holder(target: Path) -> tuple[subprocess.Popen, Path]:
    """A concurrently running 'stage' in the middle of building `target`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, "holder did not start"
    return proc, Path(line)


def _stale(parent: Path, name: str, suffix: str, with_lock: bool = True, age_s: float = 0.0) -> Path:
    """A temp folder as a SIGKILLed run leaves it: half-written content and an unheld lock file."""
    folder = parent / f".{name}.tmp-{suffix}"
    (folder / name).mkdir(parents=True)
    (folder / name / "half.json").write_text("{")
    if with_lock:
        (folder / LOCK_NAME).write_text("12345\n")
    if age_s:
        old = time.time() - age_s
        for path in (folder / name / "half.json", folder / name, folder):
            os.utime(path, (old, old))
    return folder


def test_atomic_path_clears_stale_siblings_but_not_live_ones(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    target = data / "tiles"
    live_proc, live = _start_holder(target)
    try:
        stale = _stale(data, "tiles", "killed01")
        legacy = _stale(data, "tiles", "legacy01", with_lock=False, age_s=2 * nio.STALE_UNLOCKED_AGE_S)
        young_unlocked = _stale(data, "tiles", "young001", with_lock=False)  # may be one being set up right now
        other_target = _stale(data, "raw", "killed02")  # another stage's temp: not ours to judge
        similar = _stale(data, "tiles.tmp-x", "killed03")  # '.tiles.tmp-x.tmp-…' is a different target
        assert live.is_dir() and (live / LOCK_NAME).is_file()

        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "train.json").write_text("[]")

        assert not stale.exists() and not legacy.exists()
        assert live.is_dir() and (live / "tiles" / "part").is_file()
        assert young_unlocked.is_dir() and other_target.is_dir() and similar.is_dir()
        assert (target / "train.json").read_text() == "[]"
    finally:
        live_proc.communicate("go\n", timeout=30)
    assert live_proc.returncode == 0
    assert not live.exists()  # the live run finished and published
    assert (target / "done").read_text() == "yes"


def test_temp_folder_of_a_sigkilled_run_is_cleared_next_time(tmp_path):
    target = tmp_path / "data" / "tiles"
    proc, killed = _start_holder(target)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stdin.close()
    assert killed.is_dir(), "SIGKILL runs no cleanup: the temp folder stays"
    assert clear_stale_temps(target) == [killed]
    assert not killed.exists()


def test_clear_stale_temps_ignores_links_and_files(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (tmp_path / ".out.tmp-link0001").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / ".out.tmp-file0001").write_text("a file")
    assert clear_stale_temps(tmp_path / "out") == []
    assert (elsewhere / "keep.txt").is_file() and (tmp_path / ".out.tmp-file0001").is_file()


def test_fetch_dataset_clears_stale_download_staging(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    stale = _stale(data, "raw", "killed01")
    (stale / "extracted").mkdir()
    (stale / "download.zip").write_bytes(b"PK" + bytes(1000))
    fetch_dataset("synthetic", data / "raw", synthetic_options=dict(SMALL))
    assert not stale.exists()
    assert (data / "raw" / "train").is_dir()
    assert sorted(p.name for p in data.iterdir()) == ["raw"]


def test_fetch_dataset_keeps_a_running_download(tmp_path):
    target = tmp_path / "data" / "raw"
    proc, live = _start_holder(target)
    try:
        fetch_dataset("synthetic", target, synthetic_options=dict(SMALL))
        assert live.is_dir()
        assert json.loads((target / "SOURCE.json").read_text())["source"] == "synthetic"
    finally:
        proc.communicate("go\n", timeout=30)


def test_failure_removes_parents_it_created(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_parents_that_existed_or_filled_up(tmp_path):
    (tmp_path / "a").mkdir()
    target = tmp_path / "a" / "b" / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target):
            (tmp_path / "a" / "other.txt").write_text("someone else's")
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["other.txt"]


def test_success_publishes_and_leaves_only_the_output(tmp_path):
    target = tmp_path / "x" / "out"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("1")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["out"]
    assert not (target / LOCK_NAME).exists()


def test_folder_replaces_a_file_or_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("k")
    link = tmp_path / "out"
    link.symlink_to(elsewhere, target_is_directory=True)
    with atomic_path(link) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("n")
    assert not link.is_symlink() and (link / "new").is_file()
    assert (elsewhere / "keep").is_file()
