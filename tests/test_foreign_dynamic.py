"""Foreign graphs exported with a symbolic batch (``dynamic_axes`` / ``dynamic_shapes``).

tgGBC builds static reshapes, so a rewrite is for one size: the given inputs (``--inputs``)
fix the graph's symbolic inputs, after which shape inference resolves every intermediate and
``--override`` tensors have static shapes. Without given inputs, an override naming a tensor
with symbolic dimensions is refused in one line that says how to fix the sizes. An override
tensor static inference cannot size although the inputs are fixed is sized by one ONNX
Runtime run (``graph.run.run_shapes``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import foreign_models as fm
from edgeprune.errors import PatternNotFoundError
from edgeprune.graph.run import run_shapes
from edgeprune.graph.shapes import infer_shapes, pin_input_shapes, symbolic_inputs
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys.tggbc import KeyPruningPass
from test_foreign_graphs import CONFIG, TOL, run_onnx, torch_tggbc


def _every_part(model: onnx.ModelProto) -> list[str]:
    """``--override`` flags naming every part of every layer, read off the graph with its inputs fixed."""
    flags = []
    for layer in discover(model).layers:
        flags.append(f"layer.{layer.index}.probs={layer.probs.tensor}")
        for part, pins in (("key", layer.key_inputs), ("value", layer.value_inputs), ("mask", layer.masks)):
            flags += [f"layer.{layer.index}.{part}={p.tensor}@{p.consumer}" for p in pins[:1]]
        flags.append(f"layer.{layer.index}.logits={layer.logits}")
    return flags


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_dynamic_batch_graph_pruned_with_every_part_overridden(exporter: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")
    module = fm.model("detr-sdpa")
    path = fm.exported("detr-sdpa", exporter, 2, True, dynamic=True)
    inputs = module.example_inputs(2, True)
    model = onnx.load(str(path))
    assert symbolic_inputs(model) == list(inputs)                  # really exported with a symbolic batch
    pinned = onnx.load(str(path))
    pin_input_shapes(pinned, {k: tuple(v.shape) for k, v in inputs.items()})
    flags = _every_part(pinned)
    assert len(flags) == 5 * module.sizes.layers

    with pytest.raises(PatternNotFoundError) as err:
        discover(model, flags)                                     # no sizes given: refused, one line
    message = str(err.value)
    assert "\n" not in message and "symbolic sizes" in message and "--inputs X.npz" in message

    out = tmp_path / "pruned.onnx"
    feeds = {k: v.numpy() for k, v in inputs.items()}
    report = rewrite(path, out, [KeyPruningPass(CONFIG)], overrides=flags, verify_inputs=feeds)
    assert report.structure.batch == 2 and report.structure.source == "matched"
    expected, _ = torch_tggbc(module, inputs, CONFIG)
    assert np.abs(run_onnx(out, inputs) - expected.numpy()).max() < TOL
    assert symbolic_inputs(onnx.load(str(out))) == []              # the result is for the given sizes


def _unsized_attention() -> onnx.ModelProto:
    """One attention whose scores come from com.microsoft.FusedMatMul: ONNX shape inference does not
    know the op, so every tensor after it is unsized although the inputs are fixed."""
    q = helper.make_tensor("q", TensorProto.FLOAT, [1, 4, 8], np.random.default_rng(0).standard_normal(32).tolist())
    nodes = [helper.make_node("FusedMatMul", ["q", "memory"], ["scores"], "qk", domain="com.microsoft",
                              transB=1),
             helper.make_node("Softmax", ["scores"], ["probs"], "softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "memory"], ["out"], "pv")]
    graph = helper.make_graph(nodes, "unsized", [helper.make_tensor_value_info("memory", TensorProto.FLOAT, [1, 6, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializer=[q])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_override_without_inferable_shape_is_sized_by_one_run() -> None:
    model = _unsized_attention()
    assert "probs" not in infer_shapes(model)
    assert run_shapes(model, ["probs", "scores"]) == {"probs": (1, 4, 6), "scores": (1, 4, 6)}
    structure = discover(model, ["layer.0.probs=probs", "layer.0.key=memory@qk",
                                 "layer.0.value=memory@pv"])
    assert (structure.num_keys, structure.num_queries, structure.batch) == (6, 4, 1)
    assert structure.layers[0].key_inputs[0].key_axis == 1
