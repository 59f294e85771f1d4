"""Profile aggregation by op type and decoder layer."""
from __future__ import annotations

import json

import pytest

from _runner_models import matmul_chain
from edgeprune.runners.local import LocalRunner
from edgeprune.runners.profile import aggregate, format_profile, graph_node_layers, layer_from_name


def _row(node, op, us):
    return {"op_type": op, "node": node, "provider": "CPUExecutionProvider", "dur_us": us}


ROWS = [
    _row("/backbone/layer1/layer1.0/conv1/Conv", "Conv", 50.0),
    _row("/pts_bbox_head/transformer/decoder/layers.0/attentions.1/MatMul", "MatMul", 10.0),
    _row("/pts_bbox_head/transformer/decoder/layers.0/attentions.1/Softmax", "Softmax", 5.0),
    _row("/pts_bbox_head/transformer/decoder/layers.1/attentions.1/MatMul", "MatMul", 20.0),
    _row("/pts_bbox_head/transformer/decoder/layers.10/ffns.0/Add", "Add", 15.0),
]


def test_layer_from_name():
    assert layer_from_name("/decoder/layers.3/attn/MatMul") == 3
    assert layer_from_name("decoder.layers.12.norm") == 12
    assert layer_from_name("/layers_2/Add") == 2
    assert layer_from_name("/backbone/layer1/layer1.0/conv1/Conv") is None
    assert layer_from_name("/encoder/layers.1/x", decoder_scoped=True) is None


def test_aggregate_by_op_type_and_layer():
    s = aggregate(ROWS, model="m")
    assert s.total_us == 100.0
    assert [(r.key, r.total_us, r.nodes) for r in s.by_op_type] == [
        ("Conv", 50.0, 1), ("MatMul", 30.0, 2), ("Add", 15.0, 1), ("Softmax", 5.0, 1)]
    assert [(r.key, r.total_us) for r in s.by_layer] == [
        ("layer 0", 15.0), ("layer 1", 20.0), ("layer 10", 15.0), ("other", 50.0)]
    assert sum(r.share for r in s.by_layer) == pytest.approx(1.0)


def test_no_layer_names_gives_no_layer_split():
    s = aggregate([_row("node_MatMul_1", "MatMul", 3.0), _row("node_Add_2", "Add", 1.0)])
    assert s.by_layer == () and [r.key for r in s.by_op_type] == ["MatMul", "Add"]


def test_graph_layers_from_dynamo_scopes_and_decoder_map(tmp_path):
    """Dynamo names nodes node_<op>_<n> and puts the module path in node metadata."""
    import onnx
    from onnx import TensorProto, helper

    def node(op, inp, out, name, scopes=None):
        n = helper.make_node(op, [inp], [out], name=name)
        if scopes:
            entry = n.metadata_props.add()
            entry.key, entry.value = "pkg.torch.onnx.name_scopes", repr(scopes)
        return n

    nodes = [node("Relu", "x", "a", "node_relu", ["", "decoder", "decoder.layers.0", "relu"]),
             node("Softmax", "a", "probs_1", "node_softmax_1"),                     # no metadata: from the map
             node("Sigmoid", "probs_1", "y", "node_sigmoid", ["", "head", "sigmoid"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key = "edgeprune.decoder_map"
    entry.value = json.dumps({"layers": [{"index": 1, "cross_attn_probs": {"name": "probs_1", "shape": [2]},
                                          "logits": None}]})
    onnx.save(model, str(tmp_path / "g.onnx"))
    mapping = graph_node_layers(tmp_path / "g.onnx")
    assert mapping == {"node_relu": 0, "node_softmax_1": 1}
    # ORT renames fused nodes: "fused <name>" (FusedGemm) or "<name>_<suffix>"
    rows = [_row("fused node_relu", "FusedGemm", 1.0), _row("node_softmax_1_nchwc", "Softmax", 2.0),
            _row("node_sigmoid", "Sigmoid", 4.0)]
    s = aggregate(rows, mapping)
    assert [(r.key, r.total_us) for r in s.by_layer] == [("layer 0", 1.0), ("layer 1", 2.0), ("other", 4.0)]


def _save_graph(path, nodes, n_inputs=1):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [2])
                                           for i in range(n_inputs)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_generic_names_inherit_their_producers_layer(tmp_path):
    """onnxsim renames fused nodes (Gemm_4); they take the layer of their inputs when unambiguous."""
    from onnx import helper

    nodes = [helper.make_node("Relu", ["x0"], ["a"], name="/decoder/layers.0/Relu"),
             helper.make_node("Relu", ["a"], ["b"], name="Gemm_4"),                       # -> layer 0
             helper.make_node("Relu", ["b"], ["c"], name="/decoder/layers.1/Relu"),
             helper.make_node("Relu", ["x0"], ["d"], name="/head/Relu"),                  # scoped, no layer
             helper.make_node("Add", ["c", "d"], ["e"], name="Add_7"),                    # layer 1 + other -> 1
             helper.make_node("Add", ["b", "c"], ["f"], name="Add_8"),                    # layers 0 and 1: ambiguous
             helper.make_node("Relu", ["x0"], ["g"], name="Relu_9")]                      # graph input only
    _save_graph(tmp_path / "ts.onnx", nodes)
    assert graph_node_layers(tmp_path / "ts.onnx") == {
        "/decoder/layers.0/Relu": 0, "Gemm_4": 0, "/decoder/layers.1/Relu": 1, "Add_7": 1}
    unscoped = [helper.make_node("Relu", ["x0"], ["a"], name="node_relu"),
                helper.make_node("Relu", ["a"], ["b"], name="node_relu_1")]
    _save_graph(tmp_path / "dyn.onnx", unscoped)
    assert graph_node_layers(tmp_path / "dyn.onnx") == {}      # nothing to propagate from: all "other"


def test_real_profile_of_a_layered_model(tmp_path):
    path = tmp_path / "m.onnx"
    matmul_chain(path, 32, layers=3)
    with LocalRunner() as runner:
        res = runner.run({"models": [{"name": "m", "path": str(path)}], "warmup": 1, "repeats": 3, "profile": True,
                          "inputs": {"free_dims": {"batch": 4}}})
    summary = aggregate(res["models"][0]["profile"], graph_node_layers(path), "m")
    assert summary == aggregate(res["models"][0]["profile"], {}, "m")   # TorchScript-style names suffice
    assert [r.key for r in summary.by_layer] == ["layer 0", "layer 1", "layer 2"]
    assert all(r.nodes == 2 for r in summary.by_layer)           # MatMul + Relu per layer
    assert {r.key: r.nodes for r in summary.by_op_type} == {"MatMul": 3, "Relu": 3}
    text = format_profile(summary, top=1)
    assert "1 more op types" in text
    assert sum(line.strip().startswith("layer ") for line in text.splitlines()) == 3
