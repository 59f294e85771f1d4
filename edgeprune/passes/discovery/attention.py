"""Match multi-head attention in an ONNX graph, unfused or as one fused op.

Unfused attention, as the TorchScript and dynamo exporters write it (hand-written matmul
code and ``nn.MultiheadAttention`` alike), found from its Softmax::

    q_in -> MatMul/Gemm(Wq) [+bq] -> Reshape/Transpose.. [* scale] --+
                                                                      MatMul (QK^T) [* or / scale] [+ mask | Where(mask)] -> Softmax -> probs
    k_in -> MatMul/Gemm(Wk) [+bk] -> [Split] -> Reshape/Transpose.. --+                                                       |
    v_in -> MatMul/Gemm(Wv) [+bv] -> [Split] -> Reshape/Transpose.. ------------------------------------------------ MatMul(probs, V)

``[Split]`` appears after onnxsim merged the projections of all layers reading the same
tensor; a ``Reshape [B, Nk, E] -> [B*Nk, E]`` may precede a 2-D ``Gemm``. Other forms matched:

- key = value (``nn.MultiheadAttention`` / ``nn.TransformerDecoderLayer`` cross-attention): one
  packed projection ``MatMul(memory, [Wk | Wv])``, unflattened, then ``Gather(0)`` / ``Gather(1)``
  (a walk passes a Gather with a constant scalar index); both sides name the same input;
- SDPA as the exporters write it: the scale ``sqrt(1/sqrt(d))`` on Q and on K^T (TorchScript
  computes it from ``Shape(q)``: constant for static shapes), and with a boolean mask
  ``Where(mask, 0, -inf)`` before and a NaN guard ``Where(IsNaN(p), 0, p)`` after the Softmax;
- keys combined from several per-key tensors (Conditional DETR:
  ``Concat(Wc memory, Wp key_pos)`` per head, plus ``Wc memory + Wp key_pos`` in its first
  layer): every projection input is returned, so key pruning gathers all of them. Fused attention is
ONNX ``Attention`` (opset 23) or ``com.microsoft.MultiHeadAttention`` with inputs (Q, K, V).

Match records are immutable; nothing here edits the graph or decides cross vs self attention
(``discovery`` does, from where keys come from and from shapes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from edgeprune.graph.index import GraphIndex, Walk, walk_up
from edgeprune.graph.values import attr
from edgeprune.passes.discovery.structure import AttentionProbs, MaskInput, ProjectionInput

log = logging.getLogger(__name__)

_SCORE_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity", "Reshape"})
_MAX_SCORE_STEPS = 12


@dataclass(frozen=True)
class AttentionMatch:
    """One attention block as matched (cross or self: not decided here)."""

    node: str                               # the Softmax, or the fused op
    probs: AttentionProbs
    pv_node: str
    qk_node: str | None                     # MatMul(Q, K^T); None for fused ops
    query_input: ProjectionInput | None     # None: queries folded to a constant, or projection not matched
    key_inputs: tuple[ProjectionInput, ...]     # several when keys combine per-key tensors (Conditional DETR)
    value_inputs: tuple[ProjectionInput, ...]
    masks: tuple[MaskInput, ...]
    num_queries: int
    num_keys: int
    batch: int
    embed_dims: int                         # last axis of the key projection input
    path_nodes: tuple[str, ...]             # nodes between projection inputs and attention
    query_constant: bool = False            # the query side (Q) is computed from constants only

    @property
    def key_input(self) -> ProjectionInput:
        """The first key projection input (the memory side for the combined keys of Conditional DETR)."""
        return self.key_inputs[0]

    @property
    def value_input(self) -> ProjectionInput:
        return self.value_inputs[0]


@dataclass(frozen=True)
class _Projection:
    input: ProjectionInput
    path: tuple[Any, ...]        # nodes from the consumer down to the attention (graph order reversed)
    factor: float


# ----------------------------------------------------------------- projections
def _projection_node(index: GraphIndex, walk: Walk) -> tuple[Any, int] | None:
    """(MatMul/Gemm node, data input index) if the walk stopped at a projection by a constant weight."""
    node = walk.node
    if node is None:
        return None
    if node.op_type == "Gemm" and not attr(node, "transA", 0) and index.is_constant(node.input[1]):
        return node, 0
    if node.op_type == "MatMul":
        const = [index.is_constant(i) for i in node.input]
        if const[1] and not const[0]:
            return node, 0
    return None


def _flatten_source(index: GraphIndex, tensor: str) -> Any | None:
    """The Reshape that flattened [.., N, E] to 2-D right before a Gemm, if any."""
    node = index.producer.get(tensor)
    shape, src = index.shape(tensor), None
    if node is not None and node.op_type == "Reshape" and shape is not None and len(shape) == 2:
        src = index.shape(node.input[0])
    return node if src is not None and len(src) >= 3 else None


def find_projection(index: GraphIndex, tensor: str, num_keys: int) -> _Projection | None:
    """Walk up from an attention input (K, V or Q side) to the projection and its input."""
    return _projection_at(index, walk_up(index, tensor), num_keys)


def _projection_at(index: GraphIndex, walk: Walk, num_keys: int) -> _Projection | None:
    """The projection where ``walk`` stopped, with its input's key/batch axes; None if it is not one."""
    found = _projection_node(index, walk)
    if found is None:
        return None
    proj, data = found
    path = walk.path + (proj,)
    consumer, idx, x = proj, data, proj.input[data]
    flat = _flatten_source(index, x)
    if flat is not None:
        consumer, idx, x = flat, 0, flat.input[0]
        path = path + (flat,)
    axes = _axes(index.shape(x), num_keys)
    if axes is None:
        return None
    key_axis, batch_axis = axes
    pin = ProjectionInput(tensor=x, consumer=consumer.name, input_index=idx, key_axis=key_axis,
                          batch_axis=batch_axis, projection=proj.name)
    return _Projection(pin, path, walk.factor)


