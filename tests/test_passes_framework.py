"""The pass framework: registry, rewrite driver (checks, verification, atomic output), CLI, FLOPs.

Passes here are small test passes written against the registry contract; the real passes
(tgGBC, GPQ, ToMe, fp16) have their own tests.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import handwritten_decoder as hd
from edgeprune.cli.main import main
from edgeprune.errors import InternalError, InvalidModelError, ModelNotFoundError, ParameterError, \
    PatternNotFoundError
from edgeprune.cli.args import add_key_count_arguments
from edgeprune.graph import files
from edgeprune.passes import driver, registry
from edgeprune.passes.discovery import normalize
from edgeprune.report import flops
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.registry import BasePass, IdentityPass
from edgeprune.passes.verify import compare_models, load_inputs


# ---------------------------------------------------------------- test passes
class DoubleLogitsPass(BasePass):
    """Multiplies every layer's logits by 2 where they enter the stacked class output."""

    name = "double"
    help = "test: double the class logits"
    requires: ClassVar[frozenset[str]] = frozenset({"logits"})

    def apply(self, working: Any, structure: Any) -> None:
        model = working.proto()
        graph = model.graph
        for layer in structure.layers:
            doubled = f"{layer.logits}_x2"
            for node in graph.node:
                if node.op_type in ("Unsqueeze", "Reshape", "Concat"):
                    node.input[:] = [doubled if i == layer.logits else i for i in node.input]
            two = helper.make_tensor(f"{doubled}_two", onnx.TensorProto.FLOAT, [], [2.0])
            graph.initializer.append(two)
            graph.node.append(helper.make_node("Mul", [layer.logits, two.name], [doubled], name=f"test/{doubled}"))
        working.replace(model)


class BrokenPass(BasePass):
    """Produces an invalid graph (an op that does not exist) feeding an output."""

    name = "broken"
    help = "test: break the graph"

    def apply(self, working: Any, structure: Any) -> None:
        model = working.proto()
        out = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [f"{o}_orig" if o == out else o for o in node.output]
        model.graph.node.append(helper.make_node("NoSuchOp", [f"{out}_orig"], [out], name="test/broken"))
        working.replace(model)


class MustNotRunPass(BasePass):
    name = "needs-everything"
    help = "test: requires logits"
    requires: ClassVar[frozenset[str]] = frozenset({"probs", "logits"})

    def apply(self, working: Any, structure: Any) -> None:
        raise AssertionError("apply ran although a required part is missing")


class WithOptionsA(BasePass):
    name = "a"
    help = "test pass with an option of its own"

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--only-a", type=int, default=3)


class WithOptionsB(WithOptionsA):
    name = "b"

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--only-b", action="store_true")


class RedefinesR(WithOptionsA):
    name = "c"

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--r", type=int, default=None)


@pytest.fixture
def decoder(tmp_path: Path) -> Path:
    """A writable copy of a simplified TorchScript export of the nn.MultiheadAttention decoder."""
    src = hd.exported("mha", "torchscript", True)
    dst = tmp_path / "decoder.onnx"
    dst.write_bytes(src.read_bytes())
    return dst


def _outputs(path: Path, feeds: dict) -> dict:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _feeds() -> dict:
    inputs = hd.HandDecoder("mha").example_inputs()
    return {k: v.numpy() for k, v in inputs.items()}


# ---------------------------------------------------------------- registry
def test_registry_lists_methods_and_fails_clearly_on_unknown_names() -> None:
    assert "none" in registry.method_names() and registry.get_method("none") is IdentityPass
    assert registry.precision_names()[0] == "fp32" and registry.get_precision("fp32") is None
    with pytest.raises(ParameterError, match="unknown method .nope.; available: .*none"):
        registry.get_method("nope")
    with pytest.raises(ParameterError, match="unknown precision 'fp8'"):
        registry.get_precision("fp8")


def test_passes_read_the_shared_options_and_add_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "METHODS", {"a": f"{__name__}:WithOptionsA", "b": f"{__name__}:WithOptionsB"})
    monkeypatch.setattr(registry, "PRECISIONS", {})
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=registry.method_names())
    add_key_count_arguments(parser)
    registry.add_pass_arguments(parser)
    args = parser.parse_args(["--method", "b", "--r", "7", "--only-b"])
    assert (args.r, args.only_a, args.only_b) == (7, 3, True)
    assert isinstance(registry.build_passes(args)[0], WithOptionsB)


