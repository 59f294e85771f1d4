"""tgGBC ONNX pass (``edgeprune.passes.keys.tggbc``) against torch tgGBC references, run in ONNX Runtime.

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
from typing import Any, Sequence

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
from edgeprune.passes.keys import tggbc as tggbc_pass
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.driver import rewrite
from edgeprune.graph.edit import GraphEditor
from edgeprune.graph.shapes import tensor_info
from edgeprune.passes.discovery.structure import AttentionProbs, DecoderLayer, DecoderStructure, MaskInput, ProjectionInput

TOL = 1e-4          # acceptance: all_cls_scores and all_bbox_preds within 1e-4 of the torch reference
MIN_GAP = 1e-5      # relative separation required at every selection boundary (5x ORT-vs-torch rounding)


# ---------------------------------------------------------------- helpers
def peaked_inputs(model: Any, batch: int, seed: int) -> dict[str, Tensor]:
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
        if 0 < cfg.k < lg.shape[1]:             # k = Nq takes every query: no query boundary
            conf = tggbc.query_confidence(lg, cfg.class_reduce).sort(dim=1, descending=True).values
            gaps.append(((conf[:, cfg.k - 1] - conf[:, cfg.k]) / conf[:, cfg.k]).min().item())
    return min(gaps)


ORACLE_BATCH = 2


@functools.lru_cache(maxsize=None)
def _preset_oracle(preset: str, layers: int, seed: int,
                   cfg: TgGBCConfig) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    model = decoder_model(preset, layers)
    inputs = peaked_inputs(model, ORACLE_BATCH, seed)
    with torch.no_grad():
        out = model.run(**inputs, pruning=cfg)
    margin = selection_margin(out.layer_logits, out.cross_attn_probs, cfg)
    return ({k: v.numpy() for k, v in inputs.items()}, out.all_cls_scores.numpy(), out.all_bbox_preds.numpy(),
            margin)


def preset_oracle(preset: str, layers: int, batch: int, seed: int,
                  cfg: TgGBCConfig) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """(inputs, all_cls_scores, all_bbox_preds, selection margin) of PETRHead with tgGBC ``cfg``.

    One torch run at batch 2 serves batch 1 too: batch elements never interact in the head
    (its tgGBC selects keys per element), so batch 1 is the first element of batch 2.
    """
    inputs, cls, box, margin = _preset_oracle(preset, layers, seed, cfg)
    return {k: v[:batch] for k, v in inputs.items()}, cls[:, :batch], box[:, :batch], margin


def pruned(src: Path, dst: Path, cfg: TgGBCConfig, tensorrt: bool = False) -> onnx.ModelProto:
    """``edgeprune rewrite`` as a library call (discovery, pass, cleanup, checker, ORT load, save)."""
    rewrite(src, dst, [tggbc_pass.KeyPruningPass(cfg, tensorrt)], verify=False)
    return onnx.load(str(dst))


def run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})


def inserted_ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node if n.name.startswith(tggbc_pass.PREFIX))


def assert_close(got: Sequence[np.ndarray], cls: np.ndarray, box: np.ndarray) -> None:
    assert got[0].shape == cls.shape and got[1].shape == box.shape
    np.testing.assert_allclose(got[0], cls, rtol=0, atol=TOL, err_msg="all_cls_scores")
    np.testing.assert_allclose(got[1], box, rtol=0, atol=TOL, err_msg="all_bbox_preds")


# ---------------------------------------------------------------- presets (acceptance)
# preset, decoder layers (fewer for speed), tgGBC config, input seed; the quick run
# (-m "not slow") keeps the 4224-key preset, whose exports the GPQ/ToMe/fp16 tests share
PRESET_CASES = [
    pytest.param(("streampetr-vov-1600x640", 2, TgGBCConfig(r=21000, n=1, k=175), 1),   # 24000 keys, the paper's
                 marks=pytest.mark.slow),                                                # r and k
    pytest.param(("petr-r50-800x320", 3, TgGBCConfig(r=4000, n=2, k=0), 1), marks=pytest.mark.slow),   # 6000 keys
    ("streampetr-r50-704x256", 3, TgGBCConfig(r=3000, n=2, k=150), 2),      # 4224 keys, n=2, k>0
]


def _case_id(case: tuple[Any, ...]) -> str:
    cfg = case[2]
    return f"{case[0]}-r{cfg.r}-n{cfg.n}-k{cfg.k}"


def _preset_runs() -> list[Any]:
    """PRESET_CASES x batch x exporter; the quick run keeps batch 1 TorchScript and batch 2 dynamo."""
    runs = []
    for case in PRESET_CASES:
        values, marks = (case.values[0], list(case.marks)) if hasattr(case, "values") else (case, [])
        for batch in (1, 2):
            for exporter in EXPORTERS:
                quick = (batch, exporter) in ((1, "torchscript"), (2, "dynamo"))
                runs.append(pytest.param(values, batch, exporter, id=f"{_case_id(values)}-{batch}-{exporter}",
                                         marks=marks if quick else [pytest.mark.slow]))
    return runs


@pytest.mark.parametrize("case, batch, exporter", _preset_runs())
def test_preset_matches_torch_reference(case: tuple[Any, ...], batch: int, exporter: str, tmp_path: Path) -> None:
    preset, layers, cfg, seed = case
    inputs, cls, box, margin = preset_oracle(preset, layers, batch, seed, cfg)
    assert margin >= MIN_GAP, f"near tie in the reference selection (gap {margin:.1e}): choose another seed"
    src = exported_decoder(preset, exporter, batch, layers)
    out = pruned(src, tmp_path / "pruned.onnx", cfg)
    assert_close(run(tmp_path / "pruned.onnx", inputs), cls, box)

    plan = tggbc_pass.plan_key_pruning(discover(onnx.load(str(src))), cfg)
    steps = len(plan.steps)
    ops = inserted_ops(out)
    assert ops["TopK"] == steps * (2 if cfg.k else 1)                 # keys (+ top queries) per pruning layer
    top = steps if cfg.k else 0                                       # top queries: their c and their rows
    assert ops["GatherElements"] == steps - 1 + top                   # chaining indices across pruning layers
    # each stage gathers memory and memory + key_pos once (shared by the later layers)
    assert ops.get("GatherND", 0) == (0 if batch == 1 else 2 * steps)
    heads = discover(onnx.load(str(src))).num_heads
    row_chunk = lambda keys: max(1, min(heads * cfg.k, tggbc_pass.SCORE_CHUNK_BYTES // (4 * keys)))  # noqa: E731
    row_gathers = sum(-(-heads * cfg.k // row_chunk(s.num_keys)) for s in plan.steps) if cfg.k else 0
    assert ops["Gather"] == (2 * steps if batch == 1 else 0) + row_gathers   # + the top rows, a chunk at a time
    assert ops.get("ReduceSum", 0) == 0                               # the head mean is in the weights
    again = discover(out)                                             # later layers now read fewer keys
    assert [layer.num_keys for layer in again.layers] == list(plan.keys_per_layer)
    assert plan.keys_per_layer[-1] == again.num_keys - cfg.r


@pytest.mark.slow
def test_edgeprune_export_then_cli_rewrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The product path: ``edgeprune export`` (onnxsim, decoder map in the metadata), then the CLI."""
    from edgeprune.cli.main import main
    from edgeprune.export import export_onnx

    preset, layers, cfg, seed = "streampetr-r50-704x256", 2, TgGBCConfig(r=2000, n=1, k=100), 1
    src, out = tmp_path / "decoder.onnx", tmp_path / "pruned.onnx"
    export_onnx(decoder_model(preset, layers), src, exporter="torchscript", batch=2)
    assert discover(onnx.load(str(src))).source == "metadata"
    inputs, cls, box, margin = preset_oracle(preset, layers, 2, seed, cfg)
    assert margin >= MIN_GAP, f"near tie in the reference selection (gap {margin:.1e}): choose another seed"
    code = main(["rewrite", str(src), "-o", str(out), "--method", "tggbc", "--r", "2000", "--n", "1", "--k", "100",
                 "--no-verify"])
    assert code == 0, capsys.readouterr().err
    assert_close(run(out, inputs), cls, box)


