"""GPQ and ToMe on the foreign corpus (``foreign_models``), against PyTorch oracles.

GPQ: the graph shrunk to the queries ``KEEP`` must compute what the module computes with only
those queries (its learned query embedding sliced: ``foreign_models.with_queries``), within
1e-4; the one-shot ranking (``--keep-queries K --calib``) must pick the queries whose
last-layer class score (max over classes, mean over the batch; methods.md) is highest in the
torch module. ToMe: the merged graph must equal ToMe's reference steps
(``edgeprune.methods.tome``: metric from the layer's key projection, bipartite matching,
size-weighted merge of every per-key tensor) run between the module's layers, where the key
projection is one Linear on one key input; masked keys are refused in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor

import foreign_models as fm
from edgeprune.errors import PatternNotFoundError
from edgeprune.methods.gpq import query_scores
from edgeprune.methods.tggbc import schedule
from edgeprune.methods.tome import bipartite_soft_matching, key_metric, matching_margin, merge_weighted
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys.tome import TokenMergingPass
from edgeprune.passes.queries.gpq import QueryPruningPass
from test_foreign_graphs import TOL, run_onnx

KEEP = [0, 3, 4, 9, 12, 17]
GPQ_CASES = [("torch-bf", "torchscript", 1, False), ("detr-sdpa", "dynamo", 2, True),
             ("conditional-detr", "torchscript", 2, True), ("detr-aux-eager", "dynamo", 1, False),
             ("torch-sf", "torchscript", 2, True), ("detr-eager", "torchscript", 1, False)]
QUICK_GPQ = GPQ_CASES[:2]


def _needs_transformers(name: str) -> None:
    if "detr" in name:
        pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")


def _param(case: tuple, quick: list) -> object:
    return pytest.param(case, id="-".join(str(c) for c in case), marks=() if case in quick else (pytest.mark.slow,))


@pytest.mark.parametrize("case", [_param(c, QUICK_GPQ) for c in GPQ_CASES])
def test_gpq_on_foreign_graph_equals_module_with_kept_queries(case: tuple, tmp_path: Path) -> None:
    name, exporter, batch, mask = case
    _needs_transformers(name)
    module = fm.model(name)
    inputs = module.example_inputs(batch, mask)
    out = tmp_path / "gpq.onnx"
    rewrite(fm.exported(name, exporter, batch, mask), out, [QueryPruningPass(keep_indices=KEEP)], verify=False)
    with torch.no_grad():
        expected = fm.with_queries(module, KEEP)(**inputs)                     # [L, B, K, C]
        full = module(**inputs)
    assert expected.shape[-2] == len(KEEP)
    got = run_onnx(out, inputs)
    assert got.shape == tuple(expected.shape)
    assert np.abs(got - expected.numpy()).max() < TOL
    assert float((expected - full[..., KEEP, :]).abs().max()) > 1e-3      # queries interact: not a mere slice


def _simplified(name: str, exporter: str) -> Path:
    pytest.importorskip("onnxsim", reason="onnxsim is the simplify extra (pip install -e .[test])")
    return fm.exported(name, exporter, 1, False, simplify=True)


FOLDED_CASES = [("torch-bf", "torchscript"), ("torch-sf", "dynamo")]


@pytest.mark.parametrize("case", [_param(c, FOLDED_CASES[:1]) for c in FOLDED_CASES])
def test_gpq_refuses_a_folded_first_self_attention_that_mixes_queries(case: tuple, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """A learned content embedding makes layer 0's self-attention input-independent; onnxsim folds it
    into one constant mixing all queries. Slicing it gives wrong logits (off by ~1.3 here), so GPQ
    refuses in one line naming the fix, writes nothing, and the unsimplified export still works."""
    from edgeprune.errors import InvalidModelError
    from edgeprune.passes.queries.folded import attention_op_count
    from test_io_policy import one_line, run_cli

    name, exporter = case
    simplified = _simplified(name, exporter)
    assert attention_op_count(onnx.load(str(simplified))) == 2 * fm.model(name).sizes.layers - 1
    out = tmp_path / "gpq.onnx"
    with pytest.raises(InvalidModelError, match="folded") as err:
        rewrite(simplified, out, [QueryPruningPass(keep_indices=KEEP)], verify=False)
    assert "\n" not in str(err.value) and "before onnxsim" in str(err.value)
    assert not out.exists()
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps(KEEP))
    code, _, stderr = run_cli(capsys, "rewrite", simplified, "-o", out, "--method", "gpq", "--keep-indices", keep)
    assert code != 0 and "self-attention" in one_line(stderr) and not out.exists()


def test_gpq_refuses_a_folded_stream_that_is_computed_from_constants(tmp_path: Path) -> None:
    """The folded stream behind an op (a Cast, as in mixed-precision graphs) is still a constant:
    the guard computes it and refuses."""
    from onnx import helper

    from edgeprune.errors import InvalidModelError
    from edgeprune.graph.index import GraphIndex
    from edgeprune.passes.discovery.discover import discover
    from edgeprune.passes.queries.folded import residual_input

    model = onnx.load(str(_simplified("torch-bf", "torchscript")))
    structure, index = discover(model), GraphIndex.build(model)
    residual = residual_input(index, index.nodes[structure.layers[0].pv_node].output[0], structure.num_queries)
    assert index.value(residual) is not None                                   # stored: put a Cast behind it
    for node in model.graph.node:
        node.input[:] = [residual + "_cast" if name == residual else name for name in node.input]
    model.graph.node.insert(0, helper.make_node("Cast", [residual], [residual + "_cast"], to=onnx.TensorProto.FLOAT))
    path, out = tmp_path / "cast.onnx", tmp_path / "gpq.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InvalidModelError, match="folded"):
        rewrite(path, out, [QueryPruningPass(keep_indices=KEEP)], verify=False)
    assert not out.exists()


@pytest.mark.slow
def test_gpq_accepts_a_folded_self_attention_whose_rows_are_all_alike(tmp_path: Path) -> None:
    """DETR's zero content: the folded first self-attention is the out-projection's bias in every
    row (equal up to rounding once the biases are not zero, as in any trained model), so slicing
    is exact; the guard sees the constant stream, lets it through, and the result equals the module."""
    import copy

    from edgeprune.graph.index import GraphIndex
    from edgeprune.passes.discovery.discover import discover
    from edgeprune.passes.queries.folded import attention_op_count, residual_input, rows_differ
    _needs_transformers("detr")
    onnxsim = pytest.importorskip("onnxsim", reason="onnxsim is the simplify extra (pip install -e .[test])")
    module = copy.deepcopy(fm.model("detr-eager"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    inputs = module.example_inputs(1, False)
    plain = tmp_path / "detr.onnx"
    with torch.no_grad():
        torch.onnx.export(module, tuple(inputs.values()), str(plain), input_names=list(inputs),
                          output_names=["all_cls_scores"], opset_version=17, dynamo=False)
    model, ok = onnxsim.simplify(onnx.load(str(plain)))
    assert ok and attention_op_count(model) < 2 * module.sizes.layers                     # it was folded
    structure, index = discover(model), GraphIndex.build(model)
    residual = residual_input(index, index.nodes[structure.layers[0].pv_node].output[0], structure.num_queries)
    assert residual is not None and index.is_constant(residual)                           # the guard looks at it
    assert not rows_differ(index.value(residual), structure.num_queries)
    simplified, out = tmp_path / "detr-sim.onnx", tmp_path / "gpq.onnx"
    onnx.save(model, str(simplified))
    rewrite(simplified, out, [QueryPruningPass(keep_indices=KEEP)], verify=False)
    with torch.no_grad():
        expected = fm.with_queries(module, KEEP)(**inputs)
    assert np.abs(run_onnx(out, inputs) - expected.numpy()).max() < TOL


def test_fold_guard_without_a_known_pv_node_lets_the_graph_through() -> None:
    """A layer named by --override may have no P V node on record: the guard has no stream to follow."""
    from types import SimpleNamespace

    from onnx import TensorProto, helper

    from edgeprune.passes.queries.folded import check_first_self_attention
    nodes = [helper.make_node("Softmax", ["x"], ["a"]), helper.make_node("Softmax", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    structure = SimpleNamespace(num_layers=1, num_queries=4, layers=[SimpleNamespace(pv_node="")])
    check_first_self_attention(model, structure)                 # was a KeyError on the empty node name


def test_rows_differ_ignores_rounding_only() -> None:
    from edgeprune.passes.queries.folded import rows_differ
    rng = np.random.default_rng(0)
    row = rng.normal(size=(1, 1, 64)).astype(np.float32)
    alike = np.repeat(row, 20, axis=1) + rng.normal(scale=2e-6, size=(1, 20, 64)).astype(np.float32)
    assert not rows_differ(alike, 20)
    assert rows_differ(rng.normal(size=(1, 20, 64)), 20)
    assert not rows_differ(rng.normal(size=(1, 7, 64)), 20)                  # no query axis


@pytest.mark.slow
def test_gpq_one_shot_keeps_the_best_scoring_queries(tmp_path: Path) -> None:
    """--keep-queries K --calib: the kept set is the top K of the torch module's last-layer scores."""
    pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")
    module, k = fm.model("detr-sdpa"), 6
    inputs = module.example_inputs(2, True)
    with torch.no_grad():
        scores = query_scores(module(**inputs)[-1])                              # [Nq]
    ranked = scores.double().sort(descending=True).values
    assert float(ranked[k - 1] - ranked[k]) > 1e-4, "near tie at the ranking boundary"
    top = sorted(scores.topk(k).indices.tolist())
    calib = {n: v.numpy() for n, v in inputs.items()}
    out = tmp_path / "gpq.onnx"
    rewrite(fm.exported("detr-sdpa", "torchscript", 2, True), out, [QueryPruningPass(keep_queries=k, calib=calib)],
            verify=False)
    with torch.no_grad():
        expected = fm.with_queries(module, top)(**inputs)
    assert np.abs(run_onnx(out, inputs) - expected.numpy()).max() < TOL


