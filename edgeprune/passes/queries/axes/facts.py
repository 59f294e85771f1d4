"""What the query-axis analysis knows of a graph: its index, static shapes and constant values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeprune import _lazy
from edgeprune.graph.index import GraphIndex
from edgeprune.graph.shapes import StaticShape, is_static, shape_of
from edgeprune.graph.values import constant_node_value
from edgeprune.passes.queries.axes.labels import QueryAxisError

Shape = StaticShape            # the analysis only ever holds static shapes


@dataclass
class GraphFacts:
    """The shape-inferred graph's index with its STATIC shapes and constant values (read-only).

    ``index`` is the toolkit's :class:`~edgeprune.graph.index.GraphIndex`; what this adds is
    what GPQ needs eagerly: every static shape (dims that are not all known are left out)
    and the value of every initializer and ``Constant`` output.
    """

    model: Any                                   # onnx.ModelProto, shape-inferred
    index: GraphIndex
    shapes: dict[str, Shape]
    constants: dict[str, np.ndarray]             # initializers and Constant-node outputs
    nodes: list[Any] = field(default_factory=list)   # graph order

    def shape(self, name: str) -> Shape:
        try:
            return self.shapes[name]
        except KeyError:
            raise QueryAxisError(f"tensor {name!r} has no static shape after shape inference; "
                                 "GPQ needs static shapes: with symbolic graph inputs give rewrite --inputs X.npz (its sizes fix them) "
                                 "or export with fixed sizes") from None


def index_facts(inferred: Any) -> GraphFacts:
    onnx = _lazy.require("onnx")
    graph = inferred.graph
    shapes: dict[str, Shape] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = shape_of(vi)
        if is_static(dims):
            shapes[vi.name] = tuple(int(d) for d in dims)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for name, value in constants.items():
        shapes[name] = tuple(value.shape)
    for node in graph.node:
        if node.op_type == "Constant":
            value = constant_node_value(node)
            if value is not None:
                constants[node.output[0]] = value
                shapes[node.output[0]] = tuple(value.shape)
    return GraphFacts(inferred, GraphIndex.build(inferred, shapes=shapes), shapes, constants, nodes=list(graph.node))