@pytest.mark.slow
def test_whole_model_images_to_detections(tmp_path: Path) -> None:
    """Scope "full": the keys come from the backbone and position encoder inside the graph."""
    import dataclasses

    from edgeprune.models.build import build_model
    from edgeprune.models.config import DecoderConfig
    from edgeprune.models.presets import get_preset

    tiny = dataclasses.replace(get_preset("focalpetr-r18-704x256"), name="tiny-r18", image_size=(96, 64),
                               decoder=DecoderConfig(num_queries=60, ffn_dims=256))        # 144 keys
    model, cfg = build_model(tiny, "full", seed=0, num_layers=3), TgGBCConfig(r=80, n=2, k=0)
    inputs = model.example_inputs(batch=2, seed=0)
    with torch.no_grad():
        ref = model.run(**inputs, pruning=cfg)
    assert selection_margin(ref.layer_logits, ref.cross_attn_probs, cfg) >= MIN_GAP
    src = tmp_path / "full.onnx"
    torch.onnx.export(model, tuple(inputs.values()), str(src), dynamo=False, opset_version=17,
                      input_names=list(inputs), output_names=["all_cls_scores", "all_bbox_preds"])
    out = pruned(src, tmp_path / "pruned.onnx", cfg)
    assert [layer.num_keys for layer in discover(out).layers] == [144, 104, 64]
    assert_close(run(tmp_path / "pruned.onnx", {k: v.numpy() for k, v in inputs.items()}),
                 ref.all_cls_scores.numpy(), ref.all_bbox_preds.numpy())


