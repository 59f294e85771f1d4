"""GPQ as a graph pass: shrink a static decoder graph to a subset of its queries.

Given the ORIGINAL indices of the queries to keep (``GPQPruner.kept_indices``, or a one-shot
ranking on calibration inputs), the pass

1. labels every axis that runs over queries (:mod:`edgeprune.passes.queries.axes`);
2. slices every per-query constant along that axis (reference points ``[Nl, 3]``, folded
   query embeddings ``[B, Nq, E]``, zero targets, ...);
3. rewrites the literal query counts of shape operands in place: Reshape targets
   (``[B, Nq, h, d]``, ``[Nq*B, E]``, StreamPETR's ``[B, Nq + M, h, d]``), Expand/Tile
   shapes, ConstantOfShape shapes, Slice bounds and Split sizes;
4. shrinks graph inputs/outputs that carry queries (StreamPETR's ``prev_query [B, P, E]`` and
   ``prev_ref [B, P, 3]`` now hold the kept propagated queries, ascending), drops stale
   ``value_info``, re-infers shapes and checks that every tensor got exactly its predicted
   shape and that no unexplained axis of the old query count remains.

The op list is unchanged: only constants and shapes change, so the result computes exactly
``head(..., query_indices=kept)`` (= ``head.select_queries(kept)``) with a smaller static graph.
Reading keep-index files and calibration inputs, and the one-shot ranking, are
:mod:`edgeprune.passes.queries.inputs` (re-exported here).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import InvalidModelError, ParameterError
from edgeprune.passes.queries import axes as qx
# Where the kept indices come from (files, calibration inputs, one-shot ranking in ORT); these
# names stay importable from here: the pass's public API.
from edgeprune.passes.queries.inputs import (OUTPUT_NAMES, calibration_samples, io_shape, load_calibration,  # noqa: F401
                                         load_keep_indices, query_scores_onnx, rank_queries_one_shot,
                                         save_keep_indices)
from edgeprune.passes.queries.axes import AxisLabel, DimOf, Literal, QueryAxes, QueryAxisError
from edgeprune.passes.registry import BasePass

log = logging.getLogger(__name__)

PROPAGATED_INPUTS = ("prev_query", "prev_ref")           # [B, P, E], [B, P, 3]


# ----------------------------------------------------------------------------- the query space
@dataclass(frozen=True)
class QuerySpace:
    """How queries are numbered in a graph: learned ``[0, Nl)`` then propagated ``[Nl, Nq)``.

    ``seeds`` are tensor axes known to run over a range of queries, from which the query axis
    is followed through the graph (outputs ``[L, B, Nq, C]``, ``prev_query [B, P, E]``, ...).
    """

    num_learned: int
    num_propagated: int
    seeds: tuple[tuple[str, int, int, int], ...]     # (tensor, axis, first query, stop)

    @property
    def num_queries(self) -> int:
        return self.num_learned + self.num_propagated

    def check(self, kept: Sequence[int]) -> np.ndarray:
        """Validate kept indices -> sorted int64 array; one-line errors for the user."""
        nq = self.num_queries
        idx = np.asarray([int(i) for i in kept], dtype=np.int64)
        if idx.size == 0:
            raise ParameterError(f"no queries to keep; give between 1 and {nq} indices in [0, {nq})")
        bad = idx[(idx < 0) | (idx >= nq)]
        if bad.size:
            raise ParameterError(f"query index {int(bad[0])} is out of range: this graph has {nq} queries "
                                 f"(indices 0..{nq - 1}); use the ORIGINAL numbering of GPQPruner.kept_indices")
        uniq, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise ParameterError(f"query index {int(uniq[counts > 1][0])} is listed twice; "
                                 "kept indices must be unique")
        return uniq


def _map_seeds(dmap: Any, nq: int, nl: int) -> list[tuple[str, int, int, int]]:
    """Seeds from the exporter's decoder map: layer logits [B, Nq, C] and recorded query constants."""
    seeds = [(layer.logits.name, 1, 0, nq) for layer in dmap.layers
             if layer.logits is not None and len(layer.logits.shape) == 3 and layer.logits.shape[1] == nq]
    for qt in dmap.query_tensors:
        if qt.count in (nl, nq):
            seeds.append((qt.name, qt.axis, 0, qt.count))
    return seeds


