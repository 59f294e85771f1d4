"""Adding nodes to an onnx-graphsurgeon graph, for the passes that insert subgraphs (tgGBC, ToMe).

:class:`GraphEditor` names every node and constant it adds ``{scope}{what}_{n}`` (unique), so
a pass's nodes carry its prefix (``tggbc/l0/...``, ``tome/...``): the fp16 pass keeps nodes
by prefix. :func:`export_graph` turns an edited graph back into a ModelProto that keeps the
input model's header and metadata (the one place that copies them), and :func:`cleanup` is the
driver's dead-node removal and topological sort.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import PatternNotFoundError
from edgeprune.graph.index import GraphIndex
from edgeprune.graph.run import run_tensors
from edgeprune.graph.shapes import TensorInfo, infer_shapes

FLOAT, BOOL = 1, 9          # onnx.TensorProto element types


@dataclass
class GraphEditor:
    """Adds uniquely named nodes to an onnx-graphsurgeon graph; knows the opset's op forms."""

    gs: Any
    graph: Any
    opset: int
    info: TensorInfo                  # tensor -> (elem type, shape) of the input model
    scope: str = ""
    count: int = 0
    tensors: dict[str, Any] = field(default_factory=dict)   # the input model's tensors by name
    nodes: dict[str, Any] = field(default_factory=dict)     # the input model's nodes by name
    position: dict[str, int] = field(default_factory=dict)  # node name -> topological position

    def __post_init__(self) -> None:
        self.tensors = self.graph.tensors()
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.position = {n.name: i for i, n in enumerate(self.graph.nodes)}

    def tensor(self, name: str) -> Any:
        if name not in self.tensors:
            raise PatternNotFoundError(f"tensor {name!r} named by the decoder structure is not in the graph")
        return self.tensors[name]

    def node(self, name: str) -> Any:
        if name not in self.nodes:
            raise PatternNotFoundError(f"node {name!r} named by the decoder structure is not in the graph")
        return self.nodes[name]

    def rank(self, name: str) -> int:
        return len(self.info.get(name, (0, ()))[1])

    @contextlib.contextmanager
    def scoped(self, scope: str) -> Iterator[None]:
        """Name the nodes added inside the block ``scope...``."""
        previous, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = previous

    def const(self, what: str, value: Any) -> Any:
        self.count += 1
        return self.gs.Constant(f"{self.scope}{what}_{self.count}", np.asarray(value))

    def ints(self, what: str, *values: int) -> Any:
        return self.const(what, np.asarray(values, dtype=np.int64))

    def op(self, op: str, inputs: Sequence[Any], what: str, outputs: int = 1, **attrs: Any) -> Any:
        """Append one ``op`` node; returns its output tensor (a list when ``outputs > 1``)."""
        self.count += 1
        name = f"{self.scope}{what}_{self.count}"
        outs = [self.gs.Variable(name if outputs == 1 else f"{name}:{i}") for i in range(outputs)]
        self.graph.nodes.append(self.gs.Node(op=op, name=name, attrs=attrs, inputs=list(inputs), outputs=outs))
        return outs[0] if outputs == 1 else outs

    def reshape(self, x: Any, what: str, *shape: int) -> Any:
        return self.op("Reshape", [x, self.ints("shape", *shape)], what)

    def reduce(self, op: str, x: Any, axis: int, what: str, keepdims: int = 0) -> Any:
        """ReduceMax/Min/Mean over one axis (axes became an input in opset 18)."""
        if self.opset >= 18:
            return self.op(op, [x, self.ints("axes", axis)], what, keepdims=keepdims)
        return self.op(op, [x], what, axes=[axis], keepdims=keepdims)

    def gather_per_batch(self, data: Any, idx: Any, batch: int, batch_axis: int | None, axis: int, rank: int,
                         what: str) -> Any:
        """``data`` [.., N, ..] -> [.., K, ..] along ``axis`` with ``idx`` [B, K], per batch element.

        Batch 1: one ``Gather`` (the same rows for the only element). Otherwise ``GatherND`` with
        ``batch_dims=1``, which wants the batch and the gathered axis first: a Transpose there and
        back when they are not.
        """
        if batch == 1:
            return self.op("Gather", [data, self.reshape(idx, "flat_idx", -1)], what, axis=axis)
        perm = [batch_axis, axis] + [a for a in range(rank) if a not in (batch_axis, axis)]
        moved = data if perm == list(range(rank)) else self.op("Transpose", [data], "batch_keys_first", perm=perm)
        out = self.op("GatherND", [moved, self.op("Unsqueeze", [idx, self.ints("axes", -1)], "idx")], what,
                      batch_dims=1)
        if perm == list(range(rank)):
            return out
        return self.op("Transpose", [out], "restore_layout", perm=[perm.index(a) for a in range(rank)])

    def clone(self, names: Sequence[str], inputs: Mapping[str, Any], what: str) -> dict[str, Any]:
        """Copies of the input model's nodes ``names`` (graph order), named ``{scope}{what}/{name}``.

        The copies read ``inputs[t]`` where the originals read tensor ``t``, each other's outputs
        where the originals read each other's, and the originals' other inputs (constants) as
        they are. Returns original output name -> the copy's output tensor.
        """
        made: dict[str, Any] = dict(inputs)
        for name in names:
            node = self.node(name)
            copy_name = f"{self.scope}{what}/{name}"
            outs = [self.gs.Variable(f"{copy_name}:{i}") for i in range(len(node.outputs))]
            copy = self.gs.Node(op=node.op, name=copy_name, attrs=dict(node.attrs), domain=node.domain,
                                inputs=[made.get(t.name, t) for t in node.inputs], outputs=outs)
            self.graph.nodes.append(copy)
            made.update({old.name: new for old, new in zip(node.outputs, outs)})
        return made

    def as_float(self, x: Any, name: str) -> Any:
        """Cast to float32 when the model computes ``name`` in another float type."""
        elem = self.info.get(name, (FLOAT, ()))[0]
        return x if elem in (FLOAT, 0) else self.op("Cast", [x], "to_fp32", to=FLOAT)


