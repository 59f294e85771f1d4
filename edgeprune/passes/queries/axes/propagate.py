"""Follow the query axis through an ONNX graph: which axis of which tensor runs over queries.

GPQ shrinks a static graph from ``Nq`` to fewer queries. Exporters scatter the query count
over the graph: per-query initializers (reference points ``[Nl, 3]``, folded query
embeddings ``[B, Nq, E]``), reshape targets (``[B, Nq, h, d]``, ``[Nq*B, E]``),
ConstantOfShape/Expand shapes, the self-attention keys of StreamPETR (``Nq + M`` tokens:
queries then temporal memory). Numbers alone cannot tell which ``900`` is a query count, so
this module labels axes *structurally*: it starts from tensors whose query axis is known
(the outputs ``[L, B, Nq, C]``, StreamPETR's ``prev_query [B, P, E]``, recorded per-query
constants) and propagates the label forwards and backwards through every node, using the
static shapes of the original graph. A label says how an axis is composed::

    AxisLabel(pre=1, segments=((0, 900), 768), post=2)   # axis of size 1 * (900 + 768) * 2

``segments`` lists, in order, ranges of ORIGINAL query indices ``(start, stop)`` and blocks
of ``n`` non-query entries (ints); ``pre``/``post`` are factors folded into the axis by a
reshape (``[Nq, B*h, d]``, ``[Nq*B, E]``). Given the kept indices, every label knows its new
size and which old positions survive, so constants can be sliced and shapes rewritten.

Also here: evaluation of small constant integer tensors (shape operands) with the origin of
each element, so a pass can rewrite the literal that carries a query count in place.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import PatternNotFoundError

log = logging.getLogger(__name__)

Segment = tuple[int, int] | int       # (start, stop) query range, or a block of non-query entries


class QueryAxisError(PatternNotFoundError):
    """The query axis cannot be followed through the graph (ambiguous or unsupported)."""


# ----------------------------------------------------------------------------- labels
def _normalize(segments: Iterable[Segment]) -> tuple[Segment, ...]:
    """Merge adjacent query ranges and adjacent non-query blocks; drop empty pieces."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, tuple):
            if seg[1] <= seg[0]:
                continue
            if out and isinstance(out[-1], tuple) and out[-1][1] == seg[0]:
                out[-1] = (out[-1][0], seg[1])
                continue
        else:
            if seg <= 0:
                continue
            if out and not isinstance(out[-1], tuple):
                out[-1] = out[-1] + seg
                continue
        out.append(seg)
    return tuple(out)


def _seg_size(seg: Segment) -> int:
    return seg[1] - seg[0] if isinstance(seg, tuple) else seg


@dataclass(frozen=True)
class AxisLabel:
    """Composition of one axis: ``pre`` x (segments laid end to end) x ``post``."""

    segments: tuple[Segment, ...]
    pre: int = 1
    post: int = 1

    @staticmethod
    def make(segments: Iterable[Segment], pre: int = 1, post: int = 1) -> AxisLabel | None:
        """A normalized label, or None when no segment runs over queries."""
        segs = _normalize(segments)
        if not any(isinstance(s, tuple) for s in segs):
            return None
        return AxisLabel(segs, pre, post)

    @property
    def inner(self) -> int:
        return sum(_seg_size(s) for s in self.segments)

    @property
    def size(self) -> int:
        return self.pre * self.inner * self.post

    def inner_positions(self, kept: np.ndarray) -> np.ndarray:
        """Positions within the segment block that survive (ascending)."""
        parts, offset = [], 0
        for seg in self.segments:
            if isinstance(seg, tuple):
                sel = kept[(kept >= seg[0]) & (kept < seg[1])] - seg[0]
                parts.append(sel + offset)
            else:
                parts.append(np.arange(seg) + offset)
            offset += _seg_size(seg)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def positions(self, kept: np.ndarray) -> np.ndarray:
        """Old indices along the whole axis that survive, ascending: [pre * inner' * post]."""
        inner = self.inner_positions(kept)
        grid = (np.arange(self.pre)[:, None, None] * self.inner + inner[None, :, None]) * self.post
        return (grid + np.arange(self.post)[None, None, :]).reshape(-1)

    def resized(self, kept: np.ndarray) -> int:
        return self.pre * len(self.inner_positions(kept)) * self.post

    def sub(self, start: int, stop: int) -> AxisLabel | None:
        """The label of entries ``[start, stop)`` of this axis (no folded factors allowed)."""
        if self.pre != 1 or self.post != 1:
            raise QueryAxisError(f"cannot slice a query axis folded with other dimensions ({self})")
        pieces: list[Segment] = []
        offset = 0
        for seg in self.segments:
            n = _seg_size(seg)
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                pieces.append((seg[0] + lo, seg[0] + hi) if isinstance(seg, tuple) else hi - lo)
            offset += n
        return AxisLabel.make(pieces)

    def __str__(self) -> str:
        segs = "+".join(f"q[{s[0]}:{s[1]}]" if isinstance(s, tuple) else str(s) for s in self.segments)
        return "*".join(p for p in (str(self.pre) if self.pre > 1 else "", f"({segs})",
                                    str(self.post) if self.post > 1 else "") if p)


