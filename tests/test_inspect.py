"""``edgeprune inspect``: discovered structure and FLOPs, on small exports and a 24000-key StreamPETR decoder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import onnx
import pytest

import handwritten_decoder as hd
from edgeprune.cli.main import main
from edgeprune.passes.discovery.discover import discover
from edgeprune.graph.shapes import infer_shapes


def inspect_json(capsys: pytest.CaptureFixture, *argv: str) -> Dict[str, Any]:
    capsys.readouterr()                      # drop what exporting printed
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _matmul_flops(model: Any, prefix: str) -> int:
    """m*p*(2n-1) of every MatMul under a node-name prefix, from the graph's own shapes."""
    shapes = infer_shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.startswith(prefix):
            n = shapes[node.input[0]][-1]
            out = [d if isinstance(d, int) else 1 for d in shapes[node.output[0]]]   # symbolic: the batch of 1
            total += int(np.prod(out)) * (2 * n - 1)
    return total


@pytest.mark.parametrize("exporter,simplify", [("torchscript", False), pytest.param("dynamo", True, marks=pytest.mark.slow)])
def test_inspect_reports_layers_tensors_and_flops(exporter: str, simplify: bool, capsys: pytest.CaptureFixture) -> None:
    path = hd.exported("hand", exporter, simplify)
    info = inspect_json(capsys, str(path))
    dims = hd.Dims()
    assert (info["num_layers"], info["num_queries"], info["num_keys"], info["num_heads"], info["ffn_dims"]) == (
        dims.layers, dims.queries, dims.keys, dims.heads, dims.ffn)
    structure = discover(onnx.load(str(path)))
    for layer, found in zip(info["layers"], structure.layers):
        assert layer["num_keys"] == dims.keys
        assert (layer["probs"], layer["logits"]) == (found.probs.tensor, found.logits)
        assert layer["key_inputs"] == [p.tensor for p in found.key_inputs]
        assert layer["value_inputs"] == [p.tensor for p in found.value_inputs]
    assert [layer["self_keys"] for layer in info["layers"]][1:] == [dims.queries, dims.queries]
    if simplify:   # the first self-attention reads only constants: folded away, costs nothing
        assert info["layers"][0]["self_keys"] is None


def test_cross_attention_matmul_flops_equal_the_graphs(capsys: pytest.CaptureFixture) -> None:
    """The matrix-product part of the count equals the MatMuls the exported graph really contains."""
    path = hd.exported("hand", "torchscript", False)
    info = inspect_json(capsys, str(path))
    model = onnx.load(str(path))
    for i, layer in enumerate(info["layers"]):
        parts = layer["flops"]["cross_attention_parts"]
        counted = parts["projections"] + parts["scores"] + parts["weighted_sum"] + parts["output"]
        assert counted == _matmul_flops(model, f"/blocks.{i}/mix_cross/")


@pytest.mark.slow
def test_inspect_pruning_estimate(capsys: pytest.CaptureFixture) -> None:
    info = inspect_json(capsys, str(hd.exported("mha", "dynamo", True)), "--r", "30", "--n", "2", "--k", "5")
    pruning = info["pruning"]
    assert pruning["drops"] == [14, 16, 0] and pruning["keys_per_layer"] == [50, 36, 20]
    assert pruning["flops"]["total"] < info["flops"]["total"]
    assert pruning["ideal_speedup"] == pytest.approx(info["flops"]["total"] / pruning["flops"]["total"])
    assert pruning["reduction"] == pytest.approx(1 - pruning["flops"]["total"] / info["flops"]["total"])


