"""tgGBC ONNX pass (``edgeprune.passes.tggbc``) against torch tgGBC references, run in ONNX Runtime.

Oracles: ``PETRHead(..., pruning=TgGBCConfig(r, n, k))`` for edgeprune presets; for the
independent handwritten decoder and a fused-attention decoder, references written here from
their intermediate tensors with ``edgeprune.methods.tggbc.keep_indices / gather_keys``.

Near ties: with random weights neighbouring keys can have importance scores within float
rounding of each other (ORT and torch differ by ~2e-6 relative), and then the two may keep
a different key. Every comparison first checks, in float64, that each selection boundary
(the last kept vs the first dropped key, and the k-th vs (k+1)-th query) is separated by
at least ``MIN_GAP`` relative; the inputs (image tokens of varied salience, fixed seeds) were
chosen so that it is. The output tolerance is never loosened.
"""
from __future__ import annotations

import collections
import functools
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import handwritten_decoder as hd
from model_cache import EXPORTERS, decoder_model, exported_decoder
from edgeprune.errors import ParameterError
from edgeprune.methods import tggbc
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.passes import tggbc as tggbc_pass
from edgeprune.passes.discovery import discover
from edgeprune.passes.driver import rewrite
from edgeprune.passes.structure import AttentionProbs, DecoderLayer, DecoderStructure, ProjectionInput

TOL = 1e-4          # acceptance: all_cls_scores and all_bbox_preds within 1e-4 of the torch reference
MIN_GAP = 1e-5      # relative separation required at every selection boundary (5x ORT-vs-torch rounding)


# ---------------------------------------------------------------- helpers
def peaked_inputs(model: Any, batch: int, seed: int) -> Dict[str, Tensor]:
    """The model's seeded inputs with image tokens of varied salience (memory_j * exp(0.5 z_j)).

    Real image tokens differ in norm; this makes attention peaked instead of near uniform, so
    importance scores spread and selection boundaries are not float-rounding ties.
    """
    x = model.example_inputs(batch=batch, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    x["memory"] = x["memory"] * torch.exp(0.5 * torch.randn(batch, x["memory"].shape[1], 1, generator=gen))
    return x


def selection_margin(logits: Sequence[Tensor], probs: Sequence[Tensor], cfg: TgGBCConfig) -> float:
    """Smallest relative gap at the selection boundaries of every pruning layer (float64).

    logits[l] [B, Nq, C]; probs[l] [B, h, Nq, Nk_l] or head-averaged [B, Nq, Nk_l].
    """
    gaps = [math.inf]
    for l, drop in enumerate(tggbc.schedule(cfg.r, cfg.n, len(logits))[:-1]):
        if drop == 0:
            continue
        attn = probs[l].double()
        attn = attn.mean(dim=1) if attn.dim() == 4 else attn
        lg = logits[l].double()
        score = tggbc.key_importance(lg, attn, cfg.k, use_class_score=cfg.use_class_score,
                                     class_reduce=cfg.class_reduce).sort(dim=1).values      # [B, Nk_l]
        gaps.append(((score[:, drop] - score[:, drop - 1]) / score[:, drop].abs()).min().item())
        if cfg.k > 0:
            conf = tggbc.query_confidence(lg, cfg.class_reduce).sort(dim=1, descending=True).values
            gaps.append(((conf[:, cfg.k - 1] - conf[:, cfg.k]) / conf[:, cfg.k]).min().item())
    return min(gaps)


@functools.lru_cache(maxsize=None)
def preset_oracle(preset: str, layers: int, batch: int, seed: int,
                  cfg: TgGBCConfig) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """(inputs, all_cls_scores, all_bbox_preds, selection margin) of PETRHead with tgGBC ``cfg``."""
    model = decoder_model(preset, layers)
    inputs = peaked_inputs(model, batch, seed)
    with torch.no_grad():
        out = model.run(**inputs, pruning=cfg)
    margin = selection_margin(out.layer_logits, out.cross_attn_probs, cfg)
    return ({k: v.numpy() for k, v in inputs.items()}, out.all_cls_scores.numpy(), out.all_bbox_preds.numpy(),
            margin)


def pruned(src: Path, dst: Path, cfg: TgGBCConfig, tensorrt: bool = False) -> onnx.ModelProto:
    """``edgeprune rewrite`` as a library call (discovery, pass, cleanup, checker, ORT load, save)."""
    rewrite(src, dst, [tggbc_pass.KeyPruningPass(cfg, tensorrt)], verify=False)
    return onnx.load(str(dst))


def run(path: Path, inputs: Dict[str, np.ndarray]) -> List[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})