def concat_labels(parts: Sequence[tuple[AxisLabel | None, int]]) -> AxisLabel | None:
    """Label of a concatenation of (label or None for non-query, size) pieces."""
    segs: list[Segment] = []
    for label, size in parts:
        if label is None:
            segs.append(size)
        elif label.pre != 1 or label.post != 1:
            raise QueryAxisError(f"cannot concatenate a query axis folded with other dimensions ({label})")
        else:
            segs.extend(label.segments)
    return AxisLabel.make(segs)


# ----------------------------------------------------------------------------- graph facts
Shape = tuple[int, ...]


@dataclass
class GraphFacts:
    """Static shapes, constant values and consumers of one graph (read-only for analysis)."""

    model: Any                                   # onnx.ModelProto, shape-inferred
    shapes: dict[str, Shape]
    constants: dict[str, np.ndarray]             # initializers and Constant-node outputs
    producers: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, list[tuple[Any, int]]] = field(default_factory=dict)
    nodes: list[Any] = field(default_factory=list)   # graph order

    def shape(self, name: str) -> Shape:
        try:
            return self.shapes[name]
        except KeyError:
            raise QueryAxisError(f"tensor {name!r} has no static shape after shape inference; "
                                 "GPQ needs a graph with static shapes (export with a fixed batch)") from None


def _constant_node_value(node: Any) -> np.ndarray | None:
    onnx = _lazy.require("onnx")
    for attr in node.attribute:
        if attr.name == "value":
            return onnx.numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(attr),
                            dtype=np.float32 if attr.name == "value_float" else np.int64)
        if attr.name in ("value_floats", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(attr),
                            dtype=np.float32 if attr.name == "value_floats" else np.int64)
    return None


def _static_dims(type_proto: Any) -> Shape | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = type_proto.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


def _index_facts(inferred: Any) -> GraphFacts:
    onnx = _lazy.require("onnx")
    graph = inferred.graph
    shapes: dict[str, Shape] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _static_dims(vi.type)
        if dims is not None:
            shapes[vi.name] = dims
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    facts = GraphFacts(inferred, shapes, constants, nodes=list(graph.node))
    for name, value in constants.items():
        shapes[name] = tuple(value.shape)
    for node in graph.node:
        if node.op_type == "Constant":
            value = _constant_node_value(node)
            if value is not None:
                constants[node.output[0]] = value
                shapes[node.output[0]] = tuple(value.shape)
        for out in node.output:
            facts.producers[out] = node
        for i, name in enumerate(node.input):
            if name:
                facts.consumers.setdefault(name, []).append((node, i))
    return facts


_SHAPE_DRIVEN = {"ConstantOfShape": 0, "Expand": 1, "Tile": 1, "Reshape": 1}   # op -> shape operand index


