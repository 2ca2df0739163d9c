"""Checkpoints that cost nothing per epoch (issue 16): a periodic policy, a stop on SIGTERM/SIGINT that checkpoints
first, the best weights in their own file, and writes on a background thread that never overlap."""

import os
import signal
import threading

import pytest
import torch
from test_training import TinyDetector, train_set

from nucleiseg.core.errors import Interrupted, NucleisegError, main_guard
from nucleiseg.train import checkpoint as checkpoint_module
from nucleiseg.train import loop as engine
from nucleiseg.train import stage as training
from nucleiseg.train.checkpoint import Checkpointer, load_checkpoint

CPU = torch.device("cpu")


class Recording(Checkpointer):
    """A Checkpointer that notes the epoch of every checkpoint it is asked to write."""

    def __init__(self, path):
        super().__init__(path)
        self.saved: list[int] = []
        self.copied: list[bool] = []

    def save(self, checkpoint, best_state, copy=True):
        self.saved.append(checkpoint["epoch"])
        self.copied.append(copy)
        super().save(checkpoint, best_state, copy)


@pytest.fixture
def cfg(make_params):
    def make(**overrides):
        return make_params(train={"epochs": 5, "lr": 1e-2, **overrides}).train

    return make


@pytest.mark.parametrize(
    "every, seconds, saved",
    [(2, 0, [2, 4, 5]), (0, 0, [5]), (3, 3600, [3, 5]), (0, 1e-6, [1, 2, 3, 4, 5])],
    ids=["every-2", "only-the-last", "every-3-or-an-hour", "every-microsecond"],
)
def test_checkpoint_policy(tiny_tiles, tmp_path, cfg, every, seconds, saved):
    """Every `checkpoint_every` epochs, at the first epoch end `checkpoint_seconds` after the previous one, and at the last epoch."""
    checkpointer = Recording(tmp_path / "run.pt")
    engine.fit(TinyDetector(), train_set(tiny_tiles, 1), cfg(checkpoint_every=every, checkpoint_seconds=seconds), CPU, seed=0,
               checkpointer=checkpointer, show_progress=False)
    assert checkpointer.saved == saved
    assert checkpointer.copied == [True] * (len(saved) - 1) + [False]  # the last is written from the live tensors: nothing runs after it
    assert load_checkpoint(tmp_path / "run.pt")["epoch"] == 5


class SignalledDetector(TinyDetector):
    """Sends itself `signals` SIGTERMs during the forward pass of `at_step` (one step per epoch: epoch = step)."""

    def __init__(self, at_step: int, signals: int = 1, seed: int = 0):
        super().__init__(seed)
        self.at_step, self.signals, self.steps = at_step, signals, 0

    def forward(self, images, targets=None):
        self.steps += 1
        if self.steps == self.at_step:
            for _ in range(self.signals):
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(images, targets)


def test_sigterm_finishes_the_epoch_checkpoints_it_and_the_resumed_run_is_exact(tiny_tiles, tmp_path, cfg):
    """SIGTERM in epoch 2 of 4 with no periodic checkpoint due: epoch 2 ends, is checkpointed, the loop stops;
    the resumed run trains epochs 3-4 and ends with the weights of an uninterrupted run, bit for bit."""
    config = cfg(epochs=4, checkpoint_every=0, checkpoint_seconds=0)
    straight = TinyDetector()
    engine.fit(straight, train_set(tiny_tiles, 1), config, CPU, seed=0, show_progress=False)

    before = signal.getsignal(signal.SIGTERM)
    checkpointer = Recording(tmp_path / "run.pt")
    with pytest.raises(KeyboardInterrupt):
        engine.fit(SignalledDetector(at_step=2), train_set(tiny_tiles, 1), config, CPU, seed=0, checkpointer=checkpointer, show_progress=False)
    assert signal.getsignal(signal.SIGTERM) is before  # the stage's own handling is back
    assert checkpointer.saved == [2] and checkpointer.copied == [False] and load_checkpoint(tmp_path / "run.pt")["epoch"] == 2
    assert checkpointer.resume_hint(4).endswith("running the stage again resumes from epoch 3")

    seen = []
    resumed = TinyDetector(seed=7)
    engine.fit(resumed, train_set(tiny_tiles, 1), config, CPU, seed=0, checkpointer=Checkpointer(tmp_path / "run.pt"),
               on_epoch_end=seen.append, show_progress=False)
    assert [row["epoch"] for row in seen] == [3, 4]
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_second_signal_stops_at_once(tiny_tiles, tmp_path, cfg):
    """Two SIGTERMs in epoch 3: no more work, the checkpoint on disk stays epoch 2's (checkpoint_every 1)."""
    checkpointer = Recording(tmp_path / "run.pt")
    with pytest.raises(KeyboardInterrupt):
        engine.fit(SignalledDetector(at_step=3, signals=2), train_set(tiny_tiles, 1), cfg(checkpoint_every=1), CPU, seed=0,
                   checkpointer=checkpointer, show_progress=False)
    assert checkpointer.saved == [1, 2] and load_checkpoint(tmp_path / "run.pt")["epoch"] == 2


def _checkpoint(epoch: int, best_epoch: int, weights: torch.Tensor) -> dict:
    return {"model": {"w": weights}, "optimizer": {}, "scheduler": {}, "scaler": None, "epoch": epoch, "history": [],
            "best": {"epoch": best_epoch, "metric": 0.5, "loss": 1.0}, "run": {"mlflow_run_id": "abc"}}


