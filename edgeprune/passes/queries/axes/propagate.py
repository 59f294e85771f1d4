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

The package's parts: ``labels`` (the label algebra), ``fill`` (static shapes, with the
shape-driven ops inference leaves open filled in), ``values`` (small integer constants with
the origin of each element), ``rules`` (one rule per op type), and this module (the
fixed-point propagation and :func:`analyze`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeprune.passes.queries.axes.fill import GraphFacts, Shape
from edgeprune.passes.queries.axes.labels import AxisLabel, QueryAxisError
from edgeprune.passes.queries.axes.rules import RULES, SHAPE_OPS, rule_concat
from edgeprune.passes.queries.axes.values import ShapeValues

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
                    rule_concat(self, node)
            self.guess_concat = False
            if not self.changed:
                return

    def _fixpoint(self, nodes: list[Any]) -> None:
        nodes = [n for n in nodes if n.op_type in RULES and self._has_shapes(n)]
        for _ in range(10_000):
            self.changed = False
            for node in nodes + nodes[::-1]:
                RULES[node.op_type](self, node)
            if not self.changed:
                return
        raise QueryAxisError("query-axis propagation did not converge")

    def _has_shapes(self, node: Any) -> bool:
        """Nodes with a tensor of unknown shape are skipped (the final checks catch a missed query axis)."""
        used = [n for n in node.input if n] + [n for i, n in enumerate(node.output)
                                               if n and (i == 0 or n in self.facts.index.consumers or n in self.outputs)]
        return all(n in self.facts.shapes for n in used)


def analyze(facts: GraphFacts, seeds: Seeds) -> QueryAxes:
    """Label every axis that runs over queries, starting from ``seeds``; fail on unsupported ops."""
    prop = _Propagation(facts)
    prop.run(seeds)
    for node in facts.nodes:
        if node.op_type in RULES or node.op_type in SHAPE_OPS:
            continue
        touched = [n for n in list(node.input) + list(node.output) if n and prop.labelled_any(n)]
        if touched:
            raise QueryAxisError(f"node {node.name or '?'} ({node.op_type}) touches the query axis of "
                                 f"{touched[0]!r}; GPQ does not know how {node.op_type} treats queries")
    return QueryAxes(facts, {name: tuple(labels) for name, labels in prop.labels.items()})