def _fill_shape(node: Any, facts: GraphFacts, values: "ShapeValues") -> Shape | None:
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
        facts = _index_facts(onnx.shape_inference.infer_shapes(work, data_prop=True))
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


def attr(node: Any, name: str, default: Any = None) -> Any:
    onnx = _lazy.require("onnx")
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ----------------------------------------------------------------------------- constant ints
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
        node = facts.producers.get(name)
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


# ----------------------------------------------------------------------------- propagation
Seeds = dict[str, dict[int, AxisLabel]]


@dataclass(frozen=True)
class QueryAxes:
    """The result: for every tensor, the label of each axis (None = not a query axis)."""

    facts: GraphFacts
    labels: dict[str, tuple[AxisLabel | None, ...]]

    def of(self, name: str) -> tuple[AxisLabel | None, ...]:
        return self.labels.get(name, ())

    def labelled(self, name: str) -> bool:
        return any(lab is not None for lab in self.of(name))

    def new_shape(self, name: str, kept: np.ndarray) -> Shape:
        """Static shape of ``name`` once only the ``kept`` queries remain."""
        old = self.facts.shape(name)
        labels = self.of(name) or (None,) * len(old)
        return tuple(lab.resized(kept) if lab is not None else d for lab, d in zip(labels, old))


class _Propagation:
    """Fixed-point propagation of axis labels over the nodes (forwards and backwards)."""

    def __init__(self, facts: GraphFacts) -> None:
        self.facts = facts
        self.values = ShapeValues(facts)
        self.labels: dict[str, list[AxisLabel | None]] = {}
        self.changed = False
        self.guess_concat = False
        self.outputs = {o.name for o in facts.model.graph.output}

    def get(self, name: str, axis: int) -> AxisLabel | None:
        labels = self.labels.get(name)
        return None if labels is None else labels[axis]

    def put(self, name: str, axis: int, label: AxisLabel | None, node: Any | None) -> None:
        if label is None:
            return
        shape = self.facts.shape(name)
        where = f" at node {node.name or '?'} ({node.op_type})" if node is not None else ""
        if label.size != shape[axis]:
            raise QueryAxisError(f"query axis label {label} of {name!r} axis {axis} does not match its size "
                                 f"{shape[axis]}{where}")
        labels = self.labels.setdefault(name, [None] * len(shape))
        old = labels[axis]
        if old is None:
            labels[axis] = label
            self.changed = True
        elif old != label:
            raise QueryAxisError(f"tensor {name!r} axis {axis} (size {shape[axis]}) is reached as two different "
                                 f"query axes, {old} and {label}{where}; the graph mixes query sets in a way "
                                 "GPQ cannot follow")

    def labelled_any(self, name: str) -> bool:
        return any(lab is not None for lab in self.labels.get(name, ()))

    def link(self, a: str, ax_a: int, b: str, ax_b: int, node: Any) -> None:
        """Axes ``a[ax_a]`` and ``b[ax_b]`` are the same axis: share whichever label is known."""
        la, lb = self.get(a, ax_a), self.get(b, ax_b)
        if la is not None:
            self.put(b, ax_b, la, node)
        if lb is not None:
            self.put(a, ax_a, lb, node)

    def run(self, seeds: Seeds) -> None:
        for name, axes in seeds.items():
            for axis, label in axes.items():
                self.put(name, axis, label, None)
        nodes = self.facts.nodes
        while True:
            self._fixpoint(nodes)
            self.guess_concat, self.changed = True, False
            for node in nodes:
                if node.op_type == "Concat" and self._has_shapes(node):
                    _rule_concat(self, node)
            self.guess_concat = False
            if not self.changed:
                return

    def _fixpoint(self, nodes: list[Any]) -> None:
        nodes = [n for n in nodes if n.op_type in _RULES and self._has_shapes(n)]
        for _ in range(10_000):
            self.changed = False
            for node in nodes + nodes[::-1]:
                _RULES[node.op_type](self, node)
            if not self.changed:
                return
        raise QueryAxisError("query-axis propagation did not converge")

    def _has_shapes(self, node: Any) -> bool:
        """Nodes with a tensor of unknown shape are skipped (the final checks catch a missed query axis)."""
        used = [n for n in node.input if n] + [n for i, n in enumerate(node.output)
                                               if n and (i == 0 or n in self.facts.consumers or n in self.outputs)]
        return all(n in self.facts.shapes for n in used)


