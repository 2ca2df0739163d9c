"""Metrics on tiny synthetic instances: hand-computed values, edge cases, COCO AP checks."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from scipy import sparse

from nucleiseg.core.coco import ImageRecord, ground_truth, results
from nucleiseg.core.masks import Instance, iou
from nucleiseg.evaluate import metrics

H = W = 64
TOL = 1e-6


def coco_segm_metrics_reference(gt_doc: dict, detections: list[dict], max_dets_all: int) -> dict:
    """The same numbers as ``coco_segm_metrics`` with plain pycocotools (slow): the reference the fast path is checked against."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections or not gt_doc.get("annotations"):
        return metrics._zeros()
    n_all = metrics._max_dets_all(gt_doc, detections, max_dets_all)
    doc, res = metrics._copies(gt_doc, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = doc
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(res)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        max_dets = metrics._set_params(ev.params, n_all)
        ev.evaluate()
        ev.accumulate()
    return metrics._stats_from_eval(ev, max_dets, n_all)


def pairwise_iou(gt: list[Instance], pred: list[Instance]) -> sparse.csr_matrix:
    """IoU of every (gt, pred) pair as a sparse (n_gt, n_pred) CSR matrix; absent = 0."""
    ov = metrics._overlaps(gt, pred)
    return sparse.csr_matrix((ov.iou, (ov.rows, ov.cols)), shape=(len(gt), len(pred)))


def image_metrics(gt: list[Instance], pred: list[Instance], iou_threshold: float = 0.5) -> dict:
    """{'tp','fp','fn','precision','recall','f1','aji','pq','dq','sq'} for one image: what score_sweep pools per threshold."""
    return metrics._image_metrics(metrics._overlaps(gt, pred), iou_threshold)


def square(x0: int, y0: int, w: int, h: int | None = None, score: float = 1.0) -> Instance:
    return Instance(np.ones((h or w, w), dtype=bool), x0, y0, score)


def disc(cx: int, cy: int, r: int, score: float = 1.0) -> Instance:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return Instance(xx**2 + yy**2 <= r * r, cx - r, cy - r, score)


def coco_pair(images: dict[int, tuple[list[Instance], list[Instance]]], h: int = H, w: int = W):
    records = [ImageRecord(image_id, f"{image_id}.png", h, w, gt) for image_id, (gt, _) in images.items()]
    res = []
    for image_id, (_, pred) in images.items():
        res.extend(results(image_id, pred, h, w))
    return ground_truth(records), res


def random_case(seed: int) -> list[Instance]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(15):
        out.append(disc(int(rng.integers(6, W - 6)), int(rng.integers(6, H - 6)), int(rng.integers(3, 6))))
    return out


# ----------------------------------------------------------------------------- matching


def test_identity_gives_perfect_scores():
    gt = [square(2, 2, 10), disc(30, 30, 6), square(40, 5, 8, 12), disc(50, 50, 4)]
    pred = [Instance(g.mask.copy(), g.x0, g.y0, score=0.5 + 0.1 * i) for i, g in enumerate(gt)]
    m = image_metrics(gt, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (4, 0, 0)
    for key in ("precision", "recall", "f1", "aji", "pq", "dq", "sq"):
        assert m[key] == 1.0, key
    doc, res = coco_pair({3: (gt, pred), 17: (gt[:2], pred[:2])})
    ap = metrics.coco_segm_metrics(doc, res, max_dets_all=3000)
    for key in ("ap50", "ap50_all", "ap", "ap75"):
        assert ap[key] == pytest.approx(1.0, abs=TOL), key
    assert all(p == pytest.approx(1.0) for _, p in ap["pr_curve"])


def test_hand_computed_case():
    gt = [square(5, 5, 10), square(30, 30, 10)]  # areas 100, 100
    pred = [
        square(5, 5, 10),  # exact copy of gt[0]: IoU 1
        square(32, 30, 10),  # gt[1] shifted 2 px: inter 8*10 = 80, union 200 - 80 = 120, IoU 2/3
        square(50, 50, 6),  # false positive, area 36, touches nothing
    ]
    assert iou(gt[1], pred[1]) == pytest.approx(2 / 3)
    m = image_metrics(gt, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 0)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(0.8)  # 2*2 / (2*2 + 1 + 0)
    assert m["dq"] == pytest.approx(0.8)
    assert m["sq"] == pytest.approx(5 / 6)  # (1 + 2/3) / 2
    assert m["pq"] == pytest.approx(2 / 3)  # 5/6 * 0.8
    # AJI: C = 100 + 80 = 180; U = 100 + 120 + 36 (unused FP) = 256
    assert m["aji"] == pytest.approx(180 / 256)
    mt = metrics.match(gt, pred)
    assert [(g, p) for g, p, _ in mt.pairs] == [(0, 0), (1, 1)]
    assert mt.pairs[1][2] == pytest.approx(2 / 3)


def test_iou_threshold_is_inclusive():
    gt = [square(10, 10, 10)]  # area 100
    exact_half = [square(10, 10, 10, 5)]  # 50 px inside: IoU 50/100 = 0.5
    below = [Instance(np.ones((7, 7), bool), 10, 10)]  # 49 px inside: IoU 0.49
    assert metrics.match(gt, exact_half).tp == 1
    m = metrics.match(gt, below)
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)
    assert (m.precision, m.recall, m.f1, m.sq, m.pq) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_one_prediction_over_two_gt_counts_once():
    gt = [square(10, 10, 10), square(20, 10, 10)]  # side by side, 100 px each
    pred = [square(10, 10, 20, 10)]  # covers both: IoU 100/200 = 0.5 with each
    m = image_metrics(gt, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["sq"] == pytest.approx(0.5)
    # original AJI: both GT take the same prediction: C = 100 + 100, U = 200 + 200
    assert m["aji"] == pytest.approx(0.5)


def test_assignment_maximises_matches_not_greedy_iou():
    # gt0-pred0 has the best IoU, but pred0 is gt1's only candidate: greedy gives 1 match.
    rows, cols = np.array([0, 0, 1]), np.array([0, 1, 0])
    ious = np.array([0.9, 0.6, 0.7])
    pairs = metrics._assign(rows, cols, ious, 2, 2)
    assert pairs == [(0, 1, 0.6), (1, 0, 0.7)]


def test_empty_cases():
    gt = [square(5, 5, 10)]
    both = image_metrics([], [])
    assert (both["tp"], both["fp"], both["fn"]) == (0, 0, 0)
    assert all(both[k] == 1.0 for k in ("precision", "recall", "f1", "aji", "pq", "dq", "sq"))
    no_pred = image_metrics(gt, [])
    assert (no_pred["tp"], no_pred["fp"], no_pred["fn"]) == (0, 0, 1)
    assert all(no_pred[k] == 0.0 for k in ("precision", "recall", "f1", "aji", "pq", "dq", "sq"))
    no_gt = image_metrics([], gt)
    assert (no_gt["tp"], no_gt["fp"], no_gt["fn"]) == (0, 1, 0)
    assert all(no_gt[k] == 0.0 for k in ("precision", "recall", "f1", "aji", "pq", "dq", "sq"))
    assert pairwise_iou([], gt).shape == (0, 1)

    doc, _ = coco_pair({1: (gt, [])})
    for fn in (metrics.coco_segm_metrics, coco_segm_metrics_reference):
        out = fn(doc, [], max_dets_all=3000)
        assert (out["ap"], out["ap50"], out["ap75"], out["ap50_all"]) == (0.0, 0.0, 0.0, 0.0)
        assert len(out["pr_curve"]) == 101
    doc_empty, res = coco_pair({1: ([], gt)})
    assert metrics.coco_segm_metrics(doc_empty, res, max_dets_all=3000)["ap50"] == 0.0


def test_pairwise_iou_matches_direct_iou():
    gt, pred = random_case(1), random_case(2)
    mat = pairwise_iou(gt, pred).toarray()
    direct = np.array([[iou(g, p) for p in pred] for g in gt])
    np.testing.assert_allclose(mat, direct)


def test_summarize_pools_counts_and_averages_the_rest():
    a = {"tp": 2, "fp": 1, "fn": 0, "aji": 0.5, "pq": 0.4, "dq": 0.8, "sq": 0.5}
    b = {"tp": 0, "fp": 0, "fn": 3, "aji": 0.0, "pq": 0.0, "dq": 0.0, "sq": 0.0}
    s = metrics.summarize([a, b])
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 3)
    assert isinstance(s["tp"], int)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 5)
    assert s["f1"] == pytest.approx(4 / 8)
    assert s["aji"] == pytest.approx(0.25)
    assert s["pq"] == pytest.approx(0.2)