def find_projections(index: GraphIndex, tensor: str, num_keys: int, depth: int = 3) -> tuple[_Projection, ...] | None:
    """Every projection feeding an attention input, also when it combines several per-key tensors.

    Conditional DETR's keys are ``Concat(content(memory), pos(key_pos))`` along the head
    width, and its first layer adds the two projections: the keys then depend on two
    projection inputs, and pruning must gather both. Combinations followed: a Concat not
    along the key axis, and Add/Sub of two computed tensors. None when a part is not a projection.
    """
    walk = walk_up(index, tensor)
    single = _projection_at(index, walk, num_keys)
    if single is not None:
        return (single,)
    node = walk.node
    if depth == 0 or node is None or not _combines_per_key(index, node, walk.tensor, num_keys):
        return None
    parts: list[_Projection] = []
    for inp in dict.fromkeys(i for i in node.input if i and not index.is_constant(i)):
        found = find_projections(index, inp, num_keys, depth - 1)
        if found is None:
            return None
        parts += [_Projection(p.input, walk.path + (node,) + p.path, walk.factor) for p in found]
    return tuple(parts)


def _combines_per_key(index: GraphIndex, node: Any, tensor: str, num_keys: int) -> bool:
    """``node`` joins per-key tensors key by key: Add/Sub of two computed inputs, or a Concat along
    an axis other than the keys'."""
    computed = [i for i in node.input if i and not index.is_constant(i)]
    if node.op_type in ("Add", "Sub"):
        return len(computed) == 2
    if node.op_type != "Concat" or len(computed) < 2:
        return False
    shape = index.shape(tensor)
    if shape is None:
        return False
    axis = attr(node, "axis", 0) % len(shape)
    return shape[axis] != num_keys and num_keys in shape