def _rank(p: _Propagation, name: str) -> int:
    return len(p.facts.shape(name))


def _rule_same(p: _Propagation, node: Any) -> None:
    """Output 0 has the shape of input 0 (unary ops, Softmax, normalizations)."""
    for ax in range(_rank(p, node.output[0])):
        p.link(node.input[0], ax, node.output[0], ax, node)


def _rule_broadcast(p: _Propagation, node: Any) -> None:
    """Numpy broadcasting: equal non-1 dims of any input and output 0 are the same axis."""
    out = node.output[0]
    oshape = p.facts.shape(out)
    for name in node.input:
        if not name:
            continue
        ishape = p.facts.shape(name)
        off = len(oshape) - len(ishape)
        for ax, d in enumerate(ishape):
            if d != 1 and d == oshape[ax + off]:
                p.link(name, ax, out, ax + off, node)


def _rule_matmul(p: _Propagation, node: Any) -> None:
    """[..., M, K] x [..., K, N] -> [..., M, N]; K of A and K of B are one axis."""
    a, b, o = node.input[0], node.input[1], node.output[0]
    ra, rb, ro = _rank(p, a), _rank(p, b), _rank(p, o)
    if ra == 1 or rb == 1:
        p.link(a, ra - 1, b, max(rb - 2, 0), node)
        keep = (a, range(ra - 1)) if rb == 1 else (b, [ax for ax in range(rb) if ax != rb - 2])
        for i, ax in enumerate(keep[1]):
            p.link(keep[0], ax, o, i + ro - len(list(keep[1])), node)
        return
    p.link(a, ra - 2, o, ro - 2, node)
    p.link(b, rb - 1, o, ro - 1, node)
    p.link(a, ra - 1, b, rb - 2, node)
    oshape = p.facts.shape(o)
    for name, rank in ((a, ra), (b, rb)):
        shape = p.facts.shape(name)
        for ax in range(rank - 2):
            if shape[ax] != 1 and shape[ax] == oshape[ax + ro - rank]:
                p.link(name, ax, o, ax + ro - rank, node)


def _rule_gemm(p: _Propagation, node: Any) -> None:
    """Gemm: A [M, K] (or [K, M]), B [K, N] (or [N, K]), C broadcast to [M, N]."""
    a, b, o = node.input[0], node.input[1], node.output[0]
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    p.link(a, 1 if ta else 0, o, 0, node)
    p.link(b, 0 if tb else 1, o, 1, node)
    p.link(a, 0 if ta else 1, b, 1 if tb else 0, node)
    if len(node.input) > 2 and node.input[2]:
        cshape, oshape = p.facts.shape(node.input[2]), p.facts.shape(o)
        off = 2 - len(cshape)
        for ax, d in enumerate(cshape):
            if d != 1 and d == oshape[ax + off]:
                p.link(node.input[2], ax, o, ax + off, node)


def _rule_transpose(p: _Propagation, node: Any) -> None:
    rank = _rank(p, node.input[0])
    perm = attr(node, "perm") or list(range(rank))[::-1]
    for out_ax, in_ax in enumerate(perm):
        p.link(node.input[0], in_ax, node.output[0], out_ax, node)


