"""The `nucleiseg` command: `predict` on any images with a trained model, `report` of the MLflow runs.

    nucleiseg predict IMAGE_OR_FOLDER... --model models/model.pt --out predictions/mine
    nucleiseg predict slides/ --model runs:/<run_id>/model --out out/ --window 512 --tta d4
    nucleiseg report --out reports/results.md [--baseline RECIPE]

`predict` goes through the same `Predictor` as the infer stage (windows, stitching, TTA), with
the infer settings the model was validated with (saved in its model file by the train stage) and
the flags on top; `--params FILE` takes a params file's `infer` section and `device` instead. The
params.yaml of the current folder is never read unless named.

Two thresholds, as in the pipeline:
- `predictions.json` holds every detection scored >= the detection floor (infer.score_floor
  of the settings above, 0.05 by default; --score-floor sets it), like the infer stage's
  predictions: COCO AP needs them all. Image ids are input positions 1..n.
- `<stem>_labels.tif` (uint16 instance labels, 0 = background) and `<stem>_overlay.png`
  (outlines) hold only the detections at the operating point: the score threshold the
  evaluate stage chose on val, read from `operating_point.json` next to the model file (for
  `runs:/<id>/...` the run's `operating_point.json` artifact). --score-threshold overrides it;
  without either, the detection floor is used and a warning says so. Label k is the
  image's k-th entry in predictions.json (best score first), so the label maps' detections
  are a prefix of each image's entries.
Also `images.json` (id, file_name, path, height, width) and `settings.json` (model, both
thresholds and where the label threshold came from, the infer settings and where they came
from, device). Large images show a progress bar per window.

Every input is read before anything is written; outputs are built in a temp folder and moved
into --out at the end, so a failure (one `error:` line, exit 2) leaves --out as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nucleiseg.core.errors import NucleisegError, main_guard, os_error_text

if TYPE_CHECKING:
    from nucleiseg.core.config import InferConfig

log = logging.getLogger("nucleiseg")
# The train stage's model file (its --model in dvc.yaml; a test keeps the two equal).
PIPELINE_MODEL = "models/model.pt"

MAX_LABEL = np.iinfo(np.uint16).max
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "file:", "s3://", "gs://", "http://", "https://", "dbfs:/")
# Flags that override the model's (or --params FILE's) `infer` settings: flag dest -> InferConfig field.
INFER_FLAGS = ("window", "overlap", "batch_size", "score_floor", "mask_threshold", "tta", "whole_image")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------- inputs


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files from files and folders (not recursive), in the order given; folders sorted by name.

    A named file is kept whatever its suffix (reading it decides); in folders only
    PNG/TIFF/JPEG files count. The same file named twice is kept once. A named path that
    does not exist is refused here, before anything else happens.
    """
    from nucleiseg.data.layout import IMAGE_SUFFIXES

    missing = [item for item in inputs if not Path(item).exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise NucleisegError(f"input not found: {shown}; nothing was written")
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                log.warning("%s: no PNG/TIFF/JPEG files in this folder", path)
        else:
            found = [path]
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    if not out:
        raise NucleisegError(f"no images in {' '.join(inputs)}; give PNG/TIFF/JPEG files or folders holding them")
    by_stem: dict[str, list[Path]] = {}
    for p in out:
        by_stem.setdefault(p.stem, []).append(p)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        shown = "; ".join(" and ".join(str(p) for p in paths) for paths in clashes[:3])
        raise NucleisegError(f"images share a name, so their outputs would overwrite each other: {shown}; predict them into separate --out folders")
    return out


def check_out(out_dir: Path, images: list[Path]) -> None:
    """--out is a folder (or will be one) that holds no input and can be written to.

    Outputs in a folder of inputs could overwrite one (slide.png's overlay is slide_overlay.png)
    and would be read back as inputs by the next run on that folder.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NucleisegError(f"--out {out_dir}: exists and is not a folder")
    out = out_dir.resolve()
    inside = [str(p) for p in images if p.resolve().parent == out]
    if inside:
        more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
        raise NucleisegError(f"--out {out_dir} holds input images ({', '.join(inside[:3])}{more}): outputs could overwrite them "
                             "and be read as inputs next time; choose an --out folder that holds no input")
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NucleisegError(f"--out {out_dir}: {existing} is not writable for this user; choose a folder you can write to")


def check_readable(images: list[Path], max_megapixels: float | None = None) -> list[tuple[int, int]]:
    """(height, width) of every image, each decoded once; any unreadable one -> one NucleisegError naming them all."""
    from nucleiseg.data.layout import read_rgb

    sizes, bad = [], []
    for path in images:
        try:
            sizes.append(read_rgb(path, max_megapixels).shape[:2])
        except NucleisegError as exc:
            bad.append(_one_line(exc) if str(path) in str(exc) else f"{path}: {_one_line(exc)}")
        except (OSError, ValueError, MemoryError) as exc:
            bad.append(f"{path}: unreadable ({type(exc).__name__}: {_one_line(exc)})")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise NucleisegError(f"{len(bad)} of {len(images)} input image(s) cannot be read, nothing was written: {'; '.join(bad[:3])}{more}")
    return sizes


# ---------------------------------------------------------------------------------------------- settings


def _checked_flag(cls, name: str, value, flag: str):
    """A flag value through the same check as its params.yaml key (config.py defines the limits once)."""
    check = {f.name: f for f in dataclasses.fields(cls)}[name].metadata["check"]
    try:
        return check(value)
    except ValueError as exc:
        raise NucleisegError(f"{flag} {value} is not allowed; expected {exc}") from None


@dataclasses.dataclass
class Settings:
    infer: object  # config.InferConfig: what the Predictor runs with (score_floor = the detection floor)
    device: str
    label_threshold: float | None  # --score-threshold, or None: the model's operating point decides
    source: str = "nucleiseg's defaults"  # where `infer` came from, for settings.json and the log


def _params_file(args):
    """The --params file's Params, or None when the flag is not given (params.yaml is never read unasked)."""
    from nucleiseg.core.config import read_params

    if args.params is None:
        return None
    path = Path(args.params)
    if not path.is_file():
        raise NucleisegError(f"{path}: not found; pass an existing --params file or leave it out")
    return read_params(path)


def _flag_values(args) -> dict:
    """The infer flags given, each through the same check as its params.yaml key."""
    from nucleiseg.core.config import InferConfig

    return {name: _checked_flag(InferConfig, name, getattr(args, name), "--" + name.replace("_", "-"))
            for name in INFER_FLAGS if getattr(args, name) is not None}


def check_flags(args) -> None:
    """Everything about the command line that can be checked before the model is loaded."""
    from nucleiseg.core.config import InferConfig, Params, params_from_dict

    _params_file(args)
    flags = _flag_values(args)
    if "window" in flags and "overlap" in flags:
        params_from_dict({"infer": {**dataclasses.asdict(InferConfig()), **flags}}, "nucleiseg predict flags")
    if args.device is not None:
        _checked_flag(Params, "device", args.device, "--device")
    if args.score_threshold is not None:
        _checked_flag(InferConfig, "score_floor", args.score_threshold, "--score-threshold")


def predict_device(args) -> str:
    """--device, else the --params file's `device`, else auto."""
    from nucleiseg.core.config import Params

    if args.device is not None:
        return _checked_flag(Params, "device", args.device, "--device")
    params = _params_file(args)
    return params.device if params is not None else "auto"


def infer_settings(args, saved: InferConfig, model: str) -> Settings:
    """The flags on top of the --params file's `infer` section when given, else of the infer settings
    `model` was validated with (`saved`, from its model file). All checked by config.py."""
    from nucleiseg.core.config import InferConfig, params_from_dict

    params = _params_file(args)
    if params is not None:
        base, source = dataclasses.asdict(params.infer), str(args.params)
    else:
        base, source = dataclasses.asdict(saved), f"the settings {model} was validated with"
    flags = _flag_values(args)
    if flags:
        source = f"{source} + nucleiseg predict flags"
    # Cross-checks (overlap < window) exactly as for params.yaml.
    infer_cfg = params_from_dict({"infer": {**base, **flags}}, source).infer
    device = predict_device(args)
    label_threshold = None
    if args.score_threshold is not None:
        label_threshold = _checked_flag(InferConfig, "score_floor", args.score_threshold, "--score-threshold")
    return Settings(infer_cfg, device, label_threshold, source)


# ---------------------------------------------------------------------------------------------- model


def is_mlflow_uri(model: str) -> bool:
    return model.startswith(MLFLOW_SCHEMES)


def load_model(model: str, device):
    """(Mask R-CNN in eval mode, the model file's dict) from models/model.pt (train stage output) or an
    MLflow model URI. Either way only a tensor-only model file is loaded (torch.load(weights_only=True));
    an MLflow model's pickles and code are never loaded or run."""
    from nucleiseg.model.maskrcnn import load_trained

    if not is_mlflow_uri(model):
        try:
            net, ckpt = load_trained(model, device)
        except NucleisegError:
            raise
        except Exception as exc:  # a file load_trained does not foresee: still one line, never a traceback
            raise NucleisegError(f"{model}: cannot build a model from this file ({type(exc).__name__}: {_one_line(exc)[:200]}); "
                                 "use a models/model.pt written by the train stage") from None
        return net.eval(), ckpt
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nucleiseg-model-") as tmp:
        path, where = download_model_file(model, Path(tmp))
        try:
            net, ckpt = load_trained(path, device)
        except NucleisegError as exc:  # name the file in the run, not the temp copy
            raise NucleisegError(str(exc).replace(str(path), where)) from None
        except Exception as exc:
            raise NucleisegError(f"{where}: cannot build a model from this file ({type(exc).__name__}: {_one_line(exc)[:200]})") from None
    return net.eval(), ckpt


def download_model_file(model: str, dst: Path) -> tuple[Path, str]:
    """(local copy of the MLflow model's tensor-only model file, its name in the store): nothing else
    of the model is downloaded."""
    # MLflow draws a progress bar per download (the model, operating_point.json): noise in this command's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from nucleiseg.track import runs as tracking

    if tracking.uses_local_store() and not tracking.store_db().is_file():  # never create an empty store here
        raise NucleisegError(f"{model}: no MLflow store at {tracking.store_label()}; run nucleiseg from the root of the repository "
                             "that trained the model, or set MLFLOW_TRACKING_URI")
    if model.startswith("runs:/"):
        tracking.check_run(_mlflow_run_id(model) or "(none)", fix="check the run id with `mlflow ui`")
    tracking.configure()
    where = f"{model.rstrip('/')}/{tracking.MODEL_FILE}"
    try:
        base = model
        if model.startswith("models:/"):  # models:/<id or name/version> has no sub-paths: its storage location has
            from mlflow.store.artifact.models_artifact_repo import (
                ModelsArtifactRepository,
            )

            base = ModelsArtifactRepository.get_underlying_uri(model)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base.rstrip('/')}/{tracking.MODEL_FILE}", dst_path=str(dst))
    except (MlflowException, OSError) as exc:
        first = _one_line(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        raise NucleisegError(f"{where}: not found ({first[:200]}); nucleiseg loads only this tensor-only file of a model "
                             "logged by its train stage, never a pickled one: check the run id / model with `mlflow ui`, "
                             "or pass a models/model.pt file") from None
    return Path(local), where


def _mlflow_run_id(model: str) -> str | None:
    """The run that logged an MLflow model URI (runs:/<id>/..., or via the model's metadata)."""
    if model.startswith("runs:/"):
        run_id = model[len("runs:/"):].split("/", 1)[0]
        return run_id or None
    try:
        from mlflow.models import get_model_info

        return get_model_info(model).run_id
    except Exception:  # not resolvable: the caller falls back with a warning
        log.debug("%s: no run id", model, exc_info=True)
        return None


def mlflow_operating_point(model: str) -> float | None:
    """The score threshold in the run's `operating_point.json` artifact (logged by the evaluate stage), or None."""
    import tempfile

    import mlflow.artifacts

    from nucleiseg.evaluate.outputs import OPERATING_POINT_FILE, load_operating_point

    run_id = _mlflow_run_id(model)
    if run_id is None:
        return None
    with tempfile.TemporaryDirectory(prefix="nucleiseg-op-") as tmp:
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=OPERATING_POINT_FILE, dst_path=tmp)
        except Exception as exc:  # MlflowException (no such artifact), OSError, ...
            log.debug("run %s: no %s (%s)", run_id, OPERATING_POINT_FILE, _one_line(exc)[:200])
            return None
        path = Path(tmp) / OPERATING_POINT_FILE
        if not path.is_file():
            return None
        try:
            return load_operating_point(Path(tmp) / "model")
        except NucleisegError:
            raise NucleisegError(f"{OPERATING_POINT_FILE} of run {run_id}: no valid score_threshold in it; "
                                 "run the evaluate stage again, or pass --score-threshold") from None


