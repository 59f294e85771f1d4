"""The query space of a graph: how many learned and propagated queries, and where analysis starts.

A decoder's queries are numbered learned ``[0, Nl)`` then propagated ``[Nl, Nq)`` (StreamPETR's
temporal queries enter as graph inputs). The space is read from the exporter's decoder map
when present, else from the class output ``[L, B, Nq, C]`` and the propagated inputs; its
``seeds`` are the tensor axes the query-axis analysis starts from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgeprune.errors import InvalidModelError, ParameterError
from edgeprune.passes.queries import axes as qx
from edgeprune.passes.queries.axes import AxisLabel, QueryAxes

OUTPUT_NAMES = ("all_cls_scores", "all_bbox_preds")      # [L, B, Nq, C|code]


def io_shape(model: Any, name: str) -> tuple[int, ...] | None:
    """Static shape of graph input/output ``name`` (-1 for a free dim), None when there is none."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            return tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)
    return None


PROPAGATED_INPUTS = ("prev_query", "prev_ref")           # [B, P, E], [B, P, 3]


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
        # queries are the logits' second-to-last axis: [B, Nq, C], or [Nq, C] where onnxsim turned
        # a batch-1 Linear into a Gemm on the flattened queries (the whole demo export)
        seeds += [(layer.logits, -2, 0, nq) for layer in structure.layers if layer.logits]
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