def reshape_groups(ishape: Shape, oshape: Shape) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output axes (size-1 axes left out) whose sizes multiply equally."""
    ins = [ax for ax, d in enumerate(ishape) if d != 1]
    outs = [ax for ax, d in enumerate(oshape) if d != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i]], [outs[j]]
        pi, po = ishape[ins[i]], oshape[outs[j]]
        while pi != po:
            if pi < po and i + 1 < len(ins):
                i += 1
                gi.append(ins[i])
                pi *= ishape[ins[i]]
            elif po < pi and j + 1 < len(outs):
                j += 1
                gj.append(outs[j])
                po *= oshape[outs[j]]
            else:
                raise QueryAxisError(f"reshape from {list(ishape)} to {list(oshape)} does not preserve size")
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    return groups


def _carry(p: _Propagation, src: str, src_axes: list[int], dst: str, dst_axes: list[int], node: Any) -> None:
    """Move the one query axis among ``src_axes`` into ``dst_axes`` (same element order)."""
    sshape, dshape = p.facts.shape(src), p.facts.shape(dst)
    marked = [k for k, ax in enumerate(src_axes) if p.get(src, ax) is not None]
    if not marked:
        return
    if len(marked) > 1:
        raise QueryAxisError(f"node {node.name} ({node.op_type}) merges two query axes of {src!r} "
                             f"{list(sshape)} into one; GPQ cannot shrink that")
    k = marked[0]
    label = p.get(src, src_axes[k])
    assert label is not None
    pre = int(np.prod([sshape[ax] for ax in src_axes[:k]], dtype=np.int64)) * label.pre
    post = label.post * int(np.prod([sshape[ax] for ax in src_axes[k + 1:]], dtype=np.int64))
    found = []
    for b, ax in enumerate(dst_axes):
        before = int(np.prod([dshape[x] for x in dst_axes[:b]], dtype=np.int64))
        after = int(np.prod([dshape[x] for x in dst_axes[b + 1:]], dtype=np.int64))
        if pre % before == 0 and post % after == 0 and (pre // before) * label.inner * (post // after) == dshape[ax]:
            found.append((ax, AxisLabel(label.segments, pre // before, post // after)))
    if len(found) != 1:
        why = "splits the query axis over several axes" if not found else "is ambiguous (equal dimensions)"
        raise QueryAxisError(f"node {node.name} ({node.op_type}) reshaping {list(sshape)} -> {list(dshape)} "
                             f"{why}; cannot tell where the {label.inner} queries go")
    p.put(dst, found[0][0], found[0][1], node)


def _rule_reshape(p: _Propagation, node: Any) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze: follow the query axis through size-preserving groups."""
    src, dst = node.input[0], node.output[0]
    for in_axes, out_axes in reshape_groups(p.facts.shape(src), p.facts.shape(dst)):
        _carry(p, src, in_axes, dst, out_axes, node)
        _carry(p, dst, out_axes, src, in_axes, node)


def _axis(node: Any, rank: int, default: int = 0) -> int:
    ax = int(attr(node, "axis", default))
    return ax + rank if ax < 0 else ax


def _rule_concat(p: _Propagation, node: Any) -> None:
    out = node.output[0]
    rank = _rank(p, out)
    axis = _axis(node, rank)
    inputs = [n for n in node.input if n]
    for name in inputs:
        for ax in range(rank):
            if ax != axis:
                p.link(name, ax, out, ax, node)
    sizes = [p.facts.shape(n)[axis] for n in inputs]
    whole = p.get(out, axis)
    if whole is not None:
        offset = 0
        for name, size in zip(inputs, sizes):
            p.put(name, axis, whole.sub(offset, offset + size), node)
            offset += size
        return
    parts = [(p.get(n, axis), s) for n, s in zip(inputs, sizes)]
    known = [lab is not None or n not in p.facts.constants and p.facts.producers.get(n) is None
             for n, (lab, _) in zip(inputs, parts)]
    if any(lab is not None for lab, _ in parts) and (all(known) or p.guess_concat):
        p.put(out, axis, concat_labels(parts), node)


def _rule_split(p: _Propagation, node: Any) -> None:
    src = node.input[0]
    rank = _rank(p, src)
    axis = _axis(node, rank)
    outs = [o for o in node.output if o]
    offset = 0
    label = p.get(src, axis)
    for out in outs:
        for ax in range(rank):
            if ax != axis:
                p.link(src, ax, out, ax, node)
        size = p.facts.shape(out)[axis]
        if label is not None:
            p.put(out, axis, label.sub(offset, offset + size), node)
        offset += size


