"""One tiny hand-built graph per attention-matching rule the foreign corpus relies on.

``tests/test_foreign_graphs.py`` exercises these rules on real exports; here each rule gets
the smallest graph that needs it, so a broken rule fails by name and in milliseconds:

- ``Shape``/``Size`` of a statically shaped tensor counts as a constant (TorchScript computes
  SDPA's scale from ``Shape(q)``), of a symbolic one not;
- a walk passes a ``Gather`` with a constant index (``nn.MultiheadAttention`` packs key and
  value into one projection and picks each out of it);
- the NaN guard ``Where(IsNaN(p), 0, p)`` exporters put after an SDPA Softmax with a mask;
- keys combining several per-key tensors (``Concat`` of two projections, as Conditional DETR).

Graph: queries ``hidden [1, 4, E]`` attend to ``memory [1, 6, E]`` (and ``key_pos``).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.graph.index import GraphIndex
from edgeprune.graph.run import cpu_session, random_inputs
from edgeprune.passes.discovery.attention import find_attentions
from edgeprune.passes.discovery.discover import is_cross_attention

NQ, NK, E = 4, 6, 8
RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _i64(name: str, values: list[int] | int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _model(nodes: list, inits: list, *, memory_dims: list = (1, NK, E), key_pos: bool = False) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, NQ, E]),
              helper.make_tensor_value_info("memory", TensorProto.FLOAT, list(memory_dims))]
    if key_pos:
        inputs.append(helper.make_tensor_value_info("key_pos", TensorProto.FLOAT, [1, NK, E]))
    graph = helper.make_graph(nodes, "rule", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, NQ, E])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _attention(k: str, v: str, guard: bool = False) -> tuple[list, list]:
    """Q = hidden Wq; probs = Softmax(Q K^T) [1, NQ, NK] (optionally NaN-guarded); out = probs V."""
    nodes = [helper.make_node("MatMul", ["hidden", "wq"], ["q"], "q_proj"),
             helper.make_node("Transpose", [k], ["kt"], "k_t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], "qk"),
             helper.make_node("Softmax", ["scores"], ["probs"], "softmax", axis=-1)]
    probs = "probs"
    if guard:
        nodes += [helper.make_node("IsNaN", ["probs"], ["nan"], "isnan"),
                  helper.make_node("Where", ["nan", "zero", "probs"], ["probs_ok"], "nan_guard")]
        probs = "probs_ok"
    nodes.append(helper.make_node("MatMul", [probs, v], ["out"], "pv"))
    return nodes, [_w("wq", E, E), numpy_helper.from_array(np.zeros((), np.float32), "zero")]


def _projections(*names: str) -> list:
    return [helper.make_node("MatMul", [src, f"w_{out}"], [out], f"{out}_proj") for src, out in
            (n.split(">") for n in names)]


def _only_match(model: onnx.ModelProto):
    index = GraphIndex.build(model)
    matches = find_attentions(index)
    assert len(matches) == 1
    assert is_cross_attention(index, matches[0])
    return index, matches[0]


def _runs(model: onnx.ModelProto) -> None:
    sess = cpu_session(model)
    assert np.isfinite(sess.run(None, random_inputs(sess))[0]).all()


# ------------------------------------------------------------------ Shape of a static tensor
def _shape_scaled(memory_dims: list) -> onnx.ModelProto:
    """Keys scaled by 1/sqrt(d) with d read from Shape(k), as TorchScript writes SDPA's scale."""
    nodes, inits = _attention("k_scaled", "v")
    nodes[:0] = _projections("memory>k", "memory>v") + [
        helper.make_node("Shape", ["k"], ["k_shape"], "shape"),
        helper.make_node("Gather", ["k_shape", "last"], ["d"], "gather_d", axis=0),
        helper.make_node("Cast", ["d"], ["d_f"], "cast", to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["d_f"], ["sqrt_d"], "sqrt"),
        helper.make_node("Div", ["k", "sqrt_d"], ["k_scaled"], "scale")]
    inits += [_w("w_k", E, E), _w("w_v", E, E), _i64("last", 2)]
    return _model(nodes, inits, memory_dims=memory_dims)


def test_shape_of_a_static_tensor_is_a_constant() -> None:
    model = _shape_scaled([1, NK, E])
    index, match = _only_match(model)
    assert index.is_constant("k_shape") and index.is_constant("sqrt_d")
    assert match.key_input.tensor == "memory" and match.key_input.consumer == "k_proj"
    _runs(model)


def test_shape_of_a_symbolic_tensor_is_not() -> None:
    index = GraphIndex.build(_shape_scaled(["batch", NK, E]))
    assert not index.is_constant("k_shape") and not index.is_constant("sqrt_d")


