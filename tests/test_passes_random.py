"""Random key-pruning pass (``edgeprune.passes.keys.random_keys``) against torch references, run in ONNX Runtime.

Oracles: the decoders run in PyTorch with the same key subsets gathered between layers:
``PETRHead(..., pruning=FixedKeys(...))`` for an edgeprune preset, and the handwritten
decoder's own blocks (sequence-first ``nn.MultiheadAttention`` with a key padding mask) for a
graph edgeprune did not export. The subsets are the pass's seeded constants
(:func:`random_keep`); the references gather them with ``methods.tggbc.gather_keys``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor

import handwritten_decoder as hd
from model_cache import decoder_model, exported_decoder
from edgeprune.errors import ParameterError
from edgeprune.methods import tggbc
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.models.decoder import LayerKeys
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys import random_keys
from edgeprune.passes.keys.tggbc import plan_key_pruning

TOL = 1e-4


class FixedKeys:
    """The head's KeyReduction protocol with given kept keys per pruning layer (the oracle's pruning)."""

    def __init__(self, r: int, n: int, kept: Sequence[np.ndarray]) -> None:
        self.r, self.n, self.kept = r, n, [torch.from_numpy(k) for k in kept]

    def layer_schedule(self, num_keys: int, num_layers: int, num_queries: int) -> list[int]:
        return TgGBCConfig(r=self.r, n=self.n).layer_schedule(num_keys, num_layers, num_queries)

    def reduce(self, keys: LayerKeys, amount: int, layer: Any, logits: Tensor, probs: Tensor) -> LayerKeys:
        keep = self.kept.pop(0).expand(keys.memory.shape[0], -1)                  # [B, Nk - amount]
        assert keep.shape[1] == keys.memory.shape[1] - amount
        return tggbc.kept_keys(keys, keep)


def kept_subsets(path: Path, r: int, n: int, seed: int) -> list[np.ndarray]:
    plan = plan_key_pruning(discover(onnx.load(str(path))), TgGBCConfig(r=r, n=n))
    return random_keys.random_keep(plan, seed)


def run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})


def pruned(src: Path, dst: Path, r: int, n: int, seed: int = 0) -> onnx.ModelProto:
    rewrite(src, dst, [random_keys.RandomPruningPass(r, n, seed)], verify=False)
    return onnx.load(str(dst))


def assert_close(got: Sequence[np.ndarray], cls: np.ndarray, box: np.ndarray) -> None:
    assert got[0].shape == cls.shape and got[1].shape == box.shape
    np.testing.assert_allclose(got[0], cls, rtol=0, atol=TOL, err_msg="all_cls_scores")
    np.testing.assert_allclose(got[1], box, rtol=0, atol=TOL, err_msg="all_bbox_preds")


# ---------------------------------------------------------------- oracles
@pytest.mark.parametrize("exporter, batch", [("torchscript", 1),     # the export tgGBC's quick tests share
                                            pytest.param("dynamo", 2, marks=pytest.mark.slow)])
def test_preset_matches_torch_reference(exporter: str, batch: int, tmp_path: Path) -> None:
    preset, layers, r, n, seed = "streampetr-r50-704x256", 3, 3000, 2, 5       # 4224 -> 2724 -> 1224 keys
    src = exported_decoder(preset, exporter, batch, layers)
    kept = kept_subsets(src, r, n, seed)
    assert [len(k) for k in kept] == [2724, 1224]
    for k, size in zip(kept, (4224, 2724)):                      # sorted, distinct, in range, not a prefix
        assert (np.diff(k) > 0).all() and k[0] >= 0 and k[-1] < size and k[-1] != len(k) - 1
    model = decoder_model(preset, layers)
    inputs = model.example_inputs(batch=batch, seed=1)
    with torch.no_grad():
        ref = model.run(**inputs, pruning=FixedKeys(r, n, kept))
    out = pruned(src, tmp_path / "random.onnx", r, n, seed)
    assert_close(run(tmp_path / "random.onnx", {k: v.numpy() for k, v in inputs.items()}),
                 ref.all_cls_scores.numpy(), ref.all_bbox_preds.numpy())
    assert [layer.num_keys for layer in discover(out).layers] == [4224, 2724, 1224]
    ops = [node.op_type for node in out.graph.node if node.name.startswith(random_keys.PREFIX)]
    assert ops == ["Gather"] * 4                                 # memory and memory + key_pos, per stage


def hand_reference(module: hd.HandDecoder, inputs: dict[str, Tensor], r: int, n: int,
                   kept: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The handwritten decoder's own blocks, with memory, key_pos and mask gathered to ``kept`` between them."""
    memory, key_pos, mask = inputs["memory"], inputs["key_pos"], inputs["key_padding_mask"]
    qpos = module.anchor_embed(module.anchors).unsqueeze(0).expand(memory.shape[0], -1, -1)   # [B, Nq, E]
    anchor_logit = torch.log(module.anchors / (1 - module.anchors))
    x, subsets = torch.zeros_like(qpos), list(kept)
    scores, boxes = [], []
    for block, drop in zip(module.blocks, tggbc.schedule(r, n, module.dims.layers)):
        x, _ = block(x.transpose(0, 1), qpos.transpose(0, 1), memory.transpose(0, 1), key_pos.transpose(0, 1), mask)
        x = x.transpose(0, 1)
        logits, box = module._heads(x, anchor_logit)
        scores.append(logits), boxes.append(box)
        if drop:
            keep = torch.from_numpy(subsets.pop(0)).expand(memory.shape[0], -1)
            memory, key_pos, mask = (tggbc.gather_keys(t, keep) for t in (memory, key_pos, mask))
    return torch.stack(scores).numpy(), torch.stack(boxes).numpy()


