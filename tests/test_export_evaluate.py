"""The CodaLab answer (format, order, validation, zip, the export stage), RLE round trips, evaluation and overlays."""

import contextlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from nucleiseg import coco
from nucleiseg import data as nucleiseg_data
from nucleiseg.errors import NucleisegError
from nucleiseg.evaluation import evaluate, overlay
from nucleiseg.export import ANSWER_KEYS, build_answer, validate_answer, write_answer
from nucleiseg.masks import Instance, paste
from nucleiseg.synthetic import generate_dataset, synth_image

STAGES = Path(__file__).resolve().parents[1] / "stages"


def _full(inst: Instance, height: int, width: int) -> np.ndarray:
    return paste([inst], height, width) > 0


def _synthetic_records(n=2, height=96, width=120):
    records = []
    for k in range(n):
        _, gt = synth_image(np.random.default_rng(10 + k), height, width, radius_range=(4, 12))
        for j, inst in enumerate(gt):
            inst.score = 1.0 - j / (len(gt) + 1)  # distinct scores: a fixed ranking
        records.append(coco.ImageRecord(k + 1, f"img{k}.png", height, width, gt))
    return records


# ----------------------------------------------------------------------------- evaluation


def test_ground_truth_as_predictions_scores_perfect():
    records = _synthetic_records()
    assert all(0 < len(r.instances) < 100 for r in records)  # under the leaderboard's 100 detections
    results = [entry for r in records for entry in coco.results(r.id, r.instances, r.height, r.width)]
    metrics, pr_curve = evaluate(records, results, max_dets_all=3000)
    for key in ("ap50", "ap50_all", "ap", "ap75", "precision", "recall", "f1", "aji", "pq", "dq", "sq"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["fp"] == metrics["fn"] == 0
    assert metrics["tp"] == sum(len(r.instances) for r in records)
    assert all(p == pytest.approx(1.0) for _, p in pr_curve)


def test_missing_half_of_the_nuclei():
    records = _synthetic_records(n=1)
    gt = records[0].instances
    kept = gt[::2]
    results = coco.results(1, kept, records[0].height, records[0].width)
    metrics, _ = evaluate(records, results, max_dets_all=3000)
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == pytest.approx(len(kept) / len(gt))
    assert metrics["ap50_all"] < 1.0


def test_overlay_green_predictions_red_missed():
    image = np.full((24, 24, 3), 128, np.uint8)
    a = Instance(np.ones((6, 6), bool), 2, 2)
    b = Instance(np.ones((6, 6), bool), 14, 14)
    out = overlay(image, [a, b], [a])
    assert out.shape == image.shape and out.dtype == np.uint8
    green = np.all(out == (0, 230, 0), axis=-1)
    red = np.all(out == (255, 0, 0), axis=-1)
    in_a, in_b = _full(a, 24, 24), _full(b, 24, 24)
    assert green.any() and red.any()
    assert not (green & ~in_a).any()  # green only on the prediction
    assert not (red & ~in_b).any()  # red only on the missed GT (a is matched)
    assert (red | green).sum() < in_a.sum() + in_b.sum()  # outlines, not fills
    untouched = ~(in_a | in_b)
    assert (out[untouched] == 128).all()
    np.testing.assert_array_equal(image, np.full((24, 24, 3), 128, np.uint8))  # input not modified
    # all matched: no red at all
    assert not np.all(overlay(image, [a], [a]) == (255, 0, 0), axis=-1).any()


# ----------------------------------------------------------------------------- RLE round trips


def _odd_masks(height, width):
    masks = []
    one = np.zeros((height, width), bool)
    one[0, 0] = True
    masks.append(one)
    last = np.zeros((height, width), bool)
    last[-1, -1] = True
    masks.append(last)
    for slc in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):  # touching each border
        m = np.zeros((height, width), bool)
        m[slc] = True
        masks.append(m)
    masks.append(np.ones((height, width), bool))
    if height > 1 and width > 1:
        ell = np.zeros((height, width), bool)
        ell[1:, 1] = True
        ell[-1, 1:] = True
        masks.append(ell)
    checker = np.indices((height, width)).sum(axis=0) % 2 == 0
    masks.append(checker)
    return masks


