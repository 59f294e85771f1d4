"""``compare``: do two ONNX detectors (e.g. a model and its rewrite) detect the same things?

Two views on the same inputs (dataset scenes, or one ``.npz``):

- numeric drift of every output (max abs / max rel over all inputs, as ``rewrite`` reports);
- detection agreement as a DETR user reads it: per sample, each model's ``top_n`` queries by
  best-class score (last layer); A's boxes, best first, take the nearest untaken B box within
  ``match_distance`` metres (BEV centres). **overlap** = matched / A's boxes; **score drift**
  = max |score_A - score_B| over matches; **class agreement** = matched pairs with the same
  class / matches; **centre error** = mean centre distance of matches (m); size and heading
  errors are reported alongside.

The verdict compares these with thresholds (:class:`Thresholds`); ``edgeprune compare``
exits 0 on pass and 1 on fail.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeprune.data.boxes import Boxes
from edgeprune.evaluation.decode import last_layer, top_queries
from edgeprune.evaluation.inference import OUTPUTS, Progress, dataset_outputs
from edgeprune.evaluation.metrics import angle_diff
from edgeprune.errors import InvalidModelError, ParameterError
from edgeprune.passes.verify import OutputDrift, output_drift, random_inputs, session


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria; ``max_abs`` (numeric drift of any output) is checked only when set."""

    min_overlap: float = 0.9
    max_score_drift: float = 0.05
    min_class_agreement: float = 0.95
    max_center_error: float = 0.25
    max_abs: float | None = None


@dataclass
class _Tally:
    matched: int = 0
    total: int = 0
    same_class: int = 0
    score_drift: float = 0.0
    center: list[float] = field(default_factory=list)
    size_rel: list[float] = field(default_factory=list)
    yaw: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Agreement:
    samples: int
    top_n: int
    overlap: float
    score_drift: float
    class_agreement: float
    center_error: float
    size_error: float            # mean max-axis relative size difference
    yaw_error: float             # mean |heading difference| (rad)


@dataclass(frozen=True)
class CompareReport:
    drift: tuple[OutputDrift, ...]
    agreement: Agreement
    thresholds: Thresholds
    failures: tuple[str, ...]
    inputs: str

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failures": list(self.failures), "inputs": self.inputs,
                "drift": [asdict(d) for d in self.drift], "agreement": asdict(self.agreement),
                "thresholds": asdict(self.thresholds)}


def match_boxes(a: Boxes, b: Boxes, max_distance: float) -> list[tuple[int, int]]:
    """Greedy pairs ``(i, j)``: A's boxes in score order take the nearest free B box within ``max_distance``."""
    free = np.ones(len(b), dtype=bool)
    pairs = []
    for i in np.argsort(-a.scores, kind="stable"):
        dist = np.where(free, np.linalg.norm(b.centers[:, :2] - a.centers[i, :2], axis=1), np.inf)
        if len(dist) and dist.min() <= max_distance:
            j = int(np.argmin(dist))
            free[j] = False
            pairs.append((int(i), j))
    return pairs


def _tally(t: _Tally, a: Boxes, b: Boxes, pairs: Sequence[tuple[int, int]]) -> None:
    t.total += len(a)
    t.matched += len(pairs)
    for i, j in pairs:
        t.same_class += int(a.labels[i] == b.labels[j])
        t.score_drift = max(t.score_drift, abs(float(a.scores[i] - b.scores[j])))
        t.center.append(float(np.linalg.norm(a.centers[i, :2] - b.centers[j, :2])))
        t.size_rel.append(float(np.max(np.abs(a.sizes[i] - b.sizes[j]) / a.sizes[i])))
        t.yaw.append(float(abs(angle_diff(a.yaws[i], b.yaws[j], 2 * np.pi))))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def _agreement(t: _Tally, samples: int, top_n: int) -> Agreement:
    return Agreement(samples, top_n, t.matched / t.total if t.total else 1.0, t.score_drift,
                     t.same_class / t.matched if t.matched else 0.0, _mean(t.center), _mean(t.size_rel), _mean(t.yaw))


def _fold(prev: OutputDrift | None, cur: OutputDrift) -> OutputDrift:
    """Worst of two drifts of one output (max over inputs)."""
    if prev is None:
        return cur
    if prev.max_abs is None or cur.max_abs is None:
        return prev if prev.max_abs is None else cur
    return OutputDrift(cur.name, cur.shape_before, cur.shape_after, max(prev.max_abs, cur.max_abs),
                       max(prev.max_rel or 0.0, cur.max_rel or 0.0), prev.exact and cur.exact,
                       prev.nonfinite + cur.nonfinite)


