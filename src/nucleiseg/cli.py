"""The `nucleiseg` command: `predict` on any images with a trained model, `report` of the MLflow runs.

    nucleiseg predict IMAGE_OR_FOLDER... --model models/model.pt --out predictions/mine
    nucleiseg predict slides/ --model runs:/<run_id>/model --out out/ --window 512 --tta
    nucleiseg report --out reports/results.md

`predict` goes through the same `Predictor` as the infer stage (windows, stitching, TTA).
Per image it writes `<stem>_labels.tif` (uint16 instance labels, 0 = background; label k
is the image's k-th entry in predictions.json, best score first) and
`<stem>_overlay.png` (outlines); for all images `predictions.json` (COCO results,
image ids = input position 1..n) and `images.json` (id, file_name, path, height, width).
An image that cannot be read or predicted is logged and skipped; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from .errors import NucleisegError, main_guard

log = logging.getLogger("nucleiseg")

MAX_LABEL = np.iinfo(np.uint16).max
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "file:", "s3://", "gs://", "http://", "https://", "dbfs:/")


# ---------------------------------------------------------------------------------------------- inputs


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files from files and folders (not recursive), in the order given; folders sorted by name.

    A named file is kept whatever its suffix (reading it decides); in folders only
    PNG/TIFF/JPEG files count. The same file named twice is kept once.
    """
    from .data import IMAGE_SUFFIXES

    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                log.warning("%s: no PNG/TIFF/JPEG files in this folder", path)
        else:
            found = [path]  # a missing file is reported per image, like an unreadable one
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


# ---------------------------------------------------------------------------------------------- model


def is_mlflow_uri(model: str) -> bool:
    return model.startswith(MLFLOW_SCHEMES)


def load_model(model: str, device):
    """A Mask R-CNN in eval mode from models/model.pt (train stage output) or an MLflow model URI."""
    from .model import WindowTransform, load_trained

    if not is_mlflow_uri(model):
        net, _ = load_trained(model, device)
        return net
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from . import tracking

    tracking.configure()
    try:
        net = mlflow.pytorch.load_model(model, map_location="cpu")
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NucleisegError(f"{model}: cannot load the MLflow model ({first}); check the run id / model name with `mlflow ui`") from None
    if not hasattr(net, "roi_heads") or not isinstance(getattr(net, "transform", None), WindowTransform):
        raise NucleisegError(f"{model}: not a nucleiseg Mask R-CNN (logged by the train stage as 'model')")
    return net.to(device).eval()


# ---------------------------------------------------------------------------------------------- predict


def infer_settings(args) -> tuple:
    """(InferConfig, device name) from the params file's sections, then the flags."""
    from .config import InferConfig, infer_config, load_params, train_config

    params_path = Path(args.params)
    if params_path.is_file():
        params = load_params(params_path)
        cfg = infer_config(params)
        device = train_config(params).device
    elif args.params_given:
        raise NucleisegError(f"{params_path}: not found; pass an existing --params file or leave it out")
    else:
        cfg, device = InferConfig(), "auto"
    overrides = {
        name: getattr(args, name)
        for name in ("window", "overlap", "batch_size", "score_threshold", "mask_threshold", "tta", "whole_image")
        if getattr(args, name) is not None
    }
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.window <= 0 or not 0 <= cfg.overlap < cfg.window:
        raise NucleisegError(f"window {cfg.window} / overlap {cfg.overlap} invalid; need --window > 0 and 0 <= --overlap < --window")
    if cfg.batch_size < 1:
        raise NucleisegError(f"--batch-size {cfg.batch_size} invalid; need >= 1")
    return cfg, args.device or device


def labels_uint16(instances, height: int, width: int) -> np.ndarray:
    from .masks import paste

    if len(instances) > MAX_LABEL:
        raise NucleisegError(f"{len(instances)} instances do not fit a 16-bit label image (max {MAX_LABEL}); raise --score-threshold")
    return paste(instances, height, width).astype(np.uint16)


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, instances) -> None:
    """<stem>_labels.tif and <stem>_overlay.png, each written atomically.

    `instances` come best score first (like the image's entries in predictions.json),
    so label k is the k-th of them.
    """
    import tifffile
    from PIL import Image

    from .evaluation import overlay
    from .io import atomic_path

    labels = labels_uint16(instances, *image.shape[:2])
    with atomic_path(out_dir / f"{stem}_labels.tif") as tmp:
        tifffile.imwrite(tmp, labels, compression="zlib")
    with atomic_path(out_dir / f"{stem}_overlay.png") as tmp:
        Image.fromarray(overlay(image, [], instances)).save(tmp, format="PNG")


