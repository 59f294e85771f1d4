"""FLOPs of PETR-family decoder layers from their sizes, before and after tgGBC key pruning.

Counting follows the tgGBC paper's appendix B: a matrix product [m, n] x [n, p] costs
m*p*(2n - 1) (n multiplications and n - 1 additions per entry); bias additions, LayerNorms
and the class/box branches are not counted. One multi-head attention with Nq queries,
Nk keys, width E and h heads (head width d = E/h) costs

    projections  Nq*E*(2E-1) + 2*Nk*E*(2E-1)         (Q from queries; K, V from keys)
    scores       h * Nq*Nk*(2d-1)                     (Q K^T per head)
    scale        1 + h*Nq*Nk                          (sqrt(d) once, one division per score)
    softmax      h * Nq*(3Nk-1)                       (Nk exp, Nk-1 additions, Nk divisions per row)
    weighted sum h * Nq*d*(2Nk-1)                     (probs V per head)
    output       Nq*E*(2E-1)

and the importance scores of a pruning layer cost h*Nq*Nk (head mean) + Nq*Nk (weighting by
class confidence) + (k-1)*Nk (sum over the k kept queries). With these, the paper's Table 7
before-pruning figures are reproduced exactly (StreamPETR-VoVNet 1600x640: 174.91 GFLOPs of
cross-attention over 6 layers; OPEN-R101 1408x512: 123.55) and the after-pruning figures to
within 0.2% (61.36 vs 61.44 at r=21000 n=2; the equation of the importance cost is not
legible in our copy of the paper).

Everything here is plain arithmetic on ints (no onnx, no torch): boards can import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Sequence

from edgeprune.methods.tggbc import TgGBCConfig      # torch-free: config, validation, schedule


def matmul_flops(m: int, n: int, p: int) -> int:
    """[m, n] x [n, p]."""
    return m * p * (2 * n - 1)


@dataclass(frozen=True)
class AttentionFlops:
    """One multi-head attention, split as in the paper's equations 12-18."""

    projections: int
    scores: int
    scale: int
    softmax: int
    weighted_sum: int
    output: int

    @property
    def total(self) -> int:
        return self.projections + self.scores + self.scale + self.softmax + self.weighted_sum + self.output


def attention_flops(num_queries: int, num_keys: int, embed_dims: int, num_heads: int) -> AttentionFlops:
    nq, nk, e, h = num_queries, num_keys, embed_dims, num_heads
    d = e // h
    return AttentionFlops(
        projections=matmul_flops(nq, e, e) + 2 * matmul_flops(nk, e, e),
        scores=h * matmul_flops(nq, d, nk),
        scale=1 + h * nq * nk,
        softmax=h * nq * (3 * nk - 1),
        weighted_sum=h * matmul_flops(nq, nk, d),
        output=matmul_flops(nq, e, e))


def importance_flops(num_queries: int, num_keys: int, num_heads: int, k: int) -> int:
    """tgGBC key importance of one pruning layer (k <= 0: all queries)."""
    kept = k if 0 < k <= num_queries else num_queries
    return num_heads * num_queries * num_keys + num_queries * num_keys + (kept - 1) * num_keys


def ffn_flops(num_queries: int, embed_dims: int, hidden: int) -> int:
    return matmul_flops(num_queries, embed_dims, hidden) + matmul_flops(num_queries, hidden, embed_dims)


def keys_per_layer(num_keys: int, drops: Sequence[int]) -> list[int]:
    """Keys each layer's cross-attention reads when layer l drops ``drops[l]`` after itself."""
    keys, out = num_keys, []
    for drop in drops:
        out.append(keys)
        keys -= drop
    return out


@dataclass(frozen=True)
class LayerFlops:
    """One decoder layer (per batch element): cross-attention, self-attention, FFN, scoring."""

    index: int
    num_keys: int
    cross: AttentionFlops
    self_attn: AttentionFlops | None = None   # None: not counted (folded to constants or unknown)
    ffn: int | None = None                    # None: hidden width unknown
    importance: int = 0                          # tgGBC scoring after this layer

    @property
    def cross_total(self) -> int:
        """Cross-attention + scoring: the paper's per-layer quantity (Eq. 20 + 21)."""
        return self.cross.total + self.importance

    @property
    def total(self) -> int:
        return self.cross_total + (self.self_attn.total if self.self_attn else 0) + (self.ffn or 0)


