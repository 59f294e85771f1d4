"""The ready-to-paste ``--override`` flags of discovery's error work when pasted.

A graph discovery cannot handle alone: the DETR corpus graph with a ``Mul(p, 1)`` after every
cross-attention Softmax (an op the matcher does not follow; values unchanged). The user names
each layer's probabilities as the first error asks; the next error lists the key and value
projection inputs as real tensors (no ``TENSOR`` placeholder); pasted, the rewrite succeeds
and equals the PyTorch tgGBC of the module within 1e-4.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import foreign_models as fm
from edgeprune.errors import PatternNotFoundError
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys.tggbc import KeyPruningPass
from test_foreign_graphs import CONFIG, TOL, run_onnx, torch_tggbc


def _unknown_op_after_softmax(src: Path, dst: Path) -> list[str]:
    """Copy of ``src`` with ``Mul(p, 1)`` between each cross-attention Softmax and its readers; the Softmax outputs."""
    model = onnx.load(str(src))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((), np.float32), "one"))
    probs = [n.output[0] for n in model.graph.node if n.op_type == "Softmax" and "encoder_attn" in n.name]
    nodes = []
    for node in model.graph.node:
        node.input[:] = [f"{i}/times_one" if i in probs else i for i in node.input]
        nodes.append(node)
        if node.output and node.output[0] in probs:
            nodes.append(helper.make_node("Mul", [node.output[0], "one"], [f"{node.output[0]}/times_one"],
                                          f"{node.name}/times_one"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return probs


@pytest.mark.slow
def test_pasted_guidance_flags_make_the_rewrite_work(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")
    module = fm.model("detr-eager")
    inputs = module.example_inputs(1, False)
    path = tmp_path / "unknown-op.onnx"
    probs = _unknown_op_after_softmax(fm.exported("detr-eager", "torchscript", 1, False), path)
    assert len(probs) == module.sizes.layers
    with pytest.raises(PatternNotFoundError, match="no decoder cross-attention found"):
        discover(onnx.load(str(path)))                                       # discovery alone fails

    named = [f"layer.{i}.probs={t}" for i, t in enumerate(probs)]
    out = tmp_path / "pruned.onnx"
    with pytest.raises(PatternNotFoundError) as err:
        rewrite(path, out, [KeyPruningPass(CONFIG)], overrides=named, verify=False)
    message = str(err.value)
    flags = re.findall(r"--override (\S+)", message)
    assert "\n" not in message and "TENSOR" not in message
    assert sorted(f.split("=")[0] for f in flags) == sorted(f"layer.{i}.{p}" for i in range(module.sizes.layers)
                                                          for p in ("key", "value"))
    rewrite(path, out, [KeyPruningPass(CONFIG)], overrides=named + flags, verify=False)
    expected, _ = torch_tggbc(module, inputs, CONFIG)
    assert np.abs(run_onnx(out, inputs) - expected.numpy()).max() < TOL
