"""Model outputs -> scored 3D boxes.

edgeprune models output ``all_cls_scores [L, B, Nq, C]`` (logits) and ``all_bbox_preds
[L, B, Nq, 10]`` (the box code of :mod:`edgeprune.data.boxes`); only the last layer is a
prediction. Two readings:

- :func:`top_detections` is PETR's NMS-free coder (``NMSFreeCoder``): sigmoid scores over
  all ``Nq x C`` (query, class) pairs, the ``top_n`` best, so one query may yield a box for
  several classes. This is what detection metrics are computed on.
- :func:`top_queries` keeps one box per query (its best class): what ``compare`` matches,
  so that "class agreement" asks whether two models give the same query the same class.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeprune.data import boxes as box_code
from edgeprune.data.boxes import Boxes
from edgeprune.errors import ParameterError

# PETR's nuScenes class order (the 10-class heads of the presets).
NUSCENES_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier",
                    "motorcycle", "bicycle", "pedestrian", "traffic_cone")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def last_layer(cls_scores: np.ndarray, bbox_preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[L, B, Nq, C]``, ``[L, B, Nq, 10]`` -> the last layer's ``[B, Nq, C]``, ``[B, Nq, 10]``."""
    if cls_scores.ndim != 4 or bbox_preds.ndim != 4 or bbox_preds.shape[-1] < box_code.CODE_SIZE:
        raise ParameterError(f"expected all_cls_scores [L, B, Nq, C] and all_bbox_preds [L, B, Nq, 10]; got "
                             f"{list(cls_scores.shape)} and {list(bbox_preds.shape)}")
    return cls_scores[-1], bbox_preds[-1]


def model_classes(num_classes: int, dataset_classes: Sequence[str]) -> tuple[str, ...]:
    """Names of a head's ``num_classes`` outputs: the dataset's own, or nuScenes' 10."""
    if num_classes == len(dataset_classes):
        return tuple(dataset_classes)
    if num_classes == len(NUSCENES_CLASSES):
        return NUSCENES_CLASSES
    raise ParameterError(f"the model predicts {num_classes} classes; eval knows heads trained on the dataset's "
                         f"{len(dataset_classes)} classes {list(dataset_classes)} or nuScenes' 10")


def top_detections(logits: np.ndarray, code: np.ndarray, top_n: int, pc_range: Sequence[float]) -> Boxes:
    """One sample: ``logits [Nq, C]``, ``code [Nq, 10]`` -> the ``top_n`` best (query, class) boxes."""
    scores = sigmoid(logits).reshape(-1)                           # [Nq * C]
    n = min(top_n, scores.size)
    best = np.argsort(-scores, kind="stable")[:n]
    num_classes = logits.shape[-1]
    return box_code.decode(code[best // num_classes], best % num_classes, scores[best], pc_range)


def top_queries(logits: np.ndarray, code: np.ndarray, top_n: int, pc_range: Sequence[float]) -> tuple[Boxes, np.ndarray]:
    """One sample -> (the ``top_n`` queries by best-class score as boxes, their query indices)."""
    probs = sigmoid(logits)                                        # [Nq, C]
    best = np.argsort(-probs.max(-1), kind="stable")[:min(top_n, len(probs))]
    labels = probs[best].argmax(-1)
    return box_code.decode(code[best], labels, probs[best, labels], pc_range), best


def relabel(boxes: Boxes, names: Sequence[str], target: Sequence[str]) -> Boxes:
    """Map labels indexing ``names`` to indices of ``target``; boxes of classes not in ``target`` are dropped."""
    lookup = np.array([target.index(n) if n in target else -1 for n in names], dtype=np.int64)
    mapped = lookup[boxes.labels] if len(boxes) else boxes.labels
    kept = boxes.select(mapped >= 0)
    return Boxes(kept.centers, kept.sizes, kept.yaws, mapped[mapped >= 0], kept.scores, kept.velocities)