def _query_counts(dmap: Any, structure: Any, cls_shape: tuple[int, ...] | None, num_prop: int) -> tuple[int, int]:
    """(Nq, Nl) from the decoder map, else the discovered structure, else ``all_cls_scores``."""
    if dmap is not None:
        return dmap.num_queries, dmap.num_learned_queries
    if structure is not None:
        return structure.num_queries, structure.num_queries - num_prop
    if cls_shape is not None and len(cls_shape) >= 2:
        return cls_shape[-2], cls_shape[-2] - num_prop
    raise InvalidModelError("cannot tell how many queries this graph has: it has no edgeprune decoder map, "
                            f"no output named {OUTPUT_NAMES[0]!r} [L, B, Nq, C] and no discovered structure; "
                            "export it with edgeprune export or name the class output all_cls_scores")


def resolve_query_space(model: Any, structure: Any = None) -> QuerySpace:
    """Query counts and seed axes from the decoder map, the discovered structure, or the outputs.

    Seeds: each layer's logits ``[B, Nq, C]`` (map or discovery), the outputs ``[L, B, Nq, C]``,
    the map's per-query constants, and StreamPETR's propagated-query inputs
    ``prev_query``/``prev_ref`` (axis 1, queries ``[Nl, Nq)``).
    """
    from edgeprune.export.decoder_map import read_decoder_map
    dmap = read_decoder_map(model)
    outputs = {name: io_shape(model, name) for name in OUTPUT_NAMES}
    prop = {name: shape for name in PROPAGATED_INPUTS for shape in [io_shape(model, name)] if shape is not None}
    num_prop = _prop_count(prop)
    nq, nl = _query_counts(dmap, structure, outputs[OUTPUT_NAMES[0]], num_prop)
    if prop and nq - nl != num_prop:
        raise InvalidModelError(f"the graph inputs {sorted(prop)} carry {num_prop} propagated queries "
                                f"but the decoder has {nq} queries of which {nl} are learned")
    seeds = _map_seeds(dmap, nq, nl) if dmap is not None else []
    if structure is not None:
        seeds += [(layer.logits, 1, 0, nq) for layer in structure.layers if layer.logits]
    seeds += [(name, len(shape) - 2, 0, nq) for name, shape in outputs.items()
              if shape is not None and len(shape) >= 2 and shape[-2] == nq]
    seeds += [(name, 1, nl, nq) for name in prop]
    if not seeds:
        raise InvalidModelError(f"found no tensor whose axis runs over the {nq} queries; GPQ needs the outputs "
                                f"{list(OUTPUT_NAMES)} or an edgeprune decoder map")
    return QuerySpace(nl, nq - nl, tuple(dict.fromkeys(seeds)))


def _prop_count(prop: dict[str, tuple[int, ...] | None]) -> int:
    counts = {shape[1] for shape in prop.values() if shape is not None and len(shape) >= 2}
    if len(counts) > 1:
        raise InvalidModelError(f"graph inputs {sorted(prop)} disagree on the number of propagated queries "
                                f"({sorted(counts)})")
    return counts.pop() if counts else 0


def analyze_queries(model: Any, space: QuerySpace) -> QueryAxes:
    """Label every query axis of ``model`` (see :mod:`edgeprune.passes.queries.axes`)."""
    facts = qx.graph_facts(model)
    seeds: qx.Seeds = {}
    for name, axis, start, stop in space.seeds:
        shape = facts.shapes.get(name)
        if shape is None:
            raise InvalidModelError(f"tensor {name!r} named as carrying queries is not in the graph "
                                    "(or has no static shape)")
        axis = axis + len(shape) if axis < 0 else axis
        label = AxisLabel(((start, stop),))
        if shape[axis] != stop - start:
            raise InvalidModelError(f"tensor {name!r} {list(shape)} should have {stop - start} queries on axis "
                                    f"{axis}; the graph does not match its recorded query count")
        seeds.setdefault(name, {})[axis] = label
    return qx.analyze(facts, seeds)