def test_a_pass_redefining_a_shared_option_fails_when_the_parser_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "METHODS", {"c": f"{__name__}:RedefinesR"})
    monkeypatch.setattr(registry, "PRECISIONS", {})
    parser = argparse.ArgumentParser()
    add_key_count_arguments(parser)
    with pytest.raises(argparse.ArgumentError, match="--r"):
        registry.add_pass_arguments(parser)


# ---------------------------------------------------------------- driver
def test_identity_rewrite_reproduces_outputs_exactly(decoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "same.onnx"
    report = driver.rewrite(decoder, out, [IdentityPass()])
    assert report.verification is not None and report.verification.exact
    assert [o.max_abs for o in report.verification.outputs] == [0.0, 0.0]
    assert report.structure.num_layers == 3 and report.passes == ("none",)
    onnx.checker.check_model(str(out))
    feeds = _feeds()
    before, after = _outputs(decoder, feeds), _outputs(out, feeds)   # ORT defaults, a real padding mask
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta[driver.REWRITE_KEY]) == [{"passes": ["none"], "precision": "fp32"}]


def test_verification_reports_the_drift_a_pass_causes(decoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "double.onnx"
    feeds = _feeds()
    report = driver.rewrite(decoder, out, [DoubleLogitsPass()], verify_inputs=feeds)
    drift = {o.name: o for o in report.verification.outputs}
    assert drift["all_bbox_preds"].exact and not drift["all_cls_scores"].exact
    cls = _outputs(decoder, feeds)["all_cls_scores"]
    assert drift["all_cls_scores"].max_abs == pytest.approx(float(np.abs(cls).max()), rel=1e-6)
    assert drift["all_cls_scores"].max_rel == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(_outputs(out, feeds)["all_cls_scores"], 2 * cls, rtol=1e-6)


def test_missing_part_fails_before_the_pass_runs(decoder: Path, tmp_path: Path) -> None:
    model = onnx.load(str(decoder))
    model.graph.output.pop(0)                           # no stacked class output: no logits
    src = tmp_path / "no_cls.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "out.onnx"
    with pytest.raises(PatternNotFoundError, match=r"--method needs-everything needs \d+ decoder parts.*class logits.*"
                                                   r"--override layer\.0\.logits=TENSOR --override layer\.1"):
        driver.rewrite(src, out, [MustNotRunPass()])
    assert not out.exists()


def test_a_broken_pass_is_an_internal_error_and_leaves_no_file(decoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "broken.onnx"
    with pytest.raises(InternalError, match="rewritten model fails onnx.checker"):
        driver.rewrite(decoder, out, [BrokenPass()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]


def test_bad_input_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        files.load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        files.load_model(tmp_path)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07\x12\x05hello\x3a\xff\xff")
    with pytest.raises(InvalidModelError, match="cannot read .*corrupt.onnx as ONNX"):
        files.load_model(corrupt)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InvalidModelError, match="is not an ONNX model"):
        files.load_model(empty)


def test_external_data_output(decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "PROTOBUF_LIMIT", 0)      # as if the model were above 2 GB
    out = tmp_path / "ext.onnx"
    report = driver.rewrite(decoder, out, [IdentityPass()])
    assert report.external_data == "ext.onnx.data" and (tmp_path / "ext.onnx.data").is_file()
    assert report.verification.exact


def test_verification_with_given_inputs(decoder: Path, tmp_path: Path) -> None:
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **_feeds())
    inputs = load_inputs(npz)
    assert compare_models(decoder, decoder, inputs=inputs).exact
    with pytest.raises(ModelNotFoundError, match="inputs file"):
        load_inputs(tmp_path / "none.npz")


# ---------------------------------------------------------------- CLI
def test_cli_rewrite(decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli.onnx"
    assert main(["rewrite", str(decoder), "-o", str(out), "--method", "none"]) == 0
    assert out.is_file() and "all_cls_scores [3, 1, 20, 10]: exact" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "corrupt", "no-decoder", "bad-override", "unwritable"])
