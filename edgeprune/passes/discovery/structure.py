"""The decoder structure found in an ONNX graph: the contract between discovery and passes.

Discovery (``edgeprune.passes.discovery.discover``) fills these records from the exporter's metadata
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

Deployment graphs often compute the class logits of the last layer only. The class branch
is one module shared by all layers, so a layer whose logits are not in the graph gets them
recomputed by a copy of the graph's own class head (:class:`ClassHead`)::

    layer l output  [B, Nq, E] (head_input) --copy of the head--> logits_l [B, Nq, C]   (tggbc/l{l}/class_head/)
    last layer out  [B, Nq, E] (entry) --LayerNorm -> Linear-LN-ReLU x2 -> Linear--> cls output (exit)

or, when the head runs once on the stacked outputs of every layer (Hugging Face's auxiliary
outputs), ``entry`` is the stack ``[L, B, Nq, E]`` and layer l's input is its l-th slice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # The MatMul/Gemm doing the projection. Usually ``consumer`` itself; after onnxsim a 3-D
    # projection is often Reshape [B, Nk, E] -> [B*Nk, E] -> Gemm, and then ``consumer`` is that
    # flattening Reshape. onnxsim also merges the projections of all layers that read the same
    # tensor into one MatMul [E, L*E] + Split: then several layers share ``consumer``.
    projection: str = ""


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
    batch_axis: int | None = None   # axis with B entries (None: broadcast over batch)
    heads_in_batch: bool = False    # the batch axis holds B*h entries (b-major), as in "(BH)QK"


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
    fused_qk: tuple[str, str] | None = None   # (Q, K) inputs of a fused attention op, [B, S, h*d] or [B, h, S, d]
    scale: float | None = None                 # softmax scale for recomputation (None: 1/sqrt(d))
    # com.microsoft.MultiHeadAttention's packed bias [3*h*d] (Q, K, V): add its Q / K thirds
    # to ``fused_qk`` before recomputing the probabilities. None when there is none.
    fused_bias: str | None = None


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer's cross-attention, as key pruning needs it."""

    index: int
    probs: AttentionProbs
    key_inputs: tuple[ProjectionInput, ...]     # inputs of the key projection(s)
    value_inputs: tuple[ProjectionInput, ...]   # inputs of the value projection(s)
    masks: tuple[MaskInput, ...]                # per-key additive masks of this layer, if any
    pv_node: str                                # the MatMul(probs, V) node (or the fused op)
    # This layer's class logits: [B, Nq, C] values in row-major order. The tensor may fold or
    # add unit leading axes ([B*Nq, C], [1, B, Nq, C] when onnxsim merged the Reshape into the
    # stacking); reshaping it to (batch, num_queries, num_classes) is always valid.
    logits: str | None
    num_keys: int
    # Nodes from the key/value projection inputs (exclusive) to the attention MatMuls / fused
    # op (exclusive): projections, bias Adds, Splits, head Reshapes/Transposes. Static shape
    # constants of these nodes carry Nk and must follow when keys are gathered.
    key_path_nodes: tuple[str, ...] = ()
    # Where this layer's output sits at the position the class head reads (``ClassHead.entry``
    # for the last layer): set when ``logits`` is None and the logits are to be recomputed.
    head_input: str | None = None
    # Masks on this layer's scores that discovery saw but could not record (a layer named by
    # overrides): a pass that gathers keys needs them named with ``--override layer.N.mask``.
    unmatched_masks: tuple[str, ...] = ()
    # Discovery's guesses for parts it could not record (a layer named by overrides), as
    # ``--override`` values: ``(("key", "TENSOR@NODE"), ("value", ...))``.
    guesses: tuple[tuple[str, str], ...] = ()
    # The MatMul(Q, K^T) node of the scores (None for fused ops and layers named by overrides).
    qk_node: str | None = None

    @property
    def logits_recomputed(self) -> bool:
        """True when a pass must recompute this layer's logits with the shared class head."""
        return self.logits is None and self.head_input is not None


@dataclass(frozen=True)
class ClassHead:
    """The class branch as the graph computes it after the last layer, shared by all layers.

    ``nodes`` (graph order) read ``entry`` and constants only and end in ``exit``, the class
    logits; applying copies of them to another layer's output gives that layer's logits.
    """

    entry: str                  # last layer's output [B, Nq, E], or the stack of all layers' [L, B, Nq, E]
    exit: str                   # the logits the head computes from ``entry``
    nodes: tuple[str, ...]      # node names from entry (exclusive) to exit (inclusive)
    stacked: bool = False       # ``entry`` stacks every layer's output along axis 0


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
    # Initializers and Constant outputs with an axis of size ``num_queries`` (candidates for GPQ;
    # a dimension may equal Nq by coincidence, so a pass checks which axis to slice).
    query_initializers: tuple[str, ...] = field(default_factory=tuple)
    cls_output: str | None = None                # graph output stacking the logits [L, B, Nq, C]
    # The exporter's record (``edgeprune.export.decoder_map.DecoderMap``) when source is
    # "metadata": query tensors with their axes, shape constants carrying Nq, memory inputs.
    decoder_map: Any = None
    # The shared class head, when some layer's logits must be recomputed with it.
    class_head: ClassHead | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)
