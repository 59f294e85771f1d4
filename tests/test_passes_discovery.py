"""Decoder discovery on graphs edgeprune did not export, checked against torch intermediates.

The handwritten decoder (tests/handwritten_decoder.py) is exported with both exporters, with
and without onnxsim, with attention by hand and as nn.MultiheadAttention. Discovery runs on
the static graph only; to prove it found the right tensors, a copy of the graph exposes them
as outputs, ONNX Runtime computes them, and their values must equal the tensors torch hooks
record inside the module: each layer's cross-attention probabilities (not a self-attention's),
the inputs of its key and value projections, its padding mask and its class logits.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import handwritten_decoder as hd
from edgeprune.cli.main import main
from edgeprune.errors import PatternNotFoundError
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.discovery.guidance import require_parts
from edgeprune.graph.index import GraphIndex, match_parent_path
from edgeprune.passes.discovery.structure import DecoderStructure, ProjectionInput

VARIANTS = [(f, e, s) for f in hd.FLAVOURS for e in hd.EXPORTERS for s in (False, True)]


def _ids(v: Sequence[Any]) -> str:
    return f"{v[0]}-{v[1]}-{'sim' if v[2] else 'raw'}"


def run_with_outputs(model: Any, names: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of graph tensors ``names`` (made graph outputs of a copy) on ``feeds``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    typed = onnx.shape_inference.infer_shapes(copy)
    infos = {v.name: v for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    inits = {t.name: t for t in copy.graph.initializer}
    present = {o.name for o in copy.graph.output}
    for name in dict.fromkeys(names):
        if name in present:
            continue
        if name in infos:
            copy.graph.output.append(infos[name])
        else:   # initializers, and outputs of contrib ops ONNX inference does not type (float here)
            dtype = inits[name].data_type if name in inits else TensorProto.FLOAT
            copy.graph.output.append(helper.make_tensor_value_info(name, dtype, None))
    sess = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [n for n in dict.fromkeys(names)]
    return dict(zip(wanted, sess.run(wanted, feeds)))


def head_mean(probs: np.ndarray, layout: str, heads: int, batch: int) -> np.ndarray:
    """Probabilities in any discovered layout -> [B, Nq, Nk] averaged over heads."""
    if layout == "BHQK":
        return probs.mean(axis=1)
    if layout == "(BH)QK":
        return probs.reshape(batch, heads, *probs.shape[1:]).mean(axis=1)
    assert layout == "BQK_mean"
    return probs


def batch_first(value: np.ndarray, pin: ProjectionInput, batch: int) -> np.ndarray:
    """A projection input -> [B, Nk, E] using the discovered key / batch axes."""
    if pin.batch_axis is None:
        return value.reshape(batch, *value.shape[-2:]) if value.ndim == 2 else value
    return np.moveaxis(value, (pin.batch_axis, pin.key_axis), (0, 1))


def masked_rows(value: np.ndarray, key_axis: int) -> np.ndarray:
    """Rows of a mask tensor along its key axis: True where a key is hidden."""
    rows = np.moveaxis(value, key_axis, -1).reshape(-1, value.shape[key_axis])
    return rows if rows.dtype == np.bool_ else rows < -1e3


def check_against_torch(model: Any, structure: DecoderStructure, module: hd.HandDecoder,
                        inputs: dict[str, Any]) -> None:
    """Discovered tensors, computed by ORT, equal the module's intermediates (hooks)."""
    rec = hd.record(module, inputs)
    b = structure.batch
    names: list[str] = []
    for layer in structure.layers:
        names += [layer.probs.tensor, layer.logits]
        names += [p.tensor for p in layer.key_inputs + layer.value_inputs] + [m.tensor for m in layer.masks]
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = run_with_outputs(model, names, feeds)
    kpm = inputs["key_padding_mask"].numpy()
    for i, layer in enumerate(structure.layers):
        probs = head_mean(got[layer.probs.tensor], layer.probs.layout, layer.probs.num_heads, b)
        np.testing.assert_allclose(probs, rec.cross_probs[i].numpy(), atol=1e-6, err_msg=f"layer {i} probs")
        (key,), (value,) = layer.key_inputs, layer.value_inputs
        np.testing.assert_allclose(batch_first(got[key.tensor], key, b), rec.key_inputs[i].numpy(), atol=1e-6)
        np.testing.assert_allclose(batch_first(got[value.tensor], value, b), rec.value_inputs[i].numpy(), atol=1e-6)
        logits = got[layer.logits].reshape(b, structure.num_queries, structure.num_classes)
        np.testing.assert_allclose(logits, rec.logits[i].numpy(), atol=1e-5, err_msg=f"layer {i} logits")
        assert len(layer.masks) == 1, layer.masks
        mask = layer.masks[0]
        rows = masked_rows(got[mask.tensor], mask.key_axis)
        if mask.batch_axis is None:                       # broadcast over batch: B == 1 or same mask
            assert all((row == kpm[0]).all() for row in rows)
        else:
            per = rows.shape[0] // b
            for r, row in enumerate(rows):
                np.testing.assert_array_equal(row, kpm[r // per])
            assert mask.heads_in_batch == (layer.probs.layout == "(BH)QK")


@pytest.fixture(scope="module", ids=_ids, params=[   # dynamo exports of the hand decoder: slow
    pytest.param(v, marks=pytest.mark.slow) if v[1] == "dynamo" else v for v in VARIANTS])
def exported(request: pytest.FixtureRequest) -> tuple:
    flavour, exporter, simplify = request.param
    return request.param, onnx.load(str(hd.exported(flavour, exporter, simplify)))


def test_discovers_cross_attention_of_every_export(exported: tuple) -> None:
    (flavour, _exporter, _sim), model = exported
    structure = discover(model)
    dims = hd.Dims()
    assert structure.source == "matched"
    assert (structure.num_layers, structure.num_queries, structure.num_keys) == (dims.layers, dims.queries, dims.keys)
    assert (structure.num_heads, structure.embed_dims, structure.num_classes, structure.batch) == (
        dims.heads, dims.embed, dims.classes, 1)
    assert structure.cls_output == "all_cls_scores"
    assert [layer.num_keys for layer in structure.layers] == [dims.keys] * dims.layers
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) > dims.layers        # the self-attentions are there, and were not taken
    expected_axes = (0, 1) if flavour == "mha" else (1, 0)   # sequence-first [Nk, B, E] vs [B, Nk, E]
    for layer in structure.layers:
        for pin in layer.key_inputs + layer.value_inputs:
            assert (pin.key_axis, pin.batch_axis) == expected_axes
            assert pin.projection in {n.name for n in model.graph.node}
    check_against_torch(model, structure, hd.HandDecoder(flavour), hd.HandDecoder(flavour).example_inputs())


@pytest.mark.parametrize("flavour,exporter,simplify", [pytest.param("hand", "dynamo", False, marks=pytest.mark.slow),
                                                        ("mha", "torchscript", True)])
def test_batch_two(flavour: str, exporter: str, simplify: bool) -> None:
    model = onnx.load(str(hd.exported(flavour, exporter, simplify, batch=2)))
    structure = discover(model)
    assert structure.batch == 2
    module = hd.HandDecoder(flavour)
    check_against_torch(model, structure, module, module.example_inputs(batch=2))


@pytest.mark.parametrize("flavour,exporter,simplify", [("mha", "torchscript", False), ("hand", "torchscript", True),
                                                      ("mha_bf", "torchscript", False)])
def test_temporal_self_attention_is_not_cross_attention(flavour: str, exporter: str, simplify: bool) -> None:
    """StreamPETR: self-attention keys = queries + memory tokens, computed from the queries."""
    model = onnx.load(str(hd.exported(flavour, exporter, simplify, temporal=12)))
    structure = discover(model)
    assert structure.num_layers == 3 and structure.num_keys == hd.Dims().keys
    module = hd.HandDecoder(flavour, hd.Dims(temporal=12))
    check_against_torch(model, structure, module, module.example_inputs())


def test_logits_found_by_structure_when_outputs_are_renamed() -> None:
    """A foreign graph's outputs have arbitrary names: the stacked Linear outputs are the logits."""
    model = onnx.load(str(hd.exported("hand", "torchscript", True)))
    renames = {"all_cls_scores": "out0", "all_bbox_preds": "out1"}
    for node in model.graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
    for out in model.graph.output:
        out.name = renames[out.name]
    structure = discover(model)
    assert structure.cls_output == "out0"
    reference = discover(onnx.load(str(hd.exported("hand", "torchscript", True))))
    assert [layer.logits for layer in structure.layers] == [layer.logits for layer in reference.layers]


# ---------------------------------------------------------------- hand-built graphs
B, NQ, NK, E, H, C = 1, 6, 14, 8, 2, 3


def _init(name: str, shape: Sequence[int], rng: np.random.Generator) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


class GraphBuilder:
    """Two-layer decoder written with onnx.helper: fused or unfused attention (see ``kind``)."""

    def __init__(self, kind: str) -> None:
        self.kind, self.nodes, self.inits = kind, [], []
        self.rng = np.random.default_rng(0)
        self.fused: list[dict] = []

    def w(self, name: str, shape: Sequence[int]) -> str:
        self.inits.append(_init(name, shape, self.rng))
        return name

    def const(self, name: str, value: Any) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], out: str, domain: str = "", **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"n_{out}", domain=domain, **attrs))
        return out

    def linear(self, x: str, name: str) -> str:
        return self.node("MatMul", [x, self.w(f"{name}.w", (E, E))], f"{name}.out")

    def heads(self, x: str, n: int, name: str) -> str:
        shape = self.const(f"{name}.shape", np.array([B, n, H, E // H], np.int64))
        r = self.node("Reshape", [x, shape], f"{name}.split")
        return self.node("Transpose", [r], f"{name}.heads", perm=[0, 2, 1, 3])

    def attention(self, q_in: str, k_in: str, v_in: str, nk: int, name: str, mask: str = "") -> str:
        q, k, v = self.linear(q_in, f"{name}.q"), self.linear(k_in, f"{name}.k"), self.linear(v_in, f"{name}.v")
        if self.kind == "attention23":
            y = self.node("Attention", [q, k, v, mask] if mask else [q, k, v], f"{name}.y",
                          q_num_heads=H, kv_num_heads=H)
            self.nodes[-1].output.extend(["", "", f"{name}.qk_softmax"])
            self.nodes[-1].attribute.append(helper.make_attribute("qk_matmul_output_mode", 3))
            self.fused.append({"q": q, "k": k, "v": v, "y": y, "probs": f"{name}.qk_softmax"})
        elif self.kind == "mha_ms":
            bias = self.w(f"{name}.bias", (3 * E,))
            y = self.node("MultiHeadAttention", [q, k, v, bias], f"{name}.y", domain="com.microsoft", num_heads=H)
            self.fused.append({"q": q, "k": k, "v": v, "y": y, "bias": bias})
        else:
            y = self._unfused(q, k, v, nk, name, mask)
        return self.linear(y, f"{name}.o")

    def _unfused(self, q: str, k: str, v: str, nk: int, name: str, mask: str) -> str:
        qh, kh, vh = self.heads(q, NQ, f"{name}.qh"), self.heads(k, nk, f"{name}.kh"), self.heads(v, nk, f"{name}.vh")
        kt = self.node("Transpose", [kh], f"{name}.kt", perm=[0, 1, 3, 2])
        s = self.node("MatMul", [qh, kt], f"{name}.scores")
        scale = self.const(f"{name}.scale", np.array(1 / np.sqrt(E // H), np.float32))
        s = self.node("Mul", [s, scale], f"{name}.scaled")
        if mask:
            s = self.node("Add", [s, mask], f"{name}.masked")
        if self.kind == "clip":                  # an op the matcher does not know: discovery must fail
            s = self.node("Clip", [s], f"{name}.clipped")
        p = self.node("Softmax", [s], f"{name}.probs", axis=-1)
        o = self.node("MatMul", [p, vh], f"{name}.pv")
        o = self.node("Transpose", [o], f"{name}.pvt", perm=[0, 2, 1, 3])
        shape = self.const(f"{name}.merge", np.array([B, NQ, E], np.int64))
        return self.node("Reshape", [o, shape], f"{name}.merged")

    def build(self) -> Any:
        mask = "key_bias" if self.kind != "mha_ms" else ""
        tgt, cls, boxes = "tgt", [], []
        keys = self.node("Add", ["memory", "key_pos"], "keys")
        qpos = self.w("qpos", (B, NQ, E))
        for layer in range(2):
            q = self.node("Add", [tgt, qpos], f"l{layer}.q_in")
            tgt = self.node("Add", [tgt, self.attention(q, q, tgt, NQ, f"l{layer}.self")], f"l{layer}.t1")
            q = self.node("Add", [tgt, qpos], f"l{layer}.cq_in")
            tgt = self.node("Add", [tgt, self.attention(q, keys, "memory", NK, f"l{layer}.cross", mask)],
                            f"l{layer}.t2")
            logits = self.node("Add", [self.node("MatMul", [tgt, self.w(f"l{layer}.cls.w", (E, C))], f"l{layer}.cls_mm"),
                                       self.w(f"l{layer}.cls.b", (C,))], f"l{layer}.logits")
            box = self.node("Sigmoid", [self.linear(tgt, f"l{layer}.box")], f"l{layer}.box_sig")
            axes = self.const("axes0", np.array([0], np.int64))
            cls.append(self.node("Unsqueeze", [logits, axes], f"l{layer}.cls_u"))
            boxes.append(self.node("Unsqueeze", [box, axes], f"l{layer}.box_u"))
        self.node("Concat", cls, "all_cls_scores", axis=0)
        self.node("Concat", boxes, "all_bbox_preds", axis=0)
        return self._model(mask)

    def _model(self, mask: str) -> Any:
        f = TensorProto.FLOAT
        inputs = [helper.make_tensor_value_info("tgt", f, [B, NQ, E]), helper.make_tensor_value_info("memory", f, [B, NK, E]),
                  helper.make_tensor_value_info("key_pos", f, [B, NK, E])]
        if mask:
            inputs.append(helper.make_tensor_value_info("key_bias", f, list(_mask_shape(self.kind))))
        outputs = [helper.make_tensor_value_info("all_cls_scores", f, [2, B, NQ, C]),
                   helper.make_tensor_value_info("all_bbox_preds", f, [2, B, NQ, E])]
        unique = {t.name: t for t in self.inits}
        graph = helper.make_graph(self.nodes, self.kind, inputs, outputs, initializer=list(unique.values()))
        opsets = [helper.make_opsetid("", 23 if self.kind == "attention23" else 17)]
        if self.kind == "mha_ms":
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model


def _mask_shape(kind: str) -> tuple:
    """ORT's Attention-23 does not broadcast the mask over queries; the unfused Add does."""
    return (B, 1, NQ, NK) if kind == "attention23" else (B, 1, 1, NK)


def _feeds(kind: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal(s).astype(np.float32)
             for n, s in (("tgt", (B, NQ, E)), ("memory", (B, NK, E)), ("key_pos", (B, NK, E)))}
    if kind != "mha_ms":
        bias = np.zeros(_mask_shape(kind), np.float32)
        bias[..., -3:] = -1e9
        feeds["key_bias"] = bias
    return feeds


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _split_heads(x: np.ndarray, heads: int) -> np.ndarray:
    b, n, e = x.shape
    return x.reshape(b, n, heads, e // heads).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("kind", ["attention23", "mha_ms"])
def test_fused_attention_gives_q_and_k_to_recompute_probabilities(kind: str) -> None:
    builder = GraphBuilder(kind)
    model = builder.build()
    structure = discover(model)
    cross = builder.fused[1::2]                          # self, cross, self, cross
    assert structure.num_layers == 2 and structure.num_keys == NK and structure.num_queries == NQ
    feeds = _feeds(kind)
    extra = [t for f in cross for t in (f["q"], f["k"], f["v"], f["y"]) + ((f["probs"],) if "probs" in f else ())]
    got = run_with_outputs(model, extra, feeds)
    for layer, fused in zip(structure.layers, cross):
        probs = layer.probs
        assert probs.layout == "fused" and probs.tensor is None and probs.num_heads == H
        assert probs.fused_qk == (fused["q"], fused["k"]) and layer.pv_node == f"n_{fused['y']}"
        assert [p.tensor for p in layer.key_inputs] == ["keys"] and [p.tensor for p in layer.value_inputs] == ["memory"]
        q, k, v = got[fused["q"]], got[fused["k"]], got[fused["v"]]
        if probs.fused_bias is not None:                 # com.microsoft: packed Q/K/V bias
            bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == probs.fused_bias))
            q, k, v = q + bias[:E], k + bias[E:2 * E], v + bias[2 * E:]
        scale = probs.scale or 1 / np.sqrt(E // H)
        scores = _split_heads(q, H) @ _split_heads(k, H).transpose(0, 1, 3, 2) * scale
        if layer.masks:
            assert layer.masks[0].tensor == "key_bias" and layer.masks[0].key_axis == 3
            scores = scores + feeds["key_bias"]
        recomputed = _softmax(scores)                                       # [B, h, Nq, Nk]
        y = (recomputed @ _split_heads(v, H)).transpose(0, 2, 1, 3).reshape(B, NQ, E)
        np.testing.assert_allclose(y, got[fused["y"]], atol=1e-5)            # the op's own output
        if "probs" in fused:                                                 # Attention-23 exposes its softmax
            np.testing.assert_allclose(recomputed, got[fused["probs"]], atol=1e-6)


def test_unmatched_attention_is_a_clear_error_and_overrides_supply_it() -> None:
    model = GraphBuilder("clip").build()
    with pytest.raises(PatternNotFoundError, match=r"no decoder cross-attention found.*--override layer\.N\.probs"):
        discover(model)
    overrides = [f"layer.{i}.probs=l{i}.cross.probs" for i in range(2)]
    with pytest.raises(PatternNotFoundError, match=r"layer\.0\.key=keys@NODE"):
        discover(model, overrides + ["layer.0.key=keys"])   # 'keys' feeds both layers' key projections
    overrides += [f"layer.{i}.key=keys@n_l{i}.cross.k.out" for i in range(2)]
    overrides += [f"layer.{i}.value=memory@n_l{i}.cross.v.out" for i in range(2)]
    structure = discover(model, overrides)
    assert [layer.probs.layout for layer in structure.layers] == ["BHQK", "BHQK"]
    assert structure.num_heads == H and structure.num_keys == NK
    assert [layer.key_inputs[0].consumer for layer in structure.layers] == ["n_l0.cross.k.out", "n_l1.cross.k.out"]
    assert [layer.logits for layer in structure.layers] == ["l0.logits", "l1.logits"]   # found by matching
    require_parts(structure, ["probs", "key", "value", "logits"])


def test_missing_part_names_the_override_that_supplies_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = GraphBuilder("unfused").build()
    model.graph.output.pop(0)                                       # no stacked class output any more
    structure = discover(model)
    assert structure.num_layers == 2 and all(layer.logits is None for layer in structure.layers)
    require_parts(structure, ["probs", "key", "value", "mask"])
    with pytest.raises(PatternNotFoundError, match=r"needs 2 decoder parts.*class logits.*: --override "
                       r"layer\.0\.logits=TENSOR --override layer\.1\.logits=TENSOR$"):           # all at once
        require_parts(structure, ["logits"], "--method tggbc")
    fixed = discover(model, ["layer.0.logits=l0.logits", "layer.1.logits=l1.logits"])
    require_parts(fixed, ["logits"])
    path = tmp_path / "no_logits.onnx"
    onnx.save(model, str(path))
    assert main(["inspect", str(path)]) == 0                  # inspect shows the same flags
    assert ("missing for --method tggbc: 2 part(s); name them with: --override layer.0.logits=TENSOR "
            "--override layer.1.logits=TENSOR") in capsys.readouterr().out
    with pytest.raises(PatternNotFoundError, match=r"names 1 tensor\(s\) or node\(s\) not in the graph: "
                       r"layer\.1\.logits=nope;"):
        discover(model, ["layer.1.logits=nope"])
    with pytest.raises(PatternNotFoundError, match=r"names 2 .*: layer\.0\.logits=l0\.logits@no_node, "
                       r"layer\.1\.logits=nope;"):                                     # every wrong name at once
        discover(model, ["layer.0.logits=l0.logits@no_node", "layer.1.logits=nope"])


def test_graph_without_decoder_is_an_error() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]))
    with pytest.raises(PatternNotFoundError, match="1 Softmax nodes, 0 matched as attention"):
        discover(model)


# ---------------------------------------------------------------- metadata
EDGEPRUNE_EXPORTS = [("manual", "torchscript", "petr-r50-800x320", "decoder"),
                     ("torch", "dynamo", "streampetr-r50-704x256", "decoder"),
                     ("torch", "torchscript", "focalpetr-r18-704x256", "full")]


@pytest.fixture(scope="module", ids=lambda p: "-".join(p[:2] + p[3:]),
                params=[pytest.param(p, marks=pytest.mark.slow) if p[1] == "dynamo" else p for p in EDGEPRUNE_EXPORTS])
def edgeprune_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny model exported by edgeprune itself (with its decoder map in the metadata)."""
    from edgeprune.export import export_onnx
    from edgeprune.models.build import build_model
    from edgeprune.models.presets import get_preset

    attention, exporter, name, scope = request.param
    preset = get_preset(name).with_decoder(num_layers=2, embed_dims=32, num_heads=2, ffn_dims=64, num_queries=20,
                                          attention=attention)
    if preset.decoder.is_temporal:
        preset = preset.with_decoder(num_propagated=8, memory_len=16)
    cameras = 6 if scope == "full" else 1
    preset = type(preset)(preset.name, preset.family, preset.backbone, (128, 64), cameras, preset.decoder)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(build_model(preset, scope), path, exporter=exporter, simplify=scope == "decoder")   # keep it quick
    return onnx.load(str(path))


def test_metadata_is_still_used_after_fp16_conversion(edgeprune_export: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """fp16 keeps Softmax in fp32 and gives its fp16 Cast the recorded probabilities name: the
    record still names the layers (no "stale" fallback to matching)."""
    from edgeprune.export.decoder_map import read_decoder_map
    from edgeprune.passes.precision.fp16 import convert_fp16

    dmap = read_decoder_map(edgeprune_export)
    half = convert_fp16(edgeprune_export)
    producers = {out: n.op_type for n in half.graph.node for out in n.output}
    recorded = [lm.cross_attn_probs.name for lm in dmap.layers if lm.cross_attn_probs is not None]
    with caplog.at_level(logging.WARNING):
        structure = discover(half)
    assert not [r for r in caplog.records if "stale" in r.getMessage()]
    assert structure.source == "metadata" and structure.num_layers == dmap.num_layers
    assert recorded and all(producers.get(name) == "Cast" for name in recorded)   # the case this guards


def test_metadata_is_used_when_present_and_ignored_when_stale(edgeprune_export: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from edgeprune.export.decoder_map import DECODER_MAP_KEY, read_decoder_map

    dmap = read_decoder_map(edgeprune_export)
    assert dmap is not None
    structure = discover(edgeprune_export)
    assert structure.source == "metadata" and structure.decoder_map == dmap
    assert [layer.probs.tensor for layer in structure.layers] == [lm.cross_attn_probs.name for lm in dmap.layers]
    assert [layer.logits for layer in structure.layers] == [lm.logits.name for lm in dmap.layers]
    assert (structure.num_keys, structure.num_queries) == (dmap.num_keys, dmap.num_queries)
    stale = onnx.ModelProto()
    stale.CopyFrom(edgeprune_export)
    prop = next(p for p in stale.metadata_props if p.key == DECODER_MAP_KEY)
    prop.value = prop.value.replace(dmap.layers[0].cross_attn_probs.name, "renamed_by_someone")
    with caplog.at_level(logging.WARNING):
        matched = discover(stale)
    assert matched.source == "matched" and "stale" in caplog.text
    # matching alone finds exactly what the exporter recorded
    assert [(layer.probs, layer.logits, layer.key_inputs, layer.value_inputs) for layer in matched.layers] == [
        (layer.probs, layer.logits, layer.key_inputs, layer.value_inputs) for layer in structure.layers]
    assert matched.num_keys == dmap.num_keys and matched.num_heads == dmap.num_heads


# ---------------------------------------------------------------- big key counts
@pytest.mark.slow
def test_discovery_on_24000_keys_reads_the_graph_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Discovery must not run the model: with ORT sessions forbidden it still finds 24000 keys."""
    import torch

    module = hd.HandDecoder("hand", hd.Dims(keys=24000))
    inputs = module.example_inputs(mask=False)
    path = tmp_path / "hand-24000.onnx"
    torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=False, opset_version=17,
                      input_names=list(inputs), output_names=["all_cls_scores", "all_bbox_preds"])
    model = onnx.load(str(path))

    def forbidden(*_a: Any, **_k: Any) -> None:
        raise AssertionError("discovery ran ONNX Runtime")

    monkeypatch.setattr(ort, "InferenceSession", forbidden)
    structure = discover(model)
    assert structure.num_keys == 24000 and structure.num_layers == 3
    assert all(layer.key_inputs[0].key_axis == 1 for layer in structure.layers)


def test_match_parent_path() -> None:
    model = GraphBuilder("unfused").build()
    index = GraphIndex.build(model)
    softmax = index.nodes["n_l0.cross.probs"]
    path = match_parent_path(index, softmax, ["Add", "Mul", "MatMul", "Transpose"], [0, 0, 0, 1])
    assert [n.name for n in path] == ["n_l0.cross.masked", "n_l0.cross.scaled", "n_l0.cross.scores", "n_l0.cross.kt"]
    assert match_parent_path(index, softmax, ["Add", "Div"], [0, 0]) is None
    assert match_parent_path(index, softmax, ["Add", "Mul", "MatMul"], [0, 1, 0]) is None    # input 1 is the scale
    assert [n.name for n in match_parent_path(index, index.nodes["n_l0.cross.scores"], ["Transpose"], [None])] == [
        "n_l0.cross.qh.heads"]


def test_metadata_survives_a_rewrite(edgeprune_export: Any, tmp_path: Path) -> None:
    from edgeprune.passes.driver import rewrite
    from edgeprune.passes.registry import IdentityPass

    src = tmp_path / "in.onnx"
    onnx.save(edgeprune_export, str(src))
    report = rewrite(src, tmp_path / "out.onnx", [IdentityPass()], verify=False)
    assert report.structure.source == "metadata"
    again = discover(onnx.load(str(tmp_path / "out.onnx")))
    assert again.source == "metadata"
    assert [layer.probs.tensor for layer in again.layers] == [layer.probs.tensor for layer in report.structure.layers]
