"""Dense supervision of the image tokens (FocalPETR's idea): a training-only head on the memory.

Why: a DETR-style decoder learns what the image shows only through one matched query per
object, a signal too sparse for a from-scratch backbone on a short CPU budget (the first demo
run settled on class scores that ignore the image). Here every image token also learns, on
its own, which object class covers it and how far away that object is. The backbone then
produces tokens that say "car, 12 m" where a car is, and the decoder's cross-attention only
has to read them. The head is not part of the detector: the exported graph is unchanged.

Targets per camera and token (stride-16 cell): the nearest box (by camera depth) whose
projected 2D box contains the cell centre, or whose projected centre falls in the cell;
its class, the log camera depth of its centre, and the offset (in cells) from the cell centre
to the object's projected centre, so that a token also says where its object's middle is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from edgeprune.data.boxes import Boxes, corners
from edgeprune.data.render import Rig
from edgeprune.models.position import STRIDE
from edgeprune.training.losses import sigmoid_focal_loss

NEAR_M = 0.5            # boxes with a corner closer to the camera plane are skipped in that camera
NO_OBJECT = -1


@dataclass(frozen=True)
class TokenTargets:
    """One scene's token targets, camera-major like the memory: ``labels [Nk]`` (-1: none), ``log_depth [Nk]``."""

    labels: Tensor
    log_depth: Tensor
    centre_offset: Tensor           # [Nk, 2] (columns, rows) from the cell centre to the object's projected centre


def _cell_centres(image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    w, h = image_size[0] // STRIDE, image_size[1] // STRIDE
    u, v = np.meshgrid((np.arange(w) + 0.5) * STRIDE, (np.arange(h) + 0.5) * STRIDE)
    return u.ravel(), v.ravel()                                          # [h*w] each, row-major


def token_targets(boxes: Boxes, rig: Rig) -> TokenTargets:
    """Class, log depth and centre offset of the object covering each image token of the scene ``boxes``."""
    u, v = _cell_centres(rig.image_size)
    per_cam = len(u)
    labels = np.full(rig.num_cameras * per_cam, NO_OBJECT, dtype=np.int64)
    log_depth = np.zeros(rig.num_cameras * per_cam, dtype=np.float32)
    offset = np.zeros((rig.num_cameras * per_cam, 2), dtype=np.float32)
    box_corners = corners(boxes) if len(boxes) else np.zeros((0, 8, 3))
    for cam in range(rig.num_cameras):
        depth = np.full(per_cam, np.inf)
        for i in range(len(boxes)):
            pts = rig.to_camera(box_corners[i], cam)
            if pts[:, 2].min() < NEAR_M:
                continue
            pix = rig.project(pts)
            centre_cam = rig.to_camera(boxes.centers[i], cam)
            cu, cv = rig.project(centre_cam)
            inside = (u >= pix[:, 0].min()) & (u <= pix[:, 0].max()) & (v >= pix[:, 1].min()) & (v <= pix[:, 1].max())
            inside |= (np.abs(u - cu) <= STRIDE / 2) & (np.abs(v - cv) <= STRIDE / 2)
            closer = inside & (centre_cam[2] < depth)
            depth[closer] = centre_cam[2]
            labels[cam * per_cam:(cam + 1) * per_cam][closer] = int(boxes.labels[i])
            cells = offset[cam * per_cam:(cam + 1) * per_cam]
            cells[closer, 0] = (cu - u[closer]) / STRIDE
            cells[closer, 1] = (cv - v[closer]) / STRIDE
        seen = np.isfinite(depth)
        log_depth[cam * per_cam:(cam + 1) * per_cam][seen] = np.log(depth[seen])
    return TokenTargets(torch.from_numpy(labels), torch.from_numpy(log_depth), torch.from_numpy(offset))


class TokenHead(nn.Module):
    """``memory [B, Nk, E]`` -> ``[B, Nk, C + 3]``: class logits, log depth and centre offset of every token."""

    def __init__(self, embed_dims: int, num_classes: int, prior_bias: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True),
                                 nn.Linear(embed_dims, num_classes + 3))
        nn.init.constant_(self.mlp[-1].bias[:num_classes], prior_bias)
        nn.init.constant_(self.mlp[-1].bias[num_classes], 2.5)           # log(12 m)
        self.num_classes = num_classes

    def forward(self, memory: Tensor) -> Tensor:
        return self.mlp(memory)


def token_loss(pred: Tensor, targets: list[TokenTargets], num_classes: int) -> tuple[Tensor, dict[str, float]]:
    """Focal loss over every token's classes + L1 on log depth and centre offset of covered tokens, per covered token."""
    labels = torch.stack([t.labels for t in targets])                           # [B, Nk]
    log_depth = torch.stack([t.log_depth for t in targets])
    covered = labels >= 0
    onehot = torch.zeros_like(pred[..., :num_classes])
    onehot[covered] = nn.functional.one_hot(labels[covered], num_classes).to(pred.dtype)
    count = max(int(covered.sum()), 1)
    focal = sigmoid_focal_loss(pred[..., :num_classes], onehot) / count
    depth = (pred[..., num_classes][covered] - log_depth[covered]).abs().sum() / count
    offset = torch.stack([t.centre_offset for t in targets])
    shift = (pred[..., num_classes + 1:num_classes + 3][covered] - offset[covered]).abs().sum() / count
    parts = {"token_cls": float(focal.detach()), "token_depth": float(depth.detach()),
             "token_offset": float(shift.detach())}
    return focal + depth + shift, parts
