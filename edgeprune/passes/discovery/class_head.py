"""Find the class head a graph applies after its last decoder layer, to recompute earlier layers' logits.

Deployment exports return the last layer's scores only: the class heads of earlier layers
are dead code and vanish. In DETR-style decoders the class branch is one module shared by
all layers, so the head that remains computes any layer's logits from that layer's output.
Found from the class-score output upwards::

    ... -> Add (residual) -> LayerNorm (layer's own) -> LayerNorm (final) -> Linear .. Linear -> scores
           top             layer output = entry      |<------------ class head ------------->|

The *chain* is the run of nodes above the scores output that each read one non-constant
tensor; it ends at the *top*, the first node with several (a residual Add, or the Concat
stacking every layer's output when the head runs once on all of them, as Hugging Face's
auxiliary outputs do). Where the layer ends and the head begins is read off the earlier
layers: from each earlier layer's attention output the path to the top is replayed (same op
types and input slots), then the chain below the top is followed as far as that layer has
the same ops; the earlier layers' outputs stop where their (dead) heads would start, and
that depth is the head's entry. A Linear whose weights differ from the head's is the next
layer's projection, never the head, so the walk does not run into the next layer.
"""
from __future__ import annotations

import logging
import re
from collections import deque
from typing import Any, Sequence

import numpy as np

from edgeprune.graph.index import GraphIndex
from edgeprune.graph.values import attr
from edgeprune.passes.discovery.structure import ClassHead, DecoderLayer

log = logging.getLogger(__name__)

_CLS_HINT = re.compile(r"cls|score|logit|class", re.IGNORECASE)
_WEIGHTED = frozenset({"MatMul", "Gemm", "Conv"})      # a shared head uses the same weights in every layer
_MAX_CHAIN = 64

Step = tuple[str, int, int]          # (op type, input slot read, output index followed)


# ------------------------------------------------------------------ the scores output and its chain
def _data_inputs(index: GraphIndex, node: Any) -> list[str]:
    return [i for i in node.input if i and not index.is_constant(i)]


def _is_linear_output(index: GraphIndex, tensor: str) -> bool:
    """``tensor`` is a Linear's output: MatMul/Gemm with constant weights [+ constant bias]."""
    node = index.producer.get(tensor)
    if node is not None and node.op_type == "Add" and len(_data_inputs(index, node)) == 1:
        node = index.producer.get(_data_inputs(index, node)[0])
    return node is not None and node.op_type in ("MatMul", "Gemm") and index.is_constant(node.input[1])


def scores_output(index: GraphIndex, last: DecoderLayer) -> str | None:
    """The graph output with the last layer's class scores: named like scores, else the one Linear output."""
    after = [o for o in index.outputs if index.depends_on(o, [index.nodes[last.pv_node].output[0]])]
    named = [o for o in after if _CLS_HINT.search(o)]
    if len(named) == 1:
        return named[0]
    linear = [o for o in (named or after) if _is_linear_output(index, o)]
    return linear[0] if len(linear) == 1 else None


def _chain(index: GraphIndex, exit_tensor: str) -> tuple[list[Any], Any | None]:
    """(nodes reading one non-constant tensor, nearest the output first; the node above them)."""
    chain: list[Any] = []
    node = index.producer.get(exit_tensor)
    while node is not None and len(chain) < _MAX_CHAIN:
        data = _data_inputs(index, node)
        if len(data) != 1 or len(node.output) != 1:
            return chain, node
        chain.append(node)
        node = index.producer.get(data[0])
    return chain, None


# ------------------------------------------------------------------ layer l's tensors at the head's position
def _distances(index: GraphIndex, start: str, limit: int) -> dict[str, int]:
    """Shortest op count from tensor ``start`` to every tensor computed from it by nodes before ``limit``."""
    dist = {start: 0}
    todo = deque([start])
    while todo:
        tensor = todo.popleft()
        for node, _ in index.uses(tensor):
            if index.position[node.name] >= limit:
                continue
            for out in node.output:
                if out and out not in dist:
                    dist[out] = dist[tensor] + 1
                    todo.append(out)
    return dist


def _same_weights(index: GraphIndex, a: Any, b: Any) -> bool:
    """Two weighted nodes read the same constants (same names, or equal values after deduplication)."""
    for x, y in zip(a.input, b.input):
        if x == y or not (index.is_constant(x) and index.is_constant(y)):
            continue
        vx, vy = index.value(x), index.value(y)
        if vx is None or vy is None or vx.shape != vy.shape or not np.array_equal(vx, vy):
            return False
    return True