def test_writes_run_in_the_background_from_a_copy_one_at_a_time(tmp_path, monkeypatch):
    """save() returns before the file is written; the file holds the values at save() even if the live tensors change
    afterwards; a second save waits for the first; the best file is written before the checkpoint that names it, and
    the best file of an older epoch goes once a checkpoint names a newer one."""
    real_save = checkpoint_module._save
    gate = threading.Event()
    writing, peak, order = [], [0], []

    def gated_save(obj, path):
        writing.append(path)
        peak[0] = max(peak[0], len(writing))
        gate.wait(30)
        real_save(obj, path)
        order.append(path.name)
        writing.remove(path)

    monkeypatch.setattr(checkpoint_module, "_save", gated_save)
    checkpointer = Checkpointer(tmp_path / "run.pt")
    live = torch.zeros(3)
    checkpointer.save(_checkpoint(1, 1, live), {"w": torch.full((3,), 7.0)})
    live += 1  # the next training step
    assert not (tmp_path / "run.pt").exists(), "save() waited for the write"
    threading.Timer(0.3, gate.set).start()
    checkpointer.save(_checkpoint(2, 2, live), {"w": torch.full((3,), 8.0)})  # waits for the first write
    checkpointer.wait()
    assert peak[0] == 1
    assert order == ["run.best-1.pt", "run.pt", "run.best-2.pt", "run.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.best-2.pt", "run.pt"]
    ckpt, best = Checkpointer(tmp_path / "run.pt").load()
    assert ckpt["epoch"] == 2 and torch.equal(ckpt["model"]["w"], torch.ones(3)) and torch.equal(best["w"], torch.full((3,), 8.0))
    assert Checkpointer(tmp_path / "run.pt").summary() == {"epoch": 2, "run": {"mlflow_run_id": "abc"}}


def test_an_unchanged_best_epoch_is_not_written_again(tmp_path, monkeypatch):
    written = []
    real_save = checkpoint_module._save
    monkeypatch.setattr(checkpoint_module, "_save", lambda obj, path: (written.append(path.name), real_save(obj, path)))
    checkpointer = Checkpointer(tmp_path / "run.pt")
    checkpointer.save(_checkpoint(1, 0, torch.zeros(1)), None)  # no best epoch yet (before the first validation)
    checkpointer.save(_checkpoint(2, 2, torch.zeros(1)), {"w": torch.ones(1)})
    checkpointer.save(_checkpoint(3, 2, torch.zeros(1)), {"w": torch.ones(1)})
    checkpointer.wait()
    assert written == ["run.pt", "run.best-2.pt", "run.pt", "run.pt"]


def test_a_failed_write_is_one_error_line_at_the_next_wait(tmp_path, monkeypatch):
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_save", full_disk)
    checkpointer = Checkpointer(tmp_path / "run.pt")
    checkpointer.save(_checkpoint(1, 0, torch.zeros(1)), None)
    with pytest.raises(NucleisegError, match="No space left on device") as info:
        checkpointer.wait()
    assert str(tmp_path / "run.pt") in str(info.value) and "\n" not in str(info.value)
    checkpointer.wait()  # reported once


def test_remove_deletes_the_checkpoint_and_its_best_file(tmp_path):
    checkpointer = Checkpointer(tmp_path / "run.pt")
    checkpointer.save(_checkpoint(3, 2, torch.zeros(1)), {"w": torch.ones(1)})
    (tmp_path / "other.pt").write_bytes(b"another training's file")
    checkpointer.remove()
    assert [p.name for p in tmp_path.iterdir()] == ["other.pt"]


def test_interrupted_line_says_whether_there_is_something_to_resume(tmp_path, capsys):
    checkpointer = Checkpointer(tmp_path / "run.pt")
    assert checkpointer.resume_hint(80).startswith("nothing to resume")
    checkpointer.save(_checkpoint(12, 10, torch.zeros(1)), {"w": torch.ones(1)})
    checkpointer.wait()
    assert checkpointer.resume_hint(80) == f"epoch 12 is checkpointed in {tmp_path / 'run.pt'}: running the stage again resumes from epoch 13"
    assert "without training" in checkpointer.resume_hint(12)

    @main_guard
    def stage():
        raise Interrupted(checkpointer.resume_hint(80))

    with pytest.raises(SystemExit) as info:
        stage()
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == f"error: interrupted; {checkpointer.resume_hint(80)}"


def test_checkpoint_file_is_keyed_by_the_training_params_only(make_params, tiny_data):
    """Two experiments that train differently (queued side by side) get different files; a setting train does not read shares one."""
    inputs = training.TrainInputs(tiles=tiny_data / "data/tiles", split=tiny_data / "data/split.json", raw=tiny_data / "data/raw")
    base = training.checkpoint_path(make_params(), inputs)
    assert training.checkpoint_path(make_params(seed=1), inputs) != base
    assert training.checkpoint_path(make_params(train={"lr": 3e-4}), inputs) != base
    assert training.checkpoint_path(make_params(backbone="resnet34"), inputs) != base
    assert training.checkpoint_path(make_params(evaluate={"overlays": 3}), inputs) == base
