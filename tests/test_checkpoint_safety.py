"""Model and checkpoint files never run code when loaded, and a damaged one is one clear error (issue 12).

A `.pt` is a pickle: a crafted one runs whatever its `__reduce__` names at load time unless
it is loaded with weights_only=True. Each loader gets a booby-trapped file whose payload
would write a marker file; the marker must never appear and the loader must answer with a
NucleisegError. The trap is checked to work (an unrestricted torch.load springs it), so the
test cannot pass by accident.
"""

import dataclasses
from pathlib import Path

import pytest
import torch

from nucleiseg.core.config import InferConfig
from nucleiseg.core.errors import NucleisegError
from nucleiseg.model.maskrcnn import (
    MODEL_FILE_FORMAT,
    build_model,
    load_trained,
    load_weights_file,
    model_file,
)
from nucleiseg.train.checkpoint import load_checkpoint


class Payload:
    """Unpickling this calls open(marker, 'w'): the file appears if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_cfg):
    torch.manual_seed(0)
    return build_model(tiny_model_cfg)


# The payload is refused while unpickling, before any tensor is used: a few small tensors stand in
# for the weights (a whole state dict is ~100 MB to write per file).
STATE = {"backbone.body.conv1.weight": torch.ones(2, 3), "roi_heads.box_predictor.cls_score.bias": torch.zeros(2)}


def _trapped_files(folder: Path, cfg, state: dict) -> dict[str, tuple[Path, Path]]:
    """name -> (file, marker): the formats each loader expects, each with a payload inside."""
    files = {}

    def trap(name: str, make) -> None:
        marker = folder / f"{name}.marker"
        path = folder / f"{name}.pt"
        torch.save(make(Payload(marker)), path)
        files[name] = (path, marker)

    config = dataclasses.asdict(cfg)
    trap("model_file", lambda p: {"format": MODEL_FILE_FORMAT, "model": {**state, "evil": p}, "model_config": config, "best_epoch": 1})
    trap("model_config", lambda p: {"format": MODEL_FILE_FORMAT, "model": state, "model_config": {**config, "anchor_sizes": p}})
    trap("state_dict", lambda p: {**state, "evil": p})
    trap("checkpoint", lambda p: {"model": state, "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [],
                                  "best": {"epoch": 1, "metric": 0.0, "loss": 1.0, "state": None}, "run": {"x": p}})
    trap("bare_payload", lambda p: p)
    return files


@pytest.fixture
def trapped(tmp_path, tiny_model_cfg):
    return _trapped_files(tmp_path, tiny_model_cfg, STATE)


def _assert_one_line_refusal(exc_info, path: Path) -> None:
    message = str(exc_info.value)
    assert "\n" not in message, message
    assert str(path) in message


def test_the_trap_works(trapped):
    path, marker = trapped["bare_payload"]
    torch.load(path, weights_only=False)  # what an unrestricted load does
    assert marker.is_file()


@pytest.mark.parametrize("name", ["model_file", "model_config", "state_dict", "bare_payload"])
def test_load_trained_never_runs_the_payload(trapped, name):
    path, marker = trapped[name]
    with pytest.raises(NucleisegError) as info:
        load_trained(path)
    assert not marker.exists()
    _assert_one_line_refusal(info, path)


@pytest.mark.parametrize("name", ["model_file", "state_dict", "bare_payload"])
def test_load_weights_file_never_runs_the_payload(trapped, tiny_model, tiny_model_cfg, name):
    path, marker = trapped[name]
    with pytest.raises(NucleisegError) as info:
        load_weights_file(tiny_model, path)
    assert not marker.exists()
    _assert_one_line_refusal(info, path)
    # model.weights=<file> goes the same way.
    with pytest.raises(NucleisegError):
        build_model(dataclasses.replace(tiny_model_cfg, weights=str(path)))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["checkpoint", "bare_payload"])
def test_load_checkpoint_never_runs_the_payload(trapped, name):
    path, marker = trapped[name]
    with pytest.raises(NucleisegError) as info:
        load_checkpoint(path)
    assert not marker.exists()
    _assert_one_line_refusal(info, path)


# ----------------------------------------------------------------------------- damaged files


def _damaged(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 8, "empty": b"",
             "flipped": data[:100] + bytes(b ^ 0xFF for b in data[100:300]) + data[300:]}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(content)
    return out


@pytest.fixture
def damaged(tmp_path, tiny_model_cfg):
    good = tmp_path / "good.pt"
    torch.save(model_file(STATE, tiny_model_cfg, best_epoch=1, infer=InferConfig()), good)
    return _damaged(tmp_path, good)


@pytest.mark.parametrize("name", ["truncated", "garbage", "empty", "flipped"])
def test_damaged_files_are_one_clear_error(damaged, tiny_model, name):
    path = damaged[name]
    loaders = {
        "load_trained": lambda: load_trained(path),
        "load_weights_file": lambda: load_weights_file(tiny_model, path),
        "load_checkpoint": lambda: load_checkpoint(path),
    }
    for loader, call in loaders.items():
        with pytest.raises(NucleisegError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message, (loader, message)
        assert str(path) in message, (loader, message)
        # A damaged file is not a booby-trapped one: the message must not send the user hunting for
        # malicious code when the file is merely broken.
        assert "could run code" not in message, (loader, message)
        assert "weights_only" not in message, (loader, message)  # torch's advice to load it unrestricted
