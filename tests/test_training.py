"""Training engine and the train stage's job: it learns, resumes exactly, stops on NaN, logs to MLflow, runs under DDP."""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nucleiseg import engine, training
from nucleiseg.config import AugmentConfig, ModelConfig, TrainConfig, load_params
from nucleiseg.data import load_train_sample, split_ids, train_ids
from nucleiseg.dataset import TileDataset
from nucleiseg.errors import NucleisegError
from nucleiseg.model import build_model, load_trained
from nucleiseg.synthetic import generate_dataset
from nucleiseg.tiling import tile_split

torch.set_num_threads(2)

SMALL_MODEL = dict(
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=200, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200,
    box_batch_size_per_image=16, detections_per_img=20,  # few RoIs: the mask head dominates a CPU step
)
NO_AUGMENT = dict(crop=0, scale=[1.0, 1.0], flip=False, rot90=False, color_jitter=0.0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """3 synthetic 96x96 images -> 2 train + 1 val, cut into 64 px windows (overlap 24): 8 train, 4 val windows."""
    root = tmp_path_factory.mktemp("data")
    raw = generate_dataset(root / "raw", n_train=3, n_test=1, size=96, radius_range=(4, 10))
    split = split_ids(train_ids(raw), 1, 0)
    tiles_dir = root / "tiles"
    for name, names in split.items():
        tile_split((load_train_sample(raw, n) for n in names), tiles_dir, name, 64, 24, 0.3)
    split_file = root / "split.json"
    split_file.write_text(json.dumps(split))
    return tiles_dir, split_file


@pytest.fixture(scope="module")
def tiles_one_val(tiles, tmp_path_factory):
    """The same tiles with a single val window (validation is most of a tiny run's time on CPU)."""
    tiles_dir, split_file = tiles
    copy_dir = tmp_path_factory.mktemp("tiles1") / "tiles"
    shutil.copytree(tiles_dir, copy_dir)
    doc = json.loads((copy_dir / "val.json").read_text())
    keep = next(img for img in doc["images"] if any(a["image_id"] == img["id"] for a in doc["annotations"]))
    doc["images"] = [keep]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] == keep["id"]]
    (copy_dir / "val.json").write_text(json.dumps(doc))
    return copy_dir, split_file