# ----------------------------------------------------------------------------- COCO AP


def test_fast_and_reference_coco_eval_agree():
    rng = np.random.default_rng(0)
    images = {}
    for image_id in (5, 1001):  # arbitrary ids
        gt = random_case(image_id)
        pred = []
        for g in gt:
            if rng.random() < 0.2:
                continue  # missed
            shift = rng.integers(-2, 3, size=2)
            pred.append(Instance(g.mask, g.x0 + int(shift[0]), g.y0 + int(shift[1]), float(rng.random())))
        pred += [disc(int(rng.integers(6, 58)), int(rng.integers(6, 58)), 4, float(rng.random())) for _ in range(4)]
        pred = [p.clip(0, 0, W, H) for p in pred]
        images[image_id] = (gt, [p for p in pred if p is not None])
    doc, res = coco_pair(images)
    fast = metrics.coco_segm_metrics(doc, res, max_dets_all=10)
    ref = coco_segm_metrics_reference(doc, res, max_dets_all=10)
    for key in ("ap", "ap50", "ap75", "ap50_all"):
        assert fast[key] == pytest.approx(ref[key], abs=TOL), key
    assert 0.0 < fast["ap"] < fast["ap50"] < 1.0
    np.testing.assert_allclose(np.array(fast["pr_curve"]), np.array(ref["pr_curve"]), atol=TOL)