def _computed_like(index: GraphIndex, tensor: str, ops: Sequence[Any], top: Any) -> bool:
    """``tensor`` comes from ``top``'s op type through nodes like ``ops`` (nearest first): same op types,
    attributes' axis and, for Linear/Conv, weights."""
    node = index.producer.get(tensor)
    for ref in ops:
        if (node is None or node.op_type != ref.op_type or len(_data_inputs(index, node)) != 1
                or attr(node, "axis") != attr(ref, "axis")
                or (node.op_type in _WEIGHTED and not _same_weights(index, node, ref))):
            return False
        node = index.producer.get(_data_inputs(index, node)[0])
    return node is not None and node.op_type == top.op_type and len(_data_inputs(index, node)) > 1


def _layer_output(index: GraphIndex, out: str, next_out: str, ops: Sequence[Any], top: Any,
                  distance: int) -> str | None:
    """The tensor of a layer computed like the last layer's chain tensor: between its attention and
    the next layer's (which reads it), the same ops above it, nearest in op count from the attention."""
    limit = index.position[index.producer[next_out].name]
    dist = _distances(index, out, limit)
    found = [t for t in dist if _computed_like(index, t, ops, top) and index.depends_on(next_out, [t])]
    return min(found, key=lambda t: (abs(dist[t] - distance), dist[t])) if found else None


def _earlier_outputs(index: GraphIndex, outs: Sequence[str], below: Sequence[Any], top: Any,
                     depth: int) -> list[str] | None:
    """Every earlier layer's tensor at chain depth ``depth`` (0: the top's output), or None."""
    entry = below[depth - 1].output[0] if depth else top.output[0]
    distance = _distances(index, outs[-1], index.position[top.name] + depth + 1).get(entry)
    if distance is None:
        return None
    ops = list(reversed(below[:depth]))
    found = [_layer_output(index, out, nxt, ops, top, distance) for out, nxt in zip(outs[:-1], outs[1:])]
    return None if any(t is None for t in found) else found         # type: ignore[return-value]


def follows_layers(index: GraphIndex, tensors: Sequence[str], outs: Sequence[str]) -> bool:
    """tensors[l] depends on layer l's attention output ``outs[l]`` and not yet on layer l+1's."""
    for i, tensor in enumerate(tensors):
        if not index.depends_on(tensor, [outs[i]]):
            return False
        if i + 1 < len(outs) and index.depends_on(tensor, [outs[i + 1]]):
            return False
    return True


# ------------------------------------------------------------------ the head
def _stacked_head(index: GraphIndex, top: Any, chain: list[Any], exit_tensor: str,
                  outs: Sequence[str]) -> tuple[ClassHead, list[str]] | None:
    """The head runs once on a Concat (axis 0) of every layer's output."""
    inputs = list(top.input)
    if top.op_type != "Concat" or attr(top, "axis") != 0 or len(inputs) != len(outs):
        return None
    if not follows_layers(index, inputs, outs):
        return None
    nodes = tuple(n.name for n in reversed(chain))
    return ClassHead(top.output[0], exit_tensor, nodes, stacked=True), inputs


def find_class_head(index: GraphIndex, layers: Sequence[DecoderLayer],
                    exit_tensor: str | None) -> tuple[ClassHead, list[str]] | None:
    """(the class head, each layer's tensor at the head's entry position), or None when not found.

    ``exit_tensor``: the class scores the graph computes after the last layer (None: look for
    the output named like scores).
    """
    if not layers or any(layer.pv_node not in index.nodes for layer in layers):
        return None
    outs = [index.nodes[layer.pv_node].output[0] for layer in layers]
    exit_tensor = exit_tensor or scores_output(index, layers[-1])
    if exit_tensor is None or not index.depends_on(exit_tensor, [outs[-1]]):
        return None
    chain, top = _chain(index, exit_tensor)
    if top is None or not chain:
        return None
    stacked = _stacked_head(index, top, chain, exit_tensor, outs)
    if stacked is not None:
        return stacked
    return _per_layer_head(index, top, chain, exit_tensor, outs)


def _per_layer_head(index: GraphIndex, top: Any, chain: list[Any], exit_tensor: str,
                    outs: Sequence[str]) -> tuple[ClassHead, list[str]] | None:
    """The head reads the last layer's output: the deepest chain position every earlier layer has."""
    below = list(reversed(chain))                                   # top's consumer first, exit's producer last
    for depth in range(len(below) - 1, -1, -1):
        earlier = _earlier_outputs(index, outs, below, top, depth)
        if earlier is None:
            continue
        entry = below[depth - 1].output[0] if depth else top.output[0]
        inputs = earlier + [entry]
        if not follows_layers(index, inputs, outs):
            return None
        head = ClassHead(entry, exit_tensor, tuple(n.name for n in below[depth:]))
        log.debug("class head %s -> %s (%d nodes) recomputes the logits of layers 0..%d", entry, exit_tensor,
                  len(head.nodes), len(outs) - 2)
        return head, inputs
    return None
