"""Refuse GPQ on a graph whose first self-attention was folded into a constant that mixes queries.

When the first decoder layer's query content does not depend on any model input (a learned
content embedding, as in ``nn.TransformerDecoder`` stacks or Deformable-DETR-style decoders),
its whole self-attention is a constant function of the weights. ``onnxsim`` (or an exporter's
optimizer, once the batch size is static) evaluates it and leaves one ``[B, Nq, E]`` constant
whose every row mixes all ``Nq`` queries. Slicing that constant is not what the model computes
with fewer queries, and the constant looks like any learned per-query embedding. Measured on
the corpus's ``torch-bf`` stack, exported then simplified: GPQ's logits were off by up to 1.3.

The sign it leaves: the residual stream that layer 0's cross-attention adds its output to is
a constant (stored, or computed from constants only) whose rows differ along the query axis
by more than rounding, in a graph that has self-attention. Unfolded, that stream depends on
the inputs (or on a learned embedding sliced consistently upstream, not a constant at the
Add). Folding is harmless when the folded self-attention's values are the same for every
query (DETR's zero content: every row is the out-projection's bias), and the stream's rows
then agree, up to rounding; the pass goes ahead. A decoder whose first layer has no
self-attention by design and a learned content embedding would be refused too; the message
says what was seen.
"""
from __future__ import annotations

from typing import Any

from edgeprune.errors import InvalidModelError
from edgeprune.graph.index import GraphIndex

# Ops between an attention's p*v product and its residual Add: head merge, out projection, bias,
# layer scale, dropout left in the graph.
_TO_RESIDUAL = {"Transpose", "Reshape", "MatMul", "Gemm", "Add", "Mul", "Div", "Flatten", "Squeeze", "Unsqueeze",
                "Cast", "Identity", "Dropout"}
_MAX_STEPS = 12


def attention_op_count(model: Any) -> int:
    """Softmax nodes and fused attention ops of the main graph."""
    from edgeprune.passes.discovery.attention import FUSED_OPS
    return sum(n.op_type == "Softmax" or (n.domain, n.op_type) in FUSED_OPS for n in model.graph.node)


def residual_input(index: GraphIndex, attention_output: str, num_queries: int) -> str | None:
    """The tensor the attention output is added to: the other input of the first Add downstream
    whose other input carries queries (rank >= 2, an axis of ``num_queries``) and does not
    depend on the attention. None when the walk finds none."""
    frontier = [attention_output]
    for _ in range(_MAX_STEPS):
        following = []
        for tensor in frontier:
            for node in index.consumers.get(tensor, []):
                if node.op_type not in _TO_RESIDUAL:
                    continue
                if node.op_type == "Add":
                    other = node.input[1] if node.input[0] == tensor else node.input[0]
                    shape = index.shapes.get(other)
                    if shape and len(shape) >= 2 and num_queries in shape \
                            and not index.depends_on(other, [attention_output]):
                        return other
                following.extend(node.output)
        frontier = following
    return None


def _constant_value(model: Any, index: GraphIndex, tensor: str) -> "np.ndarray":
    """The value of a tensor computed from constants only: stored, or from one run (any inputs)."""
    from edgeprune.graph.run import run_tensors
    value = index.value(tensor)
    return value if value is not None else run_tensors(model, [tensor])[tensor]


def rows_differ(value: "np.ndarray", num_queries: int) -> bool:
    """Whether the slices of ``value`` along its query axis differ by more than rounding
    (1e-3 of the largest magnitude: a folded bias computed per row differs by ~1e-6)."""
    import numpy as np
    axes = [i for i, d in enumerate(value.shape) if d == num_queries]
    if not axes or value.size == 0:
        return False
    spread = np.abs(value - np.take(value, [0], axis=axes[0])).max()
    return bool(spread > 1e-3 * max(float(np.abs(value).max()), 1e-30))


def check_first_self_attention(model: Any, structure: Any) -> None:
    """Raise InvalidModelError when layer 0's self-attention was folded into a query-mixing constant."""
    if attention_op_count(model) <= structure.num_layers:
        return                                          # no self-attention anywhere: nothing to fold
    first = structure.layers[0]
    if not first.pv_node:
        return                                          # a layer named by overrides without its P V: no stream to follow
    index = GraphIndex.build(model)
    residual = residual_input(index, index.nodes[first.pv_node].output[0], structure.num_queries)
    if residual is None or not index.is_constant(residual):
        return
    if not rows_differ(_constant_value(model, index, residual), structure.num_queries):
        return
    raise InvalidModelError(
        f"GPQ: layer 0's cross-attention adds its output to a constant ({residual}) that differs per query: "
        "the first self-attention does not depend on the inputs and was folded into it, mixing all queries, "
        "which GPQ cannot slice exactly; give GPQ the graph before onnxsim (or export without constant "
        "folding) or make the query content depend on an input")