def model_opset(model: Any) -> int:
    """The default-domain opset of ``model`` (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def copy_header(source: Any, target: Any) -> None:
    """Give ``target`` (a ModelProto) ``source``'s IR version, opsets, producer and doc fields.

    onnx-graphsurgeon's export writes its own header; a rewritten model keeps the input's.
    """
    target.ir_version = source.ir_version
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)
    target.producer_name, target.producer_version = source.producer_name, source.producer_version
    target.doc_string, target.model_version, target.domain = source.doc_string, source.model_version, source.domain


def export_graph(gs: Any, graph: Any, model: Any, metadata: Mapping[str, Any] | None = None,
                 keep_shapes: bool = False) -> Any:
    """gs graph -> ModelProto with ``model``'s header and metadata.

    Intermediate shapes are dropped unless ``keep_shapes`` (a pass that changed key or query
    counts leaves them stale). ``metadata`` entries (values JSON-encoded) replace the input's
    entries of the same keys.
    """
    out = gs.export_onnx(graph, do_type_check=False)
    if not keep_shapes:
        del out.graph.value_info[:]
    copy_header(model, out)
    added = dict(metadata or {})
    for prop in model.metadata_props:
        if prop.key not in added:
            out.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in added.items():
        out.metadata_props.add(key=key, value=json.dumps(value, sort_keys=True))
    return out


def cleanup(model: Any) -> Any:
    """Remove dead nodes/tensors and sort topologically (onnx-graphsurgeon), keeping model metadata."""
    gs = _lazy.require("onnx_graphsurgeon")
    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return export_graph(gs, graph, model, keep_shapes=True)

# Folded integer tensors are sizes and indices; anything bigger is data and stays computed.
FOLD_BYTES = 64 * 1024


def _size_frontier(index: GraphIndex) -> list[str]:
    """Computed constants read by non-constant nodes: where constant size arithmetic ends."""
    found = []
    for node in index.graph.node:
        if node.op_type == "Constant" or not all(index.is_constant(o) for o in node.output if o):
            continue
        if any(not all(index.is_constant(o) for o in user.output if o)
               for out in node.output if out for user in index.users(out)):
            found += [o for o in node.output if o]
    return list(dict.fromkeys(found))


def fold_computed_sizes(model: Any) -> list[str]:
    """Replace integer tensors computed from fixed sizes (``Shape -> Gather -> Concat -> Reshape``,
    a ``Range`` limit) by initializers, in place; the tensors folded.

    Exports with symbolic sizes compute reshape targets from ``Shape`` ops, and so does
    TorchScript where a size flows through ops it does not fold (DETR's whole model). With fixed
    inputs (``shapes.pin_input_shapes``) those are constants: shape inference then resolves
    what depends on them, and a pass that changes a key count retargets them like the literal
    targets of a static export. Values come from one ONNX Runtime run (they depend on no input
    value); only integers up to ``FOLD_BYTES`` are folded, so every value is exact. The dead
    size arithmetic is left for the driver's cleanup.
    """
    onnx = _lazy.require("onnx")
    if not any(node.op_type in ("Shape", "Size") for node in model.graph.node):
        return []                               # nothing computes a size: skip shape inference
    frontier = _size_frontier(GraphIndex.build(model))
    values = {n: v for n, v in (run_tensors(model, frontier) if frontier else {}).items()
              if np.issubdtype(v.dtype, np.integer) and v.nbytes <= FOLD_BYTES}
    for name, value in values.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, f"{name}/folded"))
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in values:
                node.input[slot] = f"{name}/folded"
    return list(values)


def shapes_with_folded_sizes(model: Any) -> Any:
    """Shapes of ``model``'s tensors as inference finds them once computed sizes are folded (on a copy).

    For discovery on a graph with fixed inputs whose sizes inference cannot follow through
    the ops that compute them (a ``Range`` whose limit comes from ``Shape``)."""
    onnx = _lazy.require("onnx")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    fold_computed_sizes(copy)
    return infer_shapes(copy)


class WorkingModel:
    """The model one rewrite edits: a single onnx-graphsurgeon graph, exported once at the end.

    onnx-graphsurgeon's own design: import once, let every pass edit the in-memory graph, clean
    up and export once. Exactly one form is current at a time. Graph passes (tgGBC, ToMe)
    call :meth:`graph` and edit it in place; passes whose machinery reads protobufs (GPQ's
    query-axis analysis, onnxconverter-common's fp16 conversion, discovery) call :meth:`proto`
    and, when they built a new model, :meth:`replace`. Switching forms costs one export or
    import, so a chain of graph passes never round-trips.
    """

    def __init__(self, model: Any) -> None:
        self._gs = _lazy.require("onnx_graphsurgeon")
        self._proto: Any = model
        self._graph: Any = None
        self._header: Any = model            # header and metadata of the newest proto
        self._metadata: dict[str, Any] = {}  # entries to add at the next export
        self._shapes_stale = False

    def proto(self) -> Any:
        """The current model as a ModelProto (exports the graph if a graph pass edited it)."""
        if self._proto is None:
            self._proto = self._export()
            self._graph = None
        return self._proto

    def graph(self) -> Any:
        """The current graph for editing in place (its intermediate shapes become stale)."""
        if self._graph is None:
            self._graph = self._gs.import_onnx(self._proto)
            self._proto = None
        self._shapes_stale = True
        return self._graph

    def replace(self, model: Any) -> None:
        """Make ``model`` (a ModelProto built by a pass) the current form."""
        self._proto, self._graph, self._header = model, None, model
        self._shapes_stale = False

    def set_metadata(self, key: str, value: Any) -> None:
        """Record ``key`` (value JSON-encoded) in the model's metadata at the next export."""
        self._metadata[key] = value

    def finish(self) -> Any:
        """Remove dead nodes, sort topologically and export: the rewrite's one export."""
        graph = self._graph if self._graph is not None else self._gs.import_onnx(self._proto)
        self._graph, self._proto = graph, None
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return self.proto()

    def _export(self) -> Any:
        out = export_graph(self._gs, self._graph, self._header, self._metadata, keep_shapes=not self._shapes_stale)
        self._header, self._metadata, self._shapes_stale = out, {}, False
        return out
