"""fp16 conversion (``edgeprune.passes.precision.fp16``) of exported decoders, plain and rewritten, on ONNX Runtime CPU.

The oracle is the fp32 model on the same random inputs: the fp16 model must stay within
``FP16_ABS_TOLERANCE`` (``FP16_PRUNED_ABS_TOLERANCE`` after tgGBC / ToMe) on
``all_cls_scores`` (logits) and ``all_bbox_preds``, keep the tgGBC scoring / ToMe merging
subgraphs in fp32 (their data moves, ``fp16.DATA_MOVE_PARTS``, follow the keys into fp16),
keep fp32 inputs/outputs, and leave no Cast -> Cast round trip.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_cache import EXPORTERS, cache_dir, exported_decoder
from edgeprune.cli.main import main
from edgeprune.errors import InvalidModelError
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.models.config import DecoderConfig, ModelPreset
from edgeprune.passes.precision import fp16
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys.tggbc import KeyPruningPass

TOL, PRUNED_TOL = fp16.FP16_ABS_TOLERANCE, fp16.FP16_PRUNED_ABS_TOLERANCE
PRESET, LAYERS = "streampetr-r50-704x256", 3          # 4224 keys; shared with the tgGBC/GPQ/ToMe tests
# A StreamPETR-like decoder small enough to export in a second: 2 cameras x 10 x 4 = 80 keys.
TINY = ModelPreset("tiny-streampetr", "streampetr", "resnet50", (160, 64), num_cameras=2,
                   decoder=DecoderConfig(num_layers=2, embed_dims=64, num_heads=4, ffn_dims=128, num_queries=40,
                                         num_propagated=8, memory_len=24))


@functools.lru_cache(maxsize=None)
def tiny_export(exporter: str) -> Path:
    """torch.onnx.export of the TINY decoder (seed 0), once per session."""
    import torch

    from edgeprune.models.build import build_model

    model = build_model(TINY, "decoder")
    inputs = model.example_inputs(batch=1, seed=0)
    path = cache_dir() / f"fp16-tiny-{exporter}.onnx"            # the session's cache dir
    kwargs = dict(input_names=list(inputs), output_names=list(model.output_names()),
                  opset_version=18 if exporter == "dynamo" else 17, dynamo=exporter == "dynamo")
    if exporter == "dynamo":
        kwargs.update(external_data=False, verbose=False, report=False, verify=False)
    with torch.no_grad():
        torch.onnx.export(model, tuple(inputs.values()), str(path), **kwargs)
    return path


def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        out[value.name] = (rng.random(shape) if value.name == "prev_ref" else rng.standard_normal(shape)).astype(np.float32)
    return out


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray], extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Outputs by name (plus ``extra`` intermediate tensors exposed as outputs)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in extra)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (inferred), for the float ones."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return {k: v for k, v in types.items() if v in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def assert_within_tolerance(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: float = TOL) -> None:
    deviations = fp16.output_deviation({k: ref[k] for k in ("all_cls_scores", "all_bbox_preds")}, got)
    for d in deviations:
        assert d.max_abs < tol, d.summary()
        assert d.max_rel < tol / 2, d.summary()         # relative to the output's largest value


def assert_fp16_model(model: onnx.ModelProto) -> None:
    """fp32 interface, fp16 weights, Softmax kept fp32, no Cast round trip left."""
    assert fp16.is_fp16(model) and fp16.count_cast_round_trips(model) == 0
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in [*model.graph.input, *model.graph.output])
    weights = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    big16 = sum(np.prod(t.dims) for t in weights if t.data_type == TensorProto.FLOAT16)
    assert big16 > 0.95 * sum(np.prod(t.dims) for t in weights)
    types = float_types(model)
    softmax = [n.output[0] for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax and all(types[t] == TensorProto.FLOAT for t in softmax)


# ---------------------------------------------------------------- plain decoders
@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_tiny_decoder_within_tolerance(exporter: str) -> None:
    model = onnx.load(str(tiny_export(exporter)))
    half = fp16.convert_fp16(model)
    assert_fp16_model(half)
    x = feeds(model)
    assert_within_tolerance(run(model, x), run(half, x))


@pytest.mark.slow
def test_preset_decoder_within_tolerance_through_rewrite(tmp_path: Path) -> None:
    """``edgeprune rewrite --precision fp16`` alone: the driver's drift report is the fp16 deviation."""
    src = exported_decoder(PRESET, "torchscript", 1, LAYERS)
    report = rewrite(src, tmp_path / "half.onnx", [], precision=fp16.Fp16Pass(measure=False), seed=1)
    assert report.precision == "fp16" and report.verification is not None
    drift = {o.name: o for o in report.verification.outputs}
    assert drift["all_cls_scores"].max_abs < TOL and drift["all_bbox_preds"].max_abs < TOL
    assert not drift["all_cls_scores"].exact                        # it did convert
    assert_fp16_model(onnx.load(str(tmp_path / "half.onnx")))


