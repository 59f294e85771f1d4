"""``shrink_queries``: a copy of a model that computes only the kept queries, checked.

After the edits, shapes are re-inferred and every tensor must have exactly its predicted
shape, and no axis of the old query count may remain unexplained (else a per-query constant
was missed): the shrink refuses rather than write a graph that computes something else.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.passes.queries import axes as qx
from edgeprune.passes.queries.axes import QueryAxes, QueryAxisError
from edgeprune.passes.queries.edits import ConstantEditor, plan_shape_edits, resize_io, slice_constant
from edgeprune.passes.queries.space import QuerySpace, analyze_queries, resolve_query_space

log = logging.getLogger(__name__)

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
    edits = plan_shape_edits(qa, values, kept_arr)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    editor = ConstantEditor(new)
    sliced = [name for name in qa.facts.constants if qa.labelled(name)]
    for name in sliced:
        editor.set_constant(name, slice_constant(qa, name, kept_arr))
    for name, value in edits.in_place.items():
        editor.set_constant(name, value)
    for node_index, input_index, value in edits.copies:
        node = new.graph.node[node_index]
        node.input[input_index] = editor.add_initializer(node.input[input_index], value)
    resized = resize_io(new, qa, kept_arr)
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