# ------------------------------------------------------------------ ToMe
# (model, exporter, r, n): DETR's matchings are decided by clear margins at 40 keys merged after layer 0
TOME_CASES = [("torch-bf", "torchscript", 100, 2), ("torch-sf", "dynamo", 100, 2), ("detr-eager", "torchscript", 40, 1),
              ("detr-sdpa", "dynamo", 40, 1)]


def _key_projection(module: fm.ForeignDecoder, layer: int) -> tuple[Tensor, Tensor | None, int]:
    """(weight [h*d, E], bias, heads) of layer ``layer``'s key projection."""
    if isinstance(module, fm.TorchStack):
        attn, e = module.decoder.layers[layer].multihead_attn, module.sizes.embed
        return attn.in_proj_weight[e:2 * e], attn.in_proj_bias[e:2 * e], attn.num_heads
    proj = module.decoder.layers[layer].encoder_attn.k_proj
    return proj.weight, proj.bias, module.sizes.heads


def torch_tome(module: fm.ForeignDecoder, inputs: dict[str, Tensor], r: int, n: int) -> tuple[Tensor, float]:
    """``all_cls_scores`` of ``module`` with ToMe merging keys between its layers, and the smallest
    matching margin."""
    drops = schedule(r, n, module.sizes.layers)
    out, margin = [], float("inf")
    with torch.no_grad():
        hidden, keys = module.prepare(inputs)
        size = torch.ones(keys.memory.shape[0], keys.memory.shape[1], 1)
        for layer in range(module.sizes.layers):
            hidden = module.layer(layer, hidden, keys)
            out.append(module.logits(layer, hidden))
            if drops[layer] and layer < module.sizes.layers - 1:
                key_input = keys.memory if keys.pos is None else keys.memory + keys.pos
                metric = key_metric(key_input, *_key_projection(module, layer))
                margin = min(margin, matching_margin(metric, drops[layer]))
                matching = bipartite_soft_matching(metric, drops[layer])
                tensors = [keys.memory] + ([keys.pos] if keys.pos is not None else [])
                merged, size = merge_weighted(tensors, size, matching)
                keys = fm.Keys(merged[0], merged[1] if keys.pos is not None else None, None)
    return torch.stack(out), margin