# ---------------------------------------------------------------- rewritten decoders
@pytest.mark.slow
def test_tggbc_subgraph_stays_fp32_and_keeps_the_same_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = exported_decoder(PRESET, "dynamo", 2, LAYERS)
    cfg = TgGBCConfig(r=3000, n=2, k=0)                              # drops [1500, 1500, 0]
    rewrite(src, tmp_path / "p32.onnx", [KeyPruningPass(cfg)], verify=False)
    with caplog.at_level(logging.INFO, logger="edgeprune.passes.precision.fp16"):
        rewrite(src, tmp_path / "p16.onnx", [KeyPruningPass(cfg)], precision="fp16", verify=False)
    reported = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fp16 vs fp32 graph")]
    assert len(reported) == 2                                       # the deviation of each output is reported
    p32, p16 = onnx.load(str(tmp_path / "p32.onnx")), onnx.load(str(tmp_path / "p16.onnx"))
    assert_fp16_model(p16)
    types = float_types(p16)
    scoring = [out for n in p16.graph.node if n.name.startswith("tggbc/") and n.op_type != "Cast"
               and not any(part in n.name for part in fp16.DATA_MOVE_PARTS) for out in n.output if out in types]
    assert len(scoring) > 10 and all(types[t] == TensorProto.FLOAT for t in scoring)
    # the gathers only move keys: they read the fp16 memory / memory + key_pos (no full-size Cast to fp32)
    moved = [n.output[0] for n in p16.graph.node if "/gather/" in n.name and n.op_type in ("Gather", "GatherND")]
    assert len(moved) == 4 and all(types[t] == TensorProto.FLOAT16 for t in moved)
    # kept keys into the original numbering: layer 0's TopK, layer 1's chained indices
    kept = [n.output[1] for n in p32.graph.node if n.name.startswith("tggbc/l0/") and n.op_type == "TopK"]
    kept += [n.output[0] for n in p32.graph.node if n.name.startswith("tggbc/l1/") and n.op_type == "GatherElements"]
    assert len(kept) == 2
    x = feeds(p32, seed=2)
    ref, got = run(p32, x, kept), run(p16, x, kept)
    assert_within_tolerance(ref, got, PRUNED_TOL)
    for name in kept:
        for a, b in zip(ref[name], got[name]):                      # per batch element
            assert len(set(a.tolist()) & set(b.tolist())) >= 0.99 * len(a)   # measured: >= 99.96 %


def test_tome_merge_stays_fp32_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny_export("torchscript")
    args = ["rewrite", str(src), "--method", "tome", "--r", "40", "--n", "1", "--no-verify"]
    assert main([*args, "-o", str(tmp_path / "m32.onnx")]) == 0
    assert main([*args, "-o", str(tmp_path / "m16.onnx"), "--precision", "fp16"]) == 0
    capsys.readouterr()
    m32, m16 = onnx.load(str(tmp_path / "m32.onnx")), onnx.load(str(tmp_path / "m16.onnx"))
    assert_fp16_model(m16)
    types = float_types(m16)
    merging = [out for n in m16.graph.node if n.name.startswith("tome/") and n.op_type != "Cast"
               and not any(part in n.name for part in fp16.DATA_MOVE_PARTS) for out in n.output if out in types]
    assert len(merging) > 10 and all(types[t] == TensorProto.FLOAT for t in merging)
    x = feeds(m32)
    assert_within_tolerance(run(m32, x), run(m16, x), PRUNED_TOL)