# ---------------------------------------------------------------- handwritten decoder (auto-discovery)
HAND_CONFIG = TgGBCConfig(r=30, n=2, k=0)          # 50 keys, 3 layers: drops [14, 16]; all queries


def hand_reference(module: hd.HandDecoder, inputs: dict[str, Tensor],
                   cfg: TgGBCConfig) -> tuple[np.ndarray, np.ndarray, float]:
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


@pytest.mark.parametrize("flavour,exporter,simplify,batch", [   # dynamo exports of the hand decoder: slow
    pytest.param(*v, id=f"{v[0]}-{v[1]}-{'sim' if v[2] else 'raw'}-b{v[3]}",
                 marks=[pytest.mark.slow] if v[1] == "dynamo" else []) for v in HAND_VARIANTS])
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

    def layer(self, i: int, x: Tensor, memory: Tensor, key_pos: Tensor, attend: Tensor) -> tuple[Tensor, Tensor]:
        """-> (new x [B, Nq, E], head-mean probabilities [B, Nq, Nk] computed by hand for the reference)."""
        q, k, v = self._split(self.q[i](x)), self._split(self.k[i](memory + key_pos)), self._split(self.v[i](memory))
        mask = attend[:, None, None, :].expand(-1, 1, x.shape[1], -1)     # [B, 1, Nq, Nk]: ORT wants Nq there
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).mean(1)
        return self.norms[i](x + self.o[i](out)), probs

    def forward(self, memory: Tensor, key_pos: Tensor, attend: Tensor,
                cfg: TgGBCConfig | None = None) -> tuple[Tensor, Tensor]:
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


# ---------------------------------------------------------------- ablations, TensorRT, r = 0
@pytest.mark.parametrize("cfg,ops", [
    (TgGBCConfig(r=30, n=2, k=0, use_class_score=False), {"Sigmoid": 0, "ReduceMax": 0, "Tile": 2}),
    (TgGBCConfig(r=30, n=2, k=0, class_reduce="mean"), {"Sigmoid": 2, "ReduceMax": 0, "ReduceMean": 2}),
    (TgGBCConfig(r=20, n=1, k=0, class_reduce="min"), {"Sigmoid": 1, "ReduceMin": 1, "Tile": 1}),
    # k = Nq (20): every query scores, so no query TopK and no gather of attention rows (as k = 0)
    (TgGBCConfig(r=30, n=2, k=20), {"Sigmoid": 2, "TopK": 2, "Gather": 0}),
], ids=["no-class-score", "mean", "min", "k-all-queries"])
def test_ablations_match_their_references(cfg: TgGBCConfig, ops: dict[str, int], tmp_path: Path) -> None:
    module = hd.HandDecoder("hand")
    inputs = module.example_inputs(batch=2, seed=0)
    with torch.no_grad():
        cls, box, margin = hand_reference(module, inputs, cfg)
    assert margin >= MIN_GAP
    out = pruned(hd.exported("hand", "dynamo", True, batch=2), tmp_path / "pruned.onnx", cfg)
    inserted = inserted_ops(out)
    assert {op: inserted.get(op, 0) for op in ops} == ops           # the chosen class reduction, per-head weights
    assert_close(run(tmp_path / "pruned.onnx", {k: v.numpy() for k, v in inputs.items()}), cls, box)


