"""The CodaLab answer (format, order, validation, zip, the export stage), RLE round trips, evaluation (AP, the
operating point chosen on val and used on test), overlays, and ground truth through export + evaluate."""

import contextlib
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from stage_commands import stage_argv

from nucleiseg.core import coco
from nucleiseg.core.config import EvaluateConfig
from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.masks import Instance, paste
from nucleiseg.data import layout as nucleiseg_data
from nucleiseg.data.layout import val_image_ids
from nucleiseg.data.synthetic import generate_dataset, synth_image
from nucleiseg.evaluate import evaluator as evaluation
from nucleiseg.evaluate.evaluator import evaluate, operating_grid
from nucleiseg.evaluate.outputs import (
    EvaluateOutputs,
    coco_records,
    evaluate_predictions,
    load_operating_point,
    overlay,
)
from nucleiseg.export.answer import (
    ANSWER_KEYS,
    build_answer,
    validate_answer,
    write_answer,
)


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
    ev = evaluate(records, results, max_dets_all=3000)
    metrics = ev.metrics
    for key in ("ap50", "ap50_all", "ap", "ap75", "precision", "recall", "f1", "aji", "pq", "dq", "sq", "f1_all_detections"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["fp"] == metrics["fn"] == 0
    assert metrics["tp"] == sum(len(r.instances) for r in records)
    assert all(p == pytest.approx(1.0) for _, p in ev.pr_curve)
    assert metrics["score_threshold"] == 0.0 and metrics["operating_metric"] == "f1"  # nothing to cut: the lowest threshold
    assert [row["score_threshold"] for row in ev.sweep] == operating_grid(0.0)


def test_missing_half_of_the_nuclei():
    records = _synthetic_records(n=1)
    gt = records[0].instances
    kept = gt[::2]
    results = coco.results(1, kept, records[0].height, records[0].width)
    metrics = evaluate(records, results, max_dets_all=3000).metrics
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == pytest.approx(len(kept) / len(gt))
    assert metrics["ap50_all"] < 1.0


def _blobs(rng, n: int, height: int, width: int, score: float) -> list[Instance]:
    """n random discs (radius 3-5) inside the image: detections of nothing."""
    out = []
    for _ in range(n):
        r = int(rng.integers(3, 6))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        cx, cy = int(rng.integers(r, width - r)), int(rng.integers(r, height - r))
        out.append(Instance(xx**2 + yy**2 <= r * r, cx - r, cy - r, score))
    return out


def _planted(records, rng, gt_score: float, fp_score: float, n_fp: int = 12) -> list[dict]:
    """Every ground-truth instance as a detection scoring gt_score, plus n_fp random blobs per image scoring fp_score."""
    results = []
    for r in records:
        found = [Instance(i.mask, i.x0, i.y0, gt_score) for i in r.instances] + _blobs(rng, n_fp, r.height, r.width, fp_score)
        results += coco.results(r.id, found, r.height, r.width)
    return results


def test_operating_point_separates_planted_false_positives():
    """GT at score 0.9 + random blobs at 0.1: the threshold chosen lies between them, F1 there is 1.0 and beats
    F1 over all detections; AP is unaffected (the blobs rank last)."""
    records = _synthetic_records()
    results = _planted(records, np.random.default_rng(0), 0.9, 0.1)
    ev = evaluate(records, results, max_dets_all=3000, operating_metric="f1", score_floor=0.05)
    m = ev.metrics
    assert 0.1 < m["score_threshold"] <= 0.9
    assert m["f1"] == 1.0 and m["precision"] == 1.0 and m["recall"] == 1.0 and m["fp"] == 0
    assert m["f1_all_detections"] < 0.95 and m["f1"] > m["f1_all_detections"]
    assert m["ap50_all"] == pytest.approx(1.0)
    # The sweep starts at the inference floor and holds the chosen row.
    assert ev.sweep[0]["score_threshold"] == 0.05
    assert ev.sweep[0]["f1"] == m["f1_all_detections"]
    chosen = next(row for row in ev.sweep if row["score_threshold"] == m["score_threshold"])
    assert chosen["f1"] == 1.0
    # Ties go to the lowest threshold: the first grid step above the blobs' score.
    assert m["score_threshold"] == min(t for t in operating_grid(0.05) if t > 0.1)
    # PQ as the operating metric finds the same cut.
    assert evaluate(records, results, 3000, operating_metric="pq", score_floor=0.05).metrics["pq"] == pytest.approx(1.0)


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.95])
def test_given_score_threshold_is_used_exactly(threshold):
    """Test metrics take the threshold val chose: no choosing on test."""
    records = _synthetic_records()
    results = _planted(records, np.random.default_rng(1), 0.9, 0.1)
    m = evaluate(records, results, max_dets_all=3000, score_threshold=threshold).metrics
    assert m["score_threshold"] == threshold
    n_gt = sum(len(r.instances) for r in records)
    if threshold < 0.1:  # the blobs count
        assert m["f1"] == m["f1_all_detections"] < 1.0 and m["fp"] == 12 * len(records)
    elif threshold < 0.9:
        assert m["f1"] == 1.0 and m["tp"] == n_gt
    else:  # nothing left
        assert m["f1"] == 0.0 and m["tp"] == 0 and m["fn"] == n_gt


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
    answer = build_answer(predictions, images, "predictions/test.json")
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
    answer = build_answer(predictions, images, "predictions/test.json")
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
        build_answer(predictions + [{**predictions[0], "image_id": 99}], images, "predictions/test.json")
    extra = nucleiseg_data.TestImage(3, "empty.png", tmp_path / "empty.png", 64, 80)
    with pytest.raises(NucleisegError, match="empty.png"):
        build_answer(predictions, images + [extra], "predictions/test.json")


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
    answer = build_answer(predictions, images, "predictions/test.json")
    validate_answer(answer, images)
    bad = [dict(e) for e in answer]
    bad[3] = corrupt(bad[3])
    with pytest.raises(NucleisegError, match=message):
        validate_answer(bad, images)