# ----------------------------------------------------------------------------- shape operands
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
    keeps = (-1,) if qx.attr(node, "allowzero", 0) else (-1, 0)
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
    axis = int(qx.attr(node, "axis", 0)) % rank
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
class _ShapeEdits:
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


def _plan_shape_edits(qa: QueryAxes, values: qx.ShapeValues, kept: np.ndarray) -> _ShapeEdits:
    """Decide how every literal query count in a shape operand is rewritten."""
    facts = qa.facts
    uses = _collect_uses(qa, values, kept)
    changes, conflicts = _gather_changes(qa, uses, kept)
    outputs = {o.name for o in facts.model.graph.output}
    for name in changes:
        consumers = facts.consumers.get(name, [])
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
    return _ShapeEdits(in_place, tuple(copies))


def _with_changes(value: np.ndarray, change: Need) -> np.ndarray:
    flat = value.copy().reshape(-1)
    for index, new in change.items():
        flat[index] = new
    return flat.reshape(value.shape)


# ----------------------------------------------------------------------------- applying edits
class _GraphEditor:
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


def _slice_constant(qa: QueryAxes, name: str, kept: np.ndarray) -> np.ndarray:
    value = qa.facts.constants[name]
    for axis, label in enumerate(qa.of(name)):
        if label is not None:
            value = np.take(value, label.positions(kept), axis=axis)
    return np.ascontiguousarray(value)


def _resize_io(model: Any, qa: QueryAxes, kept: np.ndarray) -> list[str]:
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


