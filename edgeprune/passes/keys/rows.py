"""The top-k queries' attention rows of one layer, recomputed from its Q and K (tgGBC scoring).

tgGBC with ``k > 0`` needs only k of the Nq rows of a layer's attention probabilities. Reading
them from the probabilities tensor is a pass over [B, h, Nq, Nk] (690 MB on 24000 keys);
recomputing them costs a k x d x Nk product per head and a softmax over k rows::

    Q [B, h, Nq, d] | [B*h, Nq, d] --Gather rows (top-k queries)-->  Q_k [.., k, d]
    MatMul(Q_k, K^T) -> the layer's own ops between its score MatMul and Softmax
      (scale Mul/Div, additive masks broadcast over queries), replayed on the rows
    Softmax(last axis)                                                  rows [.., k, Nk]

:func:`find_score_chain` walks up from the layer's Softmax to the MatMul of Q and K^T and
returns None when the graph does not have that form (fused attention, a mask with one row per
query, a Softmax not on the last axis, a probabilities tensor that is not a Softmax output):
the pass then reads the probabilities tensor as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeprune.graph.edit import FLOAT, GraphEditor
from edgeprune.passes.discovery.structure import DecoderLayer

_REPLAYABLE = frozenset({"Add", "Sub", "Mul", "Div"})    # elementwise ops between scores and Softmax


@dataclass(frozen=True)
class ScoreChain:
    """MatMul(Q, K^T) -> elementwise ops -> Softmax: one layer's probabilities, as the graph computes them."""

    matmul: Any                          # gs node; inputs read when the rows are built (K may be gathered)
    steps: tuple[tuple[Any, int], ...]   # (elementwise node, index of its input on the score path), in order
    softmax: Any
    heads_in_batch: bool                 # Q is [B*h, Nq, d] (b-major) rather than [B, h, Nq, d]


def _producer(tensor: Any) -> Any | None:
    return tensor.inputs[0] if getattr(tensor, "inputs", None) else None


def _row_broadcast(ed: GraphEditor, layer: DecoderLayer, node: Any, index: int) -> bool:
    """Whether ``node``'s input ``index`` is the same for every query row (scalar, or query axis 1).

    A mask the pass already gathered has no recorded shape: its original's (``layer.masks``) holds.
    """
    tensor = node.inputs[index]
    shape = getattr(tensor, "values", None)
    dims = tuple(shape.shape) if shape is not None else None
    if dims is None:
        names = [m.tensor for m in layer.masks if m.consumer == node.name and m.input_index == index]
        name = names[0] if names else tensor.name
        if name not in ed.info:
            return False
        dims = tuple(ed.info[name][1])
    return len(dims) < 2 or dims[-2] == 1


def find_score_chain(ed: GraphEditor, layer: DecoderLayer, num_queries: int) -> ScoreChain | None:
    """The MatMul(Q, K^T) -> (Add|Sub|Mul|Div)* -> Softmax chain producing ``layer``'s probabilities."""
    p = layer.probs
    if p.layout not in ("BHQK", "(BH)QK") or p.tensor is None or p.tensor not in ed.tensors:
        return None
    softmax = _producer(ed.tensor(p.tensor))
    if softmax is None or softmax.op != "Softmax" or ed.info.get(p.tensor, (FLOAT,))[0] != FLOAT:
        return None
    rank = ed.rank(p.tensor)
    if softmax.attrs.get("axis", -1) not in (-1, rank - 1):
        return None
    steps, x = [], softmax.inputs[0]
    while True:
        node = _producer(x)
        if node is None:
            return None
        if node.op == "MatMul":
            break
        if node.op not in _REPLAYABLE or len(node.inputs) != 2:
            return None
        per_row = [_row_broadcast(ed, layer, node, i) for i in (0, 1)]
        if per_row.count(False) != 1:                                          # one input is the scores
            return None
        path = per_row.index(False)
        steps.append((node, path))
        x = node.inputs[path]
    q_shape = ed.info.get(node.inputs[0].name, (0, ()))[1]
    if len(q_shape) != rank or q_shape[-2] != num_queries:
        return None
    return ScoreChain(node, tuple(reversed(steps)), softmax, heads_in_batch=rank == 3)


def top_rows(ed: GraphEditor, chain: ScoreChain, top: Any, batch: int, num_heads: int, k: int) -> Any:
    """The attention rows of the ``k`` queries ``top`` [B, k]: [B, h, k, Nk], recomputed from Q and K."""
    q, kt = chain.matmul.inputs[0], chain.matmul.inputs[1]                     # current wiring: K maybe gathered
    width = int(ed.info[q.name][1][-1])
    q_rows = _gather_rows(ed, q, top, batch, num_heads, width, chain.heads_in_batch)
    x = ed.op("MatMul", [q_rows, kt], "rows_scores")                           # [.., k, Nk]
    for node, path in chain.steps:
        inputs = list(node.inputs)
        inputs[path] = x
        x = ed.op(node.op, inputs, f"rows_{node.op.lower()}", **dict(node.attrs))
    probs = ed.op("Softmax", [x], "rows_probs", **dict(chain.softmax.attrs))
    return ed.reshape(probs, "rows_bhkn", batch, num_heads, k, -1) if chain.heads_in_batch else probs


def _gather_rows(ed: GraphEditor, q: Any, top: Any, batch: int, heads: int, width: int, heads_in_batch: bool) -> Any:
    """Q's rows of the queries ``top`` [B, k], per batch element: [B, h, k, d] | [B*h, k, d]."""
    axis = 1 if heads_in_batch else 2
    if batch == 1:                                                             # same rows for every head
        return ed.op("Gather", [q, ed.reshape(top, "top_flat", -1)], "q_rows", axis=axis)
    idx = ed.reshape(top, "top_b1k1", batch, 1, -1, 1)                        # [B, 1, k, 1]
    idx = ed.op("Expand", [idx, ed.ints("bhkd", batch, heads, 1, width)], "top_bhkd")
    if heads_in_batch:
        idx = ed.reshape(idx, "top_rows", batch * heads, -1, width)
    return ed.op("GatherElements", [q, idx], "q_rows", axis=axis)
