"""The graph toolkit on tiny hand-built graphs: constants, shapes, the one saver, WorkingModel."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.graph import files
from edgeprune.graph.edit import WorkingModel
from edgeprune.graph.index import GraphIndex
from edgeprune.graph.shapes import static_shapes, tensor_info
from edgeprune.graph.values import attr, constant_node_value, model_nbytes, tensor_nbytes


def _model(weights: int = 4) -> onnx.ModelProto:
    """y = Relu(x @ W + b) with x [2, weights]; a Constant node holds b."""
    w = numpy_helper.from_array(np.arange(weights * 3, dtype=np.float32).reshape(weights, 3) / 10, "W")
    nodes = [helper.make_node("Constant", [], ["b"], name="bias", value_floats=[0.5, -0.5, 1.0]),
             helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"),
             helper.make_node("Add", ["xw", "b"], ["pre"], name="add"),
             helper.make_node("Relu", ["pre"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, weights])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="toolkit-test")
    model.metadata_props.add(key="keep.me", value="1")
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_constant_values_attributes_and_byte_counts() -> None:
    model = _model()
    bias = model.graph.node[0]
    assert constant_node_value(bias).dtype == np.float32 and constant_node_value(bias).tolist() == [0.5, -0.5, 1.0]
    ints = helper.make_node("Constant", [], ["i"], value_ints=[1, 2])
    assert constant_node_value(ints).dtype == np.int64 and constant_node_value(ints).tolist() == [1, 2]
    assert attr(helper.make_node("Softmax", ["a"], ["b"], axis=1), "axis") == 1
    assert attr(helper.make_node("Softmax", ["a"], ["b"]), "axis", -1) == -1
    assert tensor_nbytes(model.graph.initializer[0]) == 4 * 3 * 4
    index = GraphIndex.build(model)
    assert index.value("b").tolist() == [0.5, -0.5, 1.0] and index.is_constant("b") and not index.is_constant("xw")
    assert index.uses("xw") == [(model.graph.node[2], 0)]


def test_shapes_and_types_come_from_one_inference() -> None:
    model = _model()
    assert static_shapes(model, ["x", "xw", "y", "b"]) == {"x": (2, 4), "xw": (2, 3), "y": (2, 3), "b": (3,)}
    info = tensor_info(model)
    assert info["pre"] == (TensorProto.FLOAT, (2, 3)) and info["W"] == (TensorProto.FLOAT, (4, 3))


def test_save_onnx_writes_external_data_exactly_when_the_protobuf_limit_would_be_crossed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(weights=400)
    assert files.save_onnx(model, tmp_path / "inline.onnx") is None
    monkeypatch.setattr(files, "PROTOBUF_LIMIT", model_nbytes(model) + files.EXTERNAL_DATA_MARGIN - 1)
    assert files.save_onnx(model, tmp_path / "tmp.onnx", final_name="final.onnx") == "final.onnx.data"
    assert (tmp_path / "final.onnx.data").stat().st_size >= 400 * 3 * 4


def test_working_model_exports_once_with_header_metadata_and_no_stale_shapes() -> None:
    model = _model()
    inferred = onnx.shape_inference.infer_shapes(model)
    working = WorkingModel(inferred)
    graph = working.graph()                                   # a graph pass edits in place
    relu = next(n for n in graph.nodes if n.op == "Relu")
    relu.op = "Sigmoid"
    working.set_metadata("edit.plan", {"changed": ["relu"]})
    out = working.finish()
    assert [n.op_type for n in out.graph.node].count("Sigmoid") == 1 and not out.graph.value_info
    assert out.producer_name == "toolkit-test" and out.opset_import[0].version == 17
    props = {p.key: p.value for p in out.metadata_props}
    assert props["keep.me"] == "1" and json.loads(props["edit.plan"]) == {"changed": ["relu"]}
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(_run(out, x), 1 / (1 + np.exp(-(x @ w + [0.5, -0.5, 1.0]))), rtol=1e-6)


def test_working_model_keeps_shapes_when_nothing_edited_and_takes_replaced_protos() -> None:
    inferred = onnx.shape_inference.infer_shapes(_model())
    untouched = WorkingModel(inferred).finish()
    assert {vi.name for vi in untouched.graph.value_info} >= {"xw", "pre"}
    working = WorkingModel(inferred)
    replaced = working.proto()
    replaced.graph.node[3].op_type = "Identity"               # a proto pass builds a new model
    working.replace(replaced)
    assert [n.op_type for n in working.finish().graph.node][-1] == "Identity"
