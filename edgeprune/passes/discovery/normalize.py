"""Graph normalizations a pass can ask for before discovery (``BasePass.prepare``).

``split_shared_projections``: onnxsim merges the projections of every layer that reads the
same tensor (the cross-attention keys ``memory + key_pos`` of all L layers) into one
MatMul with the weights side by side, followed by a Split::

    x --MatMul(W = [W_0 | W_1 | ... ])--> Split(axis=-1) --> y_0, y_1, ...

Key pruning must feed later layers fewer keys than earlier ones, which one shared MatMul
cannot do. This rewrites it back into one MatMul per Split output (``x @ W_i``), the form the
exporters wrote. Each output element is the same dot product over the same inputs, so the
model computes the same values.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.graph.index import GraphIndex, name_nodes
from edgeprune.graph.values import attr

log = logging.getLogger(__name__)

PREFIX = "normalize/"


def _split_sizes(index: GraphIndex, split: Any, width: int) -> list[int] | None:
    """Sizes of a Split along the last axis (input ``split``, attribute, or equal parts)."""
    if len(split.input) > 1 and split.input[1]:
        sizes = index.value(split.input[1])
        return None if sizes is None else [int(s) for s in np.asarray(sizes).reshape(-1)]
    listed = attr(split, "split")
    if listed:
        return [int(s) for s in listed]
    parts = len(split.output)
    return [width // parts] * parts if width % parts == 0 else None


def _merged(index: GraphIndex, node: Any) -> tuple | None:
    """(weight array, Split node, sizes) when ``node`` is a MatMul whose only reader splits its columns."""
    if node.op_type != "MatMul" or node.input[1] not in index.initializers:
        return None
    users = index.users(node.output[0])
    if len(users) != 1 or users[0].op_type != "Split" or node.output[0] in index.outputs:
        return None
    split, weight = users[0], index.value(node.input[1])
    if weight.ndim != 2 or attr(split, "axis", 0) not in (-1, len(index.shape(node.output[0]) or ()) - 1):
        return None
    sizes = _split_sizes(index, split, weight.shape[1])
    if sizes is None or sum(sizes) != weight.shape[1] or len(sizes) != len(split.output):
        return None
    return weight, split, sizes


def _replacement(node: Any, weight: np.ndarray, split: Any, sizes: Sequence[int]) -> tuple:
    onnx = _lazy.require("onnx")
    nodes, inits, start = [], [], 0
    for i, (size, out) in enumerate(zip(sizes, split.output)):
        name = f"{PREFIX}{node.name}/part{i}"
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(weight[:, start:start + size]), f"{name}/W"))
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], f"{name}/W"], [out], name=name))
        start += size
    return nodes, inits


def split_shared_projections(model: Any) -> int:
    """Replace every MatMul + column Split by one MatMul per part (in place); returns how many."""
    name_nodes(model)
    index = GraphIndex.build(model, shapes=_shapes(model))
    replaced, new_nodes = 0, []
    drop: set = set()
    inits: list = []
    merged_weights: set = set()
    for node in model.graph.node:
        found = _merged(index, node)
        if found is None:
            continue
        weight, split, sizes = found
        parts, weights = _replacement(node, weight, split, sizes)
        new_nodes.append((split.name, parts))
        inits += weights
        drop |= {node.name, split.name}
        merged_weights.add(node.input[1])
        replaced += 1
    if replaced:
        _rebuild(model, drop, dict(new_nodes), inits, merged_weights)
        log.debug("split %d shared projections", replaced)
    return replaced


def _shapes(model: Any) -> dict:
    from edgeprune.graph.shapes import infer_shapes

    return infer_shapes(model)


def _rebuild(model: Any, drop: set, at_split: dict, inits: list, merged_weights: set) -> None:
    """Graph order kept: the parts take the Split's place; merged weights nobody reads are removed."""
    nodes = []
    for node in model.graph.node:
        if node.name in at_split:
            nodes += at_split[node.name]
        elif node.name not in drop:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used or t.name not in merged_weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
