"""export_onnx on small real PETR heads: the recorded decoder map points at real tensors that
hold exactly what the torch head computes, survives a later onnxsim, and the write is atomic."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxsim
import pytest
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from edgeprune.graph import files
from edgeprune.graph.values import model_nbytes
from edgeprune import _lazy
from edgeprune.errors import OutputPathError, ParameterError
from edgeprune.export.decoder_map import DecoderMap, TensorRef, missing_tensors, read_decoder_map
from edgeprune.export.exporter import export_onnx, resolve_options
from edgeprune.export.simplify import simplify_model
from edgeprune.export.validate import ort_session
from edgeprune.models.build import build_model
from edgeprune.models.config import DecoderConfig, ModelPreset

# StreamPETR-shaped but tiny: 20 learned + 6 propagated queries, 48 keys (6 cameras x 2 x 4).
SMALL = DecoderConfig(num_layers=2, embed_dims=32, num_heads=4, ffn_dims=64, num_classes=5,
                      num_queries=20, num_propagated=6, memory_len=10)
SMALL_PRESET = ModelPreset("tiny-streampetr", "streampetr", "resnet18", (64, 32), decoder=SMALL)
NQ, NK = SMALL.total_queries, SMALL_PRESET.num_keys


def _run_with_extra_outputs(path: Path, refs: list[TensorRef], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the saved model on ORT with the recorded intermediate tensors added as outputs."""
    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for ref in refs:
        if ref.name not in present:
            model.graph.output.append(helper.make_tensor_value_info(ref.name, onnx.TensorProto.FLOAT, list(ref.shape)))
            present.add(ref.name)
    tmp = path.with_name("with_extras.onnx")
    onnx.save_model(model, str(tmp))
    session = ort_session(tmp)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))
    values.update(feeds)
    return values


def _torch_tensors(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], object]:
    """memory/key_pos entering the head and the HeadOutput, from the torch model."""
    with torch.no_grad():
        if model.scope == "full":
            memory, key_pos = model.image_tokens(inputs["images"])
            temporal = {k: v for k, v in inputs.items() if k != "images"}
        else:
            memory, key_pos = inputs["memory"], inputs["key_pos"]
            temporal = {k: v for k, v in inputs.items() if k not in ("memory", "key_pos")}
        return {"memory": memory, "key_pos": key_pos}, model.head(memory, key_pos, **temporal)


def _check_map_matches_torch(path: Path, model: nn.Module, dmap: DecoderMap, batch: int) -> None:
    refs = [r for r in dmap.tensor_refs() if r.name not in dmap.inputs]
    inputs = model.example_inputs(batch=batch, seed=7)
    got = _run_with_extra_outputs(path, refs, {k: v.numpy() for k, v in inputs.items()})
    keys, out = _torch_tensors(model, inputs)
    # The backbone's convolutions (full scope) accumulate differently in ORT: memory ~ N(0, 1)
    # differs by up to ~6e-5 there; the decoder's own tensors agree to 2e-5.
    close = dict(rtol=0, atol=1e-4 if model.scope == "full" else 2e-5)
    np.testing.assert_allclose(got[dmap.memory.name], keys["memory"].numpy(), **close)
    np.testing.assert_allclose(got[dmap.key_pos.name], keys["key_pos"].numpy(), **close)
    key_input = (keys["memory"] + keys["key_pos"]).numpy()
    for layer in dmap.layers:
        probs = got[layer.cross_attn_probs.name].reshape(batch, SMALL.num_heads, NQ, NK)   # "(BH)QK" too
        np.testing.assert_allclose(probs, out.cross_attn_probs[layer.index].numpy(), **close)
        logits = got[layer.logits.name].reshape(batch, NQ, SMALL.num_classes)
        np.testing.assert_allclose(logits, out.layer_logits[layer.index].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[layer.key_input.name], key_input, **close)
        np.testing.assert_allclose(got[layer.value_input.name], keys["memory"].numpy(), **close)


