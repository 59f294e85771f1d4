"""Raising a graph's opset with onnx's version converter, for passes whose inserted ops need a newer one.

Graphs from older toolchains often come at opset 11 or 12 (mmdeploy's default is 11), and the
user may not have the PyTorch code to export them again. The key passes insert ops in their
opset-13+ forms (Squeeze/Unsqueeze/ReduceSum with axes as inputs, GatherND with batch_dims,
ScatterElements with a reduction), so they raise the graph first: ``onnx.version_converter``
rewrites every node to the target opset's form and computes the same function.

One of its rewrites would hide the attention from discovery: a Softmax older than opset 13
normalizes over all axes from ``axis`` on (the input seen as 2D), and where the converter cannot
tell that ``axis`` is the last, it keeps that meaning with ``Flatten(axis) -> Softmax ->
Reshape(Shape(x))``. When ``axis`` is the last axis of ``x`` (every attention), that is a plain
last-axis Softmax, and :func:`unwrap_softmax` writes it back.
"""
from __future__ import annotations

import logging
from typing import Any

from edgeprune import _lazy
from edgeprune.errors import InvalidModelError
from edgeprune.graph.edit import model_opset
from edgeprune.graph.index import GraphIndex, name_nodes
from edgeprune.graph.values import attr

log = logging.getLogger(__name__)


def upgrade_opset(model: Any, target: int) -> Any:
    """``model`` at opset ``target`` (a new ModelProto; the same one when it is already there or newer)."""
    old = model_opset(model)
    if old >= target:
        return model
    converter = _lazy.require("onnx").version_converter
    try:
        raised = converter.convert_version(model, target)
    except Exception as exc:                      # the converter raises bare RuntimeErrors/ValidationErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"the graph is opset {old} and onnx's version converter could not raise it to "
                                f"{target} ({first}); export it again with opset {target}") from exc
    unwrapped = unwrap_softmax(raised)
    log.info("raised the graph from opset %d to %d (onnx.version_converter; %d Softmax kept on the last axis)",
             old, target, unwrapped)
    return raised


def unwrap_softmax(model: Any) -> int:
    """Replace ``Flatten(x, axis=rank-1) -> Softmax -> Reshape(Shape(x))`` by ``Softmax(x, axis=-1)``
    in place; returns how many."""
    helper = _lazy.require("onnx").helper
    name_nodes(model)                          # the converter leaves its nodes unnamed
    index = GraphIndex.build(model)
    replaced: dict[str, Any] = {}              # Reshape name -> the Softmax that takes its place
    dropped: set[str] = set()
    for node in model.graph.node:
        parts = _wrapped(index, node)
        if parts is None:
            continue
        flatten, reshape = parts
        replaced[reshape.name] = helper.make_node("Softmax", [flatten.input[0]], [reshape.output[0]],
                                                  name=node.name, axis=-1)
        dropped |= {flatten.name, node.name}
        shape_of = index.producer[reshape.input[1]]
        if len(index.users(shape_of.output[0])) == 1 and shape_of.output[0] not in index.outputs:
            dropped.add(shape_of.name)
    if not replaced:
        return 0
    kept = [replaced.get(n.name, n) for n in model.graph.node if n.name not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(replaced)


def _wrapped(index: GraphIndex, softmax: Any) -> tuple[Any, Any] | None:
    """(Flatten, Reshape) around ``softmax`` when together they are a last-axis Softmax of the Flatten's input."""
    if softmax.op_type != "Softmax" or attr(softmax, "axis", -1) not in (-1, 1):
        return None
    flatten = index.producer.get(softmax.input[0])
    users = index.users(softmax.output[0])
    if flatten is None or flatten.op_type != "Flatten" or len(users) != 1 or users[0].op_type != "Reshape" \
            or {flatten.output[0], softmax.output[0]} & set(index.outputs):
        return None
    reshape, x = users[0], flatten.input[0]
    shape_of = index.producer.get(reshape.input[1])
    rank = len(index.shape(x) or ())
    if shape_of is None or shape_of.op_type != "Shape" or shape_of.input[0] != x or rank < 2:
        return None
    axis = attr(flatten, "axis", 1)
    if (axis + rank if axis < 0 else axis) != rank - 1 or len(index.users(flatten.output[0])) != 1:
        return None
    return flatten, reshape
