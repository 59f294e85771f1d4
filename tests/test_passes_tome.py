"""ToMe ONNX pass (``edgeprune.passes.keys.tome``) against the torch ToMe reference, run in ONNX Runtime.

Oracles: ``edgeprune.methods.tome.forward_with_tome`` for an edgeprune preset; for the
independent handwritten decoder (``tests/handwritten_decoder.py``), a reference written here
from its own blocks with ``methods.tome.key_metric / merge_keys``.

Near ties: a merge choice flips when two key similarities are within float rounding of each
other (ORT's similarities differ from torch's float64 ones by up to 3.3e-7 on the preset).
Each comparison first checks, in float64, that every matching is decided by at least
``MIN_GAP`` (``methods.tome.matching_margin``); the seeds were chosen so that it is. The
output tolerance is never loosened.
"""
from __future__ import annotations

import argparse
import collections
import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor

import handwritten_decoder as hd
from model_cache import EXPORTERS, decoder_model, exported_decoder
from edgeprune.cli.main import main
from edgeprune.errors import ParameterError, PatternNotFoundError
from edgeprune.methods import tome
from edgeprune.passes.keys import tome as tome_pass
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.driver import rewrite

TOL = 1e-4          # the pass computes what the torch reference computes
MIN_GAP = 5e-6      # similarity gap deciding every merge (15x the ORT-vs-torch rounding)
PRESET, LAYERS = "streampetr-r50-704x256", 3      # 4224 keys; the exports the tgGBC/GPQ tests use
PRESET_CONFIG = tome.ToMeConfig(r=2000, n=2)       # merges [1000, 1000, 0]: 4224 -> 3224 -> 2224 keys
ORACLE_SEED = 2


def run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})


def merged(src: Path, dst: Path, cfg: tome.ToMeConfig) -> onnx.ModelProto:
    """``edgeprune rewrite --method tome`` as a library call (prepare, discovery, pass, checks, save)."""
    rewrite(src, dst, [tome_pass.TokenMergingPass(cfg.r, cfg.n)], verify=False)
    return onnx.load(str(dst))


def inserted_ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node if n.name.startswith(tome_pass.PREFIX))


def margin(metrics: list[Tensor], schedule: list[int]) -> float:
    merges = [r for r in schedule if r > 0]
    return min(tome.matching_margin(m, r) for m, r in zip(metrics, merges))


@functools.lru_cache(maxsize=None)
def preset_oracle(cfg: tome.ToMeConfig) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """Batch-2 reference (batch 1 is its first element: ToMe matches keys per batch element)."""
    model = decoder_model(PRESET, LAYERS)
    inputs = model.example_inputs(batch=2, seed=ORACLE_SEED)
    with torch.no_grad():
        out = tome.forward_with_tome(model.head, inputs, cfg)
    gap = margin(out.metrics, cfg.validate(model.preset.num_keys, LAYERS))
    return ({k: v.numpy() for k, v in inputs.items()}, out.head.all_cls_scores.numpy(),
            out.head.all_bbox_preds.numpy(), gap)


@pytest.mark.parametrize("batch, exporter", [   # the quick run keeps the two exports the tgGBC quick run makes
    (1, "torchscript"), pytest.param(1, "dynamo", marks=pytest.mark.slow),
    pytest.param(2, "torchscript", marks=pytest.mark.slow), (2, "dynamo")])
def test_preset_matches_torch_reference(exporter: str, batch: int, tmp_path: Path) -> None:
    inputs, cls, box, gap = preset_oracle(PRESET_CONFIG)
    assert gap >= MIN_GAP, f"near tie in the reference matching (gap {gap:.1e}): choose another seed"
    src = exported_decoder(PRESET, exporter, batch, LAYERS)
    out = merged(src, tmp_path / "tome.onnx", PRESET_CONFIG)
    got = run(tmp_path / "tome.onnx", {k: v[:batch] for k, v in inputs.items()})
    np.testing.assert_allclose(got[0], cls[:, :batch], rtol=0, atol=TOL, err_msg="all_cls_scores")
    np.testing.assert_allclose(got[1], box[:, :batch], rtol=0, atol=TOL, err_msg="all_bbox_preds")
    ops = inserted_ops(out)
    assert ops["TopK"] == 4 and ops["NonZero"] == 2            # best match + merged keys; kept keys per merge
    # one ScatterElements per matching (merged-key flags), per merge of the sizes, and per merge of
    # each distinct key/value projection input of the later layers (merged once, then shared)
    layers = discover(onnx.load(str(src))).layers
    chains = {(pin.tensor, s) for layer in layers[1:] for pin in layer.key_inputs + layer.value_inputs
              for s in range(1, min(layer.index, 2) + 1)}
    assert ops["ScatterElements"] == 2 + 2 + len(chains)
    assert [layer.num_keys for layer in discover(out).layers] == [4224, 3224, 2224]


def test_r0_reproduces_the_input_exactly(tmp_path: Path) -> None:
    src = exported_decoder(PRESET, "torchscript", 1, LAYERS)
    report = rewrite(src, tmp_path / "same.onnx", [tome_pass.TokenMergingPass(0, 2)], seed=3)
    assert report.verification is not None and report.verification.exact
    assert not inserted_ops(onnx.load(str(tmp_path / "same.onnx")))


