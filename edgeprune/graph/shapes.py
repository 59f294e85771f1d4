"""Static shapes of every tensor in an ONNX graph, without running it.

Discovery and FLOP counting read shapes (``Nq``, ``Nk``, heads, batch) from the graph, and
must stay fast on a 24000-key model, so nothing here runs ONNX Runtime: ONNX shape
inference (with data propagation, so ``Reshape`` targets computed from ``Shape`` ops resolve)
runs on a light copy of the graph whose large initializers are replaced by typed graph
inputs. That keeps models above protobuf's 2 GB limit inferable and avoids copying weights.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

from edgeprune import _lazy
from edgeprune.errors import ParameterError
from edgeprune.graph.values import constant_node_value, tensor_nbytes

log = logging.getLogger(__name__)

Dim = int | str | None          # int = static size, str = symbolic name, None = unknown
Shape = tuple[Dim, ...]
Shapes = dict[str, Shape]
StaticShape = tuple[int, ...]  # every dimension known

# Initializers larger than this are weights, never shape tensors; inference sees only their type.
LIGHT_BYTES = 64 * 1024


def light_model(model: Any) -> Any:
    """A copy of ``model`` whose big initializers became graph inputs (same names, types, dims)."""
    onnx = _lazy.require("onnx")
    graph = model.graph
    small, inputs = [], list(graph.input)
    known = {i.name for i in graph.input}
    for init in graph.initializer:
        if tensor_nbytes(init) <= LIGHT_BYTES and init.data_location != 1:
            small.append(init)
        elif init.name not in known:
            inputs.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    light_graph = onnx.helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output),
                                         initializer=small, value_info=list(graph.value_info))
    light = onnx.helper.make_model(light_graph, opset_imports=list(model.opset_import),
                                   ir_version=model.ir_version)
    light.functions.extend(model.functions)
    return light


def shape_of(value_info: Any) -> Shape | None:
    """The shape a ValueInfoProto declares (int, symbolic name or None per dim), None without one."""
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type" or not value_info.type.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _run_inference(light: Any) -> tuple[Shapes, dict[str, int]]:
    """(shapes, element types) of every tensor ONNX shape inference can type."""
    onnx = _lazy.require("onnx")
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        log.debug("shape inference with data propagation failed (%s); retrying without", exc)
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    graph = inferred.graph
    shapes: Shapes = {}
    types: dict[str, int] = {}
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        shape = shape_of(info)
        if shape is not None:
            shapes[info.name] = shape
            types[info.name] = info.type.tensor_type.elem_type
    for init in light.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _mha_output(node: Any, shapes: Shapes) -> Shape | None:
    """com.microsoft.MultiHeadAttention: [B, Sq, v_hidden] from query [B, Sq, *] and value."""
    query = shapes.get(node.input[0])
    value = shapes.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if query is None or len(query) != 3:
        return None
    if value is None:
        return query
    hidden = value[-1] if len(value) == 3 else (value[1] * value[3] if is_static(value) else None)
    return (query[0], query[1], hidden)


# Output shapes of contrib ops ONNX's own inference does not know (it stops at them).
_CONTRIB_RULES = {("com.microsoft", "MultiHeadAttention"): _mha_output}


def _contrib_value_infos(light: Any, shapes: Shapes, types: dict[str, int]) -> list:
    onnx = _lazy.require("onnx")
    added = []
    for node in light.graph.node:
        rule = _CONTRIB_RULES.get((node.domain, node.op_type))
        if rule is None or not node.output or node.output[0] in shapes:
            continue
        shape = rule(node, shapes)
        if shape is not None and node.input[0] in types:
            added.append(onnx.helper.make_tensor_value_info(node.output[0], types[node.input[0]], list(shape)))
    return added


def infer_shapes_and_types(model: Any) -> tuple[Shapes, dict[str, int]]:
    """(tensor -> shape, tensor -> element type) for graph inputs, initializers, outputs and
    intermediates; tensors whose shape inference cannot determine are absent."""
    light = light_model(model)
    shapes, types = _run_inference(light)
    for _ in range(len(light.graph.node)):
        added = _contrib_value_infos(light, shapes, types)
        if not added:
            break
        light.graph.value_info.extend(added)
        shapes, types = _run_inference(light)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
        types[init.name] = init.data_type
    return shapes, types


def infer_shapes(model: Any) -> Shapes:
    """Tensor name -> shape for graph inputs, initializers, outputs and intermediates.

    Tensors whose shape inference cannot determine are absent from the result.
    """
    return infer_shapes_and_types(model)[0]


TensorInfo = dict[str, tuple[int, tuple[int | None, ...]]]   # tensor -> (elem type, shape; None = unknown dim)


def tensor_info(model: Any) -> TensorInfo:
    """Element type and shape (unknown and symbolic dims as None) of every typed tensor."""
    shapes, types = infer_shapes_and_types(model)
    return {name: (types[name], tuple(d if isinstance(d, int) else None for d in shape))
            for name, shape in shapes.items() if name in types}


def static_shapes(model: Any, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Static shapes of those ``names`` whose every dimension is known (inputs, initializers,
    ``Constant`` outputs, inferred intermediates)."""
    wanted = set(names)
    shapes = infer_shapes(model)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted and node.output[0] not in shapes:
            value = constant_node_value(node)
            if value is not None:
                shapes[node.output[0]] = tuple(value.shape)
    return {n: tuple(int(d) for d in s) for n, s in shapes.items() if n in wanted and is_static(s)}


def is_static(shape: Shape | None) -> bool:
    """True when every dimension of ``shape`` is a known integer."""
    return shape is not None and all(isinstance(d, int) for d in shape)


def numel(shape: Shape) -> int:
    """Element count of a static shape."""
    count = 1
    for dim in shape:
        if not isinstance(dim, int):
            raise ValueError(f"shape {shape} is not static")
        count *= dim
    return count


def symbolic_inputs(model: Any) -> list[str]:
    """Graph inputs (not initializers) with a symbolic or unknown dimension."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits and not is_static(shape_of(i))]


def pin_input_shapes(model: Any, sizes: Mapping[str, Sequence[int]]) -> list[str]:
    """Give symbolic graph inputs the static shapes ``sizes`` (in place); the names changed.

    A pass that builds static reshapes (tgGBC needs the batch) rewrites the graph for one
    size; with the inputs pinned, shape inference resolves every intermediate. Intermediate
    value_info is dropped (it carries the old symbolic dims); a size that contradicts a static
    dimension is refused.
    """
    changed = []
    for info in model.graph.input:
        declared, given = shape_of(info), sizes.get(info.name)
        if given is None or declared is None or is_static(declared):
            continue
        if len(declared) != len(given) or any(isinstance(d, int) and d != g for d, g in zip(declared, given)):
            raise ParameterError(f"input {info.name!r} of shape {list(given)} does not fit the model's "
                                 f"{list(declared)}; give arrays of the model's shape")
        for dim, size in zip(info.type.tensor_type.shape.dim, given):
            dim.Clear()
            dim.dim_value = int(size)
        changed.append(info.name)
    if changed:
        del model.graph.value_info[:]
    return changed