@pytest.mark.parametrize("height, width", [(5, 9), (9, 5), (1, 7), (1, 1), (13, 13)])
def test_rle_round_trip_odd_sizes(height, width):
    masks = _odd_masks(height, width)
    instances = []
    for k, m in enumerate(masks):
        rows, cols = np.nonzero(m)
        crop = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        instances.append(Instance(crop, int(cols.min()), int(rows.min()), score=1.0 - 0.01 * k))
    results = coco.results(7, instances, height, width)
    assert [r["score"] for r in results] == [i.score for i in instances]
    for r, m in zip(results, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [height, width]
        decoded = mask_utils.decode({"size": [height, width], "counts": r["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), m)
        # same string as pycocotools' own encoder
        assert r["segmentation"]["counts"] == mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
    back = coco.instances_by_image(results)[7]
    assert len(back) == len(masks)
    for inst, m, orig in zip(back, masks, instances):
        np.testing.assert_array_equal(_full(inst, height, width), m)
        assert inst.box == orig.box and inst.score == pytest.approx(orig.score)


# ----------------------------------------------------------------------------- the answer


def _test_images(tmp_path: Path, records) -> list[nucleiseg_data.TestImage]:
    return [nucleiseg_data.TestImage(r.id, r.file_name, tmp_path / r.file_name, r.height, r.width) for r in records]


@pytest.fixture()
def answer_case(tmp_path):
    records = _synthetic_records(n=2, height=64, width=80)
    # test_img_ids order is not id order: image 2 is listed first
    records[0].id, records[1].id = 5, 2
    images = _test_images(tmp_path, [records[0], records[1]])
    rng = np.random.default_rng(0)
    predictions = []
    for r in (records[1], records[0]):  # predictions file in another order
        for inst in r.instances:
            inst.score = float(rng.uniform(0.05, 1.0))
            inst.extra["detector_score"] = inst.score
        predictions += coco.results(r.id, r.instances, r.height, r.width)
    return records, images, predictions


def test_build_answer_format_and_order(answer_case):
    records, images, predictions = answer_case
    answer = build_answer(predictions, images)
    assert len(answer) == len(predictions)
    order = [img.id for img in images]
    keys = [(order.index(e["image_id"]), -e["score"]) for e in answer]
    assert keys == sorted(keys)
    assert [e["image_id"] for e in answer][0] == 5
    sizes = {r.id: (r.height, r.width) for r in records}
    for entry in answer:
        assert set(entry) == set(ANSWER_KEYS)
        assert entry["category_id"] == 1
        seg = entry["segmentation"]
        assert isinstance(seg["counts"], str)
        assert list(seg["size"]) == list(sizes[entry["image_id"]])
        rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        assert entry["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())  # xywh, full-image pixels
        m = mask_utils.decode(rle).astype(bool)
        rows, cols = np.nonzero(m)
        x, y, w, h = entry["bbox"]
        assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    json.dumps(answer)  # serialisable as is


def test_answer_load_res_round_trip(answer_case):
    records, images, predictions = answer_case
    answer = build_answer(predictions, images)
    gt = COCO()
    gt.dataset = {"info": {}, "images": [{"id": r.id, "height": r.height, "width": r.width} for r in records], "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        loaded = gt.loadRes(json.loads(json.dumps(answer)))
    assert len(loaded.anns) == len(answer)
    expected = {(r.id, round(i.score, 12)): _full(i, r.height, r.width) for r in records for i in r.instances}
    for ann in loaded.anns.values():
        mask = loaded.annToMask(ann).astype(bool)
        np.testing.assert_array_equal(mask, expected[(ann["image_id"], round(ann["score"], 12))])


def test_build_answer_rejects_bad_ids(answer_case, tmp_path):
    _, images, predictions = answer_case
    with pytest.raises(NucleisegError, match="not in test_img_ids"):
        build_answer(predictions + [{**predictions[0], "image_id": 99}], images)
    extra = nucleiseg_data.TestImage(3, "empty.png", tmp_path / "empty.png", 64, 80)
    with pytest.raises(NucleisegError, match="empty.png"):
        build_answer(predictions, images + [extra])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda e: {**{k: v for k, v in e.items() if k != "segmentation"}, "segmentaion": e["segmentation"]}, "segmentation"),
        (lambda e: {k: v for k, v in e.items() if k != "score"}, "score"),
        (lambda e: {**e, "segmentation": {**e["segmentation"], "counts": e["segmentation"]["counts"].encode()}}, "RLE str"),
        (lambda e: {**e, "segmentation": {**e["segmentation"], "counts": [3, 4, 5]}}, "RLE str"),
        (lambda e: {**e, "segmentation": {"counts": e["segmentation"]["counts"]}}, "segmentation"),
        (lambda e: {**e, "segmentation": {**e["segmentation"], "size": [1, 2]}}, "size"),
        (lambda e: {**e, "image_id": 12345}, "12345"),
    ],
)
def test_validate_answer_catches(answer_case, corrupt, message):
    _, images, predictions = answer_case
    answer = build_answer(predictions, images)
    validate_answer(answer, images)
    bad = [dict(e) for e in answer]
    bad[3] = corrupt(bad[3])
    with pytest.raises(NucleisegError, match=message):
        validate_answer(bad, images)


def test_write_answer_zip(answer_case, tmp_path):
    _, images, predictions = answer_case
    answer = build_answer(predictions, images)
    json_path, zip_path = tmp_path / "answer.json", tmp_path / "answer.zip"
    write_answer(answer, json_path, zip_path)
    assert json.loads(json_path.read_text()) == answer
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["answer.json"]
        assert zf.read("answer.json") == json_path.read_bytes()


# ----------------------------------------------------------------------------- the export stage


def _run_export(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STAGES / "export.py")], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_export_stage(tmp_path):
    generate_dataset(tmp_path / "data" / "raw", n_train=1, n_test=2, size=48, radius_range=(3, 8))
    (tmp_path / "data" / "split.json").write_text(json.dumps({"train": ["synth-train-000"], "val": []}))
    ids = json.loads((tmp_path / "data" / "raw" / "test_img_ids.json").read_text())
    predictions = []
    for entry in ids:
        rects = [Instance(np.ones((4, 6), bool), 3 + 9 * k, 5 + 7 * k, score=0.9 - 0.1 * k) for k in range(4)]
        predictions += coco.results(entry["id"], rects, entry["height"], entry["width"])
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "test.json").write_text(json.dumps(predictions))

    done = _run_export(tmp_path)
    assert done.returncode == 0, done.stderr
    answer = json.loads((tmp_path / "submission" / "answer.json").read_text())
    assert len(answer) == len(predictions) == 8
    with zipfile.ZipFile(tmp_path / "submission" / "answer.zip") as zf:
        assert json.loads(zf.read("answer.json")) == answer

    (tmp_path / "predictions" / "test.json").unlink()
    failed = _run_export(tmp_path)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "predictions/test.json" in lines[0]
    assert "Traceback" not in failed.stderr
    assert (tmp_path / "submission" / "answer.json").is_file()  # the previous answer is left alone
