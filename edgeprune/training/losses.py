"""The set-prediction loss: sigmoid focal loss on classes, L1 on boxes, on every decoder layer.

Boxes are compared in *loss space*: the head's code (:mod:`edgeprune.data.boxes`: centre
normalised to the point-cloud range, log sizes, sin/cos yaw, velocity) with the centre
scaled back to metres and each channel weighted like PETR's ``code_weights`` (velocity 0.2:
the synthetic scenes are static). Both terms are normalised by the number of ground-truth
boxes in the batch, as DETR does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeprune.training.matcher import FOCAL_ALPHA, FOCAL_GAMMA, hungarian, match_cost

CODE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
CLS_WEIGHT, BOX_WEIGHT = 2.0, 0.25          # PETR's loss_cls / loss_bbox weights (and matching costs)


@dataclass(frozen=True)
class Target:
    """Ground truth of one sample: class indices ``[G]`` and box codes ``[G, 10]``."""

    labels: Tensor
    code: Tensor


def loss_space(code: Tensor, pc_range: Sequence[float]) -> Tensor:
    """Box code ``[..., 10]`` -> centre in metres, every channel times its code weight."""
    span = [pc_range[3] - pc_range[0], pc_range[4] - pc_range[1], pc_range[5] - pc_range[2]]
    scale = torch.tensor(span + [1.0] * (code.shape[-1] - 3), dtype=code.dtype)
    return code * scale * torch.tensor(CODE_WEIGHTS[:code.shape[-1]], dtype=code.dtype)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA,
                       gamma: float = FOCAL_GAMMA) -> Tensor:
    """Summed focal loss (Lin et al.) of ``logits`` against one-hot ``targets`` of the same shape."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t).pow(gamma) * ce).sum()


def layer_loss(logits: Tensor, boxes: Tensor, targets: Sequence[Target],
               pc_range: Sequence[float]) -> tuple[Tensor, Tensor]:
    """One layer: ``logits [B, Nq, C]``, ``boxes [B, Nq, 10]`` -> (focal sum, L1 sum), both unnormalised."""
    onehot = torch.zeros_like(logits)
    pred_parts, target_parts = [], []
    for b, target in enumerate(targets):
        pred = loss_space(boxes[b], pc_range)                              # [Nq, 10]
        gt = loss_space(target.code, pc_range)                             # [G, 10]
        cost = match_cost(logits[b].detach(), pred.detach(), target.labels, gt, CLS_WEIGHT, BOX_WEIGHT)
        rows, cols = hungarian(cost)
        rows_t, cols_t = torch.from_numpy(rows), torch.from_numpy(cols)
        onehot[b, rows_t, target.labels[cols_t]] = 1.0
        pred_parts.append(pred[rows_t])
        target_parts.append(gt[cols_t])
    l1 = (torch.cat(pred_parts) - torch.cat(target_parts)).abs().sum()
    return sigmoid_focal_loss(logits, onehot), l1


def set_loss(all_logits: Tensor, all_boxes: Tensor, targets: Sequence[Target],
             pc_range: Sequence[float]) -> tuple[Tensor, dict[str, float]]:
    """``all_cls_scores [L, B, Nq, C]``, ``all_bbox_preds [L, B, Nq, 10]`` -> (loss, last-layer parts).

    Every layer is matched and scored on its own (auxiliary losses), with equal weight.
    """
    num_gt = max(sum(int(t.labels.numel()) for t in targets), 1)
    total = all_logits.new_zeros(())
    parts: dict[str, float] = {}
    for layer in range(all_logits.shape[0]):
        focal, l1 = layer_loss(all_logits[layer], all_boxes[layer], targets, pc_range)
        total = total + (CLS_WEIGHT * focal + BOX_WEIGHT * l1) / num_gt
        parts = {"cls": float(focal.detach()) / num_gt, "box": float(l1.detach()) / num_gt}
    return total, parts