def _check_reference_points_recorded(path: Path, model: nn.Module, dmap: DecoderMap) -> None:
    """The learned reference points [20, 3] must be among the recorded query tensors."""
    saved = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in saved.graph.node
                   if n.op_type == "Constant"})
    ref_points = model.head.reference_points.weight.detach().numpy()                    # [20, 3]
    candidates = [q for q in dmap.query_tensors if q.count == SMALL.num_queries and q.shape[-1] == 3]
    assert any(np.array_equal(values[q.name].reshape(-1, SMALL.num_queries, 3),
                              np.broadcast_to(ref_points, (values[q.name].size // ref_points.size,) + ref_points.shape))
               for q in candidates), [q.name for q in dmap.query_tensors]


@pytest.mark.parametrize("exporter, attention, batch, scope", [
    ("torchscript", "manual", 2, "decoder"),
    pytest.param("dynamo", "manual", 1, "decoder", marks=pytest.mark.slow),
    ("torchscript", "torch", 1, "decoder"),
    pytest.param("dynamo", "torch", 2, "decoder", marks=pytest.mark.slow),
    pytest.param("torchscript", "manual", 1, "full", marks=pytest.mark.slow),       # a whole detector
])
def test_decoder_map_points_at_the_torch_tensors(tmp_path: Path, exporter: str, attention: str,
                                                 batch: int, scope: str) -> None:
    model = build_model(SMALL_PRESET, scope, seed=3, attention=attention)
    report = export_onnx(model, tmp_path / "m.onnx", exporter=exporter, batch=batch)
    assert report.validation.passed and report.simplify_note.startswith("onnxsim")
    saved = onnx.load(str(report.path))
    dmap = read_decoder_map(saved)
    assert dmap == report.decoder_map and missing_tensors(saved, dmap) == []
    assert (dmap.num_layers, dmap.num_queries, dmap.num_learned_queries, dmap.num_keys) == (2, NQ, 20, NK)
    assert (dmap.num_heads, dmap.embed_dims, dmap.num_classes, dmap.batch) == (4, 32, 5, batch)
    assert dmap.attention == attention and dmap.scope == scope and dmap.probs_present
    assert dmap.inputs == tuple(model.input_names()) and not any("edgeprune." in o.name for o in saved.graph.output)
    _check_map_matches_torch(report.path, model, dmap, batch)
    _check_reference_points_recorded(report.path, model, dmap)
    resimplified, _ = onnxsim.simplify(saved, check_n=0)
    assert missing_tensors(resimplified, dmap) == []            # names survive a later onnxsim


def test_weights_over_the_protobuf_limit_go_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real > 2 GB export takes minutes and ~8 GB of RAM; lower the limit instead (the
    # decision and the write path are the same code).
    monkeypatch.setattr(files, "PROTOBUF_LIMIT", 10_000)
    monkeypatch.setattr(files, "EXTERNAL_DATA_MARGIN", 0)
    model = build_model(SMALL_PRESET, "decoder", seed=1)
    out = tmp_path / "ext.onnx"
    report = export_onnx(model, out, simplify=False)
    data = tmp_path / "ext.onnx.data"
    assert report.external_data == data and sorted(tmp_path.iterdir()) == [out, data]
    assert report.simplify_note.startswith("skipped") and report.validation.passed
    bare = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in bare.graph.initializer)
    assert report.size_bytes == out.stat().st_size + data.stat().st_size
    onnx.checker.check_model(str(out), full_check=True)
    session = ort_session(out)
    assert [i.name for i in session.get_inputs()] == model.input_names()
    assert missing_tensors(bare, read_decoder_map(bare)) == []


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(exporter="dynamo", opset=17), "needs opset >= 18"),
    (dict(batch=0), "batch must be an integer >= 1"),
    (dict(batch=True), "batch must be an integer >= 1"),
    (dict(exporter="tflite"), "unknown exporter"),
    (dict(opset=21), "use 7..20"),
    (dict(tolerance=0.0), "tolerance must be > 0"),
])
def test_bad_options_are_refused(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ParameterError, match=fragment):
        resolve_options(**kwargs)


def test_defaults_and_refusals_before_any_work(tmp_path: Path) -> None:
    assert resolve_options().opset == 17 and resolve_options("dynamo").opset == 18
    model = build_model(SMALL_PRESET, "decoder")
    with pytest.raises(OutputPathError, match="does not exist"):
        export_onnx(model, tmp_path / "missing_dir" / "m.onnx")
    with pytest.raises(ParameterError):
        export_onnx(model, tmp_path / "m.onnx", batch=0)
    assert list(tmp_path.iterdir()) == []


class WithDropout(nn.Module):
    """Dropout makes train-mode outputs random: the export must run (and validate) in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.BatchNorm1d(16))

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.body(x),)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
        return {"x": torch.randn((batch, 8), generator=torch.Generator().manual_seed(seed))}

    def output_names(self) -> list[str]:
        return ["y"]


@pytest.mark.parametrize("record_structure", [False, True])
def test_training_mode_model_is_exported_in_eval_and_restored(tmp_path: Path, record_structure: bool) -> None:
    model = WithDropout().train()
    stats = model.body[2].running_mean.clone()
    report = export_onnx(model, tmp_path / "d.onnx", batch=4, record_structure=record_structure)
    assert report.validation.passed and report.decoder_map is None
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.body[2].running_mean, stats)        # BatchNorm statistics untouched


def test_simplify_skips_with_a_warning(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(graph)
    with caplog.at_level(logging.WARNING):
        big = simplify_model(model, size_bytes=2**31)
    assert not big.applied and "over 2 GB" in big.note and "over 2 GB" in caplog.text
    assert not simplify_model(model, enabled=False).applied
    real_available = _lazy.available
    monkeypatch.setattr(_lazy, "available", lambda name: False if name == "onnxsim" else real_available(name))
    missing = simplify_model(model)
    assert not missing.applied and "not installed" in missing.note and missing.model is model


def test_model_nbytes_counts_initializers_and_constants() -> None:
    weight = numpy_helper.from_array(np.zeros((10, 10), np.float32), "w")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.zeros(5, np.int64)))
    graph = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("c", onnx.TensorProto.INT64, [5])],
                              [weight])
    assert model_nbytes(helper.make_model(graph)) == 400 + 40
