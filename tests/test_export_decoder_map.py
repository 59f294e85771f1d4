"""DecoderMap storage and the ONNX-side demotion of extra outputs, on graphs built by hand."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.graph.shapes import static_shapes
from edgeprune.errors import InvalidModelError
from edgeprune.export import record
from edgeprune.export.decoder_map import (DECODER_MAP_KEY, DecoderMap, LayerMap, QueryTensor, TensorRef,
                                          missing_tensors, read_decoder_map, write_decoder_map)


def _dmap(**changes: object) -> DecoderMap:
    layer = LayerMap(0, TensorRef("p0", (1, 2, 3, 4)), "BHQK", TensorRef("k", (1, 4, 8)),
                     TensorRef("memory", (1, 4, 8)), TensorRef("l0", (1, 3, 5)))
    base = DecoderMap(num_layers=1, num_queries=3, num_learned_queries=3, num_keys=4, num_heads=2, embed_dims=8,
                      num_classes=5, batch=1, scope="decoder", exporter="torchscript", attention="manual",
                      inputs=("memory", "key_pos"), outputs=("all_cls_scores",),
                      memory=TensorRef("memory", (1, 4, 8)), key_pos=TensorRef("key_pos", (1, 4, 8)),
                      key_padding_mask=None, layers=(layer,),
                      query_tensors=(QueryTensor("q", (3, 8), 0, 3, "initializer"),), query_shape_constants=("s",),
                      preset="x", notes=("n",))
    return replace(base, **changes)


def test_json_round_trip_is_exact() -> None:
    dmap = _dmap()
    assert DecoderMap.from_json(dmap.to_json()) == dmap
    assert dmap.probs_present
    assert not _dmap(layers=(replace(dmap.layers[0], cross_attn_probs=None, probs_layout=None),)).probs_present


def test_metadata_write_replaces_and_read_back() -> None:
    model = helper.make_model(helper.make_graph([], "g", [], []))
    helper.set_model_props(model, {"other": "kept"})
    assert read_decoder_map(model) is None
    write_decoder_map(model, _dmap(num_keys=4))
    write_decoder_map(model, _dmap(num_keys=7))
    keys = [p.key for p in model.metadata_props]
    assert keys.count(DECODER_MAP_KEY) == 1 and "other" in keys
    assert read_decoder_map(model).num_keys == 7


@pytest.mark.parametrize("text, fragment", [("{not json", "not valid JSON"),
                                            ('{"version": 99}', "version 99"),
                                            ('{"version": 1}', "malformed")])
def test_bad_metadata_is_an_invalid_model_error(text: str, fragment: str) -> None:
    model = helper.make_model(helper.make_graph([], "g", [], []))
    helper.set_model_props(model, {DECODER_MAP_KEY: text})
    with pytest.raises(InvalidModelError, match=fragment):
        read_decoder_map(model)


def _graph_with_extras() -> onnx.ModelProto:
    """x [2, 6] -> y = Relu(x + x) (main output); extras: an Identity alias of the Add, a
    Reshape only feeding an extra (dead view), a Sigmoid only feeding an extra (dead compute),
    and two identical Adds of which only the first is needed by the output."""
    f = TensorProto.FLOAT
    shape = numpy_helper.from_array(np.array([12], dtype=np.int64), "shape12")
    nodes = [
        helper.make_node("Add", ["x", "x"], ["sum"]),
        helper.make_node("Add", ["x", "x"], ["sum_again"]),
        helper.make_node("Mul", ["sum", "sum_again"], ["prod"]),
        helper.make_node("Relu", ["prod"], ["y"]),
        helper.make_node("Identity", ["sum"], ["extra.alias"]),
        helper.make_node("Reshape", ["prod", "shape12"], ["extra.view"]),
        helper.make_node("Sigmoid", ["prod"], ["extra.dead"]),
        helper.make_node("Identity", ["sum_again"], ["extra.dup"]),
    ]
    outs = [helper.make_tensor_value_info("y", f, [2, 6])] + [
        helper.make_tensor_value_info(n, f, None) for n in ("extra.alias", "extra.view", "extra.dead", "extra.dup")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2, 6])], outs, [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_demote_resolves_aliases_views_and_duplicates() -> None:
    model = _graph_with_extras()
    x = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})
    resolved = record.demote_outputs(model, ["extra.alias", "extra.view", "extra.dead", "extra.dup"])
    assert resolved == {"extra.alias": "sum", "extra.view": "prod", "extra.dead": None, "extra.dup": "sum"}
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["y"]
    assert sorted(n.op_type for n in model.graph.node) == ["Add", "Mul", "Relu"]   # dup Add merged
    assert [t.name for t in model.graph.initializer] == []                         # Reshape's shape unused
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})
    np.testing.assert_array_equal(before[0], after[0])
    shapes = static_shapes(model, ["sum", "prod", "x"])
    assert shapes == {"sum": (2, 6), "prod": (2, 6), "x": (2, 6)}


def test_missing_tensors_lists_names_the_graph_lacks() -> None:
    model = _graph_with_extras()
    dmap = _dmap(inputs=("x",), memory=TensorRef("x", (2, 6)), key_pos=None, query_tensors=(),
                 query_shape_constants=("shape12",),
                 layers=(LayerMap(0, TensorRef("sum", (2, 6)), "BHQK", None, None, TensorRef("gone", (2, 6))),))
    assert missing_tensors(model, dmap) == ["gone"]


def test_find_query_tensors_by_axis_size() -> None:
    f = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.zeros((1, 9, 4), np.float32), "per_query"),
             numpy_helper.from_array(np.zeros((4, 4), np.float32), "weight"),
             numpy_helper.from_array(np.array([1, 9, 2, 2], np.int64), "reshape_to"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "other_shape")]
    const = helper.make_node("Constant", [], ["folded"], value=numpy_helper.from_array(np.ones((9, 3), np.float32)))
    graph = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("folded", f, [9, 3])], inits)
    tensors, shape_consts = record.find_query_tensors(helper.make_model(graph), [9])
    assert tensors == (QueryTensor("per_query", (1, 9, 4), 1, 9, "initializer"),
                       QueryTensor("folded", (9, 3), 0, 9, "constant"))
    assert shape_consts == ("reshape_to",)
