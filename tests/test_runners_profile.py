"""Profile aggregation by op type and decoder layer."""
from __future__ import annotations

import json

import pytest

from _runner_models import matmul_chain
from edgeprune.runners.local import LocalRunner
from edgeprune.runners.profile import aggregate, format_profile, layer_from_name, layers_from_metadata


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


def test_decoder_map_metadata_assigns_unscoped_nodes():
    rows = [_row("node_MatMul_1", "MatMul", 3.0), _row("node_Softmax_2", "Softmax", 1.0),
            _row("/blk/x/Add", "Add", 2.0), _row("node_Sigmoid_9", "Sigmoid", 4.0)]
    decoder_map = {"layers": [{"index": 0, "probs": {"node": "node_Softmax_2"}, "pv_node": "node_MatMul_1"},
                              {"index": 1, "scope": "/blk/"}]}
    meta = {"edgeprune.decoder_map": json.dumps(decoder_map)}
    assert layers_from_metadata(meta, [r["node"] for r in rows]) == {
        "node_MatMul_1": 0, "node_Softmax_2": 0, "/blk/x/Add": 1}
    s = aggregate(rows, meta)
    assert [(r.key, r.total_us) for r in s.by_layer] == [("layer 0", 4.0), ("layer 1", 2.0), ("other", 4.0)]
    assert layers_from_metadata({"edgeprune.decoder_map": "not json"}, ["a"]) == {}


def test_real_profile_of_a_layered_model(tmp_path):
    path = tmp_path / "m.onnx"
    matmul_chain(path, 32, layers=3)
    with LocalRunner() as runner:
        res = runner.run({"models": [{"name": "m", "path": str(path)}], "warmup": 1, "repeats": 3, "profile": True,
                          "inputs": {"free_dims": {"batch": 4}}})
    summary = aggregate(res["models"][0]["profile"], res["models"][0]["metadata"], "m")
    assert [r.key for r in summary.by_layer] == ["layer 0", "layer 1", "layer 2"]
    assert all(r.nodes == 2 for r in summary.by_layer)           # MatMul + Relu per layer
    assert {r.key: r.nodes for r in summary.by_op_type} == {"MatMul": 3, "Relu": 3}
    text = format_profile(summary, top=1)
    assert "1 more op types" in text
    assert sum(line.strip().startswith("layer ") for line in text.splitlines()) == 3
