"""Cross-check of edgeprune's metric port against nuscenes-devkit itself.

The devkit is not an edgeprune dependency (it pins numpy < 2 and pulls OpenCV, Shapely,
scikit-learn and pycocotools), so this test skips unless ``nuscenes`` imports. To run it:
``python -m venv nusc && nusc/bin/pip install nuscenes-devkit pytest`` then
``PYTHONPATH=. nusc/bin/python -m pytest tests/test_evaluation_devkit.py`` (the metric
module needs numpy only).
"""
from __future__ import annotations

import numpy as np
import pytest

from edgeprune.data.boxes import Boxes
from edgeprune.evaluation import metrics

algo = pytest.importorskip("nuscenes.eval.detection.algo")
from nuscenes.eval.common.data_classes import EvalBoxes  # noqa: E402
from nuscenes.eval.common.utils import center_distance  # noqa: E402
from nuscenes.eval.detection.data_classes import DetectionBox  # noqa: E402

CLASSES = ("car", "pedestrian", "traffic_cone", "barrier")


def _noisy_predictions(seed: int) -> tuple[list[Boxes], list[Boxes]]:
    """GT scenes and predictions that are partly right (jittered), partly missing, partly spurious."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(10):
        n = int(rng.integers(2, 10))
        gt = Boxes(np.c_[rng.uniform(-40, 40, (n, 2)), rng.uniform(-1.5, -0.5, n)], rng.uniform(0.4, 4.5, (n, 3)),
                   rng.uniform(-np.pi, np.pi, n), rng.integers(0, 4, n))
        keep = rng.random(n) < 0.7
        hit = gt.select(keep)
        m = int(rng.integers(0, 5))
        centers = np.r_[hit.centers + rng.normal(0, 0.8, hit.centers.shape), np.c_[rng.uniform(-40, 40, (m, 2)), np.zeros(m)]]
        sizes = np.r_[hit.sizes * rng.uniform(0.7, 1.3, hit.sizes.shape), rng.uniform(0.4, 4.5, (m, 3))]
        yaws = np.r_[hit.yaws + rng.normal(0, 0.5, len(hit)), rng.uniform(-np.pi, np.pi, m)]
        labels = np.r_[hit.labels, rng.integers(0, 4, m)]
        gts.append(gt)
        preds.append(Boxes(centers, sizes, yaws, labels, rng.random(len(labels))))
    return gts, preds


def _eval_boxes(samples: list[Boxes], is_gt: bool) -> EvalBoxes:
    out = EvalBoxes()
    for s, boxes in enumerate(samples):
        out.add_boxes(f"s{s}", [DetectionBox(
            sample_token=f"s{s}", translation=tuple(boxes.centers[i]), size=tuple(boxes.sizes[i]),
            rotation=(float(np.cos(boxes.yaws[i] / 2)), 0.0, 0.0, float(np.sin(boxes.yaws[i] / 2))),
            velocity=(0.0, 0.0), detection_name=CLASSES[int(boxes.labels[i])],
            detection_score=-1.0 if is_gt else float(boxes.scores[i])) for i in range(len(boxes))])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_and_tp_errors_match_devkit(seed: int) -> None:
    gts, preds = _noisy_predictions(seed)
    gt_boxes, pred_boxes = _eval_boxes(gts, True), _eval_boxes(preds, False)
    ours = metrics.evaluate(gts, preds, CLASSES)
    for label, name in enumerate(CLASSES):
        for d in metrics.DISTANCE_THRESHOLDS:
            md = algo.accumulate(gt_boxes, pred_boxes, name, center_distance, d)
            assert ours.ap[name][d] == pytest.approx(algo.calc_ap(md, 0.1, 0.1), abs=1e-12)
        md = algo.accumulate(gt_boxes, pred_boxes, name, center_distance, metrics.TP_THRESHOLD)
        for metric in metrics.TP_METRICS:
            if name == "traffic_cone" and metric == "orient_err":
                continue
            assert ours.tp_errors[name][metric] == pytest.approx(algo.calc_tp(md, 0.1, metric), abs=1e-9)
    assert 0.05 < ours.mean_ap < 0.95          # a case that exercises partial precision
