"""Static shapes and constants of a graph for the query-axis analysis, with shape filling.

ONNX shape inference leaves a dimension unknown where a shape operand is computed
(TorchScript writes ``expand(B, -1, -1)`` as ``Where(Equal(...))`` on constants). GPQ needs
every shape static, so the shapes of such shape-driven ops (ConstantOfShape, Expand, Tile,
Reshape) are computed here from the evaluated operands and inference runs again from there.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgeprune import _lazy
from edgeprune.graph.values import attr
from edgeprune.passes.queries.axes.facts import GraphFacts, Shape, index_facts
from edgeprune.passes.queries.axes.values import ShapeValues

_SHAPE_DRIVEN = {"ConstantOfShape": 0, "Expand": 1, "Tile": 1, "Reshape": 1}   # op -> shape operand index


def _fill_shape(node: Any, facts: GraphFacts, values: ShapeValues) -> Shape | None:
    """Static output shape of shape-driven ops whose shape operand ONNX inference could not fold."""
    index = _SHAPE_DRIVEN[node.op_type]
    operand = values.value(node.input[index]) if len(node.input) > index and node.input[index] else None
    ishape = facts.shapes.get(node.input[0]) if index else ()
    if operand is None or ishape is None:
        return None
    target = [int(v) for v in operand.reshape(-1)]
    if node.op_type == "ConstantOfShape":
        return tuple(target)
    if node.op_type == "Expand":
        return tuple(int(d) for d in np.broadcast_shapes(ishape, tuple(target)))
    if node.op_type == "Tile":
        return tuple(d * r for d, r in zip(ishape, target))
    if not attr(node, "allowzero", 0):
        target = [ishape[i] if v == 0 else v for i, v in enumerate(target)]
    if -1 in target:
        known = int(np.prod([v for v in target if v != -1], dtype=np.int64))
        target[target.index(-1)] = int(np.prod(ishape, dtype=np.int64)) // max(known, 1)
    return tuple(target)


def graph_facts(model: Any, max_rounds: int = 16) -> GraphFacts:
    """Infer static shapes (on a copy of ``model``) and index constants, producers and consumers.

    Where ONNX shape inference leaves a dimension unknown because a shape operand is computed
    (TorchScript writes ``expand(B, -1, -1)`` as Where(Equal(...)) on constants), the shape is
    computed here and inference is run again from there.
    """
    onnx = _lazy.require("onnx")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for _ in range(max_rounds):
        facts = index_facts(onnx.shape_inference.infer_shapes(work, data_prop=True))
        values = ShapeValues(facts)
        fills = {}
        for node in facts.nodes:
            if node.op_type in _SHAPE_DRIVEN and node.output[0] not in facts.shapes:
                shape, elem = _fill_shape(node, facts, values), _elem_type(facts, node)
                if shape is not None and elem is not None:
                    fills[node.output[0]] = onnx.helper.make_tensor_value_info(node.output[0], elem, list(shape))
        if not fills:
            return facts
        kept_vi = [vi for vi in work.graph.value_info if vi.name not in fills]
        del work.graph.value_info[:]
        work.graph.value_info.extend(kept_vi + list(fills.values()))
    return facts


def _elem_type(facts: GraphFacts, node: Any) -> int | None:
    """Element type of a shape-driven op's output: its value attribute's, or its data input's."""
    onnx = _lazy.require("onnx")
    if node.op_type == "ConstantOfShape":
        value = attr(node, "value")
        return int(value.data_type) if value is not None else onnx.TensorProto.FLOAT
    src = node.input[0]
    if src in facts.constants:
        return int(onnx.helper.np_dtype_to_tensor_dtype(facts.constants[src].dtype))
    graph = facts.model.graph
    for vi in list(graph.value_info) + list(graph.input):
        if vi.name == src and vi.type.tensor_type.elem_type:
            return int(vi.type.tensor_type.elem_type)
    return None