# ----------------------------------------------------------------------------- the pass body
@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink_queries` changed."""

    queries_before: int
    queries_after: int
    learned_after: int
    propagated_after: int
    kept: tuple[int, ...]                  # original indices, ascending
    sliced_constants: tuple[str, ...]      # per-query constants sliced along their query axis
    shape_constants: tuple[str, ...]       # shape literals rewritten in place
    shape_copies: int                      # shared shape constants copied for one consumer
    resized_io: tuple[str, ...]            # graph inputs/outputs whose query axis shrank
    io_selections: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    # (graph input/output, axis, old positions kept): the new tensor = old.take(positions, axis)

    def summary(self) -> str:
        prop = f" ({self.learned_after} learned + {self.propagated_after} propagated)" if self.propagated_after else ""
        return (f"GPQ: {self.queries_before} -> {self.queries_after} queries{prop}; sliced "
                f"{len(self.sliced_constants)} per-query constants, rewrote {len(self.shape_constants)} shape "
                f"constants ({self.shape_copies} copied), resized {', '.join(self.resized_io) or 'no'} inputs/outputs")


def shrink_queries(model: Any, kept: Sequence[int], space: QuerySpace | None = None,
                   structure: Any = None) -> tuple[Any, ShrinkReport]:
    """A copy of ``model`` (onnx.ModelProto) computing only the ``kept`` queries (original numbering).

    Raises ParameterError for bad indices and QueryAxisError (a PatternNotFoundError) when the
    query axis cannot be followed or rewritten unambiguously.
    """
    onnx = _lazy.require("onnx")
    space = space or resolve_query_space(model, structure)
    kept_arr = space.check(kept)
    qa = analyze_queries(model, space)
    values = qx.ShapeValues(qa.facts)
    edits = _plan_shape_edits(qa, values, kept_arr)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    editor = _GraphEditor(new)
    sliced = [name for name in qa.facts.constants if qa.labelled(name)]
    for name in sliced:
        editor.set_constant(name, _slice_constant(qa, name, kept_arr))
    for name, value in edits.in_place.items():
        editor.set_constant(name, value)
    for node_index, input_index, value in edits.copies:
        node = new.graph.node[node_index]
        node.input[input_index] = editor.add_initializer(node.input[input_index], value)
    resized = _resize_io(new, qa, kept_arr)
    del new.graph.value_info[:]
    _check_result(new, qa, kept_arr, space)
    learned = int((kept_arr < space.num_learned).sum())
    _update_decoder_map(new, qa, kept_arr, learned)
    report = ShrinkReport(space.num_queries, len(kept_arr), learned, len(kept_arr) - learned,
                          tuple(int(i) for i in kept_arr), tuple(sliced), tuple(edits.in_place),
                          len(edits.copies), tuple(resized), _io_selections(qa, resized, kept_arr))
    log.info("%s", report.summary())
    return new, report


Selection = tuple[str, int, tuple[int, ...]]       # (graph input/output, query axis, old positions kept)


def _io_selections(qa: QueryAxes, names: Sequence[str], kept: np.ndarray) -> tuple[Selection, ...]:
    """Which old rows of each resized graph input/output remain (callers feed prev_query this way)."""
    out = []
    for name in names:
        labels = [(ax, lab) for ax, lab in enumerate(qa.of(name)) if lab is not None]
        if len(labels) != 1:
            raise QueryAxisError(f"graph input/output {name!r} has {len(labels)} query axes; expected one")
        ax, lab = labels[0]
        out.append((name, ax, tuple(int(i) for i in lab.positions(kept))))
    return tuple(out)


def _legit_dims(qa: QueryAxes) -> set[int]:
    """Sizes of axes that are certainly not queries: unlabelled graph-input axes and weight matrices."""
    dims: set[int] = set()
    graph = qa.facts.model.graph
    for vi in graph.input:
        labels = qa.of(vi.name) or (None,) * len(qa.facts.shapes.get(vi.name, ()))
        dims.update(d for d, lab in zip(qa.facts.shapes.get(vi.name, ()), labels) if lab is None)
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in qa.facts.constants:
            dims.update(qa.facts.shape(node.input[1]))
    return dims


def _check_result(model: Any, qa: QueryAxes, kept: np.ndarray, space: QuerySpace) -> None:
    """Every tensor has its predicted shape; no unexplained axis of the old query count remains."""
    onnx = _lazy.require("onnx")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError (C++); report it as our failure
        raise QueryAxisError(f"the shrunk graph does not pass shape inference ({str(exc).splitlines()[0]}); "
                             "a query count was not rewritten consistently") from exc
    after = qx.graph_facts(inferred).shapes
    wrong = [(n, after[n], qa.new_shape(n, kept)) for n in qa.facts.shapes
             if n in after and after[n] != qa.new_shape(n, kept)]
    if wrong:
        name, got, want = wrong[0]
        raise QueryAxisError(f"after shrinking, {len(wrong)} tensors have an unexpected shape, e.g. {name!r} "
                             f"is {list(got)} instead of {list(want)}; a query count was not rewritten")
    suspicious = {space.num_queries, space.num_learned if space.num_propagated else space.num_queries}
    suspicious -= _legit_dims(qa)
    left = [(n, shape) for n, shape in after.items()
            if any(d in suspicious and (not qa.of(n) or qa.of(n)[ax] is None) for ax, d in enumerate(shape))]
    if left:
        name, shape = left[0]
        raise QueryAxisError(f"{len(left)} tensors still have an axis of the old query count "
                             f"{sorted(suspicious)} that is not connected to the query axis, e.g. {name!r} "
                             f"{list(shape)}; GPQ cannot tell whether it is per-query")


def _update_decoder_map(model: Any, qa: QueryAxes, kept: np.ndarray, learned: int) -> None:
    """Keep the exporter's decoder map truthful: new query counts and tensor shapes."""
    from edgeprune.export import decoder_map as dm
    dmap = dm.read_decoder_map(model)
    if dmap is None:
        return

    def ref(r: Any) -> Any:
        if r is None or r.name not in qa.facts.shapes:
            return r
        return replace(r, shape=qa.new_shape(r.name, kept))

    layers = tuple(replace(layer, cross_attn_probs=ref(layer.cross_attn_probs), key_input=ref(layer.key_input),
                           value_input=ref(layer.value_input), logits=ref(layer.logits)) for layer in dmap.layers)
    queries = tuple(replace(q, shape=qa.new_shape(q.name, kept),
                            count=qa.new_shape(q.name, kept)[q.axis]) for q in dmap.query_tensors)
    dm.write_decoder_map(model, replace(dmap, num_queries=len(kept), num_learned_queries=learned, layers=layers,
                                        memory=ref(dmap.memory), key_pos=ref(dmap.key_pos),
                                        key_padding_mask=ref(dmap.key_padding_mask), query_tensors=queries))


# ----------------------------------------------------------------------------- the registered pass
class QueryPruningPass(BasePass):
    """``--method gpq``: shrink the graph to the kept queries (see the module docstring)."""

    name = "gpq"
    help = ("GPQ: keep only some queries (--keep-indices FILE from GPQPruner, or one-shot --keep-queries K "
            "--calib X.npz); the result is a smaller static graph")
    requires: frozenset = frozenset()

    def __init__(self, keep_indices: Sequence[int] | None = None, keep_queries: int | None = None,
                 calib: Mapping[str, np.ndarray] | None = None) -> None:
        if (keep_indices is None) == (keep_queries is None):
            raise ParameterError("--method gpq needs either --keep-indices FILE or --keep-queries K --calib X.npz")
        if keep_queries is not None and calib is None:
            raise ParameterError("--keep-queries K needs --calib X.npz (inputs to rank the queries on, "
                                 "[B, ...] or [S, B, ...] per model input)")
        if keep_queries is not None and keep_queries < 1:
            raise ParameterError(f"--keep-queries must be >= 1 (got {keep_queries})")
        self.keep_indices = None if keep_indices is None else tuple(int(i) for i in keep_indices)
        self.keep_queries, self.calib = keep_queries, calib

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--keep-indices", dest="keep_indices", default=None, metavar="FILE",
                           help="GPQ: ORIGINAL indices of the queries to keep (JSON list or .npy), "
                                "e.g. GPQPruner.kept_indices saved with edgeprune.passes.gpq.save_keep_indices")
        group.add_argument("--keep-queries", dest="keep_queries", type=int, default=None, metavar="K",
                           help="GPQ one-shot: keep the K queries scoring highest on --calib (fine-tuning with "
                                "GPQPruner recovers accuracy clearly better)")
        group.add_argument("--calib", dest="calib", default=None, metavar="X.npz",
                           help="GPQ one-shot: calibration inputs by input name, [B, ...] or [S, B, ...]")

    @classmethod
    def from_args(cls, args: Any) -> QueryPruningPass:
        path, k, calib = getattr(args, "keep_indices", None), getattr(args, "keep_queries", None), \
            getattr(args, "calib", None)
        if path is not None and (k is not None or calib is not None):
            raise ParameterError("give either --keep-indices FILE or --keep-queries K --calib X.npz, not both")
        return cls(keep_indices=load_keep_indices(path) if path is not None else None, keep_queries=k,
                   calib=load_calibration(calib) if calib is not None else None)

    def apply(self, working: Any, structure: Any) -> None:
        model = working.proto()
        space = resolve_query_space(model, structure)
        kept = self.keep_indices
        if kept is None:
            assert self.keep_queries is not None and self.calib is not None
            kept = tuple(rank_queries_one_shot(model, self.calib, self.keep_queries, space))
        small, _ = shrink_queries(model, kept, space)
        working.replace(small)

    def __repr__(self) -> str:
        how = f"{len(self.keep_indices)} indices" if self.keep_indices is not None else f"top {self.keep_queries}"
        return f"QueryPruningPass({how})"
