"""The per-op rules of query-axis propagation: which output axis is which input axis.

Each rule links axes of a node's inputs and outputs (``p.link``) so a label known on either
side reaches the other; :data:`RULES` maps op types to rules. Ops in :data:`SHAPE_OPS` only
compute shapes and never carry the query axis; any other op touching a labelled tensor makes
the analysis fail (GPQ must not guess what an unknown op does with queries).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from edgeprune.graph.values import attr
from edgeprune.passes.queries.axes.facts import GraphFacts, Shape
from edgeprune.passes.queries.axes.labels import AxisLabel, QueryAxisError, concat_labels
from edgeprune.passes.queries.axes.values import ShapeValues


class Propagation(Protocol):
    """What a rule may read and do: the propagation state (``propagate.Propagation``)."""

    facts: GraphFacts
    values: ShapeValues
    guess_concat: bool         # the last round: Concat may assume an unlabelled part holds no queries

    def get(self, name: str, axis: int) -> AxisLabel | None: ...

    def put(self, name: str, axis: int, label: AxisLabel | None, node: Any | None) -> None: ...

    def link(self, a: str, ax_a: int, b: str, ax_b: int, node: Any) -> None: ...

    def labelled_any(self, name: str) -> bool: ...


def _rank(p: Propagation, name: str) -> int:
    return len(p.facts.shape(name))


def _rule_same(p: Propagation, node: Any) -> None:
    """Output 0 has the shape of input 0 (unary ops, Softmax, normalizations)."""
    for ax in range(_rank(p, node.output[0])):
        p.link(node.input[0], ax, node.output[0], ax, node)


def _rule_broadcast(p: Propagation, node: Any) -> None:
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


def _rule_matmul(p: Propagation, node: Any) -> None:
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


def _rule_gemm(p: Propagation, node: Any) -> None:
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


def _rule_transpose(p: Propagation, node: Any) -> None:
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


def _carry(p: Propagation, src: str, src_axes: list[int], dst: str, dst_axes: list[int], node: Any) -> None:
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


def _rule_reshape(p: Propagation, node: Any) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze: follow the query axis through size-preserving groups."""
    src, dst = node.input[0], node.output[0]
    for in_axes, out_axes in reshape_groups(p.facts.shape(src), p.facts.shape(dst)):
        _carry(p, src, in_axes, dst, out_axes, node)
        _carry(p, dst, out_axes, src, in_axes, node)


def _axis(node: Any, rank: int, default: int = 0) -> int:
    ax = int(attr(node, "axis", default))
    return ax + rank if ax < 0 else ax


def rule_concat(p: Propagation, node: Any) -> None:
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
    known = [lab is not None or n not in p.facts.constants and p.facts.index.producer.get(n) is None
             for n, (lab, _) in zip(inputs, parts)]
    if any(lab is not None for lab, _ in parts) and (all(known) or p.guess_concat):
        p.put(out, axis, concat_labels(parts), node)


def _rule_split(p: Propagation, node: Any) -> None:
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


def slice_params(p: Propagation | ShapeValues, node: Any, shape: Shape) -> dict[int, tuple[int, int, int]] | None:
    """Slice node -> {axis: (start, stop, step)} normalized to the input shape, or None."""
    values = p if isinstance(p, ShapeValues) else p.values
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


def _rule_slice(p: Propagation, node: Any) -> None:
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


def _rule_gather(p: Propagation, node: Any) -> None:
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


def _rule_expand_like(p: Propagation, node: Any) -> None:
    """Expand/Tile: input axes whose size is unchanged are the output's axes."""
    src, out = node.input[0], node.output[0]
    ishape, oshape = p.facts.shape(src), p.facts.shape(out)
    off = len(oshape) - len(ishape)
    for ax, d in enumerate(ishape):
        if d != 1 and d == oshape[ax + off]:
            p.link(src, ax, out, ax + off, node)
        elif p.get(src, ax) is not None:
            raise QueryAxisError(f"{node.op_type} node {node.name} repeats a query axis of {src!r}")


def _reduced_axes(p: Propagation, node: Any, rank: int) -> list[int] | None:
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = p.values.value(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    if axes is None:
        return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(int(a) + rank if a < 0 else int(a) for a in axes)


def _rule_reduce(p: Propagation, node: Any) -> None:
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


def _rule_topk(p: Propagation, node: Any) -> None:
    src = node.input[0]
    rank = _rank(p, src)
    axis = _axis(node, rank, -1)
    if p.get(src, axis) is not None:
        raise QueryAxisError(f"TopK node {node.name} selects along a query axis; GPQ cannot shrink that")
    for out in node.output:
        for ax in range(rank):
            if ax != axis and out:
                p.link(src, ax, out, ax, node)


def _rule_pad(p: Propagation, node: Any) -> None:
    """Unpadded axes pass through; padding a query axis would add entries that are no query."""
    src, out = node.input[0], node.output[0]
    shape, oshape = p.facts.shape(src), p.facts.shape(out)
    for ax in range(len(shape)):
        if shape[ax] == oshape[ax] and shape[ax] != 1:
            p.link(src, ax, out, ax, node)
        elif shape[ax] != oshape[ax] and p.get(src, ax) is not None:
            raise QueryAxisError(f"Pad node {node.name} pads a query axis ({shape[ax]} -> {oshape[ax]}); "
                                 "GPQ cannot shrink that")


def _rule_attention(p: Propagation, node: Any) -> None:
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
SHAPE_OPS = ("Shape", "Size", "ConstantOfShape", "Constant", "Range", "EyeLike", "RandomNormal",
              "RandomUniform", "RandomNormalLike", "RandomUniformLike", "NonZero")

RULES: dict[str, Any] = {
    **{op: _rule_same for op in _SAME}, **{op: _rule_broadcast for op in _BROADCAST},
    **{op: _rule_reshape for op in _RESHAPES}, **{op: _rule_reduce for op in _REDUCES},
    "MatMul": _rule_matmul, "Gemm": _rule_gemm, "Transpose": _rule_transpose, "Concat": rule_concat,
    "Split": _rule_split, "Slice": _rule_slice, "Gather": _rule_gather, "Expand": _rule_expand_like,
    "Tile": _rule_expand_like, "TopK": _rule_topk, "Pad": _rule_pad, "Attention": _rule_attention,
    "MultiHeadAttention": _rule_attention,
}