@pytest.fixture
def mlflow_home(tmp_path, monkeypatch):
    """MLflow store under tmp (tracking resolves it from DVC_ROOT); no tracking URI leaking between tests."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exported it in-process


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="resnet18", weights="none", **SMALL_MODEL))


def train_cfg(**overrides) -> TrainConfig:
    values = dict(epochs=2, batch_size=2, optimizer="adam", lr=1e-4, warmup_iters=2, lr_drop_epoch=0, amp=False,
                  device="cpu", workers=0, samples_per_epoch=2, augment=AugmentConfig(**NO_AUGMENT))
    values.update(overrides)
    return TrainConfig(**values)


def train_set(tiles_dir, n_windows: int | None = None) -> TileDataset:
    """The train windows; with n_windows, the first that hold nuclei (window 1 of the fixture has none)."""
    ds = TileDataset(tiles_dir, "train", AugmentConfig(**NO_AUGMENT), seed=0)
    if n_windows is not None:
        ds.images = [img for img in ds.images if ds.annotations[img["id"]]][:n_windows]
    return ds


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=0), key


def test_tile_fixture_shape(tiles):
    tiles_dir, _ = tiles
    assert len(TileDataset(tiles_dir, "train")) == 8
    assert len(TileDataset(tiles_dir, "val")) == 4
    ds = train_set(tiles_dir, 2)
    for image, target in (ds[0], ds[1]):
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        assert target["boxes"].shape[0] == target["masks"].shape[0] > 0
        assert target["masks"].shape[1:] == (64, 64)


def losses_of(result) -> list[float]:
    losses = [row["train_loss"] for row in result.history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    return losses


def test_overfits_one_window_loss_halves_in_10_steps(tiles):
    """10 Adam steps (lr 1e-4, the project default) on one window: mean of the last 3 losses < first loss / 2.

    lr 1e-3 is unstable from scratch (the loss jumps 5 -> 38 by step 3), so the default lr is used.
    """
    tiles_dir, _ = tiles
    cfg = train_cfg(epochs=10, batch_size=1, samples_per_epoch=1, lr=1e-4)
    losses = losses_of(engine.fit(small_model(), train_set(tiles_dir, 1), None, cfg, CPU, seed=0, show_progress=False))
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < losses[0] / 2, losses


@pytest.mark.slow
def test_overfits_two_windows_loss_falls_below_a_third_in_30_steps(tiles):
    """30 Adam steps (lr 1e-4) on the same 2 windows, batch 2: mean of the last 3 losses < first loss / 3."""
    tiles_dir, _ = tiles
    cfg = train_cfg(epochs=30, batch_size=2, samples_per_epoch=2, lr=1e-4)
    result = engine.fit(small_model(), train_set(tiles_dir, 2), None, cfg, CPU, seed=0, show_progress=False)
    losses = losses_of(result)
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < losses[0] / 3, losses
    assert result.best_epoch >= 20  # without val windows the lowest train loss wins, near the end


RESUME_CFG = dict(epochs=2, batch_size=1, samples_per_epoch=1, lr=1e-4)


@pytest.fixture(scope="module")
def straight_run(tiles, tmp_path_factory):
    """2 epochs (1 step each) without interruption: the reference for the resume tests."""
    tiles_dir, _ = tiles
    ckpt = tmp_path_factory.mktemp("straight") / "a.pt"
    model = small_model()
    result = engine.fit(model, train_set(tiles_dir), None, train_cfg(**RESUME_CFG), CPU, seed=0, checkpoint_path=ckpt, show_progress=False)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    return result, model.state_dict()


def test_resume_replays_exactly(tiles, tmp_path, straight_run):
    """1 epoch to a checkpoint, then a fresh model resumed to epoch 2 == 2 epochs straight (weights, losses, best)."""
    tiles_dir, _ = tiles
    straight, straight_state = straight_run
    ckpt = tmp_path / "b.pt"
    first = engine.fit(small_model(), train_set(tiles_dir), None, train_cfg(**{**RESUME_CFG, "epochs": 1}), CPU, seed=0, checkpoint_path=ckpt, show_progress=False)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    assert first.history[0]["train_loss"] == pytest.approx(straight.history[0]["train_loss"], abs=1e-6)

    model = small_model(seed=99)  # a different init: everything must come from the checkpoint
    resumed = engine.fit(model, train_set(tiles_dir), None, train_cfg(**RESUME_CFG), CPU, seed=0, checkpoint_path=ckpt, show_progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[1]["train_loss"] == pytest.approx(straight.history[1]["train_loss"], abs=1e-6)
    assert resumed.history[1]["lr"] == pytest.approx(straight.history[1]["lr"])
    assert_same_state(model.state_dict(), straight_state)
    assert resumed.best_epoch == straight.best_epoch
    assert_same_state(resumed.best_state, straight.best_state)


class KilledInEpoch(TileDataset):
    """Dies on its first sample of `kill_epoch`: a run killed mid-epoch, after the previous epoch's checkpoint."""

    kill_epoch = 2

    def __getitem__(self, index):
        if self.epoch == self.kill_epoch:
            raise KeyboardInterrupt("killed (simulated)")
        return super().__getitem__(index)


def test_killed_run_resumes_from_last_checkpoint(tiles, tmp_path, straight_run):
    tiles_dir, _ = tiles
    _, straight_state = straight_run
    ckpt = tmp_path / "run.pt"
    killed = KilledInEpoch(tiles_dir, "train", AugmentConfig(**NO_AUGMENT), seed=0)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(small_model(), killed, None, train_cfg(**RESUME_CFG), CPU, seed=0, checkpoint_path=ckpt, show_progress=False)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"], "atomic save left a temp folder"

    seen = []
    model = small_model(seed=7)
    engine.fit(model, train_set(tiles_dir), None, train_cfg(**RESUME_CFG), CPU, seed=0, checkpoint_path=ckpt, on_epoch_end=seen.append, show_progress=False)
    assert [row["epoch"] for row in seen] == [2]
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    assert_same_state(model.state_dict(), straight_state)


class NanModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets=None):
        return {"loss_mask": self.weight * float("nan"), "loss_classifier": self.weight * 0.5}


def test_non_finite_loss_stops_training(tiles, tmp_path):
    tiles_dir, _ = tiles
    ckpt = tmp_path / "nan.pt"
    seen = []
    with pytest.raises(NucleisegError, match="non-finite") as info:
        engine.fit(NanModel(), train_set(tiles_dir), None, train_cfg(epochs=2), CPU, seed=0, checkpoint_path=ckpt, on_epoch_end=seen.append, show_progress=False)
    assert "loss_mask=nan" in str(info.value) and "train.lr" in str(info.value)
    assert not ckpt.exists() and seen == []


def train_params(**train_overrides) -> dict:
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params = copy.deepcopy(params)
    params["backbone"] = "resnet18"
    params["model"].update(weights="none", **SMALL_MODEL)
    params["train"].update(epochs=2, batch_size=1, workers=0, samples_per_epoch=1, device="cpu", warmup_iters=2,
                           lr=1e-4, lr_drop_epoch=0, augment=dict(NO_AUGMENT), **train_overrides)
    return params


def outputs(root: Path) -> training.TrainOutputs:
    return training.TrainOutputs(model=root / "models/model.pt", run=root / "models/run.json",
                                 metrics=root / "metrics/train.json", curves=root / "plots/train.csv")


def test_run_training_logs_a_complete_mlflow_run(tiles_one_val, mlflow_home):
    import mlflow
    from mlflow.tracking import MlflowClient

    tiles_dir, split_file = tiles_one_val
    out = outputs(mlflow_home)
    params = train_params()
    metrics = training.run_training(params, tiles_dir, split_file, outputs=out, show_progress=False)

    # Outputs on disk.
    assert metrics["epochs"] == 2 and metrics["best_epoch"] in (1, 2)
    assert json.loads(out.metrics.read_text()) == metrics
    curves = out.curves.read_text().splitlines()
    assert curves[0].split(",")[:4] == ["epoch", "train_loss", "val_loss", "val_ap50"] and len(curves) == 3
    saved = torch.load(out.model, weights_only=False)
    assert saved["model_config"]["backbone"] == "resnet18" and saved["best_epoch"] == metrics["best_epoch"]
    assert not training.checkpoint_path(params, split_file).exists(), "resume checkpoint left behind after success"

    # The model rebuilds from model.pt alone.
    model, ckpt = load_trained(out.model)
    assert not model.training
    assert_same_state(model.state_dict(), saved["model"])
    with torch.no_grad():
        (pred,) = model([torch.rand(3, 64, 64)])
    assert pred["boxes"].shape[0] <= SMALL_MODEL["detections_per_img"]

    # The MLflow run.
    run_info = json.loads(out.run.read_text())
    assert run_info["tracking_uri"].startswith("sqlite:///") and str(mlflow_home) in run_info["tracking_uri"]
    client = MlflowClient(run_info["tracking_uri"])
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "resnet18"
    assert float(run.data.params["train.lr"]) == pytest.approx(1e-4)
    assert run.data.params["model.weights"] == "none"
    assert run.data.params["train_windows"] == "8" and run.data.params["val_windows"] == "1"
    assert run.data.tags["backbone"] == "resnet18" and run.data.tags["device"] == "cpu"
    assert run.data.tags["torch"] == torch.__version__
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/window_ap50")) == [1, 2]
    assert "val/loss" in run.data.metrics and "lr" in run.data.metrics
    assert run.data.metrics["train/best_epoch"] == metrics["best_epoch"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert artifacts == {"weights/model.pt"}
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert plots and all(p.endswith(".png") for p in plots)

    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in logged] == [run.info.run_id]
    assert logged[0].name == "model"
    files = {a.path for a in client.list_logged_model_artifacts(logged[0].model_id)}
    assert "MLmodel" in files
    mlflow.set_tracking_uri(run_info["tracking_uri"])
    reloaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert_same_state(reloaded.state_dict(), saved["model"])


