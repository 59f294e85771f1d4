"""The query-axis algorithm of GPQ, one piece at a time (``edgeprune.passes.queries.axes``).

Two layers of tests:

- the label algebra (``AxisLabel`` and its segment normalization, ``concat_labels``,
  ``reshape_groups``, ``slice_params``, ``ShapeValues``), on small cases computed by hand or
  checked against numpy indexing;
- one tiny graph per propagation rule, written with ``onnx.helper``: a graph input (or an
  initializer) is seeded with the query axis, ``graph_facts`` + ``analyze`` label the graph,
  and the test asserts which axis of each output carries which queries. Where the rule passes
  queries through unchanged, the graph is also shrunk with GPQ (``shrink_queries``) and the
  shrunk graph's ONNX Runtime outputs on the kept rows must equal the original graph's outputs
  restricted to the kept queries (the oracle).

Sizes: ``NQ = 6`` queries; no other axis in these graphs has size 6 (the shrink refuses a
graph with an unexplained axis of the query count).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.passes.queries import gpq
from edgeprune.passes.queries import axes as qx
from edgeprune.passes.queries.axes import AxisLabel, QueryAxisError

NQ = 6                       # queries
E = 4                        # embedding width
KEPT = (0, 2, 5)             # the queries a GPQ shrink keeps in the end-to-end checks
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
Shape = Sequence[int]


# ----------------------------------------------------------------------------- helpers
def q(start: int = 0, stop: int = NQ, pre: int = 1, post: int = 1) -> AxisLabel:
    """A label whose axis is one range of queries, optionally folded with ``pre``/``post``."""
    return AxisLabel(((start, stop),), pre, post)


def node(op: str, inputs: Sequence[str], outputs: Sequence[str] | str, domain: str = "", **attrs: Any) -> Any:
    outs = [outputs] if isinstance(outputs, str) else list(outputs)
    return helper.make_node(op, list(inputs), outs, name=f"{op}_{outs[0]}", domain=domain, **attrs)


def model_of(nodes: Sequence[Any], inputs: Mapping[str, Shape], outputs: Mapping[str, Shape],
             inits: Mapping[str, np.ndarray] | None = None, opset: int = 17,
             int_inputs: Sequence[str] = (), extra_domains: Sequence[str] = ()) -> onnx.ModelProto:
    """A checked model: float32 inputs (int64 for ``int_inputs``) and float32 outputs, static shapes."""
    graph = helper.make_graph(
        list(nodes), "tiny",
        [helper.make_tensor_value_info(n, INT64 if n in int_inputs else FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, INT64 if n in int_inputs else FLOAT, list(s)) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in (inits or {}).items()])
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_domains]
    model = helper.make_model(graph, opset_imports=imports, ir_version=10 if opset <= 21 else 11)
    if not extra_domains:
        onnx.checker.check_model(model, full_check=True)
    return model


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def labels(model: onnx.ModelProto, seeds: Mapping[str, Mapping[int, AxisLabel]]) -> qx.QueryAxes:
    """The public analysis, as GPQ runs it: static facts, then propagation from the seeds."""
    return qx.analyze(qx.graph_facts(model), {name: dict(axes) for name, axes in seeds.items()})


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, dict(feeds))))


def random_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == INT64:
            feeds[vi.name] = rng.integers(0, 5, size=shape).astype(np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def restrict(value: np.ndarray, axes: Mapping[int, Sequence[int]]) -> np.ndarray:
    for axis, positions in axes.items():
        value = np.take(value, np.asarray(positions, np.int64), axis=axis)
    return value


Rows = Mapping[str, Mapping[int, Sequence[int]]]      # tensor -> {axis: old positions kept}


def assert_shrinks(model: onnx.ModelProto, seeds: Sequence[tuple[str, int]], rows: Rows,
                   kept: Sequence[int] = KEPT) -> gpq.ShrinkReport:
    """GPQ-shrink ``model`` to ``kept``; on the kept input rows it computes the kept output rows.

    ``rows`` names, for every graph input and output with a query axis, the old positions the
    shrunk tensor holds (by hand); the oracle is the ORIGINAL graph's outputs restricted to them.
    """
    space = gpq.QuerySpace(NQ, 0, tuple((name, axis, 0, NQ) for name, axis in seeds))
    small, report = gpq.shrink_queries(model, kept, space)
    onnx.checker.check_model(small)
    feeds = random_feeds(model)
    want = {name: restrict(value, rows.get(name, {})) for name, value in run(model, feeds).items()}
    got = run(small, {name: restrict(value, rows.get(name, {})) for name, value in feeds.items()})
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    return report


# ----------------------------------------------------------------------------- label algebra
def test_make_merges_adjacent_ranges_and_blocks_and_drops_empty_pieces() -> None:
    label = AxisLabel.make([(0, 2), (2, 4), (4, 4), 0, 3, 2, (5, 6)])
    assert label == AxisLabel(((0, 4), 5, (5, 6)))
    assert AxisLabel.make([(0, 3), (4, 6)]).segments == ((0, 3), (4, 6))      # not adjacent: kept apart
    assert AxisLabel.make([(3, 6), (0, 3)]).segments == ((3, 6), (0, 3))      # order matters


def test_make_without_a_query_range_is_no_label() -> None:
    assert AxisLabel.make([5, 3]) is None
    assert AxisLabel.make([(2, 2), 4]) is None
    assert AxisLabel.make([]) is None


def test_sizes_count_segments_and_folded_factors() -> None:
    label = AxisLabel(((0, 6), 5), pre=2, post=3)
    assert label.inner == 11
    assert label.size == 2 * 11 * 3
    assert label.resized(np.array(KEPT)) == 2 * (3 + 5) * 3


def test_inner_positions_keep_every_non_query_entry() -> None:
    label = AxisLabel(((0, 6), 5))                     # StreamPETR self-attention keys: queries, then memory
    assert label.inner_positions(np.array(KEPT)).tolist() == [0, 2, 5, 6, 7, 8, 9, 10]
    propagated = AxisLabel(((4, 6),))                  # queries 4 and 5 only
    assert propagated.inner_positions(np.array(KEPT)).tolist() == [1]
    assert propagated.inner_positions(np.array([0, 1])).tolist() == []


def test_positions_of_a_folded_axis_match_numpy_indexing() -> None:
    """[pre, inner, post] flattened: positions = arange(...).reshape(pre, inner, post)[:, kept_inner, :]."""
    label = AxisLabel(((0, 4), 1), pre=2, post=3)
    kept = np.array([1, 3])
    oracle = np.arange(label.size).reshape(2, 5, 3)[:, [1, 3, 4], :].reshape(-1)
    assert label.positions(kept).tolist() == oracle.tolist()
    assert label.resized(kept) == oracle.size


def test_positions_by_hand() -> None:
    assert AxisLabel(((0, 4),), pre=2, post=2).positions(np.array([1, 3])).tolist() == [2, 3, 6, 7, 10, 11, 14, 15]
    assert AxisLabel(((2, 6),)).positions(np.array(KEPT)).tolist() == [0, 3]


def test_sub_cuts_ranges_and_blocks() -> None:
    label = AxisLabel(((0, 6), 5))
    assert label.sub(4, 8) == AxisLabel(((4, 6), 2))
    assert label.sub(0, 6) == q()
    assert label.sub(6, 11) is None                    # only memory: not a query axis
    assert AxisLabel(((0, 3), 2, (3, 6))).sub(2, 6) == AxisLabel(((2, 3), 2, (3, 4)))


def test_sub_of_a_folded_axis_is_refused() -> None:
    with pytest.raises(QueryAxisError, match="folded"):
        q(pre=2).sub(0, 3)


def test_concat_labels_lays_pieces_end_to_end() -> None:
    assert qx.concat_labels([(q(0, 4), 4), (None, 5), (q(4, 6), 2)]) == AxisLabel(((0, 4), 5, (4, 6)))
    assert qx.concat_labels([(q(0, 3), 3), (q(3, 6), 3)]) == q()
    assert qx.concat_labels([(None, 3), (None, 2)]) is None
    with pytest.raises(QueryAxisError, match="folded"):
        qx.concat_labels([(q(post=2), 12), (None, 3)])


@pytest.mark.parametrize("ishape, oshape, groups", [
    ((2, 6, 4), (2, 6, 2, 2), [([0], [0]), ([1], [1]), ([2], [2, 3])]),
    ((6, 2, 4), (12, 4), [([0, 1], [0]), ([2], [1])]),
    ((1, 6, 4), (6, 1, 4), [([1], [0]), ([2], [2])]),           # size-1 axes are left out
    ((2, 3, 4), (3, 8), [([0, 1, 2], [0, 1])]),                 # no common boundary before 24: one group
])
def test_reshape_groups(ishape: Shape, oshape: Shape, groups: list) -> None:
    assert qx.reshape_groups(ishape, oshape) == groups


def test_reshape_groups_refuse_a_size_change() -> None:
    with pytest.raises(QueryAxisError, match="does not preserve size"):
        qx.reshape_groups((6, 4), (5, 5))


def _slice_model(starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> onnx.ModelProto:
    """x [6, 5] -> Slice -> y, every parameter an initializer (or a graph input when given a str)."""
    inits: dict[str, np.ndarray] = {}
    names = []
    for name, value in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps)):
        if value is None:
            names.append("")
        elif isinstance(value, str):
            names.append(value)
        else:
            inits[name] = np.array(value, np.int64)
            names.append(name)
    while names and not names[-1]:
        names.pop()
    inputs = {"x": (NQ, 5), **{n: (1,) for n in names if n and n not in inits}}
    nodes = [node("Slice", ["x", *names], "y"), node("Shape", ["y"], "y_shape")]
    graph = helper.make_graph(nodes, "slice",
                              [helper.make_tensor_value_info(n, FLOAT if n == "x" else INT64, list(s))
                               for n, s in inputs.items()],
                              [helper.make_tensor_value_info("y_shape", INT64, [2])],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("starts, ends, axes, steps, want", [
    ([1], [-1], [-1], None, {1: (1, 4, 1)}),
    ([2, 0], [6, 2**63 - 1], None, None, {0: (2, 6, 1), 1: (0, 5, 1)}),     # INT64_MAX = "to the end"
    ([-2], [-100], [0], [-1], {0: (4, -1, -1)}),                           # backwards to the start
    ([0], [10], [1], [2], {1: (0, 5, 2)}),                                 # clamped to the size
])
def test_slice_params_normalize_to_the_input_shape(starts: Any, ends: Any, axes: Any, steps: Any, want: dict) -> None:
    model = _slice_model(starts, ends, axes, steps)
    facts = qx.graph_facts(model)
    got = qx.slice_params(qx.ShapeValues(facts), facts.nodes[0], (NQ, 5))
    assert got == want
    for ax, (start, stop, step) in want.items():        # the same slice in numpy
        assert len(range(start, stop, step)) == facts.shape("y")[ax]


def test_slice_params_of_run_time_bounds_is_none() -> None:
    model = _slice_model("starts", [3], [0])
    facts = qx.graph_facts(model)
    assert qx.slice_params(qx.ShapeValues(facts), facts.nodes[0], (NQ, 5)) is None


def test_shape_values_trace_each_element_to_a_literal_or_a_dimension() -> None:
    """Reshape target = Concat(Shape(x)[0:1], [-1, 2]): value and the origin of each element."""
    nodes = [node("Shape", ["x"], "s"), node("Slice", ["s", "zero", "one"], "s0"),
             node("Concat", ["s0", "tail"], "target", axis=0), node("Reshape", ["x", "target"], "y")]
    model = model_of(nodes, {"x": (3, NQ, E)}, {"y": (3, 12, 2)},
                     {"zero": np.array([0]), "one": np.array([1]), "tail": np.array([-1, 2])})
    values = qx.ShapeValues(qx.graph_facts(model))
    assert values.value("target").tolist() == [3, -1, 2]
    assert values.origins("target") == [qx.DimOf("x", 0), qx.Literal("tail", 0), qx.Literal("tail", 1)]
    assert values.value("x") is None                           # a run-time tensor has no value


# ----------------------------------------------------------------------------- one graph per rule
def test_rule_same_forwards_and_backwards() -> None:
    """_rule_same: Relu and Softmax keep the query axis; a label on the output reaches the input."""
    model = model_of([node("Relu", ["x"], "r"), node("Softmax", ["r"], "y", axis=-1)],
                     {"x": (2, NQ, E)}, {"y": (2, NQ, E)})
    qa = labels(model, {"x": {1: q()}})
    assert qa.of("y") == (None, q(), None) and qa.of("r") == (None, q(), None)
    backwards = labels(model, {"y": {1: q()}})
    assert backwards.of("x") == (None, q(), None)
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: KEPT}})


def test_rule_broadcast_labels_and_slices_a_per_query_constant() -> None:
    """_rule_broadcast: x [2, Nq, E] + bias [Nq, 1] * scale [1, 1, E]; the bias is per query."""
    model = model_of([node("Add", ["x", "bias"], "a"), node("Mul", ["a", "scale"], "y")],
                     {"x": (2, NQ, E)}, {"y": (2, NQ, E)},
                     {"bias": weights(NQ, 1), "scale": weights(1, 1, E, seed=1)})
    qa = labels(model, {"x": {1: q()}})
    assert qa.of("bias") == (q(), None)
    assert not qa.labelled("scale")
    assert qa.of("y") == (None, q(), None)
    report = assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: KEPT}})
    assert report.sliced_constants == ("bias",)


def test_rule_broadcast_refuses_two_different_query_sets_on_one_axis() -> None:
    model = model_of([node("Add", ["x", "z"], "y")], {"x": (NQ, E), "z": (NQ, E)}, {"y": (NQ, E)})
    with pytest.raises(QueryAxisError, match="two different query axes"):
        labels(model, {"x": {0: q()}, "z": {0: AxisLabel(((0, 3), 3))}})


def test_rule_matmul_rows_and_batch_axes() -> None:
    """_rule_matmul: x [2, Nq, E] @ W [E, 5] -> [2, Nq, 5]; the weight gets no label."""
    model = model_of([node("MatMul", ["x", "w"], "y")], {"x": (2, NQ, E)}, {"y": (2, NQ, 5)}, {"w": weights(E, 5)})
    qa = labels(model, {"x": {1: q()}})
    assert qa.of("y") == (None, q(), None)
    assert not qa.labelled("w")
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: KEPT}})


def test_rule_matmul_self_attention_scores_carry_queries_on_both_axes() -> None:
    """x [Nq, E] @ x^T [E, Nq] -> scores [Nq, Nq]: rows and columns are queries."""
    model = model_of([node("Transpose", ["x"], "xt", perm=[1, 0]), node("MatMul", ["x", "xt"], "s"),
                      node("Softmax", ["s"], "p", axis=-1), node("MatMul", ["p", "x"], "y")],
                     {"x": (NQ, E)}, {"y": (NQ, E)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("s") == (q(), q())
    assert qa.of("xt") == (None, q())
    # pruned queries vanish from self-attention too: the oracle is attention among the kept rows
    space = gpq.QuerySpace(NQ, 0, (("x", 0, 0, NQ),))
    small, _ = gpq.shrink_queries(model, KEPT, space)
    x = random_feeds(model)["x"][list(KEPT)]                    # [3, E]
    scores = x @ x.T
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = probs / probs.sum(-1, keepdims=True) @ x
    np.testing.assert_allclose(run(small, {"x": x})["y"], want, rtol=1e-5, atol=1e-6)


def test_rule_matmul_contraction_axis_links_both_operands() -> None:
    """a [3, Nq] @ b [Nq, 5]: the contracted axis of b is the query axis of a; the output has none."""
    model = model_of([node("MatMul", ["a", "b"], "y")], {"a": (3, NQ)}, {"y": (3, 5)}, {"b": weights(NQ, 5)})
    qa = labels(model, {"a": {1: q()}})
    assert qa.of("b") == (q(), None)
    assert not qa.labelled("y")


def test_rule_matmul_with_a_vector() -> None:
    """x [2, Nq, E] @ v [E] -> [2, Nq] (the rank-1 case of MatMul)."""
    model = model_of([node("MatMul", ["x", "v"], "y")], {"x": (2, NQ, E)}, {"y": (2, NQ)}, {"v": weights(E)})
    assert labels(model, {"x": {1: q()}}).of("y") == (None, q())
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: KEPT}})


@pytest.mark.parametrize("trans_a", [0, 1])
def test_rule_gemm(trans_a: int) -> None:
    """_rule_gemm: A [Nq, E] (or [E, Nq] with transA) x B^T [E, 5] + C [Nq, 1] -> [Nq, 5]."""
    a_shape = (E, NQ) if trans_a else (NQ, E)
    model = model_of([node("Gemm", ["a", "b", "c"], "y", transA=trans_a, transB=1)],
                     {"a": a_shape}, {"y": (NQ, 5)}, {"b": weights(5, E), "c": weights(NQ, 1, seed=2)})
    axis = 1 if trans_a else 0
    qa = labels(model, {"a": {axis: q()}})
    assert qa.of("y") == (q(), None)
    assert qa.of("c") == (q(), None)
    assert not qa.labelled("b")
    report = assert_shrinks(model, [("a", axis)], {"a": {axis: KEPT}, "y": {0: KEPT}})
    assert report.sliced_constants == ("c",)


def test_rule_gemm_contraction_axis_links_both_operands() -> None:
    """a [3, Nq] x b^T where b is [5, Nq] (transB): b's query axis is its axis 1; the output has none."""
    model = model_of([node("Gemm", ["a", "b"], "y", transB=1)], {"a": (3, NQ)}, {"y": (3, 5)}, {"b": weights(5, NQ)})
    qa = labels(model, {"a": {1: q()}})
    assert qa.of("b") == (None, q())
    assert not qa.labelled("y")