def test_leaderboard_cap_at_100_detections():
    gt = [square(2 + 8 * (i % 15), 2 + 8 * (i // 15), 6) for i in range(150)]  # 15 x 10 grid
    pred = [Instance(g.mask, g.x0, g.y0, score=1.0 - i / 1000) for i, g in enumerate(gt)]
    doc, res = coco_pair({42: (gt, pred)}, h=84, w=124)
    out = metrics.coco_segm_metrics(doc, res, max_dets_all=3)  # N grows to the 150 GT
    # at most 100 of 150 found: precision 1 up to recall 2/3 -> 67 of 101 recall points
    assert out["ap50"] == pytest.approx(67 / 101, abs=TOL)
    assert out["ap50"] == pytest.approx(100 / 150, abs=0.01)
    assert out["ap50_all"] == pytest.approx(1.0, abs=TOL)


def test_score_order_matters():
    gt = [square(4 + 14 * i, 4, 10) for i in range(4)]
    fps = [square(4 + 14 * i, 40, 10) for i in range(4)]

    def ap50(tp_score: float, fp_score: float) -> float:
        pred = [Instance(g.mask, g.x0, g.y0, tp_score) for g in gt] + [Instance(f.mask, f.x0, f.y0, fp_score) for f in fps]
        doc, res = coco_pair({1: (gt, pred)})
        return metrics.coco_segm_metrics(doc, res, max_dets_all=100)["ap50"]

    good, bad = ap50(0.9, 0.1), ap50(0.1, 0.9)
    assert good == pytest.approx(1.0)
    assert bad < good


def test_coco_eval_is_quiet_and_leaves_inputs_alone(capsys):
    gt = random_case(3)
    doc, res = coco_pair({9: (gt, gt)})
    before = (repr(doc), repr(res))
    metrics.coco_segm_metrics(doc, res, max_dets_all=100)
    coco_segm_metrics_reference(doc, res, max_dets_all=100)
    assert capsys.readouterr().out == ""
    assert (repr(doc), repr(res)) == before


# ----------------------------------------------------------------------------- score sweep


def test_score_sweep_equals_metrics_of_the_kept_predictions():
    """Each row = summarize(image_metrics) of the predictions scoring >= t, pooled over images."""
    rng = np.random.default_rng(4)
    gt_lists, pred_lists = [], []
    for seed in (1, 2, 3):
        gt = random_case(seed)
        pred = [Instance(g.mask, g.x0 + int(rng.integers(-1, 2)), g.y0, float(rng.random())) for g in gt if rng.random() < 0.8]
        pred += [disc(int(rng.integers(6, 58)), int(rng.integers(6, 58)), 3, float(rng.random())) for _ in range(3)]
        gt_lists.append(gt)
        pred_lists.append(pred)
    thresholds = [0.0, 0.1, 0.35, 0.5, 0.8, 1.0]
    rows = metrics.score_sweep(gt_lists, pred_lists, thresholds)
    assert [r["score_threshold"] for r in rows] == thresholds
    for t, row in zip(thresholds, rows):
        expected = metrics.summarize([image_metrics(g, [p for p in ps if p.score >= t]) for g, ps in zip(gt_lists, pred_lists)])
        assert row == {"score_threshold": t, **expected}
    assert rows[0]["tp"] + rows[0]["fp"] == sum(len(p) for p in pred_lists)
    assert rows[-1]["tp"] == rows[-1]["fp"] == 0  # no random score reaches 1.0


def test_score_sweep_separates_planted_false_positives():
    gt = [square(4 + 14 * i, 4, 10) for i in range(4)]
    pred = [Instance(g.mask, g.x0, g.y0, 0.9) for g in gt] + [square(4 + 14 * i, 40, 8, score=0.1) for i in range(3)]
    low, between, high = metrics.score_sweep([gt], [pred], [0.05, 0.5, 0.95])
    assert (low["tp"], low["fp"], low["fn"]) == (4, 3, 0) and low["f1"] == pytest.approx(8 / 11)
    assert (between["tp"], between["fp"], between["fn"]) == (4, 0, 0) and between["f1"] == 1.0 and between["pq"] == 1.0
    assert (high["tp"], high["fp"], high["fn"]) == (0, 0, 4) and high["f1"] == 0.0