def inserted_ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node if n.name.startswith(tggbc_pass.PREFIX))


def assert_close(got: Sequence[np.ndarray], cls: np.ndarray, box: np.ndarray) -> None:
    assert got[0].shape == cls.shape and got[1].shape == box.shape
    np.testing.assert_allclose(got[0], cls, rtol=0, atol=TOL, err_msg="all_cls_scores")
    np.testing.assert_allclose(got[1], box, rtol=0, atol=TOL, err_msg="all_bbox_preds")


# ---------------------------------------------------------------- presets (acceptance)
# preset, decoder layers (fewer for speed), tgGBC config, input seed per batch size
PRESET_CASES = [
    ("streampetr-vov-1600x640", 2, TgGBCConfig(r=21000, n=1, k=175), {1: 1, 2: 1}),   # 24000 keys, paper's r, k
    ("petr-r50-800x320", 3, TgGBCConfig(r=4000, n=2, k=0), {1: 1, 2: 1}),             # 6000 keys, n=2
    ("streampetr-r50-704x256", 3, TgGBCConfig(r=3000, n=2, k=150), {1: 1, 2: 2}),      # 4224 keys, n=2, k>0
]


def _case_id(case: Tuple[Any, ...]) -> str:
    cfg = case[2]
    return f"{case[0]}-r{cfg.r}-n{cfg.n}-k{cfg.k}"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", PRESET_CASES, ids=_case_id)
def test_preset_matches_torch_reference(case: Tuple[Any, ...], batch: int, exporter: str, tmp_path: Path) -> None:
    preset, layers, cfg, seeds = case
    inputs, cls, box, margin = preset_oracle(preset, layers, batch, seeds[batch], cfg)
    assert margin >= MIN_GAP, f"near tie in the reference selection (gap {margin:.1e}): choose another seed"
    src = exported_decoder(preset, exporter, batch, layers)
    out = pruned(src, tmp_path / "pruned.onnx", cfg)
    assert_close(run(tmp_path / "pruned.onnx", inputs), cls, box)

    plan = tggbc_pass.plan_key_pruning(discover(onnx.load(str(src))), cfg)
    steps = len(plan.steps)
    ops = inserted_ops(out)
    assert ops["TopK"] == steps * (2 if cfg.k else 1)                 # keys (+ top queries) per pruning layer
    assert ops["GatherElements"] == steps - 1                         # chaining indices across pruning layers
    # each stage gathers memory and memory + key_pos once (shared by the later layers)
    assert ops["Gather" if batch == 1 else "GatherND"] == 2 * steps
    again = discover(out)                                             # later layers now read fewer keys
    assert [layer.num_keys for layer in again.layers] == list(plan.keys_per_layer)
    assert plan.keys_per_layer[-1] == again.num_keys - cfg.r


# ---------------------------------------------------------------- handwritten decoder (auto-discovery)
HAND_CONFIG = TgGBCConfig(r=30, n=2, k=0)          # 50 keys, 3 layers: drops [14, 16]; all queries


