"""nuScenes detection metrics in numpy: mAP over centre-distance thresholds and TP errors.

A port of nuscenes-devkit 1.2.0's ``nuscenes.eval.detection.algo`` (``accumulate``,
``calc_ap``, ``calc_tp``) and of ``DetectionMetrics``' summary, with the same definitions
and tie-breaking, because the devkit itself pins numpy < 2 and pulls OpenCV, scikit-learn,
Shapely and pycocotools (a 574 MB environment). ``tests/test_evaluation_devkit.py`` compares
this module with the devkit where the devkit is installed.

Definitions (per class ``c``; predictions of all samples ranked by score, highest first):

- a prediction matches the nearest still-unmatched ground-truth box of ``c`` in its sample
  when their BEV centre distance is ``< d``; AP at ``d`` is the precision, interpolated at
  recalls 0, 0.01 .. 1, minus 0.1, clipped at 0, averaged over recalls above 0.1 and
  divided by 0.9; **mAP** is the mean over ``d`` in {0.5, 1, 2, 4} m and over classes;
- TP errors at ``d = 2 m``, averaged over the recall range 0.1 .. max recall: **ATE** (BEV
  centre distance, m), **ASE** (1 - IoU of the boxes aligned in centre and heading), **AOE**
  (smallest heading difference, rad; modulo pi for barriers, not defined for traffic cones);
  a class that never reaches 10 % recall gets error 1;
- **NDS** = (5 mAP + sum over TP metrics of (1 - min(1, error))) / (5 + number of TP metrics),
  the devkit's formula over the TP metrics that apply here (velocity and attribute errors
  do not: the synthetic scenes are static and unattributed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeprune.data.boxes import Boxes
from edgeprune.errors import ParameterError

DISTANCE_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
TP_THRESHOLD = 2.0
MIN_RECALL = 0.1
MIN_PRECISION = 0.1
MEAN_AP_WEIGHT = 5
TP_METRICS = ("trans_err", "scale_err", "orient_err")
NELEM = 101


@dataclass(frozen=True)
class MetricData:
    """Precision and TP errors of one class at one distance, at recalls 0, 0.01 .. 1 ``[101]``."""

    recall: np.ndarray
    precision: np.ndarray
    confidence: np.ndarray
    trans_err: np.ndarray
    scale_err: np.ndarray
    orient_err: np.ndarray

    @classmethod
    def no_predictions(cls) -> "MetricData":
        ones = np.ones(NELEM)
        return cls(np.linspace(0, 1, NELEM), np.zeros(NELEM), np.zeros(NELEM), ones, ones, ones)

    @property
    def max_recall_ind(self) -> int:
        """Index of the last non-zero confidence: the highest recall reached."""
        nonzero = np.nonzero(self.confidence)[0]
        return int(nonzero[-1]) if len(nonzero) else 0


def angle_diff(a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    """Smallest signed difference ``a - b`` of angles with the given period (devkit's angle_diff)."""
    diff = (a - b + period / 2) % period - period / 2
    return np.where(diff > np.pi, diff - 2 * np.pi, diff)


def scale_iou(gt_size: np.ndarray, pred_size: np.ndarray) -> np.ndarray:
    """IoU of boxes ``[..., 3]`` aligned in centre and heading: sizes only."""
    inter = np.prod(np.minimum(gt_size, pred_size), axis=-1)
    return inter / (np.prod(gt_size, axis=-1) + np.prod(pred_size, axis=-1) - inter)


def cummean(x: np.ndarray) -> np.ndarray:
    """Running mean ignoring NaNs; all-NaN gives ones (devkit's cummean)."""
    if np.all(np.isnan(x)):
        return np.ones(len(x))
    total, count = np.nancumsum(x.astype(float)), np.cumsum(~np.isnan(x))
    return np.divide(total, count, out=np.zeros_like(total), where=count != 0)


def _ranked_predictions(preds: Sequence[Boxes], label: int) -> list[tuple[int, int, float]]:
    """(sample, box, score) of class ``label``, highest score first; ties: later box first (devkit)."""
    flat = [(s, int(i), float(p.scores[i])) for s, p in enumerate(preds) for i in np.nonzero(p.labels == label)[0]]
    scores = np.array([f[2] for f in flat])
    order = np.lexsort((np.arange(len(flat)), scores))[::-1]
    return [flat[i] for i in order]


def _match(gts: Sequence[Boxes], preds: Sequence[Boxes], label: int, dist_th: float,
           period: float) -> tuple[list[int], list[float], dict[str, list[float]]]:
    """Greedy matching -> (tp flags, confidences, per-match errors) in ranking order."""
    taken = [np.zeros(len(g), dtype=bool) for g in gts]
    tp, conf, errs = [], [], {"trans_err": [], "scale_err": [], "orient_err": [], "conf": []}
    for s, i, score in _ranked_predictions(preds, label):
        gt, pred = gts[s], preds[s]
        candidates = (gt.labels == label) & ~taken[s]
        dist = np.where(candidates, np.linalg.norm(gt.centers[:, :2] - pred.centers[i, :2], axis=1), np.inf)
        j = int(np.argmin(dist)) if len(dist) else -1
        matched = j >= 0 and dist[j] < dist_th
        tp.append(int(matched))
        conf.append(score)
        if matched:
            taken[s][j] = True
            errs["trans_err"].append(float(dist[j]))
            errs["scale_err"].append(float(1 - scale_iou(gt.sizes[j], pred.sizes[i])))
            errs["orient_err"].append(float(abs(angle_diff(pred.yaws[i], gt.yaws[j], period))))
            errs["conf"].append(score)
    return tp, conf, errs


def accumulate(gts: Sequence[Boxes], preds: Sequence[Boxes], label: int, dist_th: float,
               period: float = 2 * np.pi) -> MetricData:
    """Precision/recall and TP errors of class ``label`` at distance ``dist_th`` over all samples."""
    if len(gts) != len(preds):
        raise ParameterError(f"{len(gts)} ground-truth samples but {len(preds)} prediction samples")
    npos = int(sum(np.count_nonzero(g.labels == label) for g in gts))
    if npos == 0:
        return MetricData.no_predictions()
    tp_flags, conf_list, errs = _match(gts, preds, label, dist_th, period)
    if not errs["trans_err"]:
        return MetricData.no_predictions()
    tp = np.cumsum(tp_flags).astype(float)
    fp = np.cumsum(1 - np.array(tp_flags)).astype(float)
    rec_interp = np.linspace(0, 1, NELEM)
    rec = tp / npos
    prec = np.interp(rec_interp, rec, tp / (tp + fp), right=0)
    conf = np.interp(rec_interp, rec, np.array(conf_list), right=0)
    match_conf = np.array(errs["conf"])[::-1]
    resampled = {k: np.interp(conf[::-1], match_conf, cummean(np.array(errs[k]))[::-1])[::-1] for k in TP_METRICS}
    return MetricData(rec_interp, prec, conf, **resampled)


def calc_ap(md: MetricData, min_recall: float = MIN_RECALL, min_precision: float = MIN_PRECISION) -> float:
    prec = np.copy(md.precision)[round(100 * min_recall) + 1:] - min_precision
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - min_precision)