@pytest.mark.parametrize("perm, axis", [([1, 2, 0], 0), (None, 1)])      # None: ONNX reverses the axes
def test_rule_transpose(perm: list[int] | None, axis: int) -> None:
    attrs = {"perm": perm} if perm else {}
    oshape = (NQ, E, 2) if perm else (E, NQ, 2)
    model = model_of([node("Transpose", ["x"], "y", **attrs)], {"x": (2, NQ, E)}, {"y": oshape})
    qa = labels(model, {"x": {1: q()}})
    assert [ax for ax, lab in enumerate(qa.of("y")) if lab is not None] == [axis]
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {axis: KEPT}})


def test_rule_reshape_splits_heads_and_rewrites_the_target() -> None:
    """_rule_reshape: [2, Nq, E] -> [2, Nq, 2, 2] (heads); the target literal Nq is rewritten."""
    model = model_of([node("Reshape", ["x", "shape"], "y")], {"x": (2, NQ, E)}, {"y": (2, NQ, 2, 2)},
                     {"shape": np.array([2, NQ, 2, 2], np.int64)})
    qa = labels(model, {"x": {1: q()}})
    assert qa.of("y") == (None, q(), None, None)
    report = assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: KEPT}})
    assert report.shape_constants == ("shape",)


def test_rule_reshape_folds_the_query_axis_with_another_and_back() -> None:
    """[Nq, 2, E] -> [Nq*2, E] (label Nq x post 2) -> Relu -> [Nq, 2, E]: TorchScript's [Nq*B, E]."""
    model = model_of([node("Reshape", ["x", "flat"], "f"), node("Relu", ["f"], "r"),
                      node("Reshape", ["r", "back"], "y")],
                     {"x": (NQ, 2, E)}, {"y": (NQ, 2, E)},
                     {"flat": np.array([NQ * 2, E], np.int64), "back": np.array([NQ, 2, E], np.int64)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("f") == (q(post=2), None)
    assert qa.of("y") == (q(), None, None)
    report = assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "y": {0: KEPT}})
    assert set(report.shape_constants) == {"flat", "back"}