def label_threshold(model: str, settings: Settings) -> tuple[float, str]:
    """(score threshold of the label maps and overlays, where it came from)."""
    from nucleiseg.evaluate.outputs import OPERATING_POINT_FILE, load_operating_point

    if settings.label_threshold is not None:
        return settings.label_threshold, "--score-threshold"
    if is_mlflow_uri(model):
        found, where = mlflow_operating_point(model), f"{OPERATING_POINT_FILE} of the model's MLflow run"
    else:
        found, where = load_operating_point(model), str(Path(model).with_name(OPERATING_POINT_FILE))
    if found is not None:
        return found, where
    floor = settings.infer.score_floor
    log.warning("no operating point for %s (%s missing; the evaluate stage writes it): label maps and overlays keep every "
                "detection scored >= the detection floor infer.score_floor = %g; pass --score-threshold to choose", model, where, floor)
    return floor, "infer.score_floor (no operating point)"


# ---------------------------------------------------------------------------------------------- predict


def labels_uint16(instances, height: int, width: int) -> np.ndarray:
    from nucleiseg.core.masks import paste

    if len(instances) > MAX_LABEL:
        raise NucleisegError(f"{len(instances)} instances do not fit a 16-bit label image (max {MAX_LABEL}); raise --score-threshold")
    return paste(instances, height, width).astype(np.uint16)


