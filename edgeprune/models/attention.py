"""Multi-head attention that returns its probabilities (needed by tgGBC).

Two implementations of one function with one parameter layout (``in_proj_weight [3E, E]``,
``in_proj_bias [3E]``, ``out_proj``), so a checkpoint loads into either:

- ``ManualAttention``: MatMul/Softmax written out, batch-first. Exports to the plain
  MatMul -> Mul -> (Add) -> Softmax -> MatMul pattern NVIDIA's deployment graphs contain.
- ``TorchAttention``: ``nn.MultiheadAttention`` as in the reference training code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padding_bias(key_padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """[B, Nk] bool (True = ignore) -> additive [B, 1, 1, Nk] bias of 0 / -inf."""
    if key_padding_mask is None:
        return None
    bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]


class ManualAttention(nn.Module):
    """Batch-first multi-head attention written as MatMul/Softmax; returns per-head probs.

    With ``need_weights = False`` (training, see :func:`set_need_weights`) it computes the same
    function with ``F.scaled_dot_product_attention`` and returns None for the probabilities:
    the fused kernel never stores the ``[B, h, Nq, Nk]`` matrix, 4x faster on CPU with its backward.
    """

    need_weights = True

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} not divisible by num_heads {num_heads}")
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dims, embed_dims))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dims))
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _project(self, x: Tensor, which: int) -> Tensor:
        """Project with the q/k/v slice ``which`` and split heads: [B, N, E] -> [B, h, N, d]."""
        e = self.embed_dims
        w = self.in_proj_weight[which * e:(which + 1) * e]
        b = self.in_proj_bias[which * e:(which + 1) * e]
        bsz, n, _ = x.shape
        return F.linear(x, w, b).reshape(bsz, n, self.num_heads, e // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """query [B, Nq, E], key/value [B, Nk, E] -> (out [B, Nq, E], probs [B, h, Nq, Nk])."""
        q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        if not self.need_weights:
            return self._fused(q, k, v, key_padding_mask), None
        scale = 1.0 / math.sqrt(self.embed_dims // self.num_heads)
        scores = torch.matmul(q * scale, k.transpose(-2, -1))          # [B, h, Nq, Nk]
        bias = padding_bias(key_padding_mask, scores.dtype)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        out = torch.matmul(probs, v)                                     # [B, h, Nq, d]
        bsz, _, nq, _ = out.shape
        out = out.transpose(1, 2).reshape(bsz, nq, self.embed_dims)
        return self.out_proj(out), probs


    def _fused(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """q [B, h, Nq, d], k/v [B, h, Nk, d] -> [B, Nq, E] without the probability matrix."""
        bias = padding_bias(key_padding_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)          # [B, h, Nq, d]
        bsz, _, nq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(bsz, nq, self.embed_dims))


def set_need_weights(model: nn.Module, enabled: bool) -> None:
    """Switch every ManualAttention of ``model`` between returning probs (export, tgGBC) and the fused kernel."""
    for module in model.modules():
        if isinstance(module, ManualAttention):
            module.need_weights = enabled


class TorchAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch-first) returning per-head probabilities.

    Subclassing keeps the parameter names (``in_proj_weight`` ...) identical to
    ``ManualAttention`` and to the reference checkpoints.
    """

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__(embed_dims, num_heads, batch_first=True)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,  # type: ignore[override]
                key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, probs = super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                     need_weights=True, average_attn_weights=False)
        return out, probs                                                # probs [B, h, Nq, Nk]


def build_attention(impl: str, embed_dims: int, num_heads: int) -> nn.Module:
    if impl == "manual":
        return ManualAttention(embed_dims, num_heads)
    if impl == "torch":
        return TorchAttention(embed_dims, num_heads)
    from edgeprune.errors import ParameterError
    raise ParameterError(f"unknown attention implementation {impl!r}; choose 'manual' or 'torch'")
