"""Which axis of which tensor runs over queries: the analysis GPQ's shrink is built on.

``labels`` (the label algebra) <- ``values`` (small integer constants with element origins)
<- ``fill`` (static shapes, filling what ONNX inference leaves open) <- ``rules`` (one rule per
op type) <- ``propagate`` (fixed-point propagation and :func:`analyze`). See ``propagate``'s
docstring for the idea.
"""
from __future__ import annotations

from edgeprune.passes.queries.axes.fill import GraphFacts, Shape, graph_facts
from edgeprune.passes.queries.axes.labels import AxisLabel, QueryAxisError, Segment, concat_labels
from edgeprune.passes.queries.axes.propagate import QueryAxes, Seeds, analyze
from edgeprune.passes.queries.axes.rules import RULES, SHAPE_OPS, reshape_groups, slice_params
from edgeprune.passes.queries.axes.values import Computed, DimOf, Literal, Origin, ShapeValues

__all__ = ["AxisLabel", "Computed", "DimOf", "GraphFacts", "Literal", "Origin", "QueryAxes", "QueryAxisError",
           "RULES", "SHAPE_OPS", "Seeds", "Segment", "Shape", "ShapeValues", "analyze", "concat_labels",
           "graph_facts", "reshape_groups", "slice_params"]