def slice_params(p: _Propagation | ShapeValues, node: Any, shape: Shape) -> dict[int, tuple[int, int, int]] | None:
    """Slice node -> {axis: (start, stop, step)} normalized to the input shape, or None."""
    values = p.values if isinstance(p, _Propagation) else p
    got = [values.value(n) if i < len(node.input) and n else None for i, n in enumerate(node.input)]
    if len(got) < 3 or got[1] is None or got[2] is None:
        return None
    starts, ends = got[1].reshape(-1), got[2].reshape(-1)
    axes = got[3].reshape(-1) if len(got) > 3 and got[3] is not None else np.arange(len(starts))
    steps = got[4].reshape(-1) if len(got) > 4 and got[4] is not None else np.ones(len(starts), np.int64)
    if len(got) > 3 and node.input[3] and got[3] is None or len(got) > 4 and node.input[4] and got[4] is None:
        return None
    result = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) + len(shape) if a < 0 else int(a)
        start, stop, step = slice(int(s), int(e), int(st)).indices(shape[a])
        result[a] = (start, stop, step)
    return result


def _rule_slice(p: _Propagation, node: Any) -> None:
    src, out = node.input[0], node.output[0]
    shape = p.facts.shape(src)
    params = slice_params(p, node, shape)
    if params is None:
        if p.labelled_any(src) or p.labelled_any(out):
            raise QueryAxisError(f"Slice node {node.name} on a query tensor has non-constant parameters")
        return
    for ax in range(len(shape)):
        start, stop, step = params.get(ax, (0, shape[ax], 1))
        if (start, stop, step) == (0, shape[ax], 1):
            p.link(src, ax, out, ax, node)
            continue
        label = p.get(src, ax)
        if label is not None:
            if step != 1:
                raise QueryAxisError(f"Slice node {node.name} steps by {step} over a query axis")
            p.put(out, ax, label.sub(start, stop), node)


def _rule_gather(p: _Propagation, node: Any) -> None:
    data, idx, out = node.input[0], node.input[1], node.output[0]
    r, q = _rank(p, data), _rank(p, idx)
    axis = _axis(node, r)
    if p.get(data, axis) is not None:
        raise QueryAxisError(f"Gather node {node.name} picks entries along a query axis of {data!r}; "
                             "GPQ cannot shrink a graph that selects queries by index")
    for ax in range(r):
        if ax != axis:
            p.link(data, ax, out, ax if ax < axis else ax + q - 1, node)
    for ax in range(q):
        p.link(idx, ax, out, axis + ax, node)


def _rule_expand_like(p: _Propagation, node: Any) -> None:
    """Expand/Tile: input axes whose size is unchanged are the output's axes."""
    src, out = node.input[0], node.output[0]
    ishape, oshape = p.facts.shape(src), p.facts.shape(out)
    off = len(oshape) - len(ishape)
    for ax, d in enumerate(ishape):
        if d != 1 and d == oshape[ax + off]:
            p.link(src, ax, out, ax + off, node)
        elif p.get(src, ax) is not None:
            raise QueryAxisError(f"{node.op_type} node {node.name} repeats a query axis of {src!r}")