def test_rule_reshape_through_unsqueeze_squeeze_flatten() -> None:
    model = model_of([node("Unsqueeze", ["x", "zero"], "u"), node("Squeeze", ["u", "zero"], "s"),
                      node("Flatten", ["s"], "y", axis=1)],
                     {"x": (NQ, 2, E)}, {"y": (NQ, 2 * E)}, {"zero": np.array([0], np.int64)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("u") == (None, q(), None, None)
    assert qa.of("y") == (q(), None)
    assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "y": {0: KEPT}})


def test_rule_reshape_refuses_to_merge_two_query_axes() -> None:
    model = model_of([node("Reshape", ["s", "flat"], "y")], {"s": (NQ, NQ)}, {"y": (NQ * NQ,)},
                     {"flat": np.array([-1], np.int64)})
    with pytest.raises(QueryAxisError, match="merges two query axes"):
        labels(model, {"s": {0: q(), 1: q()}})


def test_rule_concat_queries_then_memory() -> None:
    """_rule_concat: StreamPETR's self-attention keys, queries [2, Nq, E] ++ memory [2, 5, E]."""
    model = model_of([node("Concat", ["x", "m"], "y", axis=1)], {"x": (2, NQ, E), "m": (2, 5, E)},
                     {"y": (2, NQ + 5, E)})
    qa = labels(model, {"x": {1: q()}})
    assert qa.of("y") == (None, AxisLabel(((0, NQ), 5)), None)
    assert not qa.labelled("m")
    memory = list(range(NQ, NQ + 5))
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: [*KEPT, *memory]}})


