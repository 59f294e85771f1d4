"""Tiny ONNX models for the runner tests, built with onnx.helper, plus their numpy oracles."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def matmul_chain(path: Path, width: int, layers: int = 2, *, dtype: str = "float32", batch: int | str = "batch",
                 scope: str = "/decoder/layers.{i}/", metadata: dict[str, str] | None = None,
                 seed: int = 0) -> list[np.ndarray]:
    """x [batch, width] -> MatMul W0 -> Relu -> MatMul W1 ... ; returns the weights (the oracle's).

    Node names carry ``scope`` per layer (``/decoder/layers.0/MatMul``) as the TorchScript
    exporter writes them. FLOPs grow with ``width**2``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    rng = np.random.default_rng(seed)
    weights, inits, nodes, cur = [], [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(dtype)
        weights.append(w)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        prefix = scope.format(i=i)
        nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"{prefix}MatMul"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}"], name=f"{prefix}Relu"))
        cur = f"h{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="/head/Identity"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", elem, [batch, width])],
                              [helper.make_tensor_value_info("y", elem, [batch, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return weights


def chain_oracle(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    h = x.astype(np.float64)
    for w in weights:
        h = np.maximum(h @ w.astype(np.float64), 0.0)
    return h


def typed_inputs_model(path: Path) -> None:
    """Inputs of four dtypes (float32 [2,3], float16 [2,3], int64 [2,3], bool [2,3]) -> float32 sum.

    y = a + float(b) + float(c) + float(d)
    """
    import onnx
    from onnx import TensorProto, helper

    ins = [("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT16), ("c", TensorProto.INT64), ("d", TensorProto.BOOL)]
    nodes = [helper.make_node("Cast", [n], [n + "_f"], to=TensorProto.FLOAT, name=f"cast_{n}") for n, _ in ins[1:]]
    nodes += [helper.make_node("Sum", ["a", "b_f", "c_f", "d_f"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "typed", [helper.make_tensor_value_info(n, t, [2, 3]) for n, t in ins],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def unnamed_dim_model(path: Path) -> None:
    """x [?, 4] with an unnamed free first dim -> Relu."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "unnamed", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
