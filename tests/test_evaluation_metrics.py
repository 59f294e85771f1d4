"""nuScenes-style metrics as pure functions: ground truth scores 1.0, displaced boxes ~0,
and hand-checkable partial cases."""
from __future__ import annotations

import numpy as np
import pytest

from edgeprune.data.boxes import Boxes
from edgeprune.evaluation.metrics import DISTANCE_THRESHOLDS, accumulate, calc_ap, evaluate

CLASSES = ("car", "pedestrian", "traffic_cone", "barrier")


def random_scenes(seed: int, samples: int = 6) -> list[Boxes]:
    """Boxes on a jittered 8 m grid (footprints never overlap, as in the synthetic scenes)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(-3, 4) * 8.0, np.arange(-3, 4) * 8.0), -1).reshape(-1, 2)
    out = []
    for _ in range(samples):
        n = int(rng.integers(3, 9))
        xy = grid[rng.choice(len(grid), n, replace=False)] + rng.uniform(-1, 1, (n, 2))
        out.append(Boxes(np.c_[xy, rng.uniform(-1.5, -0.5, n)],
                         rng.uniform(0.4, 4.5, (n, 3)), rng.uniform(-np.pi, np.pi, n), rng.integers(0, 4, n)))
    return out


def with_scores(boxes: Boxes, scores: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> Boxes:
    return Boxes(boxes.centers + [shift[0], shift[1], 0.0], boxes.sizes, boxes.yaws, boxes.labels, scores)


def test_ground_truth_as_predictions_scores_one() -> None:
    gts = random_scenes(0)
    rng = np.random.default_rng(1)
    preds = [with_scores(g, rng.uniform(0.2, 1.0, len(g))) for g in gts]
    m = evaluate(gts, preds, CLASSES)
    assert m.mean_ap == pytest.approx(1.0)
    assert all(ap == pytest.approx(1.0) for dists in m.ap.values() for ap in dists.values())
    errors = m.mean_tp_errors
    assert errors["trans_err"] == pytest.approx(0.0) and errors["scale_err"] == pytest.approx(0.0, abs=1e-12)
    assert errors["orient_err"] == pytest.approx(0.0, abs=1e-12)
    assert m.nds == pytest.approx(1.0)
    assert np.isnan(m.tp_errors["traffic_cone"]["orient_err"])
    assert sum(m.num_gt.values()) == sum(len(g) for g in gts)


def test_displaced_predictions_score_zero() -> None:
    gts = random_scenes(2)
    preds = [with_scores(g, np.linspace(1.0, 0.5, len(g)), shift=(100.0, -80.0)) for g in gts]
    m = evaluate(gts, preds, CLASSES)
    assert m.mean_ap == pytest.approx(0.0)
    assert all(m.tp_errors[c]["trans_err"] == 1.0 for c in CLASSES)
    assert m.nds == pytest.approx(0.0)


def test_shuffled_between_samples_scores_near_zero() -> None:
    gts = random_scenes(3, samples=8)
    preds = [with_scores(gts[(i + 1) % len(gts)], np.ones(len(gts[(i + 1) % len(gts)]))) for i in range(len(gts))]
    assert evaluate(gts, preds, CLASSES).mean_ap < 0.1


def test_offset_beyond_small_thresholds_only_counts_at_large_ones() -> None:
    gts = random_scenes(4)
    preds = [with_scores(g, np.ones(len(g)), shift=(1.5, 0.0)) for g in gts]      # 1.5 m off
    m = evaluate(gts, preds, CLASSES)
    for name in CLASSES:
        assert m.ap[name][0.5] == 0.0 and m.ap[name][1.0] == 0.0
        assert m.ap[name][2.0] == pytest.approx(1.0) and m.ap[name][4.0] == pytest.approx(1.0)
        assert m.tp_errors[name]["trans_err"] == pytest.approx(1.5)
    assert m.mean_ap == pytest.approx(0.5)
    assert DISTANCE_THRESHOLDS == (0.5, 1.0, 2.0, 4.0)


def test_half_recall_with_false_positives_ranked_last() -> None:
    """One class, 10 GT boxes, 5 found first, then 5 far-off false positives: precision 1 at
    recalls up to 0.49, 0.5 at recall 0.5 (the last of the repeated recall, as np.interp
    reads it), 0 beyond; AP = mean over recalls 0.11..1 of (p - 0.1)+ / 0.9."""
    gt = Boxes(np.c_[np.arange(10) * 5.0, np.zeros(10), np.zeros(10)], np.ones((10, 3)), np.zeros(10), np.zeros(10))
    found = gt.select(np.arange(5))
    far = Boxes(found.centers + [0, 50, 0], found.sizes, found.yaws, found.labels)
    pred = Boxes(np.r_[found.centers, far.centers], np.ones((10, 3)), np.zeros(10), np.zeros(10),
                 np.r_[np.linspace(1, 0.6, 5), np.linspace(0.5, 0.1, 5)])
    ap = calc_ap(accumulate([gt], [pred], 0, 2.0))
    assert ap == pytest.approx((39 * 1.0 + (0.5 - 0.1) / 0.9) / 90)


def test_barrier_heading_is_symmetric() -> None:
    gt = Boxes([[10.0, 0, 0]], [[2.4, 0.5, 1.0]], [0.3], [3])
    flipped = Boxes([[10.0, 0, 0]], [[2.4, 0.5, 1.0]], [0.3 + np.pi], [3])
    m = evaluate([gt], [flipped], CLASSES)
    assert m.tp_errors["barrier"]["orient_err"] == pytest.approx(0.0, abs=1e-9)
    car_gt = Boxes([[10.0, 0, 0]], [[1.9, 4.5, 1.6]], [0.3], [0])
    car_flipped = Boxes([[10.0, 0, 0]], [[1.9, 4.5, 1.6]], [0.3 + np.pi], [0])
    assert evaluate([car_gt], [car_flipped], CLASSES).tp_errors["car"]["orient_err"] == pytest.approx(np.pi)
