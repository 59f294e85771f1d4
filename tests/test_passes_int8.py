"""int8 quantization (``edgeprune.passes.precision.int8``) of exported decoders on ONNX Runtime CPU.

The oracle is the fp32 model on the same inputs: the int8 model's outputs must stay within
``INT8_REL_TOLERANCE`` of each output's range (max - min), the tgGBC scoring / selection
subgraph must stay float (no quantize/dequantize or integer op named ``tggbc/``, its TopK
and MatMul still float ops), and most kept keys must match fp32's. Bad calibration input is
a one-line error with exit code 2.

Measured on the tiny decoder (r=40 n=1, input seeds 0-7): max deviation / range 0.040 (static,
8 random calibration samples) and 0.040 (dynamic); kept keys matching fp32 0.975 - 1.0.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from test_passes_fp16 import feeds, run, tiny_export
from edgeprune.cli.main import main
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys.tggbc import KeyPruningPass
from edgeprune.passes.precision import int8

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
             "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearSoftmax", "QLinearAdd"}
OUTPUTS = ("all_cls_scores", "all_bbox_preds")
KEPT_KEYS_SHARE = 0.9      # measured (tiny decoder, 40 of 80 keys kept, input seeds 0-7): 0.975 - 1.0


def calib_npz(model_path: Path, path: Path, samples: int = 8, seed: int = 10) -> Path:
    """``samples`` random feeds per input, stacked [S, ...] (as ``--calib`` takes them)."""
    model = onnx.load(str(model_path))
    stacked = [feeds(model, seed + i) for i in range(samples)]
    np.savez(path, **{k: np.stack([s[k] for s in stacked]) for k in stacked[0]})
    return path


def range_deviation(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """max |int8 - fp32| / (max - min of fp32), per output."""
    return {k: float(np.abs(got[k] - ref[k]).max() / (ref[k].max() - ref[k].min())) for k in OUTPUTS}


@pytest.fixture(scope="module")
def tiny_tggbc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tgGBC fp32, tgGBC int8, calibration npz) of the tiny decoder (80 keys, r=40 n=1 k=0)."""
    tmp = tmp_path_factory.mktemp("int8")
    src = tiny_export("torchscript")
    calib = calib_npz(src, tmp / "calib.npz")
    cfg = TgGBCConfig(r=40, n=1, k=0)
    rewrite(src, tmp / "p32.onnx", [KeyPruningPass(cfg)], verify=False)
    rewrite(src, tmp / "p8.onnx", [KeyPruningPass(cfg)], verify=False, precision=int8.Int8Pass(calib=str(calib)))
    return tmp / "p32.onnx", tmp / "p8.onnx", calib


