"""Planning and applying GPQ's constant edits: per-query constants sliced, shape literals rewritten.

A shape operand (Reshape target, Expand/Tile/ConstantOfShape shape, Slice bound, Split size)
may carry the query count as a literal; :func:`plan_shape_edits` finds, from the query-axis
labels, which element must take which new value (copying a constant shared with a consumer
that must keep the old value), and refuses when the count arrives through a computation.
:class:`ConstantEditor` applies the values to the ModelProto's initializers and ``Constant``
nodes in place (the op list never changes, so no graph surgery is needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeprune import _lazy
from edgeprune.graph.values import attr
from edgeprune.passes.queries import axes as qx
from edgeprune.passes.queries.axes import DimOf, Literal, QueryAxes, QueryAxisError

# op type -> input indices that are shape-like operands (small int vectors read, not computed on)
SHAPE_OPERANDS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Slice": (1, 2, 3, 4),
    "Split": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Pad": (1, 2, 3), "Range": (0, 1, 2),
    "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
    "ReduceL2": (1,), "TopK": (1,), "Resize": (1, 2, 3), "Clip": (1, 2), "OneHot": (1,), "CumSum": (1,),
}

Need = dict[int, int]          # element index of a shape operand -> the value it must take


def _changed(qa: QueryAxes, name: str, kept: np.ndarray) -> dict[int, tuple[int, int]]:
    """Axes of ``name`` whose size changes: axis -> (old, new)."""
    old, new = qa.facts.shape(name), qa.new_shape(name, kept)
    return {ax: (o, n) for ax, (o, n) in enumerate(zip(old, new)) if o != n}


def _operand(values: qx.ShapeValues, node: Any, index: int) -> np.ndarray:
    value = values.value(node.input[index]) if index < len(node.input) and node.input[index] else None
    if value is None:
        raise QueryAxisError(f"{node.op_type} node {node.name} sizes a query axis with {node.input[index]!r}, "
                             "which is computed at run time from non-constant data; GPQ cannot rewrite it")
    return value.reshape(-1)


def _literal_need(node: Any, k: int, have: int, old: int, new: int, keeps: tuple[int, ...] = ()) -> int | None:
    """New value for one shape element ``have`` that sizes an axis going from ``old`` to ``new``."""
    if have in keeps:
        return None
    if have != old:
        raise QueryAxisError(f"{node.op_type} node {node.name}: element {k} of its shape is {have}, expected the "
                             f"query-carrying size {old}; cannot tell how to shrink it")
    return new


def _need_reshape(qa: QueryAxes, values: qx.ShapeValues, node: Any, kept: np.ndarray) -> dict[int, Need]:
    changed = _changed(qa, node.output[0], kept)
    if not changed:
        return {}
    target = _operand(values, node, 1)
    keeps = (-1,) if attr(node, "allowzero", 0) else (-1, 0)
    need = {ax: _literal_need(node, ax, int(target[ax]), old, new, keeps) for ax, (old, new) in changed.items()}
    return {1: {k: v for k, v in need.items() if v is not None}}


def _need_expand_tile(qa: QueryAxes, values: qx.ShapeValues, node: Any, kept: np.ndarray) -> dict[int, Need]:
    """Expand shape / Tile repeats: an element must change only where the input axis has size 1."""
    out = node.output[0]
    changed = _changed(qa, out, kept)
    if not changed:
        return {}
    operand = _operand(values, node, 1)
    rank, ishape = len(qa.facts.shape(out)), qa.facts.shape(node.input[0])
    need: Need = {}
    for ax, (old, new) in changed.items():
        k, i = ax - (rank - len(operand)), ax - (rank - len(ishape))
        carried = i >= 0 and ishape[i] == old            # the input already has the query axis
        if k < 0:
            if not carried:
                raise QueryAxisError(f"{node.op_type} node {node.name}: cannot find what sizes output axis {ax}")
            continue
        value = _literal_need(node, k, int(operand[k]), old, new, (1,) if carried else ())
        if value is not None:
            need[k] = value
    return {1: need}


def _need_constant_of_shape(qa: QueryAxes, values: qx.ShapeValues, node: Any, kept: np.ndarray) -> dict[int, Need]:
    changed = _changed(qa, node.output[0], kept)
    if not changed:
        return {}
    shape = _operand(values, node, 0)
    return {0: {ax: new for ax, (old, new) in changed.items()
                if _literal_need(node, ax, int(shape[ax]), old, new) is not None}}


def _need_slice(qa: QueryAxes, values: qx.ShapeValues, node: Any, kept: np.ndarray) -> dict[int, Need]:
    """Slice bounds along a query axis: count the kept positions before the old bounds."""
    labels = qa.of(node.input[0])
    if not any(lab is not None for lab in labels):
        return {}
    shape = qa.facts.shape(node.input[0])
    starts, ends = _operand(values, node, 1), _operand(values, node, 2)
    axes = _operand(values, node, 3) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
    params = qx.slice_params(values, node, shape) or {}
    need_s: Need = {}
    need_e: Need = {}
    for j, a in enumerate(int(x) + len(shape) if x < 0 else int(x) for x in axes):
        label = labels[a]
        if label is None:
            continue
        start, stop, _ = params[a]
        pos = label.positions(kept)
        new_start, new_stop, dim = int((pos < start).sum()), int((pos < stop).sum()), len(pos)
        if slice(int(starts[j]), None).indices(dim)[0] != new_start:
            need_s[j] = new_start
        if slice(None, int(ends[j])).indices(dim)[1] != new_stop:
            need_e[j] = new_stop
    return {1: need_s, 2: need_e}


def _need_split(qa: QueryAxes, values: qx.ShapeValues, node: Any, kept: np.ndarray) -> dict[int, Need]:
    rank = len(qa.facts.shape(node.input[0]))
    axis = int(attr(node, "axis", 0)) % rank
    news = {k: qa.new_shape(out, kept)[axis] for k, out in enumerate(node.output)}
    olds = {k: qa.facts.shape(out)[axis] for k, out in enumerate(node.output)}
    if news == olds:
        return {}
    if len(node.input) < 2 or not node.input[1]:
        raise QueryAxisError(f"Split node {node.name} splits a query axis into equal parts; "
                             "GPQ needs explicit split sizes")
    sizes = _operand(values, node, 1)
    return {1: {k: news[k] for k in news if news[k] != olds[k]
                and _literal_need(node, k, int(sizes[k]), olds[k], news[k]) is not None}}


def _need_forbidden(qa: QueryAxes, values: qx.ShapeValues, node: Any, kept: np.ndarray) -> dict[int, Need]:
    if _changed(qa, node.output[0], kept):
        raise QueryAxisError(f"{node.op_type} node {node.name} generates per-query values; "
                             "GPQ cannot shrink a graph that computes query tensors from a Range")
    return {}


_NEEDS = {"Reshape": _need_reshape, "Expand": _need_expand_tile, "Tile": _need_expand_tile,
          "ConstantOfShape": _need_constant_of_shape, "Slice": _need_slice, "Split": _need_split,
          "Range": _need_forbidden}


@dataclass(frozen=True)
class _Use:
    """One shape operand: node ``node`` (index in the graph) reads ``tensor`` at input ``index``."""

    node: int
    index: int
    tensor: str
    origins: tuple[qx.Origin, ...]
    need: tuple[tuple[int, int], ...]        # (element, new value)


def _collect_uses(qa: QueryAxes, values: qx.ShapeValues, kept: np.ndarray) -> list[_Use]:
    """Every constant-derived shape operand, with the changes it needs (often none)."""
    uses = []
    for i, node in enumerate(qa.facts.nodes):
        needs = _NEEDS[node.op_type](qa, values, node, kept) if node.op_type in _NEEDS else {}
        for index in SHAPE_OPERANDS.get(node.op_type, ()):
            if index >= len(node.input) or not node.input[index]:
                continue
            origins = values.origins(node.input[index])
            need = needs.get(index, {})
            if origins is None:
                if need:
                    _operand(values, node, index)       # raises: not constant
                continue
            uses.append(_Use(i, index, node.input[index], tuple(origins), tuple(sorted(need.items()))))
    return uses


@dataclass(frozen=True)
class ShapeEdits:
    """Constants changed in place, and per-consumer copies where a constant is shared."""

    in_place: dict[str, np.ndarray]
    copies: tuple[tuple[int, int, np.ndarray], ...]      # (node index, input index, new value)


def _is_shape_consumer(facts: qx.GraphFacts, values: qx.ShapeValues, node: Any, index: int) -> bool:
    """True when ``node`` reads input ``index`` as a shape operand or only computes shapes from it."""
    if index in SHAPE_OPERANDS.get(node.op_type, ()):
        return True
    return node.op_type not in SHAPE_OPERANDS and values.get(node.output[0]) is not None


def _gather_changes(qa: QueryAxes, uses: list[_Use], kept: np.ndarray) -> tuple[dict[str, Need], set[str]]:
    """Literal changes per constant, and the constants whose users disagree about them."""
    changes: dict[str, Need] = {}
    conflicts: set[str] = set()
    for use in uses:
        node = qa.facts.nodes[use.node]
        for k, new in use.need:
            origin = use.origins[k]
            if isinstance(origin, DimOf):
                if qa.new_shape(origin.tensor, kept)[origin.axis] != new:
                    raise QueryAxisError(f"{node.op_type} node {node.name} takes element {k} of its shape from "
                                         f"{origin.tensor!r} axis {origin.axis}, which is not the query axis")
                continue
            if not isinstance(origin, Literal):
                raise QueryAxisError(f"{node.op_type} node {node.name}: element {k} of {use.tensor!r} carries the "
                                     "query count but is computed by arithmetic; GPQ cannot rewrite it")
            known = changes.setdefault(origin.name, {})
            if known.get(origin.index, new) != new:
                conflicts.add(origin.name)
            known[origin.index] = new
    for use in uses:
        need = dict(use.need)
        for k, origin in enumerate(use.origins):
            if isinstance(origin, Literal) and origin.index in changes.get(origin.name, {}):
                if need.get(k) != changes[origin.name][origin.index]:
                    conflicts.add(origin.name)
    return changes, conflicts


def plan_shape_edits(qa: QueryAxes, values: qx.ShapeValues, kept: np.ndarray) -> ShapeEdits:
    """Decide how every literal query count in a shape operand is rewritten."""
    facts = qa.facts
    uses = _collect_uses(qa, values, kept)
    changes, conflicts = _gather_changes(qa, uses, kept)
    outputs = {o.name for o in facts.model.graph.output}
    for name in changes:
        consumers = facts.index.uses(name)
        if name in outputs or not all(_is_shape_consumer(facts, values, n, i) for n, i in consumers):
            conflicts.add(name)
    in_place: dict[str, np.ndarray] = {}
    copies: list[tuple[int, int, np.ndarray]] = []
    for name, change in changes.items():
        if name not in conflicts:
            in_place[name] = _with_changes(facts.constants[name], change)
            continue
        for use in uses:
            if not any(isinstance(o, Literal) and o.name == name for o in use.origins) or not use.need:
                continue
            if use.tensor != name:
                raise QueryAxisError(f"shape constant {name!r} is shared by operations that need different "
                                     "query counts, through a shape computation; GPQ cannot rewrite it")
            copies.append((use.node, use.index, _with_changes(facts.constants[name], dict(use.need))))
    return ShapeEdits(in_place, tuple(copies))


def _with_changes(value: np.ndarray, change: Need) -> np.ndarray:
    flat = value.copy().reshape(-1)
    for index, new in change.items():
        flat[index] = new
    return flat.reshape(value.shape)


class ConstantEditor:
    """Replaces constants (initializers or Constant nodes) of a model in place."""

    def __init__(self, model: Any) -> None:
        self.onnx = _lazy.require("onnx")
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.const_nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self._fresh = 0

    def set_constant(self, name: str, value: np.ndarray) -> None:
        tensor = self.onnx.numpy_helper.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
            return
        node = self.const_nodes[name]
        del node.attribute[:]
        node.attribute.append(self.onnx.helper.make_attribute("value", tensor))

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        names = {t.name for t in self.model.graph.initializer} | {o for n in self.model.graph.node for o in n.output}
        while True:
            self._fresh += 1
            name = f"{base}.gpq{self._fresh}"
            if name not in names:
                break
        self.model.graph.initializer.append(self.onnx.numpy_helper.from_array(value, name))
        return name


def slice_constant(qa: QueryAxes, name: str, kept: np.ndarray) -> np.ndarray:
    value = qa.facts.constants[name]
    for axis, label in enumerate(qa.of(name)):
        if label is not None:
            value = np.take(value, label.positions(kept), axis=axis)
    return np.ascontiguousarray(value)


def resize_io(model: Any, qa: QueryAxes, kept: np.ndarray) -> list[str]:
    """Set the static dims of graph inputs and outputs that carry queries."""
    resized = []
    for vi in list(model.graph.input) + list(model.graph.output):
        if not qa.labelled(vi.name):
            continue
        dims = vi.type.tensor_type.shape.dim
        for dim, size in zip(dims, qa.new_shape(vi.name, kept)):
            dim.Clear()
            dim.dim_value = size
        resized.append(vi.name)
    return resized