@dataclass(frozen=True)
class DecoderFlops:
    layers: tuple[LayerFlops, ...]
    batch: int = 1

    @property
    def cross_total(self) -> int:
        return self.batch * sum(layer.cross_total for layer in self.layers)

    @property
    def total(self) -> int:
        return self.batch * sum(layer.total for layer in self.layers)


@dataclass(frozen=True)
class DecoderSizes:
    """What the FLOP count needs; ``self_keys``/``ffn_dims`` per layer (None = not counted)."""

    num_layers: int
    num_queries: int
    num_keys: int
    embed_dims: int
    num_heads: int
    batch: int = 1
    self_keys: tuple[int | None, ...] = field(default_factory=tuple)
    ffn_dims: int | None = None
    # What the graph itself already does (a tgGBC-pruned model): the keys each layer reads
    # (empty: num_keys everywhere) and the layers whose keys it scores with its top-k queries.
    layer_keys: tuple[int, ...] = field(default_factory=tuple)
    scoring_layers: tuple[int, ...] = field(default_factory=tuple)
    scoring_k: int = 0

    def keys_read(self) -> list[int]:
        """Keys each layer's cross-attention reads in the graph as it is."""
        return list(self.layer_keys) if self.layer_keys else [self.num_keys] * self.num_layers


def decoder_flops(sizes: DecoderSizes, drops: Sequence[int] | None = None, k: int = 0) -> DecoderFlops:
    """FLOPs of every layer, with ``drops[l]`` keys pruned after layer l (None: no pruning)."""
    drops = list(drops) if drops is not None else [0] * sizes.num_layers
    dropped_before = [0] + list(accumulate(drops))[:-1]                        # keys dropped by earlier layers
    keys = [nk - d for nk, d in zip(sizes.keys_read(), dropped_before)]
    e, h, nq = sizes.embed_dims, sizes.num_heads, sizes.num_queries
    layers = []
    for i, nk in enumerate(keys):
        sk = sizes.self_keys[i] if i < len(sizes.self_keys) else None
        scoring = importance_flops(nq, nk, h, k) if drops[i] > 0 else 0
        if i in sizes.scoring_layers:
            scoring += importance_flops(nq, nk, h, sizes.scoring_k)
        layers.append(LayerFlops(
            index=i, num_keys=nk, cross=attention_flops(nq, nk, e, h),
            self_attn=attention_flops(nq, sk, e, h) if sk else None,
            ffn=ffn_flops(nq, e, sizes.ffn_dims) if sizes.ffn_dims else None, importance=scoring))
    return DecoderFlops(tuple(layers), sizes.batch)


@dataclass(frozen=True)
class PruningEstimate:
    """FLOPs before and after tgGBC with (r, n, k), and the ideal speedup of the decoder."""

    r: int
    n: int
    k: int
    drops: tuple[int, ...]
    before: DecoderFlops
    after: DecoderFlops

    @property
    def reduction(self) -> float:
        """Fraction of decoder FLOPs removed (cross-attention + self-attention + FFN counted)."""
        return 1.0 - self.after.total / self.before.total

    @property
    def cross_reduction(self) -> float:
        """Fraction of cross-attention FLOPs removed (the paper's Table 7 quantity)."""
        return 1.0 - self.after.cross_total / self.before.cross_total

    @property
    def ideal_speedup(self) -> float:
        """before / after FLOPs: the speedup if run time followed FLOPs exactly."""
        return self.before.total / self.after.total


def estimate_tggbc(sizes: DecoderSizes, r: int, n: int, k: int = 0) -> PruningEstimate:
    """Validate (r, n, k) against the decoder and count FLOPs before and after pruning."""
    drops = TgGBCConfig(r=r, n=n, k=k).layer_schedule(min(sizes.keys_read()), sizes.num_layers, sizes.num_queries)
    return PruningEstimate(r, n, k, tuple(drops), decoder_flops(sizes), decoder_flops(sizes, drops, k))