def test_cli_rewrite_errors(case: str, decoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out, extra = decoder, tmp_path / "out" / "o.onnx", []
    (tmp_path / "out").mkdir()
    if case == "missing":
        src = tmp_path / "nope.onnx"
    elif case == "corrupt":
        src = tmp_path / "bad.onnx"
        src.write_bytes(b"not an onnx file")
    elif case == "no-decoder":
        src = tmp_path / "plain.onnx"
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), str(src))
    elif case == "bad-override":
        extra = ["--override", "layer.0.probz=x"]
    else:
        out = tmp_path / "no-such-dir" / "o.onnx"
    assert main(["rewrite", str(src), "-o", str(out)] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeprune rewrite: error: ")
    assert not out.exists() and not list((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- FLOPs
def test_flops_reproduce_the_papers_table_7() -> None:
    """tgGBC appendix B, Table 7: decoder cross-attention GFLOPs before and after pruning."""
    stream = flops.DecoderSizes(num_layers=6, num_queries=900, num_keys=24000, embed_dims=256, num_heads=8)
    est = flops.estimate_tggbc(stream, r=21000, n=2, k=175)
    assert est.before.cross_total / 1e9 == pytest.approx(174.91, abs=0.005)
    assert est.after.cross_total / 1e9 == pytest.approx(61.44, rel=0.002)
    assert est.cross_reduction == pytest.approx(0.6488, abs=0.002)
    open_r101 = flops.DecoderSizes(num_layers=6, num_queries=900, num_keys=16896, embed_dims=256, num_heads=8)
    est = flops.estimate_tggbc(open_r101, r=12000, n=2, k=175)
    assert est.before.cross_total / 1e9 == pytest.approx(123.55, abs=0.005)
    assert est.after.cross_total / 1e9 == pytest.approx(58.84, rel=0.003)


def test_keys_per_layer_follow_the_drops() -> None:
    assert flops.keys_per_layer(24000, [10500, 10500, 0, 0, 0, 0]) == [24000, 13500, 3000, 3000, 3000, 3000]


@pytest.mark.parametrize("r,n,k,message", [(-1, 1, 0, ">= 0"), (50, 1, 0, "smaller than the number of keys"),
                                           (10, 4, 0, "exceeds the number of decoder layers"),
                                           (10, 1, 21, "exceeds the number of queries")])
def test_flops_parameter_checks(r: int, n: int, k: int, message: str) -> None:
    sizes = flops.DecoderSizes(num_layers=3, num_queries=20, num_keys=50, embed_dims=32, num_heads=2)
    with pytest.raises(ParameterError, match=message):
        flops.estimate_tggbc(sizes, r, n, k)


# ---------------------------------------------------------------- normalization
class SplitProjectionsPass(BasePass):
    name = "split"
    help = "test: asks for per-layer projections"

    def prepare(self, model: Any) -> Any:
        normalize.split_shared_projections(model)
        return model

    def apply(self, working: Any, structure: Any) -> None:
        consumers = [layer.key_inputs[0].consumer for layer in structure.layers]
        assert len(set(consumers)) == len(consumers), "prepare ran before discovery"


def test_shared_projections_are_split_without_changing_outputs(decoder: Path, tmp_path: Path) -> None:
    merged = discover(onnx.load(str(decoder)))
    consumers = {layer.key_inputs[0].consumer for layer in merged.layers}
    assert len(consumers) == 1                          # onnxsim merged the 3 key projections
    model = onnx.load(str(decoder))
    assert normalize.split_shared_projections(model) >= 1
    assert not [n for n in model.graph.node if n.name in consumers]
    split = discover(model)
    assert len({layer.key_inputs[0].consumer for layer in split.layers}) == 3
    assert [layer.probs.tensor for layer in split.layers] == [layer.probs.tensor for layer in merged.layers]
    report = driver.rewrite(decoder, tmp_path / "split.onnx", [SplitProjectionsPass()], verify_inputs=_feeds())
    assert report.verification.exact


def test_precisions_without_calibration_leave_out_static_int8_only() -> None:
    """`sweep` offers the precisions that need no calibration data: the registry's flag says which."""
    from edgeprune.passes import registry
    all_names = registry.precision_names()
    free = registry.precision_names(calibrated=False)
    assert [n for n in all_names if n not in free] == ["int8"]
    assert registry.get_precision("int8").needs_calibration
    assert not any(registry.get_precision(n).needs_calibration for n in free if n != "fp32")