def test_rule_concat_learned_and_propagated_queries() -> None:
    """Learned queries (an initializer [4, E]) ++ propagated ones (input [2, E], queries 4..5)."""
    model = model_of([node("Concat", ["learned", "prev"], "y", axis=0)], {"prev": (2, E)}, {"y": (NQ, E)},
                     {"learned": weights(4, E)})
    qa = labels(model, {"y": {0: q()}})                 # from the output backwards
    assert qa.of("learned") == (q(0, 4), None)
    assert qa.of("prev") == (q(4, 6), None)
    report = assert_shrinks(model, [("y", 0)], {"prev": {0: [1]}, "y": {0: KEPT}})
    assert report.sliced_constants == ("learned",)
    assert report.io_selections == (("prev", 0, (1,)), ("y", 0, KEPT))


def test_rule_split_with_explicit_sizes() -> None:
    """_rule_split: [Nq, E] split [4, 2] -> queries 0..3 and 4..5; the split sizes are rewritten."""
    model = model_of([node("Split", ["x", "sizes"], ["a", "b"], axis=0)], {"x": (NQ, E)},
                     {"a": (4, E), "b": (2, E)}, {"sizes": np.array([4, 2], np.int64)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("a") == (q(0, 4), None)
    assert qa.of("b") == (q(4, 6), None)
    report = assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "a": {0: [0, 2]}, "b": {0: [1]}})
    assert report.shape_constants == ("sizes",)