def _reduced_axes(p: _Propagation, node: Any, rank: int) -> list[int] | None:
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = p.values.value(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    if axes is None:
        return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(int(a) + rank if a < 0 else int(a) for a in axes)


def _rule_reduce(p: _Propagation, node: Any) -> None:
    src, out = node.input[0], node.output[0]
    rank = _rank(p, src)
    if node.op_type in ("ArgMax", "ArgMin"):
        reduced: list[int] | None = [_axis(node, rank)]
    else:
        reduced = _reduced_axes(p, node, rank)
    if reduced is None:
        _rule_same(p, node)
        return
    keep = attr(node, "keepdims", 1)
    o = 0
    for ax in range(rank):
        if ax in reduced:
            o += 1 if keep else 0
            continue
        p.link(src, ax, out, o, node)
        o += 1


def _rule_topk(p: _Propagation, node: Any) -> None:
    src = node.input[0]
    rank = _rank(p, src)
    axis = _axis(node, rank, -1)
    if p.get(src, axis) is not None:
        raise QueryAxisError(f"TopK node {node.name} selects along a query axis; GPQ cannot shrink that")
    for out in node.output:
        for ax in range(rank):
            if ax != axis and out:
                p.link(src, ax, out, ax, node)


def _rule_pad(p: _Propagation, node: Any) -> None:
    src, out = node.input[0], node.output[0]
    shape, oshape = p.facts.shape(src), p.facts.shape(out)
    for ax in range(len(shape)):
        if shape[ax] == oshape[ax] and shape[ax] != 1:
            p.link(src, ax, out, ax, node)


def _rule_attention(p: _Propagation, node: Any) -> None:
    """Fused attention (ONNX Attention, com.microsoft.MultiHeadAttention): Q rows -> output rows."""
    q, k = node.input[0], node.input[1]
    rank = _rank(p, q)
    seq = rank - 2 if rank == 4 else 1
    for ax in range(rank):
        if ax != rank - 1:
            p.link(q, ax, node.output[0], ax, node)
    if len(node.input) > 2 and node.input[2]:
        p.link(k, seq, node.input[2], seq, node)


_SAME = ("Relu", "Sigmoid", "Sin", "Cos", "Tan", "Log", "Exp", "Sqrt", "Neg", "Abs", "Cast", "Identity",
         "Erf", "Tanh", "Softplus", "Not", "Floor", "Ceil", "Round", "Reciprocal", "LeakyRelu", "Elu",
         "Gelu", "HardSigmoid", "HardSwish", "Softsign", "Sign", "IsNaN", "IsInf", "Selu", "Celu", "Mish",
         "Asin", "Acos", "Atan", "Sinh", "Cosh", "Softmax", "LogSoftmax", "Hardmax", "Dropout", "CastLike",
         "BatchNormalization", "InstanceNormalization", "LpNormalization", "ThresholdedRelu", "Shrink",
         "Swish", "FastGelu", "QuickGelu")
_BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Less",
              "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift",
              "Clip", "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
              "BiasGelu")
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_REDUCES = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")
# ops that never carry a query axis from their inputs (shape computations, generators)
_SHAPE_OPS = ("Shape", "Size", "ConstantOfShape", "Constant", "Range", "EyeLike", "RandomNormal",
              "RandomUniform", "RandomNormalLike", "RandomUniformLike", "NonZero")

_RULES: dict[str, Any] = {
    **{op: _rule_same for op in _SAME}, **{op: _rule_broadcast for op in _BROADCAST},
    **{op: _rule_reshape for op in _RESHAPES}, **{op: _rule_reduce for op in _REDUCES},
    "MatMul": _rule_matmul, "Gemm": _rule_gemm, "Transpose": _rule_transpose, "Concat": _rule_concat,
    "Split": _rule_split, "Slice": _rule_slice, "Gather": _rule_gather, "Expand": _rule_expand_like,
    "Tile": _rule_expand_like, "TopK": _rule_topk, "Pad": _rule_pad, "Attention": _rule_attention,
    "MultiHeadAttention": _rule_attention,
}


def analyze(facts: GraphFacts, seeds: Seeds) -> QueryAxes:
    """Label every axis that runs over queries, starting from ``seeds``; fail on unsupported ops."""
    prop = _Propagation(facts)
    prop.run(seeds)
    for node in facts.nodes:
        if node.op_type in _RULES or node.op_type in _SHAPE_OPS:
            continue
        touched = [n for n in list(node.input) + list(node.output) if n and prop.labelled_any(n)]
        if touched:
            raise QueryAxisError(f"node {node.name or '?'} ({node.op_type}) touches the query axis of "
                                 f"{touched[0]!r}; GPQ does not know how {node.op_type} treats queries")
    return QueryAxes(facts, {name: tuple(labels) for name, labels in prop.labels.items()})
