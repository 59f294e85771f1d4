"""tgGBC on graphs edgeprune did not export: decoders from public code (``foreign_models``).

Each corpus graph is a plain ``torch.onnx.export`` (TorchScript opset 17, dynamo opset 18) of
a public decoder with random weights. Discovery must find the decoder with no overrides, and
the pruned graph must equal a PyTorch tgGBC run on the same module, written here layer by
layer: run layer l, read its cross-attention probabilities (head mean) and its class logits
through the model's own head, keep the most important keys with
``edgeprune.methods.tggbc.keep_indices`` (methods.md), gather memory / key position /
padding mask, and run the next layer on what is left. Nothing of edgeprune's graph code is
used by the reference.

Near ties make such a test meaningless, so the reference also reports the relative gap at
every selection boundary (last kept vs first dropped key; k-th vs (k+1)-th query), and the
test requires it to exceed ``MIN_GAP``; r is large enough that pruning changes the outputs
by far more than the tolerance. The padded keys (probability 0, importance 0) all fall on
the dropped side of the first boundary.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor

import foreign_models as fm
from edgeprune.methods.tggbc import TgGBCConfig, key_importance, keep_indices, query_confidence, schedule
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys.feed import shared_key_nodes
from edgeprune.passes.keys.tggbc import KeyPruningPass

TOL = 1e-4            # pruned graph vs PyTorch tgGBC, all_cls_scores
MIN_GAP = 1e-4        # relative gap required at every selection boundary
MIN_EFFECT = 1e-2     # pruning must move the outputs by at least this much
CONFIG = TgGBCConfig(r=200, n=2, k=10)     # 300 keys -> 200 after layer 0 -> 100 after layer 1


def _gap(values: Tensor, boundary: int) -> float:
    """Gap between the ``boundary``-th and (boundary+1)-th largest of each row, relative to them (float64):
    importance sums positive terms, so float32 computes each value to ~1e-6 of itself."""
    ranked = values.double().sort(dim=-1, descending=True).values
    gap = (ranked[:, boundary - 1] - ranked[:, boundary]) / ranked[:, boundary - 1].abs().clamp_min(1e-30)
    return float(gap.min())


def torch_tggbc(m: fm.ForeignDecoder, inputs: dict[str, Tensor], cfg: TgGBCConfig) -> tuple[Tensor, float]:
    """``all_cls_scores`` [L, B, Nq, C] of ``m`` pruned with tgGBC between its layers, and the
    smallest selection margin."""
    drops = schedule(cfg.r, cfg.n, m.sizes.layers)
    out, margin = [], float("inf")
    with torch.no_grad(), m.cross_probs() as probs:
        hidden, keys = m.prepare(inputs)
        for layer in range(m.sizes.layers):
            hidden = m.layer(layer, hidden, keys)
            logits = m.logits(layer, hidden)                                 # [B, Nq, C]
            out.append(logits)
            if drops[layer] and layer < m.sizes.layers - 1:
                attn = probs[-1]                                             # [B, Nq, Nk_l]
                score = key_importance(logits, attn, cfg.k)                  # [B, Nk_l]
                margin = min(margin, _gap(score, score.shape[1] - drops[layer]),
                             _gap(query_confidence(logits), cfg.k) if cfg.k else 1.0)
                keys = keys.gather(keep_indices(logits, attn, drops[layer], cfg.k))
    return torch.stack(out), margin


def run_onnx(path: Path, inputs: dict[str, Tensor]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v.numpy() for k, v in inputs.items() if k in names}
    return session.run([session.get_outputs()[0].name], feeds)[0]


QUICK = [("torch-bf", "torchscript", 1, False), ("torch-sf", "dynamo", 2, True), ("conditional-detr", "dynamo", 2, True),
         ("detr-eager", "torchscript", 2, True), ("detr-sdpa", "dynamo", 2, True),
         ("detr-aux-sdpa", "torchscript", 2, True)]
CASES = [(name, exporter, batch, mask) for name in fm.MODELS for exporter in fm.EXPORTERS
         for batch, mask in ((1, False), (2, True))]


def _param(case: tuple) -> Any:
    marks = () if case in QUICK else (pytest.mark.slow,)
    return pytest.param(case, id="-".join(str(c) for c in case), marks=marks)


# onnxsim'd graphs, as users often hand them over: it merges the identical key/value projections of
# the cloned (untrained) torch stacks into one shared K and V, and folds the stacked DETR head's
# Reshape targets to [L, B, Nq, C]
QUICK_SIMPLIFIED = [("torch-bf", "torchscript", 2, True), ("detr-aux-sdpa", "dynamo", 1, False)]


def _param_simplified(case: tuple) -> Any:
    marks = () if case in QUICK_SIMPLIFIED else (pytest.mark.slow,)
    return pytest.param(case + (True,), id="-".join(str(c) for c in case) + "-onnxsim", marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES] + [_param_simplified(c) for c in CASES])
def test_pruned_foreign_graph_equals_torch_tggbc(case: tuple, tmp_path: Path) -> None:
    name, exporter, batch, mask = case[:4]
    simplify = len(case) > 4
    if "detr" in name:
        pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")
    if simplify:
        pytest.importorskip("onnxsim", reason="onnxsim is the simplify extra (pip install -e .[test])")
    module = fm.model(name)
    path = fm.exported(name, exporter, batch, mask, simplify=simplify)
    inputs = module.example_inputs(batch, mask)
    structure = discover(onnx.load(str(path)))                              # no overrides
    if simplify and name.startswith("torch-"):      # onnxsim still merges the cloned layers' K and V
        assert shared_key_nodes(structure, list(range(structure.num_layers)))
    assert (structure.num_layers, structure.num_keys, structure.batch) == (module.sizes.layers, module.sizes.keys,
                                                                         batch)
    if getattr(module, "stacked_head", False):      # the head runs once on all layers: every layer recomputes
        assert structure.class_head is not None and structure.class_head.stacked
        assert all(layer.logits is None and layer.head_input is not None for layer in structure.layers)
    elif getattr(module, "final_only", False):      # only the last layer's logits exist: the others recompute
        assert structure.class_head is not None and not structure.class_head.stacked
        assert all(layer.head_input is not None for layer in structure.layers[:-1])
    else:
        assert all(layer.logits is not None for layer in structure.layers)
    expected, margin = torch_tggbc(module, inputs, CONFIG)
    assert margin > MIN_GAP, f"selection boundary within {margin:.2e}: the comparison would test ties"
    if getattr(module, "final_only", False):
        expected = expected[-1]                     # the graph outputs the last layer's logits only
    with torch.no_grad():
        unpruned = module(**inputs)
    assert float((expected - unpruned).abs().max()) > MIN_EFFECT, "r too small: pruning changes nothing"
    assert np.abs(run_onnx(path, inputs) - unpruned.numpy()).max() < TOL
    out = tmp_path / "pruned.onnx"
    rewrite(path, out, [KeyPruningPass(CONFIG)], verify=False)
    assert np.abs(run_onnx(out, inputs) - expected.numpy()).max() < TOL


@pytest.mark.parametrize("case", [pytest.param(c, id="-".join(str(x) for x in c)) for c in QUICK])
def test_discovery_names_every_per_key_input(case: tuple) -> None:
    """Packed key = value projections name the shared memory once for both sides; Conditional
    DETR's keys name both the memory and the key position; masks are found when present."""
    name, exporter, batch, mask = case
    if "detr" in name:
        pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")
    model = onnx.load(str(fm.exported(name, exporter, batch, mask)))
    inputs = {i.name for i in model.graph.input}
    for layer in discover(model).layers:
        keys = {p.tensor for p in layer.key_inputs}
        values = {p.tensor for p in layer.value_inputs}
        assert bool(layer.masks) == mask
        if name.startswith("torch"):
            assert keys == values and len(layer.key_inputs) == 1
        elif name == "conditional-detr":
            assert keys == {"memory", "key_pos"} and values == {"memory"}
        else:                                   # DETR: one key input, memory + key_pos
            assert len(layer.key_inputs) == 1 and keys.isdisjoint(inputs) and values == {"memory"}