def predict_command(args) -> int:
    cfg, device_name = infer_settings(args)
    images = collect_images(args.inputs)
    if not is_mlflow_uri(args.model) and not Path(args.model).is_file():  # before seconds of torch imports
        raise NucleisegError(f"{args.model}: no trained model; run the train stage first (dvc repro train) or pass --model")

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from . import coco
    from .data import read_rgb
    from .engine import resolve_device
    from .io import write_json
    from .predictor import Predictor

    device = resolve_device(device_name)
    model = load_model(args.model, device)
    predictor = Predictor(model, cfg, device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("predicting %d image(s) with %s on %s (window %d, overlap %d%s) -> %s",
             len(images), args.model, device, cfg.window, cfg.overlap, ", TTA" if cfg.tta else "", out_dir)

    results: list[dict] = []
    records: list[dict] = []
    failed: list[tuple[Path, str]] = []
    with logging_redirect_tqdm():
        for image_id, path in enumerate(tqdm(images, desc="predict", unit="image"), start=1):
            try:
                image = read_rgb(path)
                # Stable: the order of coco.results, so label k <-> the image's k-th entry in predictions.json.
                instances = sorted(predictor.predict(image), key=lambda inst: -inst.score)
                height, width = image.shape[:2]
                write_outputs(out_dir, path.stem, image, instances)
            except NucleisegError as exc:
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                log.error("%s", message)
                failed.append((path, message))
                continue
            except Exception as exc:  # one bad image must not cost the others
                message = f"{path}: {type(exc).__name__}: {exc}".splitlines()[0]
                log.error("%s", message)
                log.debug("%s: traceback", path, exc_info=True)  # shown with -v
                failed.append((path, message))
                continue
            results += coco.results(image_id, instances, height, width)
            records.append({"id": image_id, "file_name": path.name, "path": str(path), "height": height, "width": width})
            log.debug("%s: %d instances", path, len(instances))

    write_json(out_dir / "predictions.json", results, indent=None)
    write_json(out_dir / "images.json", records)
    log.info("%d instance(s) on %d image(s) written to %s", len(results), len(records), out_dir)
    if failed:
        log.error("%d of %d image(s) failed: %s", len(failed), len(images), ", ".join(str(p) for p, _ in failed))
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- report


def report_command(args) -> int:
    from .report import write_report

    text = write_report(Path(args.out))
    sys.stdout.write(text)
    log.info("wrote %s", args.out)
    return 0


# ---------------------------------------------------------------------------------------------- parser


class _ParamsAction(argparse.Action):
    """Remembers that --params was given explicitly (then a missing file is an error)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.params_given = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nucleiseg", description="Nuclei instance segmentation with Mask R-CNN.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="segment nuclei in images with a trained model",
                       description="Segment nuclei in PNG/TIFF/JPEG images (RGB, RGBA, gray, 16-bit).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders of images")
    p.add_argument("--model", default="models/model.pt",
                   help="models/model.pt (default), or an MLflow model URI: runs:/<run_id>/model, models:/<model_id>")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--params", default="params.yaml", action=_ParamsAction,
                   help="its `infer` section (and train.device) are the defaults; flags override (default: params.yaml if present)")
    p.add_argument("--window", type=int, help="window size in pixels")
    p.add_argument("--overlap", type=int, help="window overlap in pixels (> largest nucleus)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass")
    p.add_argument("--score-threshold", type=float, help="drop detections scored below this")
    p.add_argument("--mask-threshold", type=float, help="mask probability threshold")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="flip test-time augmentation")
    p.add_argument("--whole-image", action=argparse.BooleanOptionalAction, default=None, help="one pass per image, no windows")
    p.add_argument("--device", help="auto | cpu | cuda | mps (default: params train.device, else auto)")
    p.set_defaults(func=predict_command, params_given=False)

    r = sub.add_parser("report", help="Markdown table of the MLflow runs (reports/results.md)")
    r.add_argument("--out", default="reports/results.md", help="output Markdown file (default: reports/results.md)")
    r.set_defaults(func=report_command)
    return parser


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
