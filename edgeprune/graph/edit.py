"""Adding nodes to an onnx-graphsurgeon graph, for the passes that insert subgraphs (tgGBC, ToMe).

:class:`GraphEditor` names every node and constant it adds ``{scope}{what}_{n}`` (unique), so
a pass's nodes carry its prefix (``tggbc/l0/...``, ``tome/...``): the fp16 pass keeps nodes
by prefix. :func:`tensor_info` gives the element type and static shape of every tensor of the
input model (ONNX shape inference on a weight-free copy), and :func:`export_graph` turns the
edited graph back into a ModelProto that keeps the input model's header and metadata.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import PatternNotFoundError

FLOAT, BOOL = 1, 9          # onnx.TensorProto element types
TensorInfo = dict[str, tuple[int, tuple[Any, ...]]]   # tensor -> (elem type, shape; None = unknown dim)


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

    def as_float(self, x: Any, name: str) -> Any:
        """Cast to float32 when the model computes ``name`` in another float type."""
        elem = self.info.get(name, (FLOAT, ()))[0]
        return x if elem in (FLOAT, 0) else self.op("Cast", [x], "to_fp32", to=FLOAT)


def model_opset(model: Any) -> int:
    """The default-domain opset of ``model`` (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def tensor_info(model: Any) -> TensorInfo:
    """Element type and shape of every tensor (static inference on a weight-free copy)."""
    onnx = _lazy.require("onnx")
    from edgeprune.graph.shapes import light_model

    light = light_model(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    info: TensorInfo = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim) \
            if tt.HasField("shape") else ()
        info[vi.name] = (tt.elem_type, dims)
    for init in model.graph.initializer:
        info[init.name] = (init.data_type, tuple(int(d) for d in init.dims))
    return info


def export_graph(gs: Any, graph: Any, model: Any, metadata: Mapping[str, Any] | None = None) -> Any:
    """gs graph -> ModelProto with ``model``'s header and metadata; stale intermediate shapes dropped.

    ``metadata`` entries (values JSON-encoded) replace the input's entries of the same keys.
    """
    out = gs.export_onnx(graph, do_type_check=False)
    del out.graph.value_info[:]                        # later layers' key counts changed
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.doc_string, out.model_version, out.domain = model.doc_string, model.model_version, model.domain
    added = dict(metadata or {})
    for prop in model.metadata_props:
        if prop.key not in added:
            out.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in added.items():
        out.metadata_props.add(key=key, value=json.dumps(value, sort_keys=True))
    return out