def test_rule_split_queries_from_memory() -> None:
    model = model_of([node("Split", ["t", "sizes"], ["x", "m"], axis=1)], {"t": (2, NQ + 5, E)},
                     {"x": (2, NQ, E), "m": (2, 5, E)}, {"sizes": np.array([NQ, 5], np.int64)})
    qa = labels(model, {"t": {1: AxisLabel(((0, NQ), 5))}})
    assert qa.of("x") == (None, q(), None)
    assert not qa.labelled("m")


def test_rule_slice_cuts_a_query_range_and_rewrites_its_bounds() -> None:
    """_rule_slice: x[2:6] holds queries 2..5; kept {0, 2, 5} -> rows 0 and 3 of the slice."""
    model = model_of([node("Slice", ["x", "starts", "ends", "axes"], "y")], {"x": (NQ, E)}, {"y": (4, E)},
                     {"starts": np.array([2], np.int64), "ends": np.array([NQ], np.int64),
                      "axes": np.array([0], np.int64)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("y") == (q(2, 6), None)
    report = assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "y": {0: [0, 3]}})
    assert "starts" in report.shape_constants             # 2 -> 1 kept query before it; the end clamps


def test_rule_slice_on_another_axis_keeps_the_query_axis() -> None:
    model = model_of([node("Slice", ["x", "starts", "ends", "axes"], "y")], {"x": (NQ, 5)}, {"y": (NQ, 2)},
                     {"starts": np.array([1], np.int64), "ends": np.array([3], np.int64),
                      "axes": np.array([1], np.int64)})
    assert labels(model, {"x": {0: q()}}).of("y") == (q(), None)
    assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "y": {0: KEPT}})


