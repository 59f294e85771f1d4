"""One-to-one assignment of predictions to ground truth (DETR's Hungarian matcher, PETR's costs).

Cost of giving query ``q`` the ground-truth box ``g`` (PETR's ``HungarianAssigner3D``)::

    cost[q, g] = cls_weight * focal_cost(logit[q, label_g]) + box_weight * |code_q - code_g|_1

with the box codes in loss space (:func:`edgeprune.training.losses.loss_space`: centres in
metres, the rest as coded, weighted per channel). ``scipy.optimize.linear_sum_assignment``
finds the assignment of least total cost.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
_EPS = 1e-8


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = FOCAL_ALPHA,
                     gamma: float = FOCAL_GAMMA) -> Tensor:
    """``logits [Nq, C]``, ``labels [G]`` -> ``[Nq, G]``: focal loss as a positive minus as a negative."""
    prob = logits.sigmoid()[:, labels]                                    # [Nq, G]
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + _EPS).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + _EPS).log()
    return pos - neg


@torch.no_grad()
def match_cost(logits: Tensor, boxes: Tensor, labels: Tensor, target: Tensor, cls_weight: float,
               box_weight: float) -> Tensor:
    """``logits [Nq, C]``, ``boxes [Nq, K]`` (loss space), ``labels [G]``, ``target [G, K]`` -> ``[Nq, G]``."""
    return cls_weight * focal_class_cost(logits, labels) + box_weight * torch.cdist(boxes, target, p=1)


def hungarian(cost: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cost [Nq, G]`` -> (query indices, ground-truth indices) of the least-cost one-to-one assignment."""
    matrix = cost.detach().cpu().numpy() if isinstance(cost, Tensor) else np.asarray(cost)
    if matrix.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(matrix)
    return rows.astype(np.int64), cols.astype(np.int64)