def write_image_outputs(folder: Path, stem: str, image: np.ndarray, instances) -> list[str]:
    """<stem>_labels.tif and <stem>_overlay.png in `folder`; returns their names.

    `instances` come best score first (like the image's entries in predictions.json),
    so label k is the k-th of them.
    """
    import tifffile
    from PIL import Image

    from nucleiseg.evaluate.outputs import overlay

    labels = labels_uint16(instances, *image.shape[:2])
    names = [f"{stem}_labels.tif", f"{stem}_overlay.png"]
    tifffile.imwrite(folder / names[0], labels, compression="zlib")
    Image.fromarray(overlay(image, [], instances)).save(folder / names[1], format="PNG")
    return names


def predict_command(args) -> int:
    # Everything that can be checked without torch first: flags, inputs, the model file.
    check_flags(args)
    if args.max_megapixels is not None and not args.max_megapixels > 0:
        raise NucleisegError(f"--max-megapixels {args.max_megapixels} is not allowed; expected a number > 0 (inf: no limit)")
    images = collect_images(args.inputs)
    if not is_mlflow_uri(args.model) and not Path(args.model).is_file():
        if Path(args.model).is_dir():
            raise NucleisegError(f"--model {args.model}: a folder; pass the model file itself (the train stage writes models/model.pt)")
        raise NucleisegError(f"{args.model}: no trained model; run the train stage first (dvc repro train) or pass --model")
    out_dir = Path(args.out)
    check_out(out_dir, images)
    check_readable(images, args.max_megapixels)

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from nucleiseg.core import coco
    from nucleiseg.core.io import atomic_path
    from nucleiseg.core.runtime import resolve_device
    from nucleiseg.data.layout import read_rgb
    from nucleiseg.evaluate.evaluator import at_threshold
    from nucleiseg.model.maskrcnn import saved_infer_config
    from nucleiseg.predict.predictor import Predictor

    wanted = predict_device(args)
    try:
        device = resolve_device(wanted)
    except NucleisegError:  # device=cuda without a visible GPU
        where = "--device" if args.device is not None else f"{args.params}: device ="
        raise NucleisegError(f"{where} {wanted}, but no CUDA device is visible; use --device auto or --device cpu") from None
    model, ckpt = load_model(args.model, device)
    saved = saved_infer_config(ckpt, args.model)
    settings = infer_settings(args, saved, args.model)
    threshold, threshold_source = label_threshold(args.model, settings)
    # The detector keeps everything >= the floor (predictions.json); the label maps are a prefix of that.
    cfg = settings.infer
    if threshold < cfg.score_floor:
        raise NucleisegError(f"the label threshold {threshold:g} ({threshold_source}) is below the detection floor {cfg.score_floor:g} "
                             f"({settings.source}): label maps keep a subset of the detections; pass --score-floor {threshold:g} "
                             "or a higher --score-threshold")
    predictor = Predictor(model, cfg, device, progress=True)
    log.info("predicting %d image(s) with %s on %s (window %d, overlap %d%s: %s); label maps at score >= %g (%s) -> %s",
             len(images), args.model, device, cfg.window, cfg.overlap, f", TTA {cfg.tta}" if cfg.tta != "none" else "", settings.source,
             threshold, threshold_source, out_dir)

    results: list[dict] = []
    records: list[dict] = []
    n_labelled = 0
    # The whole output is built in atomic_path's locked temp folder next to images.json and moved into
    # --out only after the last image: a failure or Ctrl-C leaves --out as it was.
    with _write_errors(out_dir), atomic_path(out_dir / "images.json") as index_tmp, logging_redirect_tqdm():
        stage = index_tmp.parent
        names: list[str] = []
        for image_id, path in enumerate(tqdm(images, desc="predict", unit="image", disable=None), start=1):
            try:
                image = read_rgb(path, args.max_megapixels)
                height, width = image.shape[:2]
                # Stable, the order of coco.results: label k <-> the image's k-th entry in predictions.json.
                instances = sorted(predictor.predict(image), key=lambda inst: -inst.score)
                kept = at_threshold(instances, threshold)
                names += write_image_outputs(stage, path.stem, image, kept)
            except NucleisegError as exc:
                message = _one_line(exc)
                raise NucleisegError((message if str(path) in message else f"{path}: {message}") + "; nothing was written") from None
            except OSError:  # writing this image's outputs: _write_errors says so
                raise
            except Exception as exc:
                log.debug("%s: traceback", path, exc_info=True)  # shown with -v
                raise NucleisegError(f"{path}: {type(exc).__name__}: {_one_line(exc)[:300]}; nothing was written (-v shows the traceback)") from None
            results += coco.results(image_id, instances, height, width)
            records.append({"id": image_id, "file_name": path.name, "path": str(path), "height": height, "width": width})
            n_labelled += len(kept)
            log.debug("%s: %d detections, %d at score >= %g", path, len(instances), len(kept), threshold)
        (stage / "predictions.json").write_text(json.dumps(results))
        settings_doc = {
            "model": args.model, "device": str(device),
            "score_threshold": threshold, "score_threshold_source": threshold_source,
            "score_floor": cfg.score_floor, "infer": dataclasses.asdict(cfg), "infer_source": settings.source,
        }
        (stage / "settings.json").write_text(json.dumps(settings_doc, indent=2))
        index_tmp.write_text(json.dumps(records, indent=2))
        # Publish: per-image files, then predictions.json and settings.json; images.json last (atomic_path).
        for name in [*names, "predictions.json", "settings.json"]:
            os.replace(stage / name, out_dir / name)
    log.info("%d image(s): %d detection(s) in predictions.json, %d in the label maps (score >= %g) -> %s",
             len(records), len(results), n_labelled, threshold, out_dir)
    return 0