@pytest.mark.parametrize("case", [_param(c, TOME_CASES[:1]) for c in TOME_CASES])
def test_tome_on_foreign_graph_equals_reference(case: tuple, tmp_path: Path) -> None:
    name, exporter, r, n = case
    _needs_transformers(name)
    module = fm.model(name)
    inputs = module.example_inputs(1, False)
    expected, margin = torch_tome(module, inputs, r, n)
    assert margin > 1e-5, f"matching decided within {margin:.1e}: the comparison would test ties"
    with torch.no_grad():
        assert float((expected - module(**inputs)).abs().max()) > 1e-2
    out = tmp_path / "tome.onnx"
    rewrite(fm.exported(name, exporter, 1, False), out, [TokenMergingPass(r=r, n=n)], verify=False)
    assert np.abs(run_onnx(out, inputs) - expected.numpy()).max() < TOL


@pytest.mark.slow
def test_tome_raises_an_old_opset_graph_and_equals_reference(tmp_path: Path) -> None:
    """ToMe inserts ScatterElements with a reduction (opset 16): an opset-12 export is raised to 17 first."""
    _needs_transformers("detr")
    module = fm.model("detr-eager")
    inputs = module.example_inputs(1, False)
    path, out = fm.exported("detr-eager", "torchscript", 1, False, opset=12), tmp_path / "tome.onnx"
    expected, margin = torch_tome(module, inputs, 40, 1)
    assert margin > 1e-5
    rewrite(path, out, [TokenMergingPass(r=40, n=1)], verify=False)
    assert np.abs(run_onnx(out, inputs) - expected.numpy()).max() < TOL
    rewrite(path, tmp_path / "same.onnx", [TokenMergingPass(r=0, n=1)], verify=False)   # nothing merged: no opset need


def test_tome_refuses_masked_keys_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")
    out = tmp_path / "tome.onnx"
    with pytest.raises(PatternNotFoundError) as err:
        rewrite(fm.exported("detr-sdpa", "dynamo", 2, True), out, [TokenMergingPass(r=100, n=2)], verify=False)
    assert "\n" not in str(err.value) and "mask" in str(err.value) and "tggbc" in str(err.value)
    assert not out.exists()
