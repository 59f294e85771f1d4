"""Geometric warm start of the position embeddings: queries attend to where their point is seen.

PETR learns, from detection losses alone, that a query at reference point ``P`` should attend
to the image tokens whose camera rays pass near ``P``; that is most of what makes it slow to
train. This stage teaches it directly and without images, in a minute: with ``tgt = 0`` and
``memory = 0`` a layer's cross-attention logits are ``(query_pos W_q)(key_pos W_k)^T``, and we
fit the query-embedding MLP, the position encoder and every layer's ``W_q``, ``W_k`` so that
their softmax matches a target map: a Gaussian (``SIGMA_TOKENS`` feature cells) around the
pixel where each camera that sees ``P`` sees it (cross-entropy, every head). The detection
training then starts from geometrically sensible attention instead of uniform attention.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeprune.models.decoder import sine_embedding_3d
from edgeprune.models.exportable import ExportableModel
from edgeprune.models.position import STRIDE, cam2lidar, intrinsics

log = logging.getLogger(__name__)

SIGMA_TOKENS = 1.0


def attention_targets(ref: Tensor, image_size: tuple[int, int], pc_range: tuple[float, ...]) -> Tensor:
    """``ref [Nq, 3]`` (normalised) -> target attention ``[Nq, 6*h*w]`` over the keys (rows sum to 1)."""
    w_img, h_img = image_size
    w, h = w_img // STRIDE, h_img // STRIDE
    lo, hi = torch.tensor(pc_range[:3], dtype=torch.float64), torch.tensor(pc_range[3:], dtype=torch.float64)
    points = lo + ref.detach().double() * (hi - lo)                                  # [Nq, 3] metres
    to_cam = torch.linalg.inv(cam2lidar())                                           # [6, 4, 4]
    homog = torch.cat([points, torch.ones(len(points), 1, dtype=torch.float64)], 1)  # [Nq, 4]
    cam = torch.einsum("nij,qj->nqi", to_cam, homog)[..., :3]                        # [6, Nq, 3]
    k = intrinsics(image_size)
    depth = cam[..., 2].clamp(min=1e-3)
    u = (k[0, 0] * cam[..., 0] / depth + k[0, 2]) / STRIDE                         # [6, Nq] in cells
    v = (k[1, 1] * cam[..., 1] / depth + k[1, 2]) / STRIDE
    seen = (cam[..., 2] > 0.1) & (u >= -0.5) & (u <= w - 0.5)                      # [6, Nq]
    v = v.clamp(0, h - 1)                                                            # low points: bottom row
    rows = torch.arange(h, dtype=torch.float64)[:, None]
    cols = torch.arange(w, dtype=torch.float64)[None, :]
    d2 = (rows[None, None] - v[..., None, None]) ** 2 + (cols[None, None] - u[..., None, None]) ** 2
    weight = torch.exp(-d2 / (2 * SIGMA_TOKENS ** 2)) * seen[..., None, None]       # [6, Nq, h, w]
    weight = weight.permute(1, 0, 2, 3).reshape(len(points), -1)                     # [Nq, 6*h*w]
    return (weight / weight.sum(1, keepdim=True).clamp(min=1e-12)).float()


def _logits(model: ExportableModel, key_pos: Tensor, query_pos: Tensor, layer: int) -> Tensor:
    """Cross-attention logits of ``layer`` with zero content: ``[h, Nq, Nk]``."""
    attn = model.head.layers[layer].cross_attn
    e, heads = attn.embed_dims, attn.num_heads
    q = F.linear(query_pos, attn.in_proj_weight[:e], attn.in_proj_bias[:e])
    k = F.linear(key_pos, attn.in_proj_weight[e:2 * e], attn.in_proj_bias[e:2 * e])
    q = q.reshape(-1, heads, e // heads).transpose(0, 1)                            # [h, Nq, d]
    k = k.reshape(-1, heads, e // heads).transpose(0, 1)                            # [h, Nk, d]
    return q @ k.transpose(1, 2) / math.sqrt(e // heads)


def warm_start_geometry(model: ExportableModel, pc_range: tuple[float, ...], steps: int = 100,
                        lr: float = 2e-3, queries_per_step: int = 100, seed: int = 0) -> float:
    """Fit the position embeddings and cross-attention q/k projections of the running layers
    (``head.cfg.num_layers``) to the geometric targets, on ``queries_per_step`` random queries a step.

    Returns the final mean cross-entropy (nats; ``log(Nk)`` is uniform attention).
    """
    head = model.head
    target = attention_targets(head.reference_points.weight, model.preset.image_size, pc_range)
    layers = range(head.cfg.num_layers)
    gen = torch.Generator().manual_seed(seed)
    params = list(head.query_embedding.parameters()) + list(model.position_encoder.parameters())
    params += [head.layers[i].cross_attn.in_proj_weight for i in layers]
    params += [head.layers[i].cross_attn.in_proj_bias for i in layers]
    opt = torch.optim.Adam(params, lr=lr)
    loss = torch.zeros(())
    for step in range(steps):
        pick = torch.randperm(len(target), generator=gen)[:queries_per_step]
        query_pos = head.query_embedding(sine_embedding_3d(head.reference_points.weight[pick].detach(),
                                                           head.cfg.embed_dims // 2))   # [nq, E]
        pos = model.position_encoder(1)[0]                                              # [6, E, h, w]
        key_pos = pos.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])                     # [Nk, E]
        loss = sum(-(target[pick] * _logits(model, key_pos, query_pos, i).log_softmax(-1)).sum(-1).mean()
                   for i in layers) / len(layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            log.info("geometry warm start %d/%d: cross-entropy %.3f (uniform %.3f)", step, steps, float(loss.detach()),
                     math.log(target.shape[1]))
    return float(loss.detach())