# Older toolchains export at opset 11-12 (mmdeploy's default is 11): the key passes raise the graph to 17
# with onnx's version converter, which wraps Softmax in Flatten/Reshape where it cannot see the axis
OLD_OPSET_CASES = [("detr-eager", 11, 2, True), ("detr-eager", 12, 1, False), ("detr-whole", 11, 1, False)]


@pytest.mark.parametrize("case", [pytest.param(c, id="-".join(map(str, c)), marks=() if i == 0 else (pytest.mark.slow,))
                                  for i, c in enumerate(OLD_OPSET_CASES)])
def test_old_opset_graph_is_raised_and_pruned_like_torch_tggbc(case: tuple, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import logging

    pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")
    name, opset, batch, mask = case
    module = fm.model(name)
    inputs = module.example_inputs(batch, mask)
    path = fm.exported(name, "torchscript", batch, mask, opset=opset)
    expected, margin = torch_tggbc(module, inputs, CONFIG)
    assert margin > MIN_GAP
    expected = expected[-1] if getattr(module, "final_only", False) else expected
    out = tmp_path / "pruned.onnx"
    with caplog.at_level(logging.INFO, logger="edgeprune"):
        rewrite(path, out, [KeyPruningPass(CONFIG)], verify=False)
    assert f"from opset {opset} to 17" in caplog.text
    if opset == 11:                                 # the converter wrapped the Softmax there: unwrapped
        assert not re.search(r"; 0 Softmax kept", caplog.text)
    assert onnx.load(str(out)).opset_import[0].version >= 17
    assert np.abs(run_onnx(out, inputs) - expected.numpy()).max() < TOL


def test_unwrap_softmax_restores_a_last_axis_softmax() -> None:
    """The converter's Flatten(axis=rank-1) -> Softmax -> Reshape(Shape(x)) becomes Softmax(x, axis=-1);
    a Flatten on an earlier axis (a softmax over several axes) stays."""
    from onnx import TensorProto, helper

    from edgeprune.graph.opset import unwrap_softmax

    def wrapped(axis: int) -> onnx.ModelProto:
        nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=axis), helper.make_node("Softmax", ["f"], ["s"], axis=-1),
                 helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Reshape", ["s", "shape"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    for axis, unwrapped in ((2, 1), (-1, 1), (1, 0)):
        model = wrapped(axis)
        before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        assert unwrap_softmax(model) == unwrapped
        ops = [n.op_type for n in model.graph.node]
        assert ("Flatten" in ops) == (not unwrapped) and ("Shape" in ops) == (not unwrapped)
        after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_allclose(after[0], before[0], atol=1e-6)
