"""Query denoising (DN-DETR / DINO): extra queries placed at jittered ground-truth centres.

Why: with Hungarian matching alone, which query answers for an object changes from step to
step early on, and a from-scratch decoder settles on class scores that ignore the image (the
first demo run did). A denoising query has a fixed job: placed within ``POSITIVE_NOISE_M`` of
an object, it must say the object's class and box; placed ``NEGATIVE_NOISE_M`` away, it must
say "nothing". Both kinds sit where objects can be, so only the image can tell them apart:
the decoder has to read its keys. The denoising queries run through the same layers in a
separate pass (DN's attention mask between groups, without building one); they are training
only, the exported model has its usual queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from edgeprune.models.decoder import PETRHead
from edgeprune.training.losses import Target, loss_space, sigmoid_focal_loss

POSITIVE_NOISE_M = 1.0          # centre jitter of a positive query (uniform in a disk, metres)
NEGATIVE_NOISE_M = (2.0, 4.0)   # distance of a negative query from its object (metres)


@dataclass(frozen=True)
class DenoisingQueries:
    """Reference points ``[B, Nd, 3]`` (normalised) and what each must predict.

    ``labels [B, Nd]``: the class of a positive, -1 for a negative or padding;
    ``code [B, Nd, 10]``: the box of a positive; ``valid [B, Nd]``: False for padding.
    """

    ref: Tensor
    labels: Tensor
    code: Tensor
    valid: Tensor


def _jitter(count: int, radius: tuple[float, float], gen: torch.Generator) -> Tensor:
    """``[count, 2]`` offsets uniform over the ring of radii ``radius`` (metres)."""
    lo, hi = radius
    r = torch.sqrt(torch.rand(count, generator=gen) * (hi ** 2 - lo ** 2) + lo ** 2)
    a = torch.rand(count, generator=gen) * 2 * math.pi
    return torch.stack([r * a.cos(), r * a.sin()], -1)


def make_queries(targets: Sequence[Target], pc_range: Sequence[float], gen: torch.Generator,
                 copies: int = 2) -> DenoisingQueries:
    """``copies`` positive and ``copies`` negative queries per ground-truth box, padded per batch."""
    lo, hi = torch.tensor(pc_range[:3]), torch.tensor(pc_range[3:])
    per_sample = max(max((len(t.labels) for t in targets), default=0), 1) * 2 * copies
    b = len(targets)
    ref = torch.full((b, per_sample, 3), 0.5)
    labels = torch.full((b, per_sample), -1, dtype=torch.long)
    code = torch.zeros(b, per_sample, 10)
    valid = torch.zeros(b, per_sample, dtype=torch.bool)
    for i, target in enumerate(targets):
        g = len(target.labels)
        if g == 0:
            continue
        centre = lo + target.code[:, :3] * (hi - lo)                              # [G, 3] metres
        pos = centre.repeat(copies, 1)
        neg = centre.repeat(copies, 1)
        pos[:, :2] += _jitter(g * copies, (0.0, POSITIVE_NOISE_M), gen)
        neg[:, :2] += _jitter(g * copies, NEGATIVE_NOISE_M, gen)
        points = ((torch.cat([pos, neg]) - lo) / (hi - lo)).clamp(0.0, 1.0)
        n = len(points)
        ref[i, :n] = points
        labels[i, :g * copies] = target.labels.repeat(copies)
        code[i, :g * copies] = target.code.repeat(copies, 1)
        valid[i, :n] = True
    return DenoisingQueries(ref, labels, code, valid)


def run_queries(head: PETRHead, memory: Tensor, key_pos: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """The head's layers on queries at ``ref [B, Nd, 3]`` -> (logits ``[L, B, Nd, C]``, boxes ``[L, B, Nd, 10]``).

    The same computation as :meth:`PETRHead.forward` for learned queries, with other reference points.
    """
    content = ref.new_zeros(ref.shape[0], ref.shape[1], head.cfg.embed_dims)
    tgt, query_pos, ref_logit = head.query_start(content, ref, memory)
    logits, boxes = [], []
    for layer, _ in zip(head.layers, range(head.cfg.num_layers)):
        tgt, _probs = layer(tgt, query_pos, memory, key_pos, None, None, None)
        cls, box = head._predict(tgt, ref_logit)
        logits.append(cls), boxes.append(box)
    return torch.stack(logits), torch.stack(boxes)


def denoise_loss(logits: Tensor, boxes: Tensor, queries: DenoisingQueries, pc_range: Sequence[float],
                 cls_weight: float, box_weight: float) -> tuple[Tensor, dict[str, float]]:
    """Focal loss on every valid denoising query + L1 on the positives' boxes, every layer,
    normalised by the number of positives (as the matched loss is by ground-truth boxes)."""
    positive = queries.labels >= 0
    count = max(int(positive.sum()), 1)
    onehot = torch.zeros_like(logits[0])
    onehot[positive] = torch.nn.functional.one_hot(queries.labels[positive], logits.shape[-1]).to(logits.dtype)
    valid = queries.valid
    total = logits.new_zeros(())
    focal = l1 = logits.new_zeros(())
    for layer in range(logits.shape[0]):
        focal = sigmoid_focal_loss(logits[layer][valid], onehot[valid]) / count
        pred = loss_space(boxes[layer][positive], pc_range)
        l1 = (pred - loss_space(queries.code[positive], pc_range)).abs().sum() / count
        total = total + cls_weight * focal + box_weight * l1
    return total, {"dn_cls": float(focal.detach()), "dn_box": float(l1.detach())}
