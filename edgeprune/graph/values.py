"""Reading values out of ONNX protos: node attributes, constants, and exact byte counts.

One reader each, so every pass agrees on what a ``Constant`` node holds (``value`` tensors and
the scalar/list forms ``value_float(s)`` / ``value_int(s)``, returned as numpy arrays with the
dtype ONNX gives them) and on how big a tensor is (from its dims and element type, which also
holds for tensors whose data lives in an external file).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgeprune import _lazy


def attr(node: Any, name: str, default: Any = None) -> Any:
    """The Python value of ``node``'s attribute ``name``, or ``default`` when it is absent."""
    onnx = _lazy.require("onnx")
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def constant_node_value(node: Any) -> np.ndarray | None:
    """The value of a ``Constant`` node as a numpy array (None for sparse or string forms)."""
    onnx = _lazy.require("onnx")
    for attribute in node.attribute:
        if attribute.name == "value":
            return onnx.numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_float", "value_floats"):
            return np.array(onnx.helper.get_attribute_value(attribute), dtype=np.float32)
        if attribute.name in ("value_int", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(attribute), dtype=np.int64)
    return None


def constant_names(graph: Any) -> set[str]:
    """Names of the tensors a graph holds as data: its initializers and ``Constant`` node outputs."""
    names = {t.name for t in graph.initializer}
    names.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return names


def tensor_nbytes(tensor: Any) -> int:
    """Bytes of a TensorProto's data, from dims and element type (exact; external data too)."""
    onnx = _lazy.require("onnx")
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def initializer_nbytes(model: Any) -> int:
    """Bytes of all initializers of ``model``."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def model_nbytes(model: Any) -> int:
    """Weight bytes of a model: initializers plus ``Constant`` node tensors."""
    total = initializer_nbytes(model)
    total += sum(tensor_nbytes(node.attribute[0].t) for node in model.graph.node
                 if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value")
    return total