def test_crash_inside_the_run_marks_it_failed(tiles, mlflow_home, monkeypatch):
    from mlflow.tracking import MlflowClient

    from nucleiseg import tracking

    tiles_dir, split_file = tiles

    def crash(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(training, "fit", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        training.run_training(train_params(), tiles_dir, split_file, outputs=outputs(mlflow_home), show_progress=False)
    client = MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.params["backbone"] == "resnet18"
    assert not (mlflow_home / "models" / "model.pt").exists()
    assert not (mlflow_home / "models" / "run.json").exists()


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from nucleiseg import engine
    from nucleiseg.config import AugmentConfig, ModelConfig, TrainConfig
    from nucleiseg.dataset import TileDataset
    from nucleiseg.model import build_model

    tiles_dir, out_dir, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    small = json.loads(sys.argv[4])
    dist = engine.dist_info()
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(dist.rank)  # different init per rank: DDP must make them agree
    model = build_model(ModelConfig(backbone="resnet18", weights="none", **small))
    ds = TileDataset(tiles_dir, "train", None, 0)
    ds.images = ds.images[:4]  # 2 windows per rank: one step of batch 2 each
    ran = []
    ds.set_epoch = lambda epoch: (ran.append(epoch), TileDataset.set_epoch(ds, epoch))
    cfg = TrainConfig(epochs=epochs, batch_size=2, lr=1e-3, warmup_iters=1, lr_drop_epoch=0, amp=False, device="cpu", workers=0)
    result = engine.fit(model, ds, None, cfg, torch.device("cpu"), 0, out_dir / "ckpt.pt", dist=dist, show_progress=False)
    torch.save(model.state_dict(), out_dir / f"rank{dist.rank}-epochs{epochs}.pt")
    # One file per rank: two processes printing to one pipe can interleave mid-line.
    (out_dir / f"rank{dist.rank}-epochs{epochs}.json").write_text(json.dumps({"ran": ran, "history": [r["epoch"] for r in result.history]}))
    torch.distributed.destroy_process_group()
    """
)


def test_ddp_two_processes_gloo(tiles, tmp_path):
    """torchrun, 2 CPU processes: both finish, weights agree, rank 0 writes the checkpoint; a resumed run agrees too."""
    tiles_dir, _ = tiles
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for epochs in (1, 2):  # the second run resumes from the first's checkpoint on every rank
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
             str(tiles_dir), str(tmp_path), str(epochs), json.dumps(SMALL_MODEL)],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
        assert ckpt["epoch"] == epochs
        rank0 = torch.load(tmp_path / f"rank0-epochs{epochs}.pt")
        rank1 = torch.load(tmp_path / f"rank1-epochs{epochs}.pt")
        # Parameters agree; BN running statistics are per rank (DDP broadcasts rank 0's before each forward).
        params = lambda state: {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}  # noqa: E731
        assert_same_state(params(rank0), params(rank1))
        assert_same_state(rank0, ckpt["model"])
    for rank in (0, 1):  # the resumed run trained only epoch 2, and its history holds both epochs
        assert json.loads((tmp_path / f"rank{rank}-epochs2.json").read_text()) == {"ran": [2], "history": [1, 2]}


def test_lr_drops_at_the_start_of_lr_drop_epoch():
    """Epochs count from 1: with lr_drop_epoch=3 and 4 iterations an epoch, iterations 8+ (epoch 3) run at lr x factor."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = engine.build_scheduler(optimizer, train_cfg(lr=1.0, warmup_iters=0, lr_drop_epoch=3, lr_drop_factor=0.1), iters_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:8] == [1.0] * 8 and lrs[8:] == pytest.approx([0.1] * 4)