@contextlib.contextmanager
def _write_errors(out_dir: Path):
    """An OS error while the outputs are written (disk full, permissions) as one line; atomic_path,
    entered after this, has removed its temp folder by then."""
    try:
        yield
    except OSError as exc:
        raise NucleisegError(f"--out {out_dir}: cannot write the outputs ({os_error_text(exc)}); nothing was written") from None


# ---------------------------------------------------------------------------------------------- report


def report_command(args) -> int:
    from nucleiseg.track import runs as tracking
    from nucleiseg.track.report import write_report

    text = write_report(Path(args.out), baseline=args.baseline)
    sys.stdout.write(text)
    log.info("wrote %s", args.out)
    where = f"{tracking.UI_COMMAND} (from the repository root), then open" if tracking.uses_local_store() else "open"
    log.info("MLflow runs table: %s %s", where, tracking.ui_url(tracking.configure()))
    return 0


# ---------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `error:` line too (argparse prints the usage block first), exit 2."""

    def error(self, message):
        raise NucleisegError(f"{self.prog}: {_one_line(message)} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from nucleiseg.data.layout import DEFAULT_MAX_MEGAPIXELS, MAX_MEGAPIXELS_ENV

    parser = _Parser(prog="nucleiseg", description="Nuclei instance segmentation with Mask R-CNN.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("predict", help="segment nuclei in images with a trained model",
                       description="Segment nuclei in PNG/TIFF/JPEG images (RGB, RGBA, gray, 16-bit). "
                                   "predictions.json keeps every detection (for AP); the label maps and overlays "
                                   "only those at the model's operating point (operating_point.json next to it).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders of images")
    p.add_argument("--model", default=PIPELINE_MODEL,
                   help=f"{PIPELINE_MODEL} (default), or an MLflow model URI: runs:/<run_id>/model, models:/<model_id>")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--params", metavar="FILE",
                   help="take `infer` and `device` from this params file (e.g. params.yaml) instead of the settings the model "
                        "was validated with, which are the default; flags override either")
    p.add_argument("--window", type=int, help="window size in pixels")
    p.add_argument("--overlap", type=int, help="window overlap in pixels (> largest nucleus)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass")
    p.add_argument("--score-threshold", type=float,
                   help="label maps and overlays keep detections scored >= this (default: the model's operating point, "
                        "else the detection floor); the operating point, as score_threshold in eval.json")
    p.add_argument("--score-floor", type=float,
                   help="predictions.json keeps every detection scored >= this (default: the model's infer.score_floor)")
    p.add_argument("--mask-threshold", type=float, help="mask probability threshold")
    p.add_argument("--tta", choices=("none", "flip", "d4"),
                   help="test-time augmentation: none, flip (4 flips, mask NMS) or d4 (8 flips/turns, per-instance mask voting)")
    p.add_argument("--whole-image", action=argparse.BooleanOptionalAction, default=None, help="one pass per image, no windows")
    p.add_argument("--device", help="auto | cpu | cuda | mps (default: the --params file's device, else auto)")
    p.add_argument("--max-megapixels", type=float,
                   help=f"refuse larger images, read from their header before decoding (default: ${MAX_MEGAPIXELS_ENV}, else "
                        f"{DEFAULT_MAX_MEGAPIXELS:g}); raise it for whole-slide images, inf for no limit")
    p.set_defaults(func=predict_command)

    r = sub.add_parser("report", help="Markdown tables of the MLflow runs: recipes over folds, then runs (reports/results.md)")
    r.add_argument("--out", default="reports/results.md", help="output Markdown file (default: reports/results.md)")
    r.add_argument("--baseline", metavar="RECIPE",
                   help="a recipe hash (or its first characters): every recipe's ap50_all gain over it, fold by fold, with twice its standard error")
    r.set_defaults(func=report_command)
    return parser


@main_guard(interrupted="interrupted; nothing was written (outputs appear only when complete)")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
