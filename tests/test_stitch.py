"""Seams: window cores partition the image, GT cut into windows and merged is GT again (the oracle),
mask NMS, Predictor's window/TTA/whole-image bookkeeping with a fake model, and TTA's transforms and mask voting."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import ndimage
from seam_oracle import (  # benchmarks/: the oracle's window cutter
    cut_without_overlap,
    instances_in_windows,
)

from nucleiseg.core import coco
from nucleiseg.core.config import InferConfig
from nucleiseg.core.masks import Instance, paste, to_rle
from nucleiseg.core.windows import axis_cores, window_starts, windows
from nucleiseg.data.synthetic import synth_image
from nucleiseg.evaluate.metrics import coco_segm_metrics
from nucleiseg.predict import stitch, tta
from nucleiseg.predict.predictor import Predictor

WINDOW, OVERLAP = 96, 40  # overlap > largest synthetic nucleus (radius 14 -> 28 px)


def _key(inst: Instance) -> tuple:
    """Pixel-exact identity of a (tight) instance, independent of score."""
    return inst.x0, inst.y0, inst.mask.shape, np.packbits(inst.mask).tobytes()


def _cut_lines(length: int, size: int, overlap: int) -> set[int]:
    """Window starts, window ends and core boundaries along one axis (inside the image)."""
    starts = window_starts(length, size, overlap)
    lines = {s for s in starts} | {s + size for s in starts}
    lines |= {int(lo) for lo, _ in axis_cores(starts, length, size)}
    return {c for c in lines if 0 < c < length}


# ----------------------------------------------------------------------------- cores


@pytest.mark.parametrize(
    "length, size, overlap",
    [(50, 64, 16), (64, 64, 16), (65, 64, 16), (100, 32, 8), (129, 64, 24), (300, 96, 40), (260, 96, 40), (1000, 512, 128), (1024, 512, 128), (33, 8, 0)],
)
def test_axis_cores_partition(length, size, overlap):
    starts = window_starts(length, size, overlap)
    cores = axis_cores(starts, length, size)
    assert len(cores) == len(starts)
    assert cores[0][0] == 0 and cores[-1][1] == length
    for (lo, hi), (lo2, _) in zip(cores, cores[1:]):
        assert hi == lo2  # contiguous: no gap, no overlap
    for i, ((lo, hi), start) in enumerate(zip(cores, starts)):
        assert lo < hi
        assert start <= lo and hi <= min(start + size, length)  # a core lies in its window
        # an interior core edge is at least overlap/2 from the window edge (more for the shifted last window)
        if i > 0:
            assert lo - start >= overlap / 2
        if i < len(starts) - 1:
            assert start + size - hi >= overlap / 2
    # every pixel centre is owned exactly once
    centres = np.arange(length) + 0.5
    owners = sum(((centres >= lo) & (centres < hi)).astype(int) for lo, hi in cores)
    assert (owners == 1).all()


def test_window_cores_cover_image_once():
    height, width = 300, 260
    wins = windows(height, width, WINDOW, OVERLAP)
    assert len({(w.x0, w.y0) for w in wins}) == len(wins)
    count = np.zeros((height, width), int)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    for w in wins:
        x0, y0, x1, y1 = w.core
        count += (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    assert (count == 1).all()


def test_owned_keeps_the_instance_whose_centre_is_in_the_core():
    (left, right) = windows(40, 120, 64, 8)  # starts 0 and 56; cores [0, 60) and [60, 120)
    assert left.core[2] == right.core[0] == 60.0
    before, after = _square(55, 5, 9), _square(56, 5, 9)  # centres (pixel centres) 59.5 and 60.5
    assert stitch.owned([before, after], left) == [before]
    assert stitch.owned([before, after], right) == [after]


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("height, width, seed", [(300, 260, 0), (256, 256, 1)])
def test_oracle_seams_reproduce_ground_truth(height, width, seed):
    seams = sorted(_cut_lines(height, WINDOW, OVERLAP) | _cut_lines(width, WINDOW, OVERLAP) | {height // 2, width // 2})
    _, gt = synth_image(np.random.default_rng(seed), height, width, radius_range=(4, 14), seam_lines=seams)
    spans = [max(i.mask.shape) for i in gt]
    assert max(spans) < OVERLAP
    per_window = instances_in_windows(gt, height, width, WINDOW, OVERLAP)
    gt_keys = Counter(_key(i) for i in gt)
    n_pieces = sum(len(p) for _, p in per_window)
    # nuclei really lie on the seams: many windows see only part of a nucleus
    halves = sum(1 for _, pieces in per_window for p in pieces if _key(p) not in gt_keys)
    assert halves > 20
    assert n_pieces > len(gt)

    merged = stitch.merge_windows(per_window, 0.3, 0.6)
    merged_keys = Counter(_key(i) for i in merged)
    assert len(merged) == len(gt)
    assert merged_keys == gt_keys  # every merged instance is a GT instance, pixel for pixel; no duplicates, no halves
    np.testing.assert_array_equal(paste(merged, height, width) > 0, paste(gt, height, width) > 0)

    doc = coco.ground_truth([coco.ImageRecord(1, "a.png", height, width, gt)])
    ap = coco_segm_metrics(doc, coco.results(1, merged, height, width), 3000)
    assert ap["ap50_all"] == 1.0

    # Contrast: the homework's 2x2 cut without overlap or merging splits the nuclei on the cut lines.
    naive = cut_without_overlap(gt, height, width)
    assert len(naive) > len(gt)
    ap_naive = coco_segm_metrics(doc, coco.results(1, naive, height, width), 3000)
    assert ap_naive["ap50_all"] < 1.0


# ----------------------------------------------------------------------------- deduplicate


def _square(x0, y0, side, score=1.0):
    return Instance(np.ones((side, side), bool), x0, y0, score)


def test_deduplicate_keeps_higher_score():
    low, high = _square(5, 5, 10, 0.4), _square(5, 5, 10, 0.8)
    (kept,) = stitch.deduplicate([low, high], 0.3, 0.6)
    assert kept is high


def test_deduplicate_keeps_low_iou_pair():
    # two 10x10 squares sharing a 10x4 strip: IoU 40 / 160 = 0.25, IoS 0.4
    a, b = _square(0, 0, 10, 0.9), _square(6, 0, 10, 0.5)
    kept = stitch.deduplicate([a, b], 0.3, 0.6)
    assert kept == [a, b]


def test_deduplicate_removes_contained_small_mask():
    big = _square(0, 0, 20, 0.9)
    small = _square(5, 5, 4, 0.95)  # inside big: IoU 0.04 but IoS 1.0
    (kept,) = stitch.deduplicate([big, small], 0.3, 0.6)
    assert kept is small  # best score first: the small one is kept, the big one covers it entirely
    big2, small2 = _square(0, 0, 20, 0.95), _square(5, 5, 4, 0.9)
    (kept,) = stitch.deduplicate([small2, big2], 0.3, 0.6)
    assert kept is big2


def test_deduplicate_far_apart_uses_grid():
    insts = [_square(x, y, 8, 0.5 + 0.001 * k) for k, (x, y) in enumerate((x, y) for x in range(0, 400, 30) for y in range(0, 400, 30))]
    assert len(stitch.deduplicate(insts, 0.3, 0.6)) == len(insts)


# ----------------------------------------------------------------------------- Predictor with a fake model

BACKGROUND = (255, 255, 255)


def _colour(k: int) -> tuple[int, int, int]:
    return (k % 251, (k // 251) % 251, 7)


def _rectangles_image(height, width, seed, n=160, sides=(3, 10)):
    """White image with disjoint axis-aligned rectangles, one colour each; many of them on cut lines."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 255, np.uint8)
    taken = np.zeros((height, width), bool)
    lines_y = sorted(_cut_lines(height, WINDOW, OVERLAP)) or [height // 2]
    lines_x = sorted(_cut_lines(width, WINDOW, OVERLAP)) or [width // 2]
    gt = []
    for attempt in range(20 * n):
        if len(gt) == n:
            break
        h, w = rng.integers(sides[0], sides[1] + 1, size=2)
        if attempt % 2 == 0:  # centred near a cut line
            cx = rng.choice(lines_x) + rng.integers(-3, 4) if rng.random() < 0.5 else rng.integers(0, width)
            cy = rng.choice(lines_y) + rng.integers(-3, 4) if rng.random() < 0.5 else rng.integers(0, height)
            x0, y0 = int(cx - w // 2), int(cy - h // 2)
        else:
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        x0, y0 = min(max(x0, 0), width - w), min(max(y0, 0), height - h)
        if taken[y0 : y0 + h, x0 : x0 + w].any():
            continue
        taken[y0 : y0 + h, x0 : x0 + w] = True
        image[y0 : y0 + h, x0 : x0 + w] = _colour(len(gt))
        gt.append(Instance(np.ones((h, w), bool), x0, y0))
    return image, gt


class RectangleOracle:
    """A perfect detector of coloured rectangles: per input tensor, one detection per colour region.

    Boxes are chosen so torchvision's paste geometry (1-pixel padded 28x28 mask, box
    expanded by 30/28, +1 pixel extent) covers exactly the region's pixels. Exact for sides <= 10:
    longer sides leave the bilinear corner values below 0.5.
    """

    def __init__(self):
        self.calls = 0
        self.floors = set()  # the score floor of each `detect` call

    @staticmethod
    def _axis(lo: int, hi: int) -> tuple[float, float]:
        centre, half = (lo + hi) / 2.0, (hi - lo - 1) / 2.0 * 28.0 / 30.0
        return centre - half, centre + half

    def detect(self, images, score_floor):
        self.floors.add(score_floor)
        out = []
        for tensor in images:
            self.calls += 1
            rgb = (tensor * 255).round().to(torch.int64).permute(1, 2, 0).numpy()
            ids = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
            values, inverse = np.unique(ids, return_inverse=True)
            labels = inverse.reshape(ids.shape) + 1
            labels[ids == 0xFFFFFF] = 0
            boxes = []
            for slc in ndimage.find_objects(labels):
                if slc is None:
                    continue
                x0, x1 = self._axis(slc[1].start, slc[1].stop)
                y0, y1 = self._axis(slc[0].start, slc[0].stop)
                boxes.append([x0, y0, x1, y1])
            n = len(boxes)
            out.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                    "scores": torch.full((n,), 0.9),
                    "labels": torch.ones(n, dtype=torch.int64),
                    "masks": torch.ones(n, 1, 28, 28),
                }
            )
        return out


def _cfg(**kw) -> InferConfig:
    return InferConfig(**{"window": WINDOW, "overlap": OVERLAP, "batch_size": 3, "min_area": 1, "fill_holes": False, **kw})


@pytest.fixture(scope="module")
def rectangles():
    return _rectangles_image(300, 260, seed=3)


def test_fake_model_renders_exact_rectangles():
    """The fake's boxes paste to exactly the rectangle: isolates Predictor bookkeeping from paste geometry."""
    image = np.full((40, 50, 3), 255, np.uint8)
    gt = []
    for k, (x0, y0, w, h) in enumerate([(0, 0, 1, 1), (3, 2, 10, 5), (20, 10, 9, 10), (40, 30, 10, 10), (30, 0, 2, 7), (49, 0, 1, 10)]):
        image[y0 : y0 + h, x0 : x0 + w] = _colour(k)
        gt.append(Instance(np.ones((h, w), bool), x0, y0))
    found = Predictor(RectangleOracle(), _cfg(window=64, overlap=16)).predict(image)
    assert Counter(map(_key, found)) == Counter(map(_key, gt))


def test_predictor_stitches_rectangles_across_seams(rectangles):
    image, gt = rectangles
    height, width = image.shape[:2]
    model = RectangleOracle()
    found = Predictor(model, _cfg(score_floor=0.07)).predict(image)
    assert model.calls == len(windows(height, width, WINDOW, OVERLAP))
    # infer.score_floor is the floor of every detect call.
    assert model.floors == {0.07}
    # the windows really cut rectangles
    pieces = instances_in_windows(gt, height, width, WINDOW, OVERLAP)
    gt_keys = Counter(map(_key, gt))
    assert sum(1 for _, ps in pieces for p in ps if _key(p) not in gt_keys) > 20
    assert len(found) == len(gt)
    assert Counter(map(_key, found)) == gt_keys
    np.testing.assert_array_equal(paste(found, height, width) > 0, paste(gt, height, width) > 0)
    scores = [i.score for i in found]
    assert scores == sorted(scores, reverse=True)
    # masks are kept cropped to their box, never full-image arrays
    for inst in found:
        assert inst.mask.shape == (inst.y1 - inst.y0, inst.x1 - inst.x0)
        assert inst.mask.shape[0] <= 10 and inst.mask.shape[1] <= 10
        assert inst.mask.size < height * width / 100


def test_predictor_whole_image_and_tta_agree(rectangles):
    image, gt = rectangles
    height, width = image.shape[:2]
    gt_rles = {to_rle(i, height, width)["counts"] for i in gt}
    windowed = Predictor(RectangleOracle(), _cfg()).predict(image)
    tta_model = RectangleOracle()
    tta = Predictor(tta_model, _cfg(tta="flip")).predict(image)
    whole_model = RectangleOracle()
    whole = Predictor(whole_model, _cfg(whole_image=True)).predict(image)
    assert whole_model.calls == 1
    assert tta_model.calls == 4 * len(windows(height, width, WINDOW, OVERLAP))
    for found in (windowed, tta, whole):
        rles = [to_rle(i, height, width)["counts"] for i in found]
        assert len(rles) == len(set(rles)) == len(gt)
        assert set(rles) == gt_rles


def test_predictor_small_image_is_padded_and_clipped():
    """An image smaller than the window: one padded window, nothing predicted in the padding."""
    image, gt = _rectangles_image(70, 50, seed=5, n=12)
    found = Predictor(RectangleOracle(), _cfg()).predict(image)
    assert Counter(map(_key, found)) == Counter(map(_key, gt))
    assert all(i.x1 <= 50 and i.y1 <= 70 for i in found)


# ----------------------------------------------------------------------------- TTA over the 8 flips/turns


@pytest.mark.parametrize("turns, mirror", tta.TRANSFORMS["d4"])
def test_tta_invert_undoes_the_transform_the_model_saw(turns, mirror):
    """An instance drawn in a window, found where the transformed window shows it, maps back to itself."""
    size = 40
    rng = np.random.default_rng(turns * 2 + mirror)
    for _ in range(5):
        mask = rng.random((int(rng.integers(1, 12)), int(rng.integers(1, 12)))) < 0.6
        mask[0, 0] = True
        inst = Instance(mask, int(rng.integers(0, size - mask.shape[1] + 1)), int(rng.integers(0, size - mask.shape[0] + 1))).tight()
        seen = tta.apply(torch.from_numpy(paste([inst], size, size) > 0)[None], turns, mirror)[0].numpy()
        found = Instance(seen, 0, 0).tight()
        assert _key(tta.invert(found, turns, mirror, size)) == _key(inst)


def test_tta_flip_is_the_old_flip_set():
    """The 4 flips as (turns, mirror): none, horizontal, vertical (a mirror turned twice), both (two turns)."""
    image = torch.arange(12.0).reshape(1, 3, 4)[:, :3, :3]
    seen = [tta.apply(image, t, m) for t, m in tta.TRANSFORMS["flip"]]
    expected = [image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


def _square(x0, y0, side=6, score=0.8, extra_column=False):
    mask = np.ones((side, side + extra_column), bool)
    return Instance(mask, x0, y0, score, {"detector_score": score})


def test_vote_keeps_the_pixel_majority_and_scores_by_agreement():
    # Nucleus A: 8 passes, 3 of them one column too wide -> the majority mask is the exact square.
    # Nucleus B (far away): found by 2 of 8 passes -> a quarter of its score.
    # Pass 0 also sees a second, worse copy of A (IoU 6/7 with A): the group takes one instance per pass.
    passes = [[_square(10, 10, extra_column=k < 3, score=0.8 - 0.01 * k)] for k in range(8)]
    passes[0].append(_square(10, 10, extra_column=True, score=0.1))
    passes[3].append(_square(40, 40, score=0.6))
    passes[6].append(_square(40, 41, score=0.4))
    found = tta.vote(passes)
    assert len(found) == 3
    a, b, leftover = found
    assert _key(a) == _key(_square(10, 10)) and a.extra["tta_votes"] == 8
    assert a.score == pytest.approx(sum(0.8 - 0.01 * k for k in range(8)) / 8) == a.extra["detector_score"]
    # Two members: a pixel covered by one of them is kept (half of the group).
    assert (b.x0, b.y0, b.mask.shape, b.mask.all()) == (40, 40, (7, 6), True) and b.score == pytest.approx(1.0 / 8)
    assert b.extra["tta_votes"] == 2
    assert leftover.extra["tta_votes"] == 1 and leftover.score == pytest.approx(0.1 / 8)


def test_predictor_d4_returns_the_ground_truth_for_an_equivariant_model(rectangles):
    """The rectangle oracle is exactly equivariant: d4 TTA finds every rectangle, pixel-exact, with all 8 votes
    and its score unchanged, as the single pass does."""
    image, gt = rectangles
    height, width = image.shape[:2]
    model = RectangleOracle()
    found = Predictor(model, _cfg(tta="d4")).predict(image)
    assert model.calls == 8 * len(windows(height, width, WINDOW, OVERLAP))
    assert Counter(map(_key, found)) == Counter(map(_key, gt)) == Counter(map(_key, Predictor(RectangleOracle(), _cfg()).predict(image)))
    assert {i.extra["tta_votes"] for i in found} == {8} and [i.score for i in found] == pytest.approx([0.9] * len(found))


class CornerArtefactOracle(RectangleOracle):
    """The rectangle oracle plus one false 5 x 5 detection in the top-left corner of whatever it is shown: not equivariant."""

    def detect(self, images, score_floor):
        out = super().detect(images, score_floor)
        for o in out:
            o["boxes"] = torch.cat([o["boxes"], torch.tensor([[*self._axis(1, 6), *self._axis(1, 6)]], dtype=torch.float32)[:, [0, 2, 1, 3]]])
            o["scores"] = torch.cat([o["scores"], torch.tensor([0.9])])
            o["labels"] = torch.cat([o["labels"], torch.ones(1, dtype=torch.int64)])
            o["masks"] = torch.cat([o["masks"], torch.ones(1, 1, 28, 28)])
        return out


def test_predictor_d4_ranks_an_artefact_of_one_orientation_down():
    """The artefact lands in each corner of the window under 2 of the 8 transforms (the corner's own mirror keeps it
    there): d4 voting keeps the 4 corner copies at 2/8 of the score, the real rectangles at full score."""
    image = np.full((64, 64, 3), 255, np.uint8)
    gt = []
    for k, (x0, y0, w, h) in enumerate([(20, 20, 8, 5), (35, 30, 4, 9), (15, 40, 10, 10)]):
        image[y0 : y0 + h, x0 : x0 + w] = _colour(k)
        gt.append(Instance(np.ones((h, w), bool), x0, y0))
    corners = [Instance(np.ones((5, 5), bool), x, y) for x in (1, 58) for y in (1, 58)]
    single = Predictor(CornerArtefactOracle(), _cfg(window=64, overlap=16)).predict(image)
    assert Counter(map(_key, single)) == Counter(map(_key, gt + corners[:1]))
    voted = Predictor(CornerArtefactOracle(), _cfg(window=64, overlap=16, tta="d4")).predict(image)
    assert Counter(map(_key, voted)) == Counter(map(_key, gt + corners))
    by_key = {_key(i): i for i in voted}
    assert [by_key[_key(c)].score for c in corners] == [pytest.approx(0.9 * 2 / 8)] * 4
    assert [by_key[_key(g)].score for g in gt] == [pytest.approx(0.9)] * 3