# ---------------------------------------------------------------- converter repairs on tiny graphs
def tiny_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def test_shared_initializer_cast_and_constant_of_shape_are_repaired() -> None:
    """One initializer read by an fp16 and a kept-fp32 node; Cast(to=float) and a valueless
    ConstantOfShape inside the fp16 part: each breaks the plain converter's output graph."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "w")
    shape = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "shape")
    nodes = [helper.make_node("Add", ["x", "w"], ["a"], name="plain_add"),
             helper.make_node("Mul", ["a", "w"], ["b"], name="tggbc/scale"),         # kept fp32, shares w
             helper.make_node("Cast", ["b"], ["c"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="zeros"),
             helper.make_node("Add", ["c", "zeros"], ["y"], name="out")]
    model = tiny_model(nodes, [w, shape])
    half = fp16.convert_fp16(model)
    scale = next(n for n in half.graph.node if n.name == "tggbc/scale")
    inits = {t.name: t.data_type for t in half.graph.initializer}
    assert inits[scale.input[1]] == TensorProto.FLOAT and inits["w"] == TensorProto.FLOAT16
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT                  # the input is untouched
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) / 7}
    want = (x["x"] + numpy_helper.to_array(w)) * numpy_helper.to_array(w)
    np.testing.assert_allclose(run(half, x)["y"], want, atol=5e-3)


def test_cast_chains_collapse_and_duplicates_merge() -> None:
    nodes = [helper.make_node("Cast", ["x"], ["h1"], name="c1", to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h1"], ["f1"], name="c2", to=TensorProto.FLOAT),     # fp32 round trip
             helper.make_node("Cast", ["x"], ["h2"], name="c3", to=TensorProto.FLOAT16),    # duplicate of c1
             helper.make_node("Cast", ["h2"], ["f2"], name="c4", to=TensorProto.FLOAT),
             helper.make_node("Add", ["f1", "f2"], ["y"], name="add")]
    model = tiny_model(nodes, [])
    assert fp16.count_cast_round_trips(model) == 2
    cleaned, removed = fp16.remove_cast_round_trips(model)
    assert removed == 4 and fp16.count_cast_round_trips(cleaned) == 0
    assert [n.op_type for n in cleaned.graph.node] == ["Add"] and list(cleaned.graph.node[0].input) == ["x", "x"]
    x = {"x": np.array([[1.0001, 2, 3], [4, 5, 6]], dtype=np.float32)}
    np.testing.assert_array_equal(run(cleaned, x)["y"], 2 * x["x"])       # no fp16 rounding left


def test_an_fp16_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    half = tmp_path / "half.onnx"
    onnx.save(fp16.convert_fp16(onnx.load(str(tiny_export("torchscript")))), str(half))
    with pytest.raises(InvalidModelError, match="already fp16"):
        fp16.convert_fp16(onnx.load(str(half)))
    assert main(["rewrite", str(half), "-o", str(tmp_path / "again.onnx"), "--precision", "fp16"]) == 2
    assert not (tmp_path / "again.onnx").exists()
    assert "already fp16" in capsys.readouterr().err


@pytest.mark.slow
def test_a_graph_the_converter_cannot_type_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Hugging Face's whole DETR: the converter leaves a type clash at the mask's CumSum (a known
    limit, README). The rewrite stops with one line naming --precision fp32 and writes nothing."""
    pytest.importorskip("transformers", reason="the DETR corpus needs the test extra (pip install -e .[test])")
    import foreign_models as fm

    out = tmp_path / "whole16.onnx"
    code = main(["rewrite", str(fm.exported("detr-whole", "torchscript", 1, False)), "-o", str(out),
                 "--method", "none", "--precision", "fp16"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "inconsistent graph" in err and "--precision fp32" in err and "CumSum" in err
    assert not out.exists()
