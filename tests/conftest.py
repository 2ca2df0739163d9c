"""Shared fixtures: tiny synthetic data laid out like the pipeline's, tiny model settings, an isolated MLflow store.

Data fixtures are session-scoped and read-only: a test that writes copies them first (`repo` does).

    tiny_raw        data/raw of 3 synthetic 96x96 training images (+1 test image)
    tiny_split      {"train": [2 names], "val": [1 name]}, as the tile stage writes data/split.json
    tiny_data       a folder with data/raw, data/split.json, data/tiles (64 px windows, overlap 24: 8 train windows)
    tiny_tiles      tiny_data's data/tiles (holds train/)
    tiny_params     a checked Params for that data: resnet18 without weights, few proposals and
                    detections, 2 epochs of 1 window, no augmentation, CPU, val every epoch
    make_params     tiny_params with overrides: make_params(train={"epochs": 3}, backbone="resnet34")
    tiny_model_cfg  tiny_params.model (a ModelConfig)
    mlflow_store    cwd and DVC_ROOT = tmp_path, so `tracking` keeps its store in tmp_path/mlruns
    repo            mlflow_store plus a writable copy of tiny_data and params.yaml = tiny_params
    closed_port     a local port nothing listens on (offline Drive tests)

Test tiers: `python -m pytest -q` runs everything; `python -m pytest -q -m "not slow"` is the
unit tier (tests over ~3 s are marked `slow`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

from nucleiseg.core.config import ModelConfig, Params, params_from_dict
from nucleiseg.data.layout import split_ids, train_ids
from nucleiseg.data.synthetic import generate_dataset
from nucleiseg.data.tile_store import write_split

REPO = Path(__file__).resolve().parents[1]

# Two cores on the CI machine: more threads only fight over them.
torch.set_num_threads(2)

TINY_SIZE = 96  # synthetic image side
TINY_WINDOW, TINY_OVERLAP = 64, 24  # 2 x 2 windows per image

# The one copy of the tiny settings. Few RoIs: the mask head dominates a CPU step.
TINY_PARAMS = {
    "backbone": "resnet18",
    "seed": 0,
    "device": "cpu",
    "data": {"source": "synthetic", "val_images": 1,
             "synthetic": {"n_train": 3, "n_test": 1, "size": TINY_SIZE, "radius_range": [4, 10]}},
    "tile": {"size": TINY_WINDOW, "overlap": TINY_OVERLAP, "min_visible": 0.3},
    "model": {
        "weights": "none", "input_scale": 1.0,  # unscaled: CPU speed, and windows stay their own size
        "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 200,
        "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 200,
        "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 16, "detections_per_img": 20,
    },
    "train": {
        "epochs": 2, "batch_size": 1, "samples_per_epoch": 1, "lr": 1.0e-4, "warmup_iters": 2, "lr_milestones": [],
        "amp": "off", "channels_last": False, "workers": 0, "val_every": 1,
        "augment": {"crop": 0, "scale": [1.0, 1.0], "flip": False, "rot90": False, "color_jitter": 0.0},
    },
    "infer": {"window": TINY_WINDOW, "overlap": TINY_OVERLAP, "batch_size": 4},
    "evaluate": {"max_dets_all": 100, "overlays": 1},
}


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_params_dict(**overrides) -> dict:
    """params.yaml-shaped dict of the tiny settings, with nested overrides merged in."""
    return _merge(TINY_PARAMS, overrides)


@pytest.fixture(scope="session")
def make_params():
    """make_params(**overrides) -> checked Params (overrides are merged section by section)."""

    def make(**overrides) -> Params:
        return params_from_dict(tiny_params_dict(**overrides), "tiny params")

    return make


@pytest.fixture(scope="session")
def tiny_params(make_params) -> Params:
    return make_params()


@pytest.fixture(scope="session")
def tiny_model_cfg(tiny_params) -> ModelConfig:
    return tiny_params.model


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A read-only folder with data/raw (3 train + 1 test image), data/split.json and data/tiles/train/."""
    root = tmp_path_factory.mktemp("tiny_data")
    syn = TINY_PARAMS["data"]["synthetic"]
    raw = generate_dataset(root / "data" / "raw", n_train=syn["n_train"], n_test=syn["n_test"], size=syn["size"],
                           seed=TINY_PARAMS["seed"], radius_range=tuple(syn["radius_range"]))
    split = split_ids(train_ids(raw), TINY_PARAMS["data"]["val_images"], TINY_PARAMS["seed"])
    write_split(raw, split["train"], root / "data" / "tiles", "train", TINY_WINDOW, TINY_OVERLAP, 0.3)
    (root / "data" / "split.json").write_text(json.dumps(split))
    return root


@pytest.fixture(scope="session")
def tiny_raw(tiny_data) -> Path:
    return tiny_data / "data" / "raw"


@pytest.fixture(scope="session")
def tiny_split(tiny_data) -> dict:
    return json.loads((tiny_data / "data" / "split.json").read_text())


@pytest.fixture(scope="session")
def tiny_tiles(tiny_data) -> Path:
    """The tile dataset folder (holds train/index.json and the windows)."""
    return tiny_data / "data" / "tiles"


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once, as when offline."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """tmp_path as the repository root (cwd and DVC_ROOT): `tracking` keeps its store in tmp_path/mlruns.

    No MLFLOW_TRACKING_URI comes in from outside, and none leaks out: `tracking.configure`
    exports one into this process (mlflow.set_tracking_uri), undone afterwards.
    """
    import mlflow

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    if mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED")
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def repo(mlflow_store, tiny_data, tiny_params) -> Path:
    """A writable pipeline folder: data/raw, data/split.json, data/tiles and params.yaml (= tiny_params);
    cwd and DVC_ROOT point at it and MLflow is isolated (see mlflow_store)."""
    shutil.copytree(tiny_data / "data", mlflow_store / "data")
    (mlflow_store / "params.yaml").write_text(yaml.safe_dump(tiny_params.as_dict(), sort_keys=False))
    return mlflow_store


def stage_env(root: Path) -> dict:
    """Environment for running a stage script as DVC would, in `root`: this checkout's library,
    DVC_ROOT = root, no tracking URI from outside."""
    env = {**os.environ, "DVC_ROOT": str(root), "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="session")
def stage_environment():
    """stage_env as a fixture: stage_environment(root) -> env dict for subprocess stages."""
    return stage_env
