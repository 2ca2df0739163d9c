"""COCO ground-truth and results documents built from Instances (RLE segmentation)."""

from __future__ import annotations

from dataclasses import dataclass

from nucleiseg.core.masks import Instance, bbox_xywh, from_rle, to_rle

CATEGORY = {"id": 1, "name": "nucleus", "supercategory": "cell"}


@dataclass
class ImageRecord:
    id: int
    file_name: str
    height: int
    width: int
    instances: list[Instance]


def ground_truth(images: list[ImageRecord], extra_image_fields: dict[int, dict] | None = None) -> dict:
    """A COCO instances document: one annotation per instance, `iscrowd` 0, RLE masks."""
    extra_image_fields = extra_image_fields or {}
    doc = {"info": {"description": "nucleiseg"}, "images": [], "annotations": [], "categories": [CATEGORY]}
    ann_id = 1
    for image in images:
        doc["images"].append(
            {"id": image.id, "file_name": image.file_name, "height": image.height, "width": image.width, **extra_image_fields.get(image.id, {})}
        )
        for inst in image.instances:
            doc["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image.id,
                    "category_id": 1,
                    "segmentation": to_rle(inst, image.height, image.width),
                    "area": inst.area,
                    "bbox": bbox_xywh(inst),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    return doc


def results(image_id: int, instances: list[Instance], height: int, width: int) -> list[dict]:
    """COCO results entries (the CodaLab answer format) for one image, best score first."""
    ordered = sorted(instances, key=lambda inst: -inst.score)
    return [
        {
            "image_id": image_id,
            "category_id": 1,
            "bbox": bbox_xywh(inst),
            "score": float(inst.score),
            "segmentation": to_rle(inst, height, width),
            **{k: v for k, v in inst.extra.items() if isinstance(v, (int, float))},
        }
        for inst in ordered
    ]


def instances_by_image(annotations: list[dict]) -> dict[int, list[Instance]]:
    """Decode GT annotations or results (with `score` when present) into Instances per image id."""
    out: dict[int, list[Instance]] = {}
    for ann in annotations:
        inst = from_rle(ann["segmentation"], float(ann.get("score", 1.0)))
        if inst is not None:
            out.setdefault(ann["image_id"], []).append(inst)
        else:
            out.setdefault(ann["image_id"], [])
    return out