@pytest.mark.parametrize("argv,message", [
    (["--r", "50"], "r=50 must be smaller than the number of keys (50)"),
    (["--r", "10", "--n", "4"], "n=4 exceeds the number of decoder layers (3)"),
    (["--r", "10", "--k", "21"], "k=21 exceeds the number of queries (20)"),
    (["--r", "-1"], "must be >= 0"),
])
def test_inspect_rejects_out_of_range_parameters(argv: list, message: str, capsys: pytest.CaptureFixture) -> None:
    path = hd.exported("mha", "torchscript", True)           # the export the tgGBC tests share
    capsys.readouterr()
    assert main(["inspect", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_inspect_without_decoder_or_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Softmax", ["x"], ["y"])],
                                                            "g", [x], [y])), str(plain))
    assert main(["inspect", str(plain)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "no decoder cross-attention found" in err[1]


@pytest.fixture(scope="module")
def streampetr_24000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edgeprune's StreamPETR-VoVNet 1600x640 decoder (900 queries, temporal memory) with 24000 keys.

    Traced with a dynamic key axis on 96 keys (running 24000 keys in torch takes ~20 s on two
    cores and inspect never runs the model), then the key axis pinned to 24000.
    """
    import torch

    from edgeprune.models.build import build_model

    model = build_model("streampetr-vov-1600x640", "decoder")
    inputs = {k: (v[:, :96] if k in ("memory", "key_pos") else v) for k, v in model.example_inputs().items()}
    path = tmp_path_factory.mktemp("streampetr") / "decoder.onnx"
    torch.onnx.export(model, tuple(inputs.values()), str(path), dynamo=False, opset_version=17,
                      input_names=list(inputs), output_names=model.output_names(),
                      dynamic_axes={"memory": {1: "keys"}, "key_pos": {1: "keys"}})
    proto = onnx.load(str(path))
    for value in proto.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "keys":
                dim.dim_value = 24000
    del proto.graph.value_info[:]
    onnx.save(proto, str(path))
    return path


@pytest.mark.slow
def test_inspect_streampetr_24000_keys_matches_the_paper(streampetr_24000: Path, capsys: pytest.CaptureFixture) -> None:
    """tgGBC Table 7: StreamPETR-VoVNet 1600x640 cross-attention 174.91 GFLOPs, r=21000 -> 61.44."""
    two = inspect_json(capsys, str(streampetr_24000), "--r", "21000", "--n", "2", "--k", "175")
    assert (two["num_layers"], two["num_queries"], two["num_keys"], two["num_heads"], two["embed_dims"]) == (
        6, 900, 24000, 8, 256)
    assert [layer["self_keys"] for layer in two["layers"]] == [900 + 768] * 6    # queries + temporal memory
    assert two["flops"]["cross_attention"] / 1e9 == pytest.approx(174.91, abs=0.005)
    assert two["pruning"]["keys_per_layer"] == [24000, 13500, 3000, 3000, 3000, 3000]
    assert two["pruning"]["flops"]["cross_attention"] / 1e9 == pytest.approx(61.44, rel=0.002)
    one = inspect_json(capsys, str(streampetr_24000), "--r", "21000", "--n", "1", "--k", "175")
    assert one["pruning"]["keys_per_layer"] == [24000] + [3000] * 5
    assert one["pruning"]["cross_attention_reduction"] > two["pruning"]["cross_attention_reduction"] > 0.6
    assert one["pruning"]["ideal_speedup"] > two["pruning"]["ideal_speedup"] > 1.5
    capsys.readouterr()
    assert main(["inspect", str(streampetr_24000), "--r", "21000", "--n", "2"]) == 0
    table = capsys.readouterr().out
    assert "keys per layer [24000, 13500, 3000, 3000, 3000, 3000]" in table


@pytest.mark.parametrize("n,k", [(1, 0), (2, 10)])
def test_inspect_of_a_pruned_model_counts_the_keys_each_layer_reads(n: int, k: int, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """inspect on a tgGBC output equals inspect --r/--n/--k on its input: per layer and in total."""
    src = hd.exported("hand", "torchscript", True)
    pruned = tmp_path / "pruned.onnx"
    assert main(["rewrite", str(src), "-o", str(pruned), "--method", "tggbc", "--r", "30", "--n", str(n),
                 "--k", str(k), "--no-verify"]) == 0
    capsys.readouterr()
    estimate = inspect_json(capsys, str(src), "--r", "30", "--n", str(n), "--k", str(k))["pruning"]
    after = inspect_json(capsys, str(pruned))
    assert [layer["num_keys"] for layer in after["layers"]] == estimate["keys_per_layer"]
    assert after["flops"]["total"] == pytest.approx(estimate["flops"]["total"], rel=0.01)
    assert after["flops"]["cross_attention"] == pytest.approx(estimate["flops"]["cross_attention"], rel=0.01)
    assert [layer["flops"]["total"] for layer in after["layers"]] == pytest.approx(estimate["flops_per_layer"], rel=0.01)
    unpruned = inspect_json(capsys, str(src))["flops"]["total"]
    assert after["flops"]["total"] < 0.95 * unpruned
