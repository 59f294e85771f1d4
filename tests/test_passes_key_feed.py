"""The key-feeding mechanism shared by tgGBC and ToMe (``edgeprune.passes.keys.feed``), on a tiny graph.

Three "layers" read one flattening Reshape (as after onnxsim) and carry Nk in a static head
Reshape. Keys are reduced after layers 0 and 1 by a transform that keeps the first keys;
oracle: numpy on the kept keys.
"""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.errors import ParameterError
from edgeprune.graph.edit import GraphEditor, export_graph
from edgeprune.graph.shapes import tensor_info
from edgeprune.cli.args import add_key_count_arguments
from edgeprune.passes.keys.feed import KeyAxes, KeyFeeder, KeyFeedPlan, key_counts_from_args
from edgeprune.passes.discovery.structure import AttentionProbs, DecoderLayer, DecoderStructure, ProjectionInput

B, NK, E, LAYERS = 2, 6, 4, 3
KEYS = (6, 4, 3)                                   # keys read by layers 0, 1, 2


def three_layers() -> tuple[Any, DecoderStructure, list[np.ndarray]]:
    """memory [B, Nk, E] -> flat [B*Nk, E] (shared) -> MatMul W_l -> Reshape [B, Nk, E] -> ReduceSum(keys)."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((E, E)).astype(np.float32) for _ in range(LAYERS)]
    nodes = [helper.make_node("Reshape", ["memory", "flat_shape"], ["flat"], name="flat")]
    inits = [numpy_helper.from_array(np.array([B * NK, E], dtype=np.int64), "flat_shape"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "key_axis")]
    for l in range(LAYERS):
        inits += [numpy_helper.from_array(weights[l], f"w{l}"),
                  numpy_helper.from_array(np.array([B, NK, E], dtype=np.int64), f"heads_shape{l}")]
        nodes += [helper.make_node("MatMul", ["flat", f"w{l}"], [f"k{l}"], name=f"proj{l}"),
                  helper.make_node("Reshape", [f"k{l}", f"heads_shape{l}"], [f"h{l}"], name=f"heads{l}"),
                  helper.make_node("ReduceSum", [f"h{l}", "key_axis"], [f"out{l}"], name=f"pv{l}", keepdims=0)]
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("memory", TensorProto.FLOAT, [B, NK, E])],
                              [helper.make_tensor_value_info(f"out{l}", TensorProto.FLOAT, [B, E])
                               for l in range(LAYERS)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    layers = tuple(DecoderLayer(l, AttentionProbs(f"h{l}", "BQK_mean", 1),
                                (ProjectionInput("memory", "flat", 0, 1, 0, projection=f"proj{l}"),), (), (),
                                f"pv{l}", None, KEYS[l], key_path_nodes=(f"proj{l}", f"heads{l}"))
                   for l in range(LAYERS))
    return model, DecoderStructure(layers, B, 1, NK, 1, E, 1, "matched"), weights


class FirstKeys:
    """A transform keeping the first keys of the stage (records what it was asked)."""

    def __init__(self, ed: GraphEditor) -> None:
        self.ed, self.calls = ed, []

    def scope(self, stage: int) -> str:
        return f"t/l{stage - 1}/keep/"

    def __call__(self, data: Any, axes: KeyAxes, stage: int) -> Any:
        self.calls.append((data.name, axes, stage))
        with self.ed.scoped(self.scope(stage)):
            return self.ed.op("Slice", [data, self.ed.ints("s", 0), self.ed.ints("e", KEYS[stage]),
                                        self.ed.ints("a", axes.key_axis)], "first")


def test_later_layers_read_fewer_keys_through_private_copies() -> None:
    model, structure, weights = three_layers()
    ed = GraphEditor(gs, gs.import_onnx(model), 17, tensor_info(model), scope="t/")
    plan = KeyFeedPlan.after_layers("test", "t/", structure, [0, 1], KEYS)
    assert plan.stages == (0, 1, 2) and plan.scopes == ("t/l0/", "t/l1/")
    transform = FirstKeys(ed)
    feeder = KeyFeeder(ed, structure, plan, transform)
    assert feeder.shared == {"flat"}                           # read by layers of all three stages
    for stage in (1, 2):
        feeder.feed_stage(stage)
    ed.graph.cleanup().toposort()
    out = export_graph(gs, ed.graph, model, {"test.plan": {"keys": list(KEYS)}})

    names = {n.name: n for n in out.graph.node}
    assert {"t/l0/copy/flat", "t/l1/copy/flat", "flat"} <= set(names)          # layer 0 keeps the original
    assert names["proj0"].input[0] == "flat"
    assert transform.calls == [("memory", KeyAxes(1, 0), 1), ("memory", KeyAxes(1, 0), 2)]
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in out.graph.initializer}
    assert consts["t/l0/shape/t/l0/copy/flat"] == [B * 4, E] and consts["t/l1/shape/heads2"] == [B, 3, E]
    assert consts["flat_shape"] == [B * NK, E]                               # stage 0 untouched
    assert dict((p.key, p.value) for p in out.metadata_props)["test.plan"] == '{"keys": [6, 4, 3]}'

    memory = np.random.default_rng(1).standard_normal((B, NK, E)).astype(np.float32)
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"memory": memory})
    for l in range(LAYERS):
        np.testing.assert_allclose(got[l], (memory[:, :KEYS[l]] @ weights[l]).sum(axis=1), rtol=1e-5, atol=1e-5)


def test_both_passes_share_the_key_count_options() -> None:
    parser = argparse.ArgumentParser()
    add_key_count_arguments(parser)
    args = parser.parse_args(["--keys-pruned", "30", "--pruning-layers", "2"])
    assert key_counts_from_args(args, "tome", "keys merged", "--r 2") == (30, 2)
    assert key_counts_from_args(parser.parse_args(["--r", "5"]), "tggbc", "keys pruned", "--r 2") == (5, 1)
    with pytest.raises(ParameterError, match="--method tggbc needs --r R \\(keys pruned\\), e.g. --r 2"):
        key_counts_from_args(parser.parse_args([]), "tggbc", "keys pruned", "--r 2")
