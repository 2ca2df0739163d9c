"""Several trainings on one machine (issue 16): a training owns its checkpoint through a lock file, and
`train.workers: auto` splits the cores between the trainings running under the repository."""

import os
import subprocess
import sys
import textwrap

import pytest

from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.runtime import DistInfo
from nucleiseg.train import concurrency as running
from nucleiseg.train.concurrency import (
    CONCURRENT_ENV,
    concurrent_trainings,
    running_trainings,
    training_lock,
)
from nucleiseg.train.stage import loader_workers


def test_a_second_training_with_the_same_checkpoint_is_refused(tmp_path):
    checkpoint = tmp_path / "train-abc.pt"
    with training_lock(checkpoint):
        assert (tmp_path / "train-abc.lock").is_file()
        with pytest.raises(NucleisegError, match="another training with the same params and data is running") as info:
            with training_lock(checkpoint):
                pass
        assert "\n" not in str(info.value) and "train-abc.pt" in str(info.value)
        with training_lock(tmp_path / "train-other.pt"):  # other params: its own file, no conflict
            assert running_trainings(tmp_path) == 2
    assert list(tmp_path.iterdir()) == []
    with training_lock(checkpoint):  # free again
        pass


def test_a_lock_held_by_another_process_counts_and_a_dead_ones_does_not(tmp_path, stage_environment):
    holder = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from nucleiseg.train.concurrency import training_lock
        with training_lock(Path(sys.argv[1])):
            print("holding", flush=True)
            sys.stdin.read()
        """
    )
    (tmp_path / "train-stale.lock").write_text("")  # left by a killed training: nobody holds it
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "train-live.pt")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=stage_environment(tmp_path))
    try:
        assert proc.stdout.readline().strip() == "holding"
        assert running_trainings(tmp_path) == 1
        with pytest.raises(NucleisegError, match="another training"):
            with training_lock(tmp_path / "train-live.pt"):
                pass
    finally:
        proc.communicate("", timeout=60)
    assert running_trainings(tmp_path) == 0


def test_concurrent_trainings_is_the_declared_or_the_running_count(tmp_path, monkeypatch):
    monkeypatch.delenv(CONCURRENT_ENV, raising=False)
    assert concurrent_trainings(tmp_path / "missing") == 1
    with training_lock(tmp_path / "a.pt"), training_lock(tmp_path / "b.pt"):
        assert concurrent_trainings(tmp_path) == 2
        monkeypatch.setenv(CONCURRENT_ENV, "4")
        assert concurrent_trainings(tmp_path) == 4
        monkeypatch.setenv(CONCURRENT_ENV, "1")
        assert concurrent_trainings(tmp_path) == 2  # more are running than declared
    for bad in ("two", "0", "-1", "1.5"):
        monkeypatch.setenv(CONCURRENT_ENV, bad)
        with pytest.raises(NucleisegError, match=CONCURRENT_ENV):
            concurrent_trainings(tmp_path)


@pytest.mark.parametrize("trainings, world, expected", [(1, 1, 12), (2, 1, 7), (4, 1, 3), (2, 2, 3), (16, 1, 0)])
def test_auto_workers_split_the_cores(tmp_path, monkeypatch, trainings, world, expected):
    """16 cores: each of N trainings (x its DDP processes) gets 16 // N - 1 loader workers, at most 12."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setenv(CONCURRENT_ENV, str(trainings))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    assert loader_workers("auto", tmp_path, DistInfo(world_size=world)) == expected
    assert loader_workers(5, tmp_path, DistInfo()) == 5  # a number is taken as is


def test_without_flock_each_training_counts_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(running, "fcntl", None)
    monkeypatch.delenv(CONCURRENT_ENV, raising=False)
    with training_lock(tmp_path / "a.pt"):
        assert concurrent_trainings(tmp_path) == 1