def test_rule_slice_refuses_a_step_over_queries() -> None:
    model = model_of([node("Slice", ["x", "starts", "ends", "axes", "steps"], "y")], {"x": (NQ, E)},
                     {"y": (3, E)}, {"starts": np.array([0], np.int64), "ends": np.array([NQ], np.int64),
                                     "axes": np.array([0], np.int64), "steps": np.array([2], np.int64)})
    with pytest.raises(QueryAxisError, match="steps by 2"):
        labels(model, {"x": {0: q()}})


def test_rule_gather_on_another_axis() -> None:
    """_rule_gather: picking columns [Nq, 5] -> [Nq, 3] keeps the query axis."""
    model = model_of([node("Gather", ["x", "idx"], "y", axis=1)], {"x": (NQ, 5)}, {"y": (NQ, 3)},
                     {"idx": np.array([4, 0, 2], np.int64)})
    assert labels(model, {"x": {0: q()}}).of("y") == (q(), None)
    assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "y": {0: KEPT}})


def test_rule_gather_indices_carry_queries_into_the_output() -> None:
    """An embedding lookup: table [5, E] gathered by per-query ids [2, Nq] -> [2, Nq, E]."""
    model = model_of([node("Gather", ["table", "ids"], "y", axis=0)], {"ids": (2, NQ)}, {"y": (2, NQ, E)},
                     {"table": weights(5, E)}, int_inputs=["ids"])
    qa = labels(model, {"ids": {1: q()}})
    assert qa.of("y") == (None, q(), None)
    assert not qa.labelled("table")
    assert_shrinks(model, [("ids", 1)], {"ids": {1: KEPT}, "y": {1: KEPT}})


