"""The decoder structure found in an ONNX graph: the contract between discovery and passes.

Discovery (``edgeprune.passes.discovery``) fills these records from the exporter's metadata
or by matching the graph; passes (tgGBC, GPQ, ToMe) only read them. All records are
immutable; a pass never stores matches on itself.

Attention as matched (one head shown; the pre-softmax Add is optional)::

    q_in --MatMul(Wq)-..reshape/transpose..--+
                                             MatMul(QK^T) -> Mul/Div(scale) -> [Add(mask)] -> Softmax -> probs
    k_in --MatMul(Wk)-..reshape/transpose..--+                                                 |
    v_in --MatMul(Wv)-..reshape/transpose..----------------------------------------- MatMul(probs, V) -> ...

``k_in``/``v_in`` are the *inputs of the key/value projections* (for cross-attention in
PETR-family decoders: ``memory + key_pos`` and ``memory``). Key pruning gathers these, not the
projected tensors, so the later projections shrink too.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProjectionInput:
    """A tensor entering a key or value projection and the axis along which keys run.

    ``consumer`` is the projection node (MatMul/Gemm) reading ``tensor``; gathering keys means
    rewiring that node's input ``input_index`` to a gathered copy along ``key_axis``.
    """

    tensor: str          # e.g. [B, Nk, E] or [Nk, B, E]
    consumer: str        # node name of the projection (MatMul / Gemm)
    input_index: int
    key_axis: int        # axis of ``tensor`` that has Nk entries
    batch_axis: int | None  # axis of ``tensor`` with B entries (None if batch is folded / absent)


@dataclass(frozen=True)
class MaskInput:
    """An additive mask (or key padding mask) applied to the attention scores of one layer.

    ``consumer``'s input ``input_index`` is the mask tensor; keys run along ``key_axis``
    (usually the last axis). Broadcast masks whose key axis has size 1 need no gather.
    """

    tensor: str
    consumer: str
    input_index: int
    key_axis: int


@dataclass(frozen=True)
class AttentionProbs:
    """Where a layer's cross-attention probabilities are, and their layout.

    ``layout`` is one of ``"BHQK"`` ([B, h, Nq, Nk]), ``"(BH)QK"`` ([B*h, Nq, Nk], as the
    TorchScript export of nn.MultiheadAttention writes), ``"BQK_mean"`` (already averaged over
    heads, [B, Nq, Nk]) or ``"fused"`` (no probability tensor: recompute from ``q``/``k`` of
    a fused Attention op, see ``fused_qk``).
    """

    tensor: str | None
    layout: str
    num_heads: int
    fused_qk: tuple[str, str] | None = None   # (Q, K) inputs of a fused attention op, [B, S, h*d]
    scale: float | None = None                 # softmax scale for recomputation


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer's cross-attention, as key pruning needs it."""

    index: int
    probs: AttentionProbs
    key_inputs: tuple[ProjectionInput, ...]     # inputs of the key projection(s)
    value_inputs: tuple[ProjectionInput, ...]   # inputs of the value projection(s)
    masks: tuple[MaskInput, ...]                # per-key additive masks of this layer, if any
    pv_node: str                                # the MatMul(probs, V) node (or the fused op)
    logits: str | None                          # this layer's class logits [B, Nq, C]
    num_keys: int


@dataclass(frozen=True)
class DecoderStructure:
    """Everything the passes need to know about one exported decoder."""

    layers: tuple[DecoderLayer, ...]
    batch: int
    num_queries: int
    num_keys: int
    num_classes: int
    embed_dims: int
    num_heads: int
    source: str                                  # "metadata" or "matched"
    query_initializers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_layers(self) -> int:
        return len(self.layers)