def calc_tp(md: MetricData, metric: str, min_recall: float = MIN_RECALL) -> float:
    first, last = round(100 * min_recall) + 1, md.max_recall_ind
    if last < first:
        return 1.0
    return float(np.mean(getattr(md, metric)[first:last + 1]))


@dataclass(frozen=True)
class DetectionMetrics:
    """The summary ``eval`` prints: mAP, NDS, AP per class and distance, TP errors per class."""

    class_names: tuple[str, ...]
    ap: dict[str, dict[float, float]]          # class -> distance -> AP
    tp_errors: dict[str, dict[str, float]]     # class -> metric -> error (NaN: not applicable)
    num_samples: int
    num_gt: dict[str, int]

    @property
    def class_ap(self) -> dict[str, float]:
        return {c: float(np.mean(list(d.values()))) for c, d in self.ap.items()}

    @property
    def mean_ap(self) -> float:
        return float(np.mean(list(self.class_ap.values())))

    @property
    def mean_tp_errors(self) -> dict[str, float]:
        out = {}
        for metric in TP_METRICS:
            values = np.array([self.tp_errors[c][metric] for c in self.class_names])
            out[metric] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
        return out

    @property
    def nds(self) -> float:
        scores = [max(0.0, 1.0 - e) for e in self.mean_tp_errors.values() if not np.isnan(e)]
        return (MEAN_AP_WEIGHT * self.mean_ap + sum(scores)) / (MEAN_AP_WEIGHT + len(scores))

    def to_dict(self) -> dict:
        return {"mAP": self.mean_ap, "NDS": self.nds, "num_samples": self.num_samples, "num_gt": self.num_gt,
                "mean_tp_errors": self.mean_tp_errors, "class_ap": self.class_ap,
                "ap": {c: {str(d): v for d, v in dists.items()} for c, dists in self.ap.items()},
                "tp_errors": self.tp_errors, "distance_thresholds": list(DISTANCE_THRESHOLDS)}


def orientation_period(name: str) -> float:
    """Heading is compared modulo pi for barriers (symmetric), 2 pi otherwise."""
    return np.pi if name == "barrier" else 2 * np.pi


def _class_tp_errors(md: MetricData, name: str) -> dict[str, float]:
    errors = {m: calc_tp(md, m) for m in TP_METRICS}
    if name == "traffic_cone":                   # a cone has no heading
        errors["orient_err"] = float("nan")
    return errors


def evaluate(gts: Sequence[Boxes], preds: Sequence[Boxes], class_names: Sequence[str]) -> DetectionMetrics:
    """Metrics of ``preds`` against ``gts`` (one Boxes per sample; labels index ``class_names``)."""
    ap: dict[str, dict[float, float]] = {}
    tp_errors: dict[str, dict[str, float]] = {}
    for label, name in enumerate(class_names):
        period = orientation_period(name)
        data = {d: accumulate(gts, preds, label, d, period) for d in DISTANCE_THRESHOLDS}
        ap[name] = {d: calc_ap(md) for d, md in data.items()}
        tp_errors[name] = _class_tp_errors(data[TP_THRESHOLD], name)
    num_gt = {n: int(sum(np.count_nonzero(g.labels == i) for g in gts)) for i, n in enumerate(class_names)}
    return DetectionMetrics(tuple(class_names), ap, tp_errors, len(gts), num_gt)