def test_rule_gather_refuses_to_select_queries() -> None:
    model = model_of([node("Gather", ["x", "idx"], "y", axis=0)], {"x": (NQ, E)}, {"y": (2, E)},
                     {"idx": np.array([1, 3], np.int64)})
    with pytest.raises(QueryAxisError, match="selects queries by index|picks entries along a query axis"):
        labels(model, {"x": {0: q()}})


def test_rule_expand_of_a_shared_row_gets_its_query_axis_from_the_consumer() -> None:
    """_rule_expand_like: zeros [1, E] expanded to [Nq, E] (a query target); the Add labels it and
    the shrink rewrites the Expand shape."""
    model = model_of([node("Expand", ["row", "shape"], "t"), node("Add", ["t", "x"], "y")],
                     {"x": (NQ, E)}, {"y": (NQ, E)},
                     {"row": weights(1, E), "shape": np.array([NQ, E], np.int64)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("t") == (q(), None)
    assert not qa.labelled("row")
    report = assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "y": {0: KEPT}})
    assert report.shape_constants == ("shape",)


def test_rule_expand_and_tile_keep_an_unchanged_query_axis() -> None:
    model = model_of([node("Expand", ["x", "shape"], "e"), node("Tile", ["e", "reps"], "y")],
                     {"x": (NQ, 1, E)}, {"y": (NQ, 3, 2 * E)},
                     {"shape": np.array([NQ, 3, E], np.int64), "reps": np.array([1, 1, 2], np.int64)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("e") == (q(), None, None)
    assert qa.of("y") == (q(), None, None)
    assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "y": {0: KEPT}})


def test_rule_tile_refuses_to_repeat_queries() -> None:
    model = model_of([node("Tile", ["x", "reps"], "y")], {"x": (NQ, E)}, {"y": (2 * NQ, E)},
                     {"reps": np.array([2, 1], np.int64)})
    with pytest.raises(QueryAxisError, match="repeats a query axis"):
        labels(model, {"x": {0: q()}})


@pytest.mark.parametrize("axis, keepdims, oshape, qaxis", [
    (2, 0, (2, NQ), 1), (2, 1, (2, NQ, 1), 1),          # over E: the class max of GPQ's score
    (0, 0, (NQ, E), 0), (0, 1, (1, NQ, E), 1),          # over the batch: the query axis moves unless kept
])
def test_rule_reduce_over_another_axis(axis: int, keepdims: int, oshape: Shape, qaxis: int) -> None:
    """_rule_reduce: ReduceMax over a non-query axis keeps the query axis, at its new position."""
    model = model_of([node("ReduceMax", ["x"], "y", axes=[axis], keepdims=keepdims)], {"x": (2, NQ, E)},
                     {"y": oshape})
    assert [ax for ax, lab in enumerate(labels(model, {"x": {1: q()}}).of("y")) if lab == q()] == [qaxis]
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {qaxis: KEPT}})


def test_rule_reduce_with_axes_as_an_input_and_over_the_query_axis() -> None:
    """ReduceSum (axes operand, opset 13+) over E keeps queries; ReduceMean over Nq removes them."""
    model = model_of([node("ReduceSum", ["x", "ax_e"], "s", keepdims=0),
                      node("ReduceMean", ["x"], "m", axes=[1], keepdims=0)],
                     {"x": (2, NQ, E)}, {"s": (2, NQ), "m": (2, E)}, {"ax_e": np.array([-1], np.int64)})
    qa = labels(model, {"x": {1: q()}})
    assert qa.of("s") == (None, q())
    assert not qa.labelled("m")


def test_rule_reduce_argmax() -> None:
    model = model_of([node("ArgMax", ["x"], "i", axis=-1, keepdims=0), node("Cast", ["i"], "y", to=FLOAT)],
                     {"x": (2, NQ, E)}, {"y": (2, NQ)})
    assert labels(model, {"x": {1: q()}}).of("i") == (None, q())
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: KEPT}})


def test_rule_topk_over_another_axis() -> None:
    """_rule_topk: TopK over keys per query ([Nq, 5] -> [Nq, 2] values and indices)."""
    model = model_of([node("TopK", ["x", "k"], ["v", "i"], axis=-1), node("Cast", ["i"], "y", to=FLOAT)],
                     {"x": (NQ, 5)}, {"v": (NQ, 2), "y": (NQ, 2)}, {"k": np.array([2], np.int64)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("v") == (q(), None) and qa.of("i") == (q(), None)
    assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "v": {0: KEPT}, "y": {0: KEPT}})