def test_tggbc_stays_float_and_int8_stays_close(tiny_tggbc: tuple[Path, Path, Path]) -> None:
    p32, p8 = (onnx.load(str(p)) for p in tiny_tggbc[:2])
    ops = {n.op_type for n in p8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops                  # static QDQ by default
    scoring = [n for n in p8.graph.node if n.name.startswith("tggbc/")]
    assert len(scoring) > 10 and not [n.name for n in scoring if n.op_type in QUANT_OPS]
    assert {"TopK", "MatMul"} <= {n.op_type for n in scoring}               # still the float ops
    softmax = [n for n in p8.graph.node if n.op_type == "Softmax"]
    assert softmax and len(softmax) == sum(n.op_type == "Softmax" for n in p32.graph.node)
    weights = {t.name: t.data_type for t in p8.graph.initializer}
    quantized = [n for n in p8.graph.node if n.op_type == "DequantizeLinear" and weights.get(n.input[0]) ==
                 onnx.TensorProto.INT8]
    assert len(quantized) >= 10                                           # int8 weights of the MatMul/Gemms
    kept = [n.output[1] for n in p32.graph.node if n.name.startswith("tggbc/l0/") and n.op_type == "TopK"]
    shares, worst = [], 0.0
    for seed in range(4):
        x = feeds(p32, seed)
        ref, got = run(p32, x, kept), run(p8, x, kept)
        worst = max(worst, *range_deviation(ref, got).values())
        a, b = ref[kept[0]][0].tolist(), got[kept[0]][0].tolist()
        shares.append(len(set(a) & set(b)) / len(a))
    assert worst < int8.INT8_REL_TOLERANCE, worst
    assert min(shares) >= KEPT_KEYS_SHARE, shares


def test_int8_dynamic_needs_no_calibration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tiny_export("torchscript")
    with caplog.at_level(logging.DEBUG, logger="edgeprune.passes.precision.int8"):
        assert main(["rewrite", str(src), "-o", str(tmp_path / "d8.onnx"), "--precision", "int8-dynamic",
                     "--method", "tggbc", "--r", "40", "--k", "0", "--no-verify"]) == 0
    model = onnx.load(str(tmp_path / "d8.onnx"))
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & {n.op_type for n in model.graph.node}
    assert not [n.name for n in model.graph.node if n.name.startswith("tggbc/") and n.op_type in QUANT_OPS]
    messages = [r.getMessage() for r in caplog.records]
    summary = [m for m in messages if m.startswith("int8 (dynamic")]
    assert len(summary) == 1 and "tggbc" in summary[0] and "Softmax" in summary[0]
    listed = [m for m in messages if m.startswith("  float: tggbc/")]
    assert len(listed) > 10                                              # -v lists every float node
    x = feeds(model)
    p32 = tmp_path / "p32.onnx"
    rewrite(src, p32, [KeyPruningPass(TgGBCConfig(r=40, n=1, k=0))], verify=False)
    dev = range_deviation(run(onnx.load(str(p32)), x), run(model, x))
    assert max(dev.values()) < int8.INT8_REL_TOLERANCE, dev


@pytest.mark.parametrize("extra, message", [
    ([], "--calib X.npz"),                                              # static int8 without calibration
    (["--calib", "{dir}/wrong.npz"], "calibration inputs must name exactly the model inputs"),
    (["--calib", "{dir}/calib.npz", "--data", "{dir}"], "not both"),
    (["--data", "{dir}/no-such-dir"], "no-such-dir"),
])
def test_bad_calibration_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                     message: str) -> None:
    src = tiny_export("torchscript")
    calib_npz(src, tmp_path / "calib.npz", samples=1)
    np.savez(tmp_path / "wrong.npz", memory=np.zeros((1, 2), np.float32))
    out = tmp_path / "q.onnx"
    code = main(["rewrite", str(src), "-o", str(out), "--precision", "int8",
                 *[e.format(dir=tmp_path) for e in extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_calibration_without_a_user_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny_export("torchscript")
    code = main(["rewrite", str(src), "-o", str(tmp_path / "h.onnx"), "--precision", "fp16",
                 "--calib", str(calib_npz(src, tmp_path / "c.npz", samples=1))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has no effect" in err and len(err.splitlines()) == 1


def test_an_int8_model_is_not_quantized_again(tiny_tggbc: tuple[Path, Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rewrite", str(tiny_tggbc[1]), "-o", str(tmp_path / "again.onnx"), "--precision", "int8-dynamic"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already quantized" in err and len(err.splitlines()) == 1


def test_bench_all_times_four_variants(tiny_tggbc: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from edgeprune.runners.bench import BenchOptions, benchmark

    report = benchmark([tiny_tggbc[0]], BenchOptions(warmup=0, repeats=2, threads=1), precision="all")
    labels = [(m.spec.name, m.spec.precision) for m in report.models]
    assert labels == [("p32-fp32", "fp32"), ("p32-fp16", "fp16"), ("p32-int8", "int8"),
                      ("p32-int8-dynamic", "int8-dynamic")]
    assert all(len(m.samples_ms) == 2 for m in report.models)


# ---------------------------------------------------------------- --int8-sensitivity
def outlier_model(path: Path) -> Path:
    """x [64, 16]: column 0 spans +-1000, the others +-1. ``fine`` reads only the small columns
    (per-tensor activation quantization at step ~8 wipes them out: sensitive), ``coarse`` reads
    mostly column 0 (its error is small against its own output range)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    fine = rng.standard_normal((16, 8)).astype(np.float32)
    fine[0] = 0.0
    coarse = (0.01 * rng.standard_normal((16, 8))).astype(np.float32)
    coarse[0] = 1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_fine"], ["y_fine"], name="fine"),
         helper.make_node("MatMul", ["x", "w_coarse"], ["y_coarse"], name="coarse")],
        "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 8]) for n in ("y_fine", "y_coarse")],
        [numpy_helper.from_array(fine, "w_fine"), numpy_helper.from_array(coarse, "w_coarse")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def outlier_feeds(n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        x = rng.uniform(-1, 1, (64, 16)).astype(np.float32)
        x[:, 0] *= 1000.0
        out.append({"x": x})
    return out


def test_sensitivity_keeps_float_the_gemm_whose_outputs_int8_would_wreck(tmp_path: Path) -> None:
    from edgeprune.passes.precision.sensitivity import relative_deviation

    model = onnx.load(str(outlier_model(tmp_path / "o.onnx")))
    x = outlier_feeds()
    config = int8.Int8Config(dynamic=True, sensitivity=0.05)
    quantized, kept = int8.quantize_int8(model, config, x)
    sensitive = [k for k in kept if k.reason.startswith(int8.SENSITIVE_REASON)]
    assert [k.name for k in sensitive] == ["fine"], kept
    assert "of its range (> 0.05)" in sensitive[0].reason
    ops = {n.name: n.op_type for n in quantized.graph.node}
    assert ops["fine"] == "MatMul" and "coarse" not in ops            # coarse became int8, fine stayed float
    all_int8, _ = int8.quantize_int8(model, int8.Int8Config(dynamic=True), x)
    ref = [run(model, f) for f in x]
    worst_all = relative_deviation([run(all_int8, f) for f in x], ref)
    worst_kept = relative_deviation([run(quantized, f) for f in x], ref)
    assert worst_all > 0.05 > worst_kept, (worst_all, worst_kept)


@pytest.mark.parametrize("extra, message", [
    (["--int8-sensitivity", "0.05"], "--int8-sensitivity measures on real inputs"),
    (["--int8-sensitivity", "1.5", "--calib", "{calib}"], "not in (0, 1)"),
    (["--calib", "{calib}"], "has no effect"),                           # dynamic without probes reads no inputs
])
def test_sensitivity_needs_inputs_and_a_fraction(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 extra: list[str], message: str) -> None:
    src = tiny_export("torchscript")
    calib = calib_npz(src, tmp_path / "c.npz", samples=1)
    out = tmp_path / "q.onnx"
    code = main(["rewrite", str(src), "-o", str(out), "--precision", "int8-dynamic",
                 *[e.format(calib=calib) for e in extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cli_sensitivity_on_a_decoder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tiny_export("torchscript")
    calib = calib_npz(src, tmp_path / "c.npz", samples=2)
    with caplog.at_level(logging.INFO, logger="edgeprune.passes"):
        assert main(["rewrite", str(src), "-o", str(tmp_path / "s.onnx"), "--precision", "int8-dynamic",
                     "--int8-sensitivity", "0.001", "--calib", str(calib), "--no-verify"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("int8 sensitivity: quantizing") for m in messages)
    summary = next(m for m in messages if m.startswith("int8 (dynamic"))
    assert "kept float" in summary and "sensitive GEMM" in summary      # at 0.1 % of the range some GEMM is


def test_each_probe_quantizes_its_node_alone_even_with_int8_attention(tmp_path: Path) -> None:
    """With --int8-attention the final run quantizes activation x activation MatMuls too; a probe
    must still exclude them, or every node's deviation would include theirs."""
    from onnx import helper

    from edgeprune.passes.precision.sensitivity import probe

    model = onnx.load(str(outlier_model(tmp_path / "o.onnx")))
    model.graph.node.append(helper.make_node("Transpose", ["y_fine"], ["y_t"], name="t"))
    model.graph.node.append(helper.make_node("MatMul", ["y_coarse", "y_t"], ["gram"], name="gram"))
    model.graph.output.append(helper.make_empty_tensor_value_info("gram"))
    onnx.save(model, str(tmp_path / "g.onnx"))
    seen: list[list[str]] = []

    def spy(src: Path, dst: Path, config: int8.Int8Config, exclude: list[str], feeds: object) -> None:
        seen.append(sorted(exclude))
        int8._quantize(src, dst, config, exclude, feeds)

    config = int8.Int8Config(dynamic=True, attention=True, sensitivity=0.05)
    found = probe(tmp_path / "g.onnx", config, [], outlier_feeds(), spy)
    assert sorted(s.name for s in found) == ["coarse", "fine"]              # weight GEMMs only: "gram" is not one
    assert seen == [["coarse", "gram"], ["fine", "gram"]]
    assert max(found, key=lambda s: s.deviation).name == "fine"


def test_static_int8_with_sensitivity_keeps_the_same_node_float(tmp_path: Path) -> None:
    model = onnx.load(str(outlier_model(tmp_path / "o.onnx")))
    config = int8.Int8Config(sensitivity=0.05)
    quantized, kept = int8.quantize_int8(model, config, outlier_feeds(4))
    assert [k.name for k in kept if k.reason.startswith(int8.SENSITIVE_REASON)] == ["fine"]
    assert {n.name: n.op_type for n in quantized.graph.node}["fine"] == "MatMul"


def test_sensitivity_out_of_range_and_without_int8_are_refused(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(int8.ParameterError, match="not in"):
        int8.Int8Config(sensitivity=0.0)
    src = tiny_export("torchscript")
    out = tmp_path / "h.onnx"
    code = main(["rewrite", str(src), "-o", str(out), "--precision", "fp16", "--int8-sensitivity", "0.05"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has no effect with --precision fp16" in err and len(err.splitlines()) == 1
    assert not out.exists()