def verdict(drift: Sequence[OutputDrift], agreement: Agreement, th: Thresholds) -> tuple[str, ...]:
    """The failed criteria, each as one readable line (empty: pass)."""
    fails = []
    if agreement.overlap < th.min_overlap:
        fails.append(f"overlap {agreement.overlap:.3f} < {th.min_overlap}")
    if agreement.score_drift > th.max_score_drift:
        fails.append(f"score drift {agreement.score_drift:.3g} > {th.max_score_drift}")
    if agreement.class_agreement < th.min_class_agreement:
        fails.append(f"class agreement {agreement.class_agreement:.3f} < {th.min_class_agreement}")
    if agreement.center_error > th.max_center_error:
        fails.append(f"centre error {agreement.center_error:.3g} m > {th.max_center_error} m")
    for d in drift:
        if d.max_abs is None:
            fails.append(f"{d.name}: shapes differ, not comparable")
        elif th.max_abs is not None and d.max_abs > th.max_abs:
            fails.append(f"{d.name}: max abs drift {d.max_abs:.3g} > {th.max_abs}")
        elif d.nonfinite:
            fails.append(f"{d.name}: {d.nonfinite} non-finite values")
    return tuple(fails)


def _npz_pairs(sa: Any, sb: Any, inputs: Mapping[str, np.ndarray], seed: int) -> Iterator[tuple[dict, dict]]:
    feeds = random_inputs(sa, seed, inputs)
    yield _run(sa, feeds), _run(sb, random_inputs(sb, seed, feeds))


def _run(sess: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds))))


def _check_outputs(sess: Any, path: str | os.PathLike) -> None:
    names = {o.name for o in sess.get_outputs()}
    if not set(OUTPUTS) <= names:
        raise InvalidModelError(f"{path} has outputs {sorted(names)}; compare reads edgeprune's {list(OUTPUTS)}")


def compare_detectors(a: str | os.PathLike, b: str | os.PathLike, *, data: str | os.PathLike | None = None,
                      inputs: Mapping[str, np.ndarray] | None = None, top_n: int = 100, match_distance: float = 1.0,
                      thresholds: Thresholds = Thresholds(), limit: int | None = None, seed: int = 0,
                      pc_range: Sequence[float] | None = None, progress: Progress | None = None) -> CompareReport:
    """Compare models ``a`` and ``b`` on dataset ``data`` or the arrays ``inputs`` (exactly one)."""
    if (data is None) == (inputs is None):
        raise ParameterError("give exactly one of --data DIR or --inputs X.npz")
    if top_n < 1 or match_distance <= 0:
        raise ParameterError(f"--top must be >= 1 and --match-distance > 0 (got {top_n}, {match_distance})")
    sa, sb = session(a), session(b)
    _check_outputs(sa, a), _check_outputs(sb, b)
    if data is not None:
        from edgeprune.data.format import load_dataset
        dataset = load_dataset(data)
        pc_range = dataset.meta.point_cloud_range
        pairs = ((oa, ob) for (_, oa), (_, ob) in zip(dataset_outputs(sa, a, dataset, limit, progress),
                                                      dataset_outputs(sb, b, dataset, limit)))
        label = f"{data} ({len(dataset) if limit is None else min(limit, len(dataset))} scenes)"
    else:
        if pc_range is None:
            from edgeprune.models.position import POINT_CLOUD_RANGE
            pc_range = POINT_CLOUD_RANGE
        pairs, label = _npz_pairs(sa, sb, inputs, seed), "given inputs"
    return _compare(pairs, top_n, match_distance, thresholds, pc_range, label)


def _compare(pairs: Iterator[tuple[dict, dict]], top_n: int, match_distance: float, th: Thresholds,
             pc_range: Sequence[float], label: str) -> CompareReport:
    drift: dict[str, OutputDrift | None] = {}
    tally, samples = _Tally(), 0
    for out_a, out_b in pairs:
        for name, value in out_a.items():
            drift[name] = _fold(drift.get(name), output_drift(name, value, out_b.get(name)))
        la, ca = last_layer(out_a[OUTPUTS[0]], out_a[OUTPUTS[1]])
        lb, cb = last_layer(out_b[OUTPUTS[0]], out_b[OUTPUTS[1]])
        for k in range(la.shape[0]):
            box_a, _ = top_queries(la[k], ca[k], top_n, pc_range)
            box_b, _ = top_queries(lb[k], cb[k], top_n, pc_range)
            _tally(tally, box_a, box_b, match_boxes(box_a, box_b, match_distance))
            samples += 1
    drifts = tuple(d for d in drift.values() if d is not None)
    agreement = _agreement(tally, samples, top_n)
    return CompareReport(drifts, agreement, th, verdict(drifts, agreement, th), label)