@pytest.mark.slow                       # its own export (batch 2 TorchScript), not shared in the quick run
def test_tensorrt_selection_matches_reference(tmp_path: Path) -> None:
    """4224 keys, 3924 kept (> 3840): two TopKs of at most 3840 select what the torch reference keeps."""
    preset, layers, cfg, seed = "streampetr-r50-704x256", 3, TgGBCConfig(r=300, n=1, k=100, use_class_score=False), 2
    inputs, cls, box, margin = preset_oracle(preset, layers, 2, seed, cfg)
    assert margin >= MIN_GAP, f"near tie in the reference selection (gap {margin:.1e}): choose another seed"
    out = pruned(exported_decoder(preset, "torchscript", 2, layers), tmp_path / "trt.onnx", cfg, tensorrt=True)
    topk = [n for n in out.graph.node if n.op_type == "TopK"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert sorted(int(inits[n.input[1]][0]) for n in topk) == sorted([100, 3840, 3924 - 3840])
    assert_close(run(tmp_path / "trt.onnx", inputs), cls, box)


def test_tensorrt_peeling_selects_exactly_what_one_topk_selects() -> None:
    """Peeled TopK (3840 at a time, taken scores set to -inf) == one TopK: the same keys, also among
    exact ties (the lower index wins, as ONNX's TopK says); the single TopK is unsorted."""
    import onnx_graphsurgeon as gs

    batch, keys, keep = 2, 12000, 9000
    models = {}
    for tensorrt in (False, True):
        step = tggbc_pass.PruningStep(0, keys, keys - keep, tggbc_pass.topk_sizes(keep, tensorrt))
        graph = gs.Graph(inputs=[gs.Variable("scores", np.float32, (batch, keys))], opset=17)
        ed = GraphEditor(gs, graph, 17, {})
        kept = tggbc_pass._select_keys(ed, graph.inputs[0], step, batch)
        kept.dtype, kept.shape = np.int64, (batch, keep)
        graph.outputs = [kept]
        models[tensorrt] = gs.export_onnx(graph)
        models[tensorrt].ir_version = 9                               # what this ONNX Runtime reads
    topk = [n for n in models[True].graph.node if n.op_type == "TopK"]
    assert len(topk) == 3                                            # 3840 + 3840 + 1320
    rng = np.random.default_rng(0)
    scores = {"scores": np.round(rng.random((batch, keys)), 3).astype(np.float32)}   # many exact ties
    one, peeled = (ort.InferenceSession(models[t].SerializeToString()).run(None, scores)[0] for t in (False, True))
    expected = np.argsort(-scores["scores"], axis=1, kind="stable")[:, :keep]   # ONNX TopK: ties -> lower index
    np.testing.assert_array_equal(peeled, expected)                   # peeling keeps the sorted order
    np.testing.assert_array_equal(np.sort(one, axis=1), np.sort(expected, axis=1))


def test_r0_reproduces_the_input_exactly(tmp_path: Path) -> None:
    src = hd.exported("mha", "torchscript", True, batch=2)
    out = pruned(src, tmp_path / "same.onnx", TgGBCConfig(r=0, n=2, k=5))
    assert not inserted_ops(out)
    inputs = {k: v.numpy() for k, v in hd.HandDecoder("mha").example_inputs(batch=2, seed=3).items()}
    for a, b in zip(run(src, inputs), run(tmp_path / "same.onnx", inputs)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- plan and parameters
def synthetic_structure(layers: int = 3, keys: int = 100, queries: int = 20) -> DecoderStructure:
    pin = ProjectionInput("memory", "proj", 0, 1, 0)
    decoder = tuple(DecoderLayer(i, AttentionProbs(f"probs{i}", "BHQK", 4), (pin,), (pin,), (), f"pv{i}", f"logits{i}",
                                 keys) for i in range(layers))
    return DecoderStructure(decoder, 1, queries, keys, 5, 32, 4, "matched")


def test_plan_follows_the_schedule() -> None:
    plan = tggbc_pass.plan_key_pruning(synthetic_structure(6, 24000, 900), TgGBCConfig(r=21000, n=2, k=175))
    assert [(s.layer, s.num_keys, s.num_drop, s.num_keep) for s in plan.steps] == [
        (0, 24000, 10500, 13500), (1, 13500, 10500, 3000)]
    assert plan.keys_per_layer == (24000, 13500, 3000, 3000, 3000, 3000)
    assert [plan.stage(i) for i in range(6)] == [0, 1, 2, 2, 2, 2]
    assert [s.topk_sizes for s in plan.steps] == [(13500,), (3000,)]
    trt = tggbc_pass.plan_key_pruning(synthetic_structure(6, 24000), TgGBCConfig(r=21000, n=2), tensorrt=True)
    assert [s.topk_sizes for s in trt.steps] == [(3840, 3840, 3840, 1980), (3000,)]
    with pytest.raises(ParameterError, match=r"n must be in \[1, 2\] for this model"):   # the last layer feeds none
        tggbc_pass.plan_key_pruning(synthetic_structure(3), TgGBCConfig(r=30, n=3))
    assert not tggbc_pass.plan_key_pruning(synthetic_structure(3), TgGBCConfig(r=0, n=2)).steps


def test_tensorrt_limits_only_a_query_topk_that_is_built() -> None:
    """k >= Nq scores with every query (no query TopK), so TensorRT's K limit does not apply to it."""
    every = tggbc_pass.plan_key_pruning(synthetic_structure(2, 100, 5000), TgGBCConfig(r=10, k=5000), tensorrt=True)
    assert every.top_queries == 0
    assert tggbc_pass.plan_key_pruning(synthetic_structure(2, 100, 5000), TgGBCConfig(r=10, k=175)).top_queries == 175


@pytest.mark.parametrize("cfg,message", [
    (TgGBCConfig(r=100), "r=100 must be smaller than the number of keys \\(100\\)"),
    (TgGBCConfig(r=10, n=4), "n=4 exceeds the number of decoder layers \\(3\\)"),
    (TgGBCConfig(r=10, k=21), "k=21 exceeds the number of queries \\(20\\)"),
    (TgGBCConfig(r=-1), "must be >= 0"),
    (TgGBCConfig(r=10, n=-2), "must be >= 0"),
    (TgGBCConfig(r=10, k=-1), "must be >= 0"),
    (TgGBCConfig(r=10, class_reduce="median"), "class_reduce='median'"),
])
def test_out_of_range_parameters_are_one_line_errors(cfg: TgGBCConfig, message: str) -> None:
    with pytest.raises(ParameterError, match=message) as info:
        tggbc_pass.plan_key_pruning(synthetic_structure(), cfg)
    assert "\n" not in str(info.value)


def test_tensorrt_refuses_more_top_queries_than_topk_allows() -> None:
    with pytest.raises(ParameterError, match=r"TensorRT.s TopK limit of 3840; use k <= 3840 or k=0"):
        tggbc_pass.plan_key_pruning(synthetic_structure(queries=5000), TgGBCConfig(r=10, k=4000), tensorrt=True)
    assert tggbc_pass.plan_key_pruning(synthetic_structure(queries=5000), TgGBCConfig(r=10, k=4000)).steps


def test_pass_module_imports_without_torch() -> None:
    """The CLI imports pass modules to build its parser; a board's rewrite install has no torch."""
    import subprocess
    import sys

    code = "import sys; import edgeprune.passes.keys.tggbc; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# ---------------------------------------------------------------- command line
def test_cli_rewrite_with_long_option_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgeprune.cli.main import main

    out = tmp_path / "pruned.onnx"
    code = main(["rewrite", str(hd.exported("mha", "torchscript", True, batch=2)), "-o", str(out), "--method", "tggbc",
                 "--keys-pruned", "30", "--pruning-layers", "2", "--top-queries", "0", "--class-reduce", "max"])
    assert code == 0, capsys.readouterr().err
    assert [layer.num_keys for layer in discover(onnx.load(str(out))).layers] == [50, 36, 20]
    assert "drift" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--r", "50"], "r=50 must be smaller than the number of keys (50)"),
    (["--r", "10", "--n", "4"], "n=4 exceeds the number of decoder layers (3)"),
    (["--r", "10", "--k", "21"], "k=21 exceeds the number of queries (20)"),
    (["--r", "-1"], "must be >= 0"),
    ([], "needs --r R"),
])
def test_cli_parameter_errors_exit_2_without_output(args: list[str], message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from edgeprune.cli.main import main

    out = tmp_path / "pruned.onnx"
    code = main(["rewrite", str(hd.exported("hand", "torchscript", False)), "-o", str(out), "--method", "tggbc", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_fused_multihead_attention_probabilities_match_the_op() -> None:
    """com.microsoft.MultiHeadAttention (3-D Q/K/V, packed bias, key padding mask): the recomputed
    per-head probabilities reproduce the op's own output."""
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper

    b, nq, nk, e, h = 2, 5, 9, 8, 2
    rng = np.random.default_rng(1)
    bias = rng.standard_normal(3 * e).astype(np.float32)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "kpm"], ["y"], name="mha",
                            domain="com.microsoft", num_heads=h)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("q", [b, nq, e]), ("k", [b, nk, e]),
                                                                             ("v", [b, nk, e]))]
    graph = helper.make_graph([node], "mha", io + [helper.make_tensor_value_info("kpm", TensorProto.INT32, [b, nk])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, nq, e])],
                              [onnx.numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    layer = DecoderLayer(0, AttentionProbs(None, "fused", h, fused_qk=("q", "k"), fused_bias="bias"), (), (),
                         (MaskInput("kpm", "mha", 4, 1, 0),), "mha", None, nk)
    plan = tggbc_pass.KeyPruningPlan(TgGBCConfig(r=1), False, b, nq, (), (nk,))
    ed = GraphEditor(gs, gs.import_onnx(model), 17, tensor_info(model))
    src = tggbc_pass._per_head_probs(ed, layer, plan, None)
    per_head = src.probs
    assert (src.heads, src.num_rows, src.rows) == (h, nq, None)
    per_head.dtype = np.float32
    ed.graph.outputs.append(per_head)
    out = gs.export_onnx(ed.graph)
    out.ir_version = 9
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("q", (b, nq, e)), ("k", (b, nk, e)),
                                                                     ("v", (b, nk, e)))}
    feeds["kpm"] = np.ones((b, nk), dtype=np.int32)
    feeds["kpm"][0, -2:] = 0
    y, probs = ort.InferenceSession(out.SerializeToString()).run(None, feeds)            # probs [B, h, Nq, Nk]
    v = (feeds["v"] + bias[2 * e:]).reshape(b, nk, h, e // h).transpose(0, 2, 1, 3)
    np.testing.assert_allclose((probs @ v).transpose(0, 2, 1, 3).reshape(b, nq, e), y, atol=1e-5)
    assert np.abs(probs[0, ..., -2:]).max() < 1e-4                       # padded keys get (almost) nothing

    # the top-k queries' rows alone (Q rows picked before Q K^T): the same rows of the op's probabilities
    rows = np.array([[3, 0], [1, 4]], dtype=np.int64)
    plan_k = tggbc_pass.KeyPruningPlan(TgGBCConfig(r=1, k=2), False, b, nq, (), (nk,))
    ed = GraphEditor(gs, gs.import_onnx(model), 17, tensor_info(model))
    src = tggbc_pass._per_head_probs(ed, layer, plan_k, ed.const("rows", rows))
    picked = src.probs
    assert (src.heads, src.num_rows, src.rows) == (h, 2, None)          # recomputed for those rows only
    picked.dtype = np.float32
    ed.graph.outputs.append(picked)
    out = gs.export_onnx(ed.graph)
    out.ir_version = 9
    got = ort.InferenceSession(out.SerializeToString()).run(None, feeds)[1]           # [B, h, k, Nk]
    np.testing.assert_allclose(got, np.stack([probs[i][:, rows[i]] for i in range(b)]), atol=1e-6)


def test_q_rows_are_picked_first_only_under_a_mask_known_to_be_per_key() -> None:
    """Recomputing only the top-k rows needs the same mask for every query; a mask whose shape
    is unknown, or has a query axis, makes the recomputation take all rows and pick them after."""
    from types import SimpleNamespace

    import onnx_graphsurgeon as gs
    from edgeprune.passes.keys.fused_probs import per_key_mask

    info = {"per_key": (onnx.TensorProto.BOOL, (2, 1, 1, 40)), "keys_only": (onnx.TensorProto.BOOL, (40,)),
            "per_query": (onnx.TensorProto.FLOAT, (7, 40))}
    ed = GraphEditor(gs, gs.Graph(opset=17), 17, info)
    attention = SimpleNamespace(op="Attention")

    def mask(name: str) -> MaskInput:
        return MaskInput(name, "attn", 3, 1, 0)
    assert per_key_mask(ed, attention, mask("per_key"))
    assert per_key_mask(ed, attention, mask("keys_only"))
    assert not per_key_mask(ed, attention, mask("per_query"))
    assert not per_key_mask(ed, attention, mask("unknown"))