def _axes(shape: Sequence[Any] | None, num_keys: int) -> tuple[int, int | None] | None:
    """(key axis, batch axis) of a projection input [B, N, E], [N, B, E] or [N, E].

    When B == N both axes fit; the batch-first reading (key axis 1) is taken.
    """
    if shape is None or len(shape) < 2:
        return None
    body = list(shape[:-1])
    hits = [i for i, d in enumerate(body) if d == num_keys]
    if not hits:
        return None
    key_axis = hits[-1]
    rest = [i for i in range(len(body)) if i != key_axis]
    return key_axis, (rest[0] if len(rest) == 1 else None)


# ------------------------------------------------------------------ score path
def _reaches_matmul(index: GraphIndex, tensor: str, depth: int = 6) -> bool:
    """True when ``tensor`` comes from a MatMul with a non-constant right side via score ops."""
    node = index.producer.get(tensor)
    if node is None or depth == 0:
        return False
    if node.op_type == "MatMul":
        return not index.is_constant(node.input[1])
    if node.op_type not in _SCORE_OPS:
        return False
    return any(_reaches_matmul(index, i, depth - 1) for i in node.input if i and not index.is_constant(i))


@dataclass(frozen=True)
class _ScorePath:
    qk: Any
    masks: tuple[tuple[str, Any, int], ...]   # (mask tensor, consumer node, input index)
    factor: float


def _main_input(index: GraphIndex, node: Any, choices: Sequence[int]) -> int | None:
    hits = [i for i in choices if i < len(node.input) and _reaches_matmul(index, node.input[i])]
    return hits[0] if len(hits) == 1 else None


def score_path(index: GraphIndex, softmax: Any) -> _ScorePath | None:
    """From a Softmax's input up to the QK MatMul, collecting masks and constant scales."""
    tensor, masks, factor = softmax.input[0], [], 1.0
    for _ in range(_MAX_SCORE_STEPS):
        node = index.producer.get(tensor)
        if node is None:
            return None
        op = node.op_type
        if op == "MatMul":
            return _ScorePath(node, tuple(masks), factor) if not index.is_constant(node.input[1]) else None
        if op in ("Cast", "Identity", "Reshape"):
            tensor = node.input[0]
            continue
        if op in ("Mul", "Div") and index.is_constant(node.input[1]) and index.scalar(node.input[1]):
            s = index.scalar(node.input[1]) or 1.0
            factor *= s if op == "Mul" else 1.0 / s
            tensor = node.input[0]
            continue
        if op in ("Add", "Where"):
            choices = (0, 1) if op == "Add" else (1, 2)
            main = _main_input(index, node, choices)
            if main is None:
                return None
            mask_idx = (1 - main) if op == "Add" else 0
            masks.append((node.input[mask_idx], node, mask_idx))
            tensor = node.input[main]
            continue
        return None
    return None


def _nan_guard(index: GraphIndex, node: Any, tensor: str) -> bool:
    """``Where(cond, constant, tensor)``: the exporters' SDPA with a boolean mask replaces the NaN
    rows of fully masked queries (``Where(IsNaN(p), 0, p)``); values pass through otherwise."""
    if node.op_type != "Where" or len(node.input) != 3 or tensor not in node.input[1:]:
        return False
    other = node.input[1] if node.input[2] == tensor else node.input[2]
    return other != tensor and index.is_constant(other)


def _pv_node(index: GraphIndex, probs: str) -> Any | None:
    """The MatMul(probs, V) reading ``probs`` (through Cast/Identity/Dropout and a NaN guard)."""
    todo, seen = [probs], set()
    while todo:
        tensor = todo.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for user in index.users(tensor):
            if user.op_type == "MatMul" and user.input[0] == tensor and not index.is_constant(user.input[1]):
                return user
            if user.op_type in ("Cast", "Identity", "Dropout") or _nan_guard(index, user, tensor):
                todo.append(user.output[0])
    return None