def test_write_answer_zip(answer_case, tmp_path):
    _, images, predictions = answer_case
    answer = build_answer(predictions, images, "predictions/test.json")
    json_path, zip_path = tmp_path / "answer.json", tmp_path / "answer.zip"
    write_answer(answer, json_path, zip_path)
    assert json.loads(json_path.read_text()) == answer
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["answer.json"]
        assert zf.read("answer.json") == json_path.read_bytes()


# ----------------------------------------------------------------------------- the export stage


def _run_export(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(stage_argv("export"), cwd=cwd, capture_output=True, text=True, timeout=120)


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


# ----------------------------------------------------------------------------- the evaluate stage's work


def _val_records(raw: Path, split: dict) -> list[coco.ImageRecord]:
    ids = val_image_ids(split["val"])
    out = []
    for name in split["val"]:
        sample = nucleiseg_data.load_train_sample(raw, name)
        out.append(coco.ImageRecord(ids[name], f"{name}.png", *sample.image.shape[:2], sample.instances))
    return out


def _test_ground_truth(raw: Path, names: list[str], first_id: int = 7) -> tuple[dict, list[coco.ImageRecord]]:
    """Training images standing in for annotated test images: their COCO GT doc and records."""
    records = []
    for k, name in enumerate(names):
        sample = nucleiseg_data.load_train_sample(raw, name)
        records.append(coco.ImageRecord(first_id + k, f"{name}.png", *sample.image.shape[:2], sample.instances))
    return coco.ground_truth(records), records


def _outputs(root: Path) -> EvaluateOutputs:
    return EvaluateOutputs(metrics=root / "metrics/eval.json", pr_curve=root / "plots/pr.csv", sweep=root / "plots/operating_point.csv",
                           overlays=root / "overlays", operating_point=root / "models/operating_point.json")


def test_evaluate_predictions_chooses_on_val_and_applies_to_test(repo, tiny_split):
    """Val: GT at 0.9 + blobs at 0.1 -> a threshold between them. Test: GT at 0.9 + blobs at 0.3: the val
    threshold keeps the test blobs (F1 < 1), where choosing on test would have cut them (F1 = 1)."""
    raw = repo / "data" / "raw"
    rng = np.random.default_rng(2)
    records = _val_records(raw, tiny_split)
    (repo / "predictions").mkdir()
    (repo / "predictions" / "val.json").write_text(json.dumps(_planted(records, rng, 0.9, 0.1)))
    gt_doc, test_recs = _test_ground_truth(raw, tiny_split["train"])
    (repo / "test_gt.json").write_text(json.dumps(gt_doc))
    (repo / "predictions" / "test.json").write_text(json.dumps(_planted(test_recs, rng, 0.9, 0.3)))
    outputs = _outputs(repo)
    cfg = EvaluateConfig(max_dets_all=100, overlays=1, operating_metric="f1")

    metrics = evaluate_predictions(raw, repo / "data" / "split.json", repo / "predictions", cfg, 0.05, "test_gt.json", outputs)

    threshold = metrics["score_threshold"]
    assert 0.1 < threshold <= 0.3
    assert metrics["f1"] == 1.0 and metrics["ap50_all"] == pytest.approx(1.0)
    test = metrics["test"]
    assert test["score_threshold"] == threshold
    assert test["f1"] == test["f1_all_detections"] < 1.0
    assert test["fp"] == 12 * len(test_recs) and test["recall"] == 1.0
    choose_on_test = evaluation.evaluate(test_recs, json.loads((repo / "predictions" / "test.json").read_text()), 100, score_floor=0.05)
    assert choose_on_test.metrics["f1"] == 1.0  # what the test numbers would be if the test set picked its own cut

    assert json.loads(outputs.metrics.read_text()) == metrics
    point = json.loads(outputs.operating_point.read_text())
    assert point == {"score_threshold": threshold, "metric": "f1", "value": 1.0, "chosen_on": "val"}
    assert load_operating_point(repo / "models" / "model.pt") == threshold
    sweep = outputs.sweep.read_text().splitlines()
    assert sweep[0] == "score_threshold,precision,recall,f1,pq,aji" and len(sweep) == 1 + len(operating_grid(0.05))
    assert outputs.pr_curve.read_text().splitlines()[0] == "recall,precision"
    assert sorted(p.name for p in outputs.overlays.iterdir()) == [f"{tiny_split['val'][0]}.png"]


def test_evaluate_predictions_writes_nothing_when_test_annotations_are_bad(repo, tiny_split):
    raw = repo / "data" / "raw"
    (repo / "predictions").mkdir()
    (repo / "predictions" / "val.json").write_text(json.dumps(_planted(_val_records(raw, tiny_split), np.random.default_rng(0), 0.9, 0.1)))
    (repo / "bad_gt.json").write_text(json.dumps([{"not": "coco"}]))
    outputs = _outputs(repo)
    with pytest.raises(NucleisegError, match="COCO instances file"):
        evaluate_predictions(raw, repo / "data" / "split.json", repo / "predictions", EvaluateConfig(max_dets_all=100), 0.05, "bad_gt.json", outputs)
    for path in (outputs.metrics, outputs.pr_curve, outputs.sweep, outputs.overlays, outputs.operating_point):
        assert not path.exists(), path


def test_load_operating_point(tmp_path):
    model = tmp_path / "model.pt"
    assert load_operating_point(model) is None  # no evaluate run yet
    for bad in ({"score_threshold": 1.5}, {"score_threshold": "high"}, ["x"]):
        (tmp_path / "operating_point.json").write_text(json.dumps(bad))
        with pytest.raises(NucleisegError, match="dvc repro evaluate"):
            load_operating_point(model)


def _stage(name: str, root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(stage_argv(name), cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_ground_truth_through_export_and_evaluate_scores_perfect(repo, tiny_split, stage_environment):
    """Perfect predictions (the ground truth) go through the export and evaluate stages: the answer file scores
    ap50_all = 1 and f1 = 1 against the test ground truth, and so does metrics/eval.json on val and test."""
    import yaml

    from nucleiseg.track import runs as tracking

    raw = repo / "data" / "raw"
    # Annotated "test" images: two training images copied into test/, listed in test_img_ids.json.
    gt_doc, test_recs = _test_ground_truth(raw, tiny_split["train"])
    for path in (raw / "test").iterdir():
        path.unlink()
    for rec in test_recs:
        shutil.copy2(raw / "train" / Path(rec.file_name).stem / "images" / rec.file_name, raw / "test" / rec.file_name)
    (raw / "test_img_ids.json").write_text(json.dumps([{"file_name": r.file_name, "height": r.height, "id": r.id, "width": r.width}
                                                       for r in test_recs]))
    (repo / "test_gt.json").write_text(json.dumps(gt_doc))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["test_annotations"] = "test_gt.json"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    def as_predictions(records):
        out = []
        for r in records:
            ranked = [Instance(i.mask, i.x0, i.y0, 0.99 - 0.001 * k) for k, i in enumerate(r.instances)]
            out += coco.results(r.id, ranked, r.height, r.width)
        return out

    val_recs = _val_records(raw, tiny_split)
    (repo / "predictions").mkdir()
    (repo / "predictions" / "val.json").write_text(json.dumps(as_predictions(val_recs)))
    (repo / "predictions" / "test.json").write_text(json.dumps(as_predictions(test_recs)))
    with tracking.active_run(None, "ground truth", {"backbone": "none"}) as run:
        run_id = run.info.run_id
    (repo / "models").mkdir()
    (repo / "models" / "run.json").write_text(json.dumps({"run_id": run_id}))
    env = stage_environment(repo)

    exported = _stage("export", repo, env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    answer = json.loads((repo / "submission" / "answer.json").read_text())
    assert len(answer) == sum(len(r.instances) for r in test_recs)
    scored = evaluation.evaluate(coco_records(repo / "test_gt.json"), answer, 100).metrics
    assert scored["ap50_all"] == 1.0 and scored["f1"] == 1.0 and scored["aji"] == pytest.approx(1.0)

    evaluated = _stage("evaluate", repo, env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    for split_metrics in (metrics, metrics["test"]):
        assert split_metrics["ap50_all"] == 1.0 and split_metrics["f1"] == 1.0, split_metrics
        assert split_metrics["pq"] == pytest.approx(1.0) and split_metrics["fp"] == split_metrics["fn"] == 0
    assert metrics["test"]["score_threshold"] == metrics["score_threshold"]
    assert json.loads((repo / "models" / "operating_point.json").read_text())["score_threshold"] == metrics["score_threshold"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    logged = client.get_run(run_id).data.metrics
    assert logged["val/ap50_all"] == 1.0 and logged["val/f1"] == 1.0 and logged["test/f1"] == 1.0
    assert logged["val/score_threshold"] == metrics["score_threshold"]
    assert "operating_point.json" in {a.path for a in client.list_artifacts(run_id)}