def hand_reference(module: hd.HandDecoder, inputs: Dict[str, Tensor],
                   cfg: TgGBCConfig) -> Tuple[np.ndarray, np.ndarray, float]:
    """The handwritten decoder with tgGBC applied by ``edgeprune.methods.tggbc`` between its blocks.

    Runs the module's own blocks and heads (its intermediate tensors), choosing keys with
    ``keep_indices`` and gathering memory, key_pos and mask with ``gather_keys``.
    """
    memory, key_pos, mask = inputs["memory"], inputs["key_pos"], inputs.get("key_padding_mask")
    anchors = module.anchors
    qpos = module.anchor_embed(anchors).unsqueeze(0).expand(memory.shape[0], -1, -1)      # [B, Nq, E]
    anchor_logit = torch.log(anchors / (1 - anchors))
    x = torch.zeros_like(qpos)
    scores, boxes, logits_seen, probs_seen = [], [], [], []
    for block, drop in zip(module.blocks, tggbc.schedule(cfg.r, cfg.n, module.dims.layers)):
        if module.flavour == "hand":
            x, probs = block(x, qpos, memory, key_pos, mask)                             # probs [B, Nq, Nk]
        else:                                                                           # sequence-first MHA
            x, probs = block(x.transpose(0, 1), qpos.transpose(0, 1), memory.transpose(0, 1),
                             key_pos.transpose(0, 1), mask)
            x = x.transpose(0, 1)
        logits, box = module._heads(x, anchor_logit)
        scores.append(logits), boxes.append(box), logits_seen.append(logits), probs_seen.append(probs)
        if drop:
            keep = tggbc.keep_indices(logits, probs, drop, cfg.k)
            memory, key_pos, mask = (tggbc.gather_keys(t, keep) for t in (memory, key_pos, mask))
    return (torch.stack(scores).numpy(), torch.stack(boxes).numpy(),
            selection_margin(logits_seen, probs_seen, cfg))


HAND_VARIANTS = [(f, e, s, 1) for f in hd.FLAVOURS for e in hd.EXPORTERS for s in (False, True)] + [
    ("hand", "dynamo", True, 2), ("mha", "torchscript", True, 2)]      # the exports discovery's tests make


@pytest.mark.parametrize("flavour,exporter,simplify,batch", HAND_VARIANTS,
                         ids=[f"{f}-{e}-{'sim' if s else 'raw'}-b{b}" for f, e, s, b in HAND_VARIANTS])
def test_handwritten_decoder_by_auto_discovery(flavour: str, exporter: str, simplify: bool, batch: int,
                                               tmp_path: Path) -> None:
    module = hd.HandDecoder(flavour)
    inputs = module.example_inputs(batch=batch, seed=0)
    r, n, k = HAND_CONFIG.r, HAND_CONFIG.n, HAND_CONFIG.k
    with torch.no_grad():
        cls, box, margin = hand_reference(module, inputs, HAND_CONFIG)
        own_cls, own_box = module(**inputs, prune=(r, n, k))              # the module's own reference agrees
    assert margin >= MIN_GAP, f"near tie in the reference selection (gap {margin:.1e}): choose another seed"
    np.testing.assert_allclose(own_cls.numpy(), cls, atol=1e-5)
    np.testing.assert_allclose(own_box.numpy(), box, atol=1e-5)
    out = pruned(hd.exported(flavour, exporter, simplify, batch=batch), tmp_path / "pruned.onnx", HAND_CONFIG)
    assert inserted_ops(out)["TopK"] == 2                                # one per pruning layer
    assert_close(run(tmp_path / "pruned.onnx", {k_: v.numpy() for k_, v in inputs.items()}), cls, box)