# ---------------------------------------------------------------- the handwritten decoder
def hand_reference(module: hd.HandDecoder, inputs: dict[str, Tensor],
                   cfg: tome.ToMeConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """The handwritten decoder with ToMe between its blocks, run from its own modules."""
    memory, key_pos = inputs["memory"], inputs["key_pos"]
    qpos = module.anchor_embed(module.anchors).unsqueeze(0).expand(memory.shape[0], -1, -1)   # [B, Nq, E]
    anchor_logit = torch.log(module.anchors / (1 - module.anchors))
    x, size, e = torch.zeros_like(qpos), torch.ones(memory.shape[0], memory.shape[1], 1), module.dims.embed
    scores, boxes, metrics = [], [], []
    schedule = cfg.validate(memory.shape[1], module.dims.layers)
    for block, r in zip(module.blocks, schedule):
        if module.flavour == "hand":
            x, _ = block(x, qpos, memory, key_pos, None)
            weight, bias = block.mix_cross.to_k.weight, block.mix_cross.to_k.bias
        else:                                                                     # sequence-first MHA
            x, _ = block(x.transpose(0, 1), qpos.transpose(0, 1), memory.transpose(0, 1),
                         key_pos.transpose(0, 1), None)
            x = x.transpose(0, 1)
            weight, bias = block.mix_cross.in_proj_weight[e:2 * e], block.mix_cross.in_proj_bias[e:2 * e]
        logits, box = module._heads(x, anchor_logit)
        scores.append(logits), boxes.append(box)
        if r:
            metrics.append(tome.key_metric(memory + key_pos, weight, bias, module.dims.heads))
            memory, key_pos, size = tome.merge_keys(memory, key_pos, size, metrics[-1], r)
    return torch.stack(scores).numpy(), torch.stack(boxes).numpy(), margin(metrics, schedule)


HAND_CONFIG = tome.ToMeConfig(r=30, n=2)        # 50 keys, 3 layers: merges [14, 16, 0]
HAND_VARIANTS = [("hand", "dynamo", False, 1), ("mha", "torchscript", True, 2)]


@pytest.mark.parametrize("flavour,exporter,simplify,batch", [   # dynamo exports of the hand decoder: slow
    pytest.param(*v, id=f"{v[0]}-{v[1]}-{'sim' if v[2] else 'raw'}-b{v[3]}",
                 marks=[pytest.mark.slow] if v[1] == "dynamo" else []) for v in HAND_VARIANTS])
def test_handwritten_decoder_by_auto_discovery(flavour: str, exporter: str, simplify: bool, batch: int,
                                               tmp_path: Path) -> None:
    """Batch-first matmul attention, and sequence-first nn.MultiheadAttention after onnxsim."""
    module = hd.HandDecoder(flavour)
    inputs = module.example_inputs(batch=batch, seed=0, mask=False)
    with torch.no_grad():
        cls, box, gap = hand_reference(module, inputs, HAND_CONFIG)
    assert gap >= MIN_GAP, f"near tie in the reference matching (gap {gap:.1e}): choose another seed"
    src = hd.exported(flavour, exporter, simplify, batch=batch, mask=False)
    merged(src, tmp_path / "tome.onnx", HAND_CONFIG)
    got = run(tmp_path / "tome.onnx", {k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_allclose(got[0], cls, rtol=0, atol=TOL, err_msg="all_cls_scores")
    np.testing.assert_allclose(got[1], box, rtol=0, atol=TOL, err_msg="all_bbox_preds")


# ---------------------------------------------------------------- refusals
def test_masked_keys_are_refused_without_output(tmp_path: Path) -> None:
    out = tmp_path / "tome.onnx"
    with pytest.raises(PatternNotFoundError, match="key mask"):
        merged(hd.exported("hand", "dynamo", True, batch=2), out, HAND_CONFIG)
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--r", "2200"], "at most half of the keys per layer"),           # 2200 > 4224 / 2 in one matching
    (["--r", "4224", "--n", "2"], "smaller than the number of keys"),
    (["--r", "100", "--n", "4"], "exceeds the number of decoder layers"),
    (["--n", "2"], "needs --r"),
    (["--r", "100", "--k", "5"], "--k is a tgGBC option"),
], ids=["half", "all-keys", "layers", "no-r", "k"])
def test_cli_rejects_bad_parameters(argv: list[str], message: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tome.onnx"
    model = exported_decoder(PRESET, "torchscript", 1, LAYERS)
    capsys.readouterr()       # the export may log (when an earlier test configured logging); not ours to check
    code = main(["rewrite", str(model), "-o", str(out), "--method", "tome", *argv])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_tggbc_options_are_refused() -> None:
    with pytest.raises(ParameterError, match="--k is a tgGBC option"):
        tome_pass.TokenMergingPass.from_args(argparse.Namespace(r=100, n=1, k=5))
    assert tome_pass.TokenMergingPass.from_args(argparse.Namespace(r=100, n=None, k=0)).config == tome.ToMeConfig(100, 1)


def test_config_refuses_a_schedule_beyond_half_of_a_layer() -> None:
    assert tome.ToMeConfig(r=2400, n=2).validate(4224, 3) == [1200, 1200, 0]     # 4224 -> 3024 -> 1824
    with pytest.raises(ParameterError, match="layer 1 would merge 1600 of 2624"):
        tome.ToMeConfig(r=3200, n=2).validate(4224, 3)