# ------------------------------------------------------------------ Gather with a constant index
def test_walk_passes_a_constant_gather_of_a_packed_projection() -> None:
    """memory [1, NK, E] -> MatMul([Wk | Wv]) -> [1, NK, 2, E] -> Transpose -> [2, 1, NK, E] -> Gather(0 | 1)."""
    nodes, inits = _attention("k", "v")
    nodes[:0] = [helper.make_node("MatMul", ["memory", "w_kv"], ["kv"], "kv_proj"),
                 helper.make_node("Reshape", ["kv", "kv_shape"], ["kv4"], "unflatten"),
                 helper.make_node("Transpose", ["kv4"], ["kv_t"], "split_t", perm=[2, 0, 1, 3]),
                 helper.make_node("Gather", ["kv_t", "zero_i"], ["k"], "pick_k", axis=0),
                 helper.make_node("Gather", ["kv_t", "one_i"], ["v"], "pick_v", axis=0)]
    inits += [_w("w_kv", E, 2 * E), _i64("kv_shape", [1, NK, 2, E]), _i64("zero_i", 0), _i64("one_i", 1)]
    model = _model(nodes, inits)
    _, match = _only_match(model)
    for side in (match.key_input, match.value_input):
        assert (side.tensor, side.consumer, side.key_axis) == ("memory", "kv_proj", 1)
    _runs(model)


def test_a_computed_gather_index_stops_the_walk() -> None:
    """The index must be constant: a Gather whose index is data is not a pick out of a packed projection."""
    nodes, inits = _attention("k", "v")
    nodes[:0] = [helper.make_node("MatMul", ["memory", "w_kv"], ["kv"], "kv_proj"),
                 helper.make_node("Reshape", ["kv", "kv_shape"], ["kv4"], "unflatten"),
                 helper.make_node("Transpose", ["kv4"], ["kv_t"], "split_t", perm=[2, 0, 1, 3]),
                 helper.make_node("ReduceMin", ["hidden"], ["h_min"], "h_min", keepdims=0),
                 helper.make_node("Cast", ["h_min"], ["h_idx"], "h_idx", to=TensorProto.INT64),
                 helper.make_node("Mul", ["h_idx", "zero_i"], ["data_idx"], "data_idx"),
                 helper.make_node("Gather", ["kv_t", "data_idx"], ["k"], "pick_k", axis=0),
                 helper.make_node("Gather", ["kv_t", "one_i"], ["v"], "pick_v", axis=0)]
    inits += [_w("w_kv", E, 2 * E), _i64("kv_shape", [1, NK, 2, E]), _i64("zero_i", 0), _i64("one_i", 1)]
    index = GraphIndex.build(_model(nodes, inits))
    assert all(m.key_input.consumer != "kv_proj" for m in find_attentions(index) if m.key_inputs)


# ------------------------------------------------------------------ NaN guard after the Softmax
@pytest.mark.parametrize("guard", [False, True])
def test_nan_guard_after_the_softmax_is_passed(guard: bool) -> None:
    nodes, inits = _attention("k", "v", guard=guard)
    nodes[:0] = _projections("memory>k", "memory>v")
    inits += [_w("w_k", E, E), _w("w_v", E, E)]
    model = _model(nodes, inits)
    _, match = _only_match(model)
    assert match.pv_node == "pv" and match.probs.tensor == "probs"
    assert match.value_input.tensor == "memory"
    _runs(model)


def test_a_guard_selecting_data_is_not_a_nan_guard() -> None:
    """Where(c, x, probs) with x computed is a different attention, not a guard: no match through it."""
    nodes, inits = _attention("k", "v", guard=True)
    nodes[:0] = _projections("memory>k", "memory>v")
    nodes = [n if n.name != "nan_guard" else helper.make_node("Where", ["nan", "hidden_t", "probs"], ["probs_ok"],
                                                               "nan_guard") for n in nodes]
    nodes.insert(0, helper.make_node("MatMul", ["hidden", "w_hm"], ["hidden_t"], "hidden_to_keys"))
    inits += [_w("w_k", E, E), _w("w_v", E, E), _w("w_hm", E, NK)]
    assert find_attentions(GraphIndex.build(_model(nodes, inits))) == []


# ------------------------------------------------------------------ keys from several per-key tensors
def test_keys_concatenating_two_projections_name_both_inputs() -> None:
    """K = Concat(memory Wc, key_pos Wp) along the width (Conditional DETR): pruning must gather both."""
    nodes, inits = _attention("k", "v")
    nodes[:0] = _projections("memory>kc", "key_pos>kp", "memory>v") + [
        helper.make_node("Concat", ["kc", "kp"], ["k"], "concat_k", axis=-1)]
    inits += [_w("w_kc", E, E // 2), _w("w_kp", E, E // 2), _w("w_v", E, E)]
    model = _model(nodes, inits, key_pos=True)
    _, match = _only_match(model)
    assert {(p.tensor, p.consumer) for p in match.key_inputs} == {("memory", "kc_proj"), ("key_pos", "kp_proj")}
    assert [p.tensor for p in match.value_inputs] == ["memory"]
    _runs(model)


def test_concat_along_the_keys_is_not_a_combination() -> None:
    """Concat along the key axis appends keys (memory + extra tokens): not key-by-key, so no key inputs."""
    nodes, inits = _attention("k", "v_all")
    nodes[:0] = _projections("memory>kc", "key_pos>kp", "memory>va", "key_pos>vb") + [
        helper.make_node("Concat", ["kc", "kp"], ["k"], "concat_k", axis=1),
        helper.make_node("Concat", ["va", "vb"], ["v_all"], "concat_v", axis=1)]
    inits += [_w("w_kc", E, E), _w("w_kp", E, E), _w("w_va", E, E), _w("w_vb", E, E)]
    index = GraphIndex.build(_model(nodes, inits, key_pos=True))
    assert find_attentions(index) == []