def test_rule_topk_refuses_to_select_queries() -> None:
    model = model_of([node("TopK", ["x", "k"], ["v", "i"], axis=0)], {"x": (NQ, E)}, {"v": (2, E)},
                     {"k": np.array([2], np.int64)})
    with pytest.raises(QueryAxisError, match="TopK"):
        labels(model, {"x": {0: q()}})


def test_rule_pad_keeps_an_unpadded_query_axis() -> None:
    """_rule_pad: padding E by 1 before and 2 after; the query axis passes, the padded axis does not."""
    model = model_of([node("Pad", ["x", "pads"], "y")], {"x": (NQ, E)}, {"y": (NQ, E + 3)},
                     {"pads": np.array([0, 1, 0, 2], np.int64)})
    qa = labels(model, {"x": {0: q()}})
    assert qa.of("y") == (q(), None)
    assert_shrinks(model, [("x", 0)], {"x": {0: KEPT}, "y": {0: KEPT}})


def test_rule_pad_refuses_to_pad_the_query_axis() -> None:
    """_rule_pad: padded query rows would be entries that are no query: a clear refusal, not a later shape error."""
    model = model_of([node("Pad", ["x", "pads"], "y")], {"x": (NQ, E)}, {"y": (NQ + 2, E)},
                     {"pads": np.array([1, 0, 1, 0], np.int64)})
    with pytest.raises(QueryAxisError, match="pads a query axis"):
        labels(model, {"x": {0: q()}})


def _mha(q_in: str, k_in: str, v_in: str) -> Any:
    return node("MultiHeadAttention", [q_in, k_in, v_in], "y", domain="com.microsoft", num_heads=2)


def test_rule_attention_ms_multi_head_cross_attention() -> None:
    """_rule_attention: com.microsoft.MultiHeadAttention, queries [1, Nq, E] attend to 5 keys."""
    model = model_of([_mha("x", "k", "v")], {"x": (1, NQ, E), "k": (1, 5, E), "v": (1, 5, E)},
                     {"y": (1, NQ, E)}, extra_domains=["com.microsoft"])
    qa = labels(model, {"x": {1: q()}})
    assert qa.of("y") == (None, q(), None)
    assert not qa.labelled("k") and not qa.labelled("v")
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: KEPT}})


def test_rule_attention_links_key_and_value_sequence_axes() -> None:
    """Keys that are queries (self-attention) make the values' sequence axis a query axis too."""
    model = model_of([_mha("x", "k", "v")], {"x": (1, 5, E), "k": (1, NQ, E), "v": (1, NQ, E)},
                     {"y": (1, 5, E)}, extra_domains=["com.microsoft"])
    qa = labels(model, {"k": {1: q()}})
    assert qa.of("v") == (None, q(), None)
    assert not qa.labelled("y")


def test_rule_attention_onnx_attention_23() -> None:
    """ONNX Attention (opset 23), 3-D inputs: output rows are the query rows."""
    model = model_of([node("Attention", ["x", "k", "v"], "y", q_num_heads=2, kv_num_heads=2)],
                     {"x": (1, NQ, E), "k": (1, 5, E), "v": (1, 5, E)}, {"y": (1, NQ, E)}, opset=23)
    assert labels(model, {"x": {1: q()}}).of("y") == (None, q(), None)
    assert_shrinks(model, [("x", 1)], {"x": {1: KEPT}, "y": {1: KEPT}})


def test_unknown_op_on_the_query_axis_is_refused() -> None:
    model = model_of([node("CumSum", ["x", "axis"], "y")], {"x": (NQ, E)}, {"y": (NQ, E)},
                     {"axis": np.array(1, np.int64)})
    with pytest.raises(QueryAxisError, match="CumSum"):
        labels(model, {"x": {0: q()}})


def test_shape_ops_do_not_carry_queries() -> None:
    """Shape(x) is a shape computation: its output has no query axis and analysis accepts it."""
    model = model_of([node("Shape", ["x"], "s"), node("Cast", ["s"], "y", to=FLOAT)],
                     {"x": (NQ, E)}, {"y": (2,)})
    qa = labels(model, {"x": {0: q()}})
    assert not qa.labelled("s") and not qa.labelled("y")
    assert qa.new_shape("x", np.array(KEPT)) == (3, E)