# ---------------------------------------------------------------- fused attention (ONNX Attention, opset 23)
class SdpaDecoder(nn.Module):
    """Cross-attention decoder using ``F.scaled_dot_product_attention`` (dynamo exports ONNX Attention).

    memory, key_pos [B, Nk, E], attend [B, Nk] bool (True = attend) -> (scores [L, B, Nq, C], boxes [L, B, Nq, 4]).
    """

    def __init__(self, layers: int = 3, embed: int = 32, heads: int = 4, queries: int = 24, classes: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(queries, embed))
        self.q, self.k, self.v, self.o = (nn.ModuleList(nn.Linear(embed, embed) for _ in range(layers)) for _ in range(4))
        self.norms = nn.ModuleList(nn.LayerNorm(embed) for _ in range(layers))
        self.cls, self.box = nn.Linear(embed, classes), nn.Linear(embed, 4)
        self.eval()

    def _split(self, x: Tensor) -> Tensor:
        b, n, e = x.shape
        return x.reshape(b, n, self.heads, e // self.heads).transpose(1, 2)                # [B, h, N, d]

    def layer(self, i: int, x: Tensor, memory: Tensor, key_pos: Tensor, attend: Tensor) -> Tuple[Tensor, Tensor]:
        """-> (new x [B, Nq, E], head-mean probabilities [B, Nq, Nk] computed by hand for the reference)."""
        q, k, v = self._split(self.q[i](x)), self._split(self.k[i](memory + key_pos)), self._split(self.v[i](memory))
        mask = attend[:, None, None, :].expand(-1, 1, x.shape[1], -1)     # [B, 1, Nq, Nk]: ORT wants Nq there
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).mean(1)
        return self.norms[i](x + self.o[i](out)), probs

    def forward(self, memory: Tensor, key_pos: Tensor, attend: Tensor,
                cfg: Optional[TgGBCConfig] = None) -> Tuple[Tensor, Tensor]:
        x = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        drops = tggbc.schedule(cfg.r, cfg.n, len(self.q)) if cfg else [0] * len(self.q)
        scores, boxes, self.seen = [], [], ([], [])
        for i, drop in enumerate(drops):
            x, probs = self.layer(i, x, memory, key_pos, attend)
            logits = self.cls(x)
            scores.append(logits), boxes.append(self.box(x).sigmoid())
            self.seen[0].append(logits), self.seen[1].append(probs)
            if drop:
                keep = tggbc.keep_indices(logits, probs, drop, cfg.k)
                memory, key_pos, attend = (tggbc.gather_keys(t, keep) for t in (memory, key_pos, attend))
        return torch.stack(scores), torch.stack(boxes)


def test_fused_attention_recomputes_probabilities(tmp_path: Path) -> None:
    module, batch, keys = SdpaDecoder(), 2, 40
    gen = torch.Generator().manual_seed(3)
    inputs = {"memory": torch.randn(batch, keys, 32, generator=gen), "key_pos": torch.randn(batch, keys, 32, generator=gen),
              "attend": torch.ones(batch, keys, dtype=torch.bool)}
    inputs["attend"][0, -3:] = False                                  # a padded tail, different per batch element
    inputs["attend"][1, 5] = False
    src = tmp_path / "sdpa.onnx"
    torch.onnx.export(module, tuple(inputs.values()), str(src), dynamo=True, opset_version=23, external_data=False,
                      input_names=list(inputs), output_names=["all_cls_scores", "all_bbox_preds"], verbose=False)
    assert sum(n.op_type == "Attention" for n in onnx.load(str(src)).graph.node) == 3
    cfg = TgGBCConfig(r=24, n=2, k=8)                                 # drops [12, 12]
    with torch.no_grad():
        cls, box = module(**inputs, cfg=cfg)
    assert selection_margin(*module.seen, cfg) >= MIN_GAP
    structure = discover(onnx.load(str(src)))
    assert [layer.probs.layout for layer in structure.layers] == ["fused"] * 3
    pruned(src, tmp_path / "pruned.onnx", cfg)
    assert_close(run(tmp_path / "pruned.onnx", {k: v.numpy() for k, v in inputs.items()}), cls.numpy(), box.numpy())