# ------------------------------------------------------------------ unfused
def _mask_input(index: GraphIndex, tensor: str, consumer: Any, idx: int, scores_rank: int,
                batch: int, heads: int, layout: str) -> MaskInput:
    """Key axis / batch axis of a mask broadcast against scores [B, h, Nq, Nk] or [B*h, Nq, Nk]."""
    shape = index.shape(tensor) or ()
    rank = len(shape)
    key_axis = rank - 1 if rank else 0
    batch_axis, in_batch = None, False
    if rank == scores_rank and shape and shape[0] not in (1, None):
        batch_axis = 0
        in_batch = layout == "(BH)QK" and heads > 1 and shape[0] == batch * heads
    return MaskInput(tensor=tensor, consumer=consumer.name, input_index=idx, key_axis=key_axis,
                     batch_axis=batch_axis, heads_in_batch=in_batch)


def _static(shape: Sequence[Any] | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def match_softmax_attention(index: GraphIndex, softmax: Any) -> AttentionMatch | None:
    """The attention around ``softmax`` (a Softmax over the last axis), or None."""
    probs_shape = index.shape(softmax.output[0])
    if not _static(probs_shape) or len(probs_shape) not in (3, 4):
        return None
    axis = attr(softmax, "axis", -1)
    if axis not in (-1, len(probs_shape) - 1):
        return None
    nq, nk = probs_shape[-2], probs_shape[-1]
    scores = score_path(index, softmax)
    pv = _pv_node(index, softmax.output[0])
    if scores is None or pv is None:
        return None
    key = find_projections(index, scores.qk.input[1], nk)
    value = find_projections(index, pv.input[1], nk)
    if key is None or value is None:
        return None
    query = find_projection(index, scores.qk.input[0], nq)
    return _assemble(index, softmax, probs_shape, scores, pv, query, key, value)


def _pins(parts: Sequence[_Projection]) -> tuple[ProjectionInput, ...]:
    """The distinct projection inputs of ``parts`` (a tensor feeding two combined parts counts once)."""
    return tuple({(p.input.consumer, p.input.input_index): p.input for p in parts}.values())


def _path_names(*sides: Sequence[_Projection]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.name for parts in sides for p in parts for n in p.path))


def _heads_and_batch(index: GraphIndex, probs_shape: Sequence[int], qk: Any,
                     key: _Projection) -> tuple[int, int, str] | None:
    """(heads, batch, layout) from the probabilities' shape and the head width of Q."""
    if len(probs_shape) == 4:
        return probs_shape[1], probs_shape[0], "BHQK"
    q_shape = index.shape(qk.input[0])
    embed = (index.shape(key.input.tensor) or (None,))[-1]
    if not _static(q_shape) or not isinstance(embed, int) or q_shape[-1] <= 0 or embed % q_shape[-1]:
        return None
    heads = embed // q_shape[-1]
    if probs_shape[0] % heads:
        return None
    return heads, probs_shape[0] // heads, "(BH)QK"


def _assemble(index: GraphIndex, softmax: Any, probs_shape: Sequence[int], scores: _ScorePath, pv: Any,
              query: _Projection | None, key: Sequence[_Projection], value: Sequence[_Projection]
              ) -> AttentionMatch | None:
    hb = _heads_and_batch(index, probs_shape, scores.qk, key[0])
    if hb is None:
        return None
    heads, batch, layout = hb
    scale = scores.factor * key[0].factor * (query.factor if query is not None else 1.0)
    masks = tuple(_mask_input(index, t, c, i, len(probs_shape), batch, heads, layout) for t, c, i in scores.masks)
    embed = index.shape(key[0].input.tensor)[-1]
    return AttentionMatch(
        node=softmax.name,
        probs=AttentionProbs(tensor=softmax.output[0], layout=layout, num_heads=heads, scale=scale),
        pv_node=pv.name, qk_node=scores.qk.name,
        query_input=query.input if query is not None else None,
        key_inputs=_pins(key), value_inputs=_pins(value), masks=masks,
        num_queries=probs_shape[-2], num_keys=probs_shape[-1], batch=batch, embed_dims=int(embed),
        path_nodes=_path_names(key, value), query_constant=index.is_constant(scores.qk.input[0]))


