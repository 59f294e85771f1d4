"""Evaluation of small constant integer tensors (shape operands), with the origin of each element.

A shape like ``[B, 900, 8, 32]`` may be a literal, read at run time (``Shape(x)[1]``), or
computed; knowing the origin of each element lets GPQ rewrite the literal that carries a
query count in place, or refuse when it cannot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeprune import _lazy
from edgeprune.graph.values import attr
from edgeprune.passes.queries.axes.facts import GraphFacts, Shape

@dataclass(frozen=True)
class Literal:
    """Element ``index`` (flat) of constant ``name``."""

    name: str
    index: int


@dataclass(frozen=True)
class DimOf:
    """A dimension read at run time by ``Shape(tensor)[axis]``."""

    tensor: str
    axis: int


@dataclass(frozen=True)
class Computed:
    """Anything else (arithmetic on shape values)."""


Origin = Literal | DimOf | Computed


class ShapeValues:
    """Values of small integer tensors computable from constants and static shapes, with the
    origin of every element (so a rewrite can find the literal to change)."""

    def __init__(self, facts: GraphFacts) -> None:
        self.facts = facts
        self._cache: dict[str, tuple[np.ndarray, list[Origin]] | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        got = self.get(name)
        return None if got is None else got[0]

    def origins(self, name: str) -> list[Origin] | None:
        got = self.get(name)
        return None if got is None else got[1]

    def get(self, name: str) -> tuple[np.ndarray, list[Origin]] | None:
        if name not in self._cache:
            self._cache[name] = None            # cycle guard
            self._cache[name] = self._compute(name)
        return self._cache[name]

    def _compute(self, name: str) -> tuple[np.ndarray, list[Origin]] | None:
        facts = self.facts
        if name in facts.constants:
            value = facts.constants[name]
            if value.size > 64:
                return None
            return value, [Literal(name, i) for i in range(value.size)]
        node = facts.index.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Shape":
            return self._shape(node)
        inputs = [self.get(i) if i else None for i in node.input]
        return _eval_node(node, inputs, list(node.output).index(name), facts.shapes.get(name))

    def _shape(self, node: Any) -> tuple[np.ndarray, list[Origin]] | None:
        dims = self.facts.shapes.get(node.input[0])
        if dims is None:
            return None
        rank = len(dims)
        start, end = attr(node, "start", 0), attr(node, "end", rank)
        axes = list(range(rank))[slice(start, end)]
        return np.array([dims[a] for a in axes], np.int64), [DimOf(node.input[0], a) for a in axes]


def _pick(got: tuple[np.ndarray, list[Origin]], flat: np.ndarray) -> tuple[np.ndarray, list[Origin]]:
    value, origins = got
    return value.reshape(-1)[flat], [origins[int(i)] for i in flat.reshape(-1)]


def _eval_node(node: Any, inputs: list[tuple[np.ndarray, list[Origin]] | None], output: int,
               out_shape: Shape | None) -> tuple[np.ndarray, list[Origin]] | None:
    """Evaluate the few ops shape computations use; None when not computable here."""
    op = node.op_type
    if output != 0 or any(x is None for x in inputs[:1]):
        return None
    first = inputs[0]
    assert first is not None
    if op in ("Identity", "Cast"):
        value = first[0] if op == "Identity" else first[0].astype(_cast_dtype(attr(node, "to")))
        return value, first[1]
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        return _reshape_small(inputs, out_shape)
    if op == "Concat" and all(x is not None for x in inputs):
        return (np.concatenate([x[0].reshape(-1) for x in inputs]),              # type: ignore[index]
                [o for x in inputs for o in x[1]])                                # type: ignore[union-attr]
    if op == "Gather" and first[0].ndim == 1 and len(inputs) > 1 and inputs[1] is not None:
        idx = inputs[1][0].astype(np.int64)
        idx = np.where(idx < 0, idx + first[0].size, idx)
        value, origins = _pick(first, idx)
        return value.reshape(idx.shape), origins
    if op == "Slice" and first[0].ndim == 1:
        return _slice_small(first, inputs)
    if op == "Where" and all(x is not None for x in inputs):
        return _where_small(inputs)                                               # type: ignore[arg-type]
    return _arith(op, inputs, node)


def _cast_dtype(to: int) -> Any:
    onnx = _lazy.require("onnx")
    return onnx.helper.tensor_dtype_to_np_dtype(to)


def _reshape_small(inputs: list[Any], out_shape: Shape | None) -> tuple[np.ndarray, list[Origin]] | None:
    """Unsqueeze/Squeeze/Reshape/Flatten keep the flat element order: only the shape changes."""
    if out_shape is None:
        return None
    value, origins = inputs[0]
    return value.reshape(out_shape), origins


def _slice_small(first: Any, inputs: list[Any]) -> tuple[np.ndarray, list[Origin]] | None:
    if any(x is None for x in inputs[1:]) or len(inputs) < 3:
        return None
    start, end = int(inputs[1][0].reshape(-1)[0]), int(inputs[2][0].reshape(-1)[0])
    step = int(inputs[4][0].reshape(-1)[0]) if len(inputs) > 4 else 1
    flat = np.arange(first[0].size)[slice(start, end, step)]
    return _pick(first, flat)


def _where_small(inputs: list[tuple[np.ndarray, list[Origin]]]) -> tuple[np.ndarray, list[Origin]] | None:
    cond, x, y = inputs
    shape = np.broadcast_shapes(cond[0].shape, x[0].shape, y[0].shape)
    if len(shape) > 1:
        return None
    n = int(np.prod(shape)) if shape else 1
    c = np.broadcast_to(cond[0], shape).reshape(-1)
    xv, yv = (np.broadcast_to(v[0], shape).reshape(-1) for v in (x, y))
    xo = x[1] if len(x[1]) == n else [x[1][0]] * n
    yo = y[1] if len(y[1]) == n else [y[1][0]] * n
    origins = [xo[i] if c[i] else yo[i] for i in range(n)]
    return np.where(c, xv, yv).reshape(shape), origins


_ARITH = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal,
          "Less": np.less, "Greater": np.greater, "Max": np.maximum, "Min": np.minimum,
          "Not": np.logical_not, "Neg": np.negative, "Abs": np.abs}


def _arith(op: str, inputs: list[Any], node: Any) -> tuple[np.ndarray, list[Origin]] | None:
    """Arithmetic on small ints: the value is known, every element's origin is Computed."""
    if any(x is None for x in inputs):
        return None
    if op in _ARITH:
        value = _ARITH[op](*[x[0] for x in inputs])
    elif op == "Div":
        a, b = inputs[0][0], inputs[1][0]
        value = a // b if np.issubdtype(a.dtype, np.integer) else a / b
    elif op == "ConstantOfShape":
        fill = attr(node, "value")
        onnx = _lazy.require("onnx")
        base = onnx.numpy_helper.to_array(fill) if fill is not None else np.zeros(1, np.float32)
        value = np.full([int(v) for v in inputs[0][0]], base.reshape(-1)[0], dtype=base.dtype)
    else:
        return None
    if np.asarray(value).size > 64:
        return None
    value = np.asarray(value)
    return value, [Computed() for _ in range(value.size)]
