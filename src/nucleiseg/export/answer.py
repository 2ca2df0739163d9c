"""The CodaLab answer: a JSON list of COCO results with RLE masks, validated before it is written."""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

from nucleiseg.core.coco import CATEGORY
from nucleiseg.core.errors import NucleisegError
from nucleiseg.data.layout import TestImage

ANSWER_KEYS = ("image_id", "bbox", "score", "category_id", "segmentation")


def validate_answer(entries: list[dict], images: list[TestImage]) -> None:
    """Raise NucleisegError unless `entries` is a well-formed answer for `images` that pycocotools loads."""
    from pycocotools.coco import COCO

    sizes = {img.id: (img.height, img.width) for img in images}
    for n, entry in enumerate(entries):
        missing = [k for k in ANSWER_KEYS if k not in entry]
        if missing:
            raise NucleisegError(f"answer entry {n}: missing key(s) {missing} (the mask key must be spelled 'segmentation')")
        seg = entry["segmentation"]
        if not isinstance(seg, dict) or not isinstance(seg.get("counts"), str) or "size" not in seg:
            raise NucleisegError(f"answer entry {n}: 'segmentation' must be {{'size': [h, w], 'counts': <RLE str>}}")
        if entry["image_id"] not in sizes:
            raise NucleisegError(f"answer entry {n}: image_id {entry['image_id']} is not in test_img_ids.json")
        if list(seg["size"]) != list(sizes[entry["image_id"]]):
            raise NucleisegError(f"answer entry {n}: mask size {seg['size']} differs from image {entry['image_id']}'s {list(sizes[entry['image_id']])}")
    gt = COCO()
    gt.dataset = {"info": {}, "images": [{"id": i.id, "file_name": i.file_name, "height": i.height, "width": i.width} for i in images],
                  "annotations": [], "categories": [CATEGORY]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if entries:
            loaded = gt.loadRes([dict(e) for e in entries])
            if len(loaded.anns) != len(entries):
                raise NucleisegError("answer: pycocotools loaded fewer entries than written")


def build_answer(predictions: list[dict], images: list[TestImage], source: str | Path) -> list[dict]:
    """Answer entries (only the CodaLab keys), sorted by image then score; every test image must have entries."""
    ids = [img.id for img in images]  # unique: load_test_index refuses an id listed twice
    seen = {p["image_id"] for p in predictions}
    unknown = sorted(seen - set(ids))
    if unknown:
        raise NucleisegError(f"{source}: image ids {unknown} are not in test_img_ids.json; re-run the infer stage")
    absent = [img.file_name for img in images if img.id not in seen]
    if absent:
        raise NucleisegError(f"{source}: no nuclei predicted for {absent}; check the model (infer.score_floor) before submitting")
    answer = [{k: p[k] for k in ANSWER_KEYS} for p in predictions]
    for entry in answer:
        entry["category_id"] = 1
    answer.sort(key=lambda e: (ids.index(e["image_id"]), -e["score"]))
    validate_answer(answer, images)
    return answer


def write_answer(answer: list[dict], json_path: Path, zip_path: Path) -> None:
    json_path.write_text(json.dumps(answer))
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(json_path, arcname="answer.json")