# ------------------------------------------------------------------ fused
FUSED_OPS = {("", "Attention"), ("ai.onnx", "Attention"), ("com.microsoft", "MultiHeadAttention")}


def _fused_geometry(index: GraphIndex, node: Any) -> tuple[int, int, int, int] | None:
    """(heads, batch, Nq, Nk) of a fused attention op from its Q/K shapes and attributes."""
    q_shape, k_shape = index.shape(node.input[0]), index.shape(node.input[1])
    if not _static(q_shape) or not _static(k_shape) or len(q_shape) != len(k_shape):
        return None
    if len(q_shape) == 4:                                   # [B, h, S, d]
        return q_shape[1], q_shape[0], q_shape[2], k_shape[2]
    if len(q_shape) != 3:
        return None
    heads = attr(node, "q_num_heads" if node.op_type == "Attention" else "num_heads")
    if not heads:
        return None
    return int(heads), q_shape[0], q_shape[1], k_shape[1]


def _fused_masks(index: GraphIndex, node: Any, batch: int) -> tuple[MaskInput, ...]:
    """Attention's attn_mask (input 3); MultiHeadAttention's key_padding_mask (4) and attention_bias (5)."""
    slots = (3,) if node.op_type == "Attention" else (4, 5)
    masks = []
    for idx in slots:
        if idx < len(node.input) and node.input[idx]:
            shape = index.shape(node.input[idx]) or ()
            batch_axis = 0 if len(shape) >= 2 and shape[0] == batch and batch > 1 else None
            masks.append(MaskInput(node.input[idx], node.name, idx, max(len(shape) - 1, 0), batch_axis))
    return tuple(masks)


def match_fused_attention(index: GraphIndex, node: Any) -> AttentionMatch | None:
    """An ONNX ``Attention`` or ``com.microsoft.MultiHeadAttention`` node with separate Q, K, V."""
    if len(node.input) < 3 or not all(node.input[:3]):
        return None
    geometry = _fused_geometry(index, node)
    if geometry is None:
        return None
    heads, batch, nq, nk = geometry
    key = find_projections(index, node.input[1], nk)
    value = find_projections(index, node.input[2], nk)
    if key is None or value is None:
        return None
    query = find_projection(index, node.input[0], nq)
    bias = node.input[3] if node.op_type == "MultiHeadAttention" and len(node.input) > 3 and node.input[3] else None
    scale = attr(node, "scale")
    probs = AttentionProbs(tensor=None, layout="fused", num_heads=heads, fused_qk=(node.input[0], node.input[1]),
                           scale=float(scale) if scale else None, fused_bias=bias)
    return AttentionMatch(
        node=node.name, probs=probs, pv_node=node.name, qk_node=None,
        query_input=query.input if query is not None else None, key_inputs=_pins(key), value_inputs=_pins(value),
        masks=_fused_masks(index, node, batch), num_queries=nq, num_keys=nk, batch=batch,
        embed_dims=int(index.shape(key[0].input.tensor)[-1]), path_nodes=_path_names(key, value),
        query_constant=index.is_constant(node.input[0]))


def find_attentions(index: GraphIndex) -> list[AttentionMatch]:
    """Every attention block of the main graph, in graph order."""
    found = []
    for node in index.graph.node:
        if node.op_type == "Softmax":
            match = match_softmax_attention(index, node)
        elif (node.domain, node.op_type) in FUSED_OPS:
            match = match_fused_attention(index, node)
        else:
            continue
        if match is None:
            log.debug("%s %s is not a matched attention", node.op_type, node.name)
        else:
            found.append(match)
    return found