def test_handwritten_decoder_with_key_padding_mask(tmp_path: Path) -> None:
    """Sequence-first nn.MultiheadAttention after onnxsim, batch 2, masked keys gathered too."""
    module, r, n, seed = hd.HandDecoder("mha"), 30, 2, 11               # 50 keys, 3 layers: drops [14, 16]
    src = hd.exported("mha", "torchscript", True, batch=2)
    kept = kept_subsets(src, r, n, seed)
    inputs = module.example_inputs(batch=2, seed=0)
    with torch.no_grad():
        cls, box = hand_reference(module, inputs, r, n, kept)
    pruned(src, tmp_path / "random.onnx", r, n, seed)
    assert_close(run(tmp_path / "random.onnx", {k: v.numpy() for k, v in inputs.items()}), cls, box)


# ---------------------------------------------------------------- determinism, r = 0
def test_same_seed_same_bytes_other_seed_other_keys(tmp_path: Path) -> None:
    src = hd.exported("mha", "torchscript", True, batch=2)
    a, b, c = (tmp_path / f"{name}.onnx" for name in "abc")
    pruned(src, a, 30, 2, seed=4), pruned(src, b, 30, 2, seed=4), pruned(src, c, 30, 2, seed=5)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not all(np.array_equal(x, y) for x, y in zip(kept_subsets(src, 30, 2, 4), kept_subsets(src, 30, 2, 5)))


def test_r0_reproduces_the_input_exactly(tmp_path: Path) -> None:
    src = hd.exported("mha", "torchscript", True, batch=2)
    out = pruned(src, tmp_path / "same.onnx", 0, 2, seed=3)
    assert not [node for node in out.graph.node if node.name.startswith(random_keys.PREFIX)]
    inputs = {k: v.numpy() for k, v in hd.HandDecoder("mha").example_inputs(batch=2, seed=3).items()}
    for x, y in zip(run(src, inputs), run(tmp_path / "same.onnx", inputs)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- parameters and the CLI
def test_parameters_are_checked() -> None:
    with pytest.raises(ParameterError, match="--k is a tgGBC option"):
        random_keys.RandomPruningPass.from_args(argparse.Namespace(r=10, n=1, k=5, seed=0))
    with pytest.raises(ParameterError, match="needs --r"):
        random_keys.RandomPruningPass.from_args(argparse.Namespace(r=None, n=1, k=None, seed=0))
    made = random_keys.RandomPruningPass.from_args(argparse.Namespace(r=10, n=None, k=None, seed=7))
    assert (made.config.r, made.config.n, made.seed) == (10, 1, 7)


def test_cli_rewrite_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgeprune.cli.main import main

    src, out = hd.exported("mha", "torchscript", True, batch=2), tmp_path / "random.onnx"
    assert main(["rewrite", str(src), "-o", str(out), "--method", "random", "--r", "30", "--n", "2",
                 "--seed", "11"]) == 0
    assert [layer.num_keys for layer in discover(onnx.load(str(out))).layers] == [50, 36, 20]
    too_many = tmp_path / "bad.onnx"
    assert main(["rewrite", str(src), "-o", str(too_many), "--method", "random", "--r", "50", "--n", "1"]) == 2
    assert "must be smaller than the number of keys" in capsys.readouterr().err
    assert not too_many.exists()
