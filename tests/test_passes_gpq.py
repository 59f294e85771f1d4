"""GPQ graph pass: the shrunk ONNX graph computes exactly the torch head restricted to the kept queries.

Oracle: ``head(**x, query_indices=kept)`` (= ``head.select_queries(kept)(**x_small)``, checked
on a small head here too). Kept indices come from real ``GPQPruner`` runs and from the one-shot
calibration ranking. Graphs are plain ``torch.onnx.export`` files (TorchScript opset 17,
dynamo opset 18, with and without onnxsim), so the query axis is found by following the graph,
and one edgeprune export exercises the decoder-map path.

The preset matrix covers, per preset, both exporters x both batches and both exporters x
with/without onnxsim in four exports (pairwise); ``EDGEPRUNE_GPQ_FULL_MATRIX=1`` runs all eight.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeprune.cli.main import main
from edgeprune.errors import ModelNotFoundError, ParameterError
from edgeprune.methods import gpq as gpq_methods
from edgeprune.models.config import DecoderConfig
from edgeprune.models.decoder import PETRHead
from edgeprune.passes import registry
from edgeprune.passes.queries import gpq
from edgeprune.passes.queries.axes import QueryAxisError
from model_cache import decoder_model, exported_decoder

# preset -> decoder layers: the same exports the tgGBC tests use (model_cache shares them per session)
LAYERS = {"petr-r50-800x320": 3, "streampetr-r50-704x256": 3, "streampetr-vov-1600x640": 2}
PRESETS = tuple(LAYERS)               # 6000, 4224 and 24000 keys
ONE_SHOT_PRESETS = (pytest.param(PRESETS[0], marks=pytest.mark.slow), PRESETS[1])   # not the 24000-key one:
# ranking runs the full 900-query graph; the quick run keeps the 4224-key preset (exports shared with tgGBC)
PAIRWISE = (("torchscript", False, 1), ("torchscript", True, 2), ("dynamo", False, 2), ("dynamo", True, 1))
FULL = tuple((e, s, b) for e in ("torchscript", "dynamo") for s in (False, True) for b in (1, 2))
VARIANTS = FULL if os.environ.get("EDGEPRUNE_GPQ_FULL_MATRIX") == "1" else PAIRWISE
ATOL = 1e-4


# ----------------------------------------------------------------------------- helpers
class HeadModule(torch.nn.Module):
    """A bare PETRHead as an exportable module (inputs in ``input_names()`` order)."""

    def __init__(self, head: PETRHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(**dict(zip(self.head.input_names(), inputs)))
        return out.all_cls_scores, out.all_bbox_preds


def export_head(head: PETRHead, x: dict[str, torch.Tensor], path: Path,
                exporter: str = "torchscript") -> onnx.ModelProto:
    kwargs: dict[str, Any] = dict(input_names=list(x), output_names=["all_cls_scores", "all_bbox_preds"])
    if exporter == "dynamo":
        kwargs.update(opset_version=18, dynamo=True, verbose=False, report=False, verify=False)
    else:
        kwargs.update(opset_version=17, dynamo=False)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(HeadModule(head), tuple(x.values()), str(path), **kwargs)
    return onnx.load(str(path))


def pruner_kept(head: PETRHead, num_to_prune: int, num_keys: int, batch: int = 2, seed: int = 1) -> list[int]:
    """A real GPQPruner run (interval 1) on random inputs; the head is key-count agnostic."""
    pruner = gpq_methods.GPQPruner(head.cfg.total_queries, num_to_prune, interval=1)
    with torch.no_grad():
        while not pruner.finished:
            x = head.example_inputs(batch=batch, seed=seed + len(pruner.removed), num_keys=num_keys)
            pruner.record(head(**x, query_indices=pruner.kept_indices).layer_logits[-1])
            pruner.step()
    return pruner.kept_indices


def run_shrunk(model: onnx.ModelProto, report: gpq.ShrinkReport, x: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run the shrunk graph on the original inputs, propagated queries cut to the kept ones."""
    import onnxruntime as ort

    feeds = {k: v.numpy() for k, v in x.items()}
    for name, axis, positions in report.io_selections:
        if name in feeds:
            feeds[name] = np.take(feeds[name], positions, axis=axis)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["all_cls_scores", "all_bbox_preds"], feeds)


def all_dims(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor (initializers, Constant outputs, inferred intermediates)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {t.name: tuple(t.dims) for t in inferred.graph.initializer}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        shapes[vi.name] = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
    for node in inferred.graph.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value":
                shapes[node.output[0]] = tuple(a.t.dims)
    return shapes


def assert_shrunk(before: onnx.ModelProto, after: onnx.ModelProto, gone: Sequence[int], new_total: int) -> None:
    """Same ops; no tensor keeps a dimension of the old query counts; outputs carry ``new_total``."""
    onnx.checker.check_model(after)
    assert collections.Counter(n.op_type for n in after.graph.node) == \
        collections.Counter(n.op_type for n in before.graph.node)
    left = {n: s for n, s in all_dims(after).items() if any(d in gone for d in s)}
    assert not left, f"tensors still sized by the old query count {gone}: {list(left.items())[:5]}"
    out = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in after.graph.output}
    assert out["all_cls_scores"][2] == out["all_bbox_preds"][2] == new_total


@functools.lru_cache(maxsize=None)
def preset_kept(preset: str) -> tuple[int, ...]:
    """GPQPruner on the preset's head: 4 iterations at interval 1 (batch 1, 64 keys, to stay fast)."""
    head = decoder_model(preset, LAYERS[preset]).head
    return tuple(pruner_kept(head, num_to_prune=4, num_keys=64, batch=1))


def preset_inputs(preset: str, batch: int) -> dict[str, torch.Tensor]:
    """The preset's seeded batch-2 inputs; batch 1 is their first element (as the oracle's)."""
    x = decoder_model(preset, LAYERS[preset]).example_inputs(batch=2)
    return {k: v[:batch] for k, v in x.items()}


@functools.lru_cache(maxsize=None)
def oracle(preset: str, kept: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``head(**x, query_indices=kept)`` on the batch-2 inputs: [L, 2, len(kept), C|code]."""
    with torch.no_grad():
        out = decoder_model(preset, LAYERS[preset]).head(**preset_inputs(preset, 2), query_indices=list(kept))
    return out.all_cls_scores.numpy(), out.all_bbox_preds.numpy()


def check_preset(preset: str, exporter: str, simplify: bool, batch: int, kept: Sequence[int]) -> None:
    cfg = decoder_model(preset, LAYERS[preset]).head.cfg
    before = onnx.load(str(exported_decoder(preset, exporter, batch, LAYERS[preset], simplify=simplify)))
    after, report = gpq.shrink_queries(before, kept)
    learned_changed = cfg.num_propagated and report.learned_after != cfg.num_queries
    gone = [cfg.total_queries] + ([cfg.num_queries] if learned_changed else [])   # 900 (and StreamPETR's 644)
    assert_shrunk(before, after, gone, len(kept))
    cls, box = run_shrunk(after, report, preset_inputs(preset, batch))
    want_cls, want_box = oracle(preset, tuple(kept))
    np.testing.assert_allclose(cls, want_cls[:, :batch], rtol=0, atol=ATOL)
    np.testing.assert_allclose(box, want_box[:, :batch], rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- presets (acceptance)
@pytest.mark.slow
@pytest.mark.parametrize("exporter,simplify,batch", VARIANTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_matches_torch_on_pruner_kept_queries(preset: str, exporter: str, simplify: bool, batch: int) -> None:
    kept = preset_kept(preset)
    assert len(kept) == 896
    check_preset(preset, exporter, simplify, batch, kept)


@pytest.mark.parametrize("exporter,simplify,batch", [   # the quick run keeps the exports tgGBC's quick run makes
    v if v in (("torchscript", False, 1), ("dynamo", False, 2)) else pytest.param(*v, marks=pytest.mark.slow)
    for v in VARIANTS])
@pytest.mark.parametrize("preset", ONE_SHOT_PRESETS)
def test_preset_matches_torch_on_one_shot_kept_queries(preset: str, exporter: str, simplify: bool, batch: int,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    model = onnx.load(str(exported_decoder(preset, exporter, batch, LAYERS[preset], simplify=simplify)))
    rows = {k: v.numpy() for k, v in decoder_model(preset, LAYERS[preset]).example_inputs(batch=2, seed=5).items()}
    # the same two calibration rows: one [B=2] sample, or two [S=2, B=1] samples (same mean score)
    calib = rows if batch == 2 else {k: v[:, None] for k, v in rows.items()}
    with caplog.at_level("WARNING"):
        kept = gpq.rank_queries_one_shot(model, calib, keep=300)
    assert gpq_methods.ONE_SHOT_WARNING in caplog.text
    assert len(kept) == 300 and kept == sorted(set(kept))
    if "streampetr" in preset:
        assert any(i >= 644 for i in kept) and any(i < 644 for i in kept)
    check_preset(preset, exporter, simplify, batch, kept)


# ----------------------------------------------------------------------------- small heads
SMALL = dict(num_layers=2, embed_dims=32, num_heads=4, ffn_dims=64)


def small_head(temporal: bool, **changes: Any) -> PETRHead:
    """28 queries (StreamPETR-like: 20 learned + 8 propagated, 6 temporal tokens), 60 keys; seeded."""
    torch.manual_seed(3)
    extra = dict(num_queries=20, num_propagated=8, memory_len=14) if temporal else dict(num_queries=28)
    return PETRHead(DecoderConfig(**{**SMALL, **extra, **changes}), num_keys=60).eval()


@functools.lru_cache(maxsize=None)
def _small_export_bytes(temporal: bool, batch: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        head = small_head(temporal)
        return export_head(head, head.example_inputs(batch=batch), Path(tmp) / "s.onnx").SerializeToString()


def small_export(temporal: bool, batch: int) -> onnx.ModelProto:
    """TorchScript export of ``small_head(temporal)`` at ``batch`` (exported once per session)."""
    return onnx.load_from_string(_small_export_bytes(temporal, batch))


@pytest.mark.parametrize("temporal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_small_head_equals_selected_head_after_full_pruner_run(temporal: bool, tmp_path: Path) -> None:
    """Pruner run to the end; the shrunk graph equals both oracles, batch 2. (On this random
    StreamPETR head the pruner removes every propagated query: prev_query becomes [B, 0, E].)"""
    head = small_head(temporal)
    kept = pruner_kept(head, num_to_prune=19, num_keys=60)
    x = head.example_inputs(batch=2)
    before = small_export(temporal, 2)
    after, report = gpq.shrink_queries(before, kept)
    assert_shrunk(before, after, [28] + ([20] if temporal else []), 9)
    cls, box = run_shrunk(after, report, x)
    learned = [i for i in kept if i < head.cfg.num_queries]
    prop = [i - head.cfg.num_queries for i in kept if i >= head.cfg.num_queries]
    x_small = dict(x)
    if temporal:
        x_small["prev_query"], x_small["prev_ref"] = x["prev_query"][:, prop], x["prev_ref"][:, prop]
        assert report.learned_after == len(learned) and report.propagated_after == len(prop)
    with torch.no_grad():
        small = head.select_queries(kept)(**x_small)
        restricted = head(**x, query_indices=kept)
    for got, want in ((cls, small.all_cls_scores), (box, small.all_bbox_preds),
                      (cls, restricted.all_cls_scores), (box, restricted.all_bbox_preds)):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_multihead_attention_layouts(exporter: str, tmp_path: Path) -> None:
    """nn.MultiheadAttention exports fold queries with batch and heads ([Nq, B*h, d], [Nq*B, E])."""
    head = small_head(True, attention="torch")
    x = head.example_inputs(batch=2)
    before = export_head(head, x, tmp_path / "mha.onnx", exporter)
    kept = [0, 2, 3, 7, 11, 19, 22, 26]
    after, report = gpq.shrink_queries(before, kept)
    assert_shrunk(before, after, [28, 20], 8)
    cls, box = run_shrunk(after, report, x)
    with torch.no_grad():
        want = head(**x, query_indices=kept)
    np.testing.assert_allclose(cls, want.all_cls_scores.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(box, want.all_bbox_preds.numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_equal_dimensions_are_told_apart_structurally(exporter: str, tmp_path: Path) -> None:
    """Queries = embed width = keys = 32 and batch 2: a number-matching rewrite would be ambiguous.

    The dynamo export shares one [2, 32, 4, 8] reshape constant between query and key paths:
    the query users get their own rewritten copy, the key users keep the original."""
    head = small_head(False, num_queries=32)
    x = head.example_inputs(batch=2, num_keys=32)
    before = export_head(head, x, tmp_path / "eq.onnx", exporter)
    kept = list(range(1, 32, 2))
    after, report = gpq.shrink_queries(before, kept)
    assert (report.shape_copies > 0) == (exporter == "dynamo")
    shapes = all_dims(after)
    assert shapes["memory"] == (2, 32, 32) and shapes["all_cls_scores"] == (2, 2, 16, 10)
    cls, box = run_shrunk(after, report, x)
    with torch.no_grad():
        want = head(**x, query_indices=kept)
    np.testing.assert_allclose(cls, want.all_cls_scores.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(box, want.all_bbox_preds.numpy(), rtol=0, atol=ATOL)


def test_one_shot_ranking_equals_torch_ranking_over_samples(tmp_path: Path) -> None:
    head = small_head(True)
    xs = [head.example_inputs(batch=2, seed=s) for s in (7, 8, 9)]
    model = small_export(True, 2)
    calib = {k: np.stack([x[k].numpy() for x in xs]) for k in xs[0]}        # [S=3, B, ...]
    with torch.no_grad():
        want = gpq_methods.rank_queries_one_shot([head(**x).layer_logits[-1] for x in xs], keep=10)
    assert gpq.rank_queries_one_shot(model, calib, keep=10) == want
    with pytest.raises(ParameterError, match=r"--keep-queries must be in \[1, 28\]"):
        gpq.rank_queries_one_shot(model, calib, keep=29)
    with pytest.raises(ParameterError, match="missing \\['temp_pos'\\]"):
        gpq.rank_queries_one_shot(model, {k: v for k, v in calib.items() if k != "temp_pos"}, keep=3)


def test_decoder_map_export_is_shrunk_and_map_updated(tmp_path: Path) -> None:
    """An edgeprune export (decoder map in metadata, onnxsim): seeds from the map, map rewritten."""
    from edgeprune.export.decoder_map import read_decoder_map
    from edgeprune.export.exporter import export_onnx
    from edgeprune.models.build import build_model
    from edgeprune.models.presets import get_preset

    preset = get_preset("streampetr-r50-704x256").with_decoder(**SMALL, num_queries=20, num_propagated=8,
                                                                memory_len=14)
    model = build_model(preset, num_layers=2)
    export_onnx(model, tmp_path / "m.onnx", batch=2)
    before = onnx.load(str(tmp_path / "m.onnx"))
    kept = [0, 3, 4, 9, 19, 20, 27]
    after, report = gpq.shrink_queries(before, kept)
    dmap = read_decoder_map(after)
    assert dmap is not None and (dmap.num_queries, dmap.num_learned_queries) == (7, 5)
    assert all(layer.logits is None or layer.logits.shape[1] == 7 for layer in dmap.layers)
    cls, box = run_shrunk(after, report, model.example_inputs(batch=2))
    with torch.no_grad():
        want = model.head(**model.example_inputs(batch=2), query_indices=kept)
    np.testing.assert_allclose(cls, want.all_cls_scores.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(box, want.all_bbox_preds.numpy(), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- bad input
def test_keep_index_files_round_trip_and_fail_clearly(tmp_path: Path) -> None:
    for name in ("k.json", "k.npy"):
        gpq.save_keep_indices(tmp_path / name, [5, 1, 3])
        assert gpq.load_keep_indices(tmp_path / name) == [1, 3, 5]
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        gpq.load_keep_indices(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ParameterError, match="1-D list of integers"):
        gpq.load_keep_indices(tmp_path / "bad.json")


@pytest.mark.parametrize("kept,message", [
    ([0, 28], r"query index 28 is out of range: this graph has 28 queries"),
    ([-1, 2], r"query index -1 is out of range"),
    ([1, 2, 2], r"query index 2 is listed twice"),
    ([], r"no queries to keep"),
])
def test_bad_indices_are_user_errors(kept: list[int], message: str) -> None:
    model = small_export(True, 2)
    with pytest.raises(ParameterError, match=message):
        gpq.shrink_queries(model, kept)


@pytest.fixture
def cli_model(tmp_path: Path) -> tuple[Path, PETRHead]:
    """A small StreamPETR-like head exported to ``tmp_path/in.onnx``."""
    assert registry.METHODS["gpq"] == "edgeprune.passes.queries.gpq:QueryPruningPass"
    onnx.save(small_export(True, 2), str(tmp_path / "in.onnx"))
    return tmp_path / "in.onnx", small_head(True)


def test_cli_keep_indices_and_one_shot(cli_model: tuple[Path, PETRHead], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    src, head = cli_model
    gpq.save_keep_indices(tmp_path / "kept.npy", [1, 2, 3, 10, 21, 27])
    assert main(["rewrite", str(src), "-o", str(tmp_path / "a.onnx"), "--method", "gpq",
                 "--keep-indices", str(tmp_path / "kept.npy")]) == 0
    out = onnx.load(str(tmp_path / "a.onnx"))
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in out.graph.input}
    assert dims["prev_query"] == [2, 2, 32] and dims["prev_ref"] == [2, 2, 3]
    x = head.example_inputs(batch=2)
    np.savez(tmp_path / "calib.npz", **{k: v.numpy() for k, v in x.items()})
    capsys.readouterr()
    assert main(["rewrite", str(src), "-o", str(tmp_path / "b.onnx"), "--method", "gpq", "--keep-queries", "22",
                 "--calib", str(tmp_path / "calib.npz")]) == 0
    assert gpq_methods.ONE_SHOT_WARNING in capsys.readouterr().err
    out_dims = [d.dim_value for d in onnx.load(str(tmp_path / "b.onnx")).graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == [2, 2, 22, 10]


@pytest.mark.parametrize("args,message", [
    (["--keep-indices", "{dir}/missing.json"], "keep-indices file .*missing.json does not exist"),
    (["--keep-indices", "{dir}/range.json"], "query index 99 is out of range"),
    (["--keep-indices", "{dir}/dup.json"], "query index 3 is listed twice"),
    (["--keep-queries", "29", "--calib", "{dir}/calib.npz"], r"--keep-queries must be in \[1, 28\]"),
    (["--keep-queries", "5"], "--keep-queries K needs --calib X.npz"),
    (["--keep-queries", "0", "--calib", "{dir}/calib.npz"], "--keep-queries must be >= 1"),
    ([], "needs either --keep-indices FILE or --keep-queries K"),
])
def test_cli_errors_are_one_line_exit_2_no_output(cli_model: tuple[Path, PETRHead], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], args: list[str],
                                                  message: str) -> None:
    src, head = cli_model
    (tmp_path / "range.json").write_text(json.dumps([0, 99]))
    (tmp_path / "dup.json").write_text(json.dumps([3, 3, 25]))
    np.savez(tmp_path / "calib.npz", **{k: v.numpy() for k, v in head.example_inputs(batch=2).items()})
    capsys.readouterr()
    argv = ["rewrite", str(src), "-o", str(tmp_path / "out.onnx"), "--method", "gpq"]
    assert main(argv + [a.format(dir=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeprune rewrite: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out.onnx").exists()


# ----------------------------------------------------------------------------- graphs GPQ cannot follow
def _graph(nodes: list[Any], inits: dict[str, np.ndarray], out_shape: list[int],
           extra_outputs: Sequence[Any] = ()) -> onnx.ModelProto:
    """x [1, 4, 2] -> ... -> all_cls_scores [1, 1, 4, 2]; per-query constants in ``inits``."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2])],
        [helper.make_tensor_value_info("all_cls_scores", TensorProto.FLOAT, out_shape), *extra_outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _to_scores(src: str) -> list[Any]:
    return [helper.make_node("Unsqueeze", [src, "ax0"], ["all_cls_scores"])]


AX0 = {"ax0": np.array([0], np.int64)}


def test_graph_selecting_queries_by_index_is_refused() -> None:
    """Gather with constant indices along the query axis: which rows survive is not ours to decide."""
    nodes = [helper.make_node("Gather", ["x", "idx"], ["picked"], axis=1)] + _to_scores("x")
    model = _graph(nodes, {"idx": np.array([0, 2], np.int64), **AX0}, [1, 1, 4, 2],
                   [helper.make_tensor_value_info("picked", TensorProto.FLOAT, [1, 2, 2])])
    with pytest.raises(QueryAxisError, match="Gather node .* picks entries along a query axis"):
        gpq.shrink_queries(model, [0, 1])


def test_per_query_gather_indices_are_sliced() -> None:
    """A per-query index constant (one table row per query) is itself per-query data: sliced, exact."""
    nodes = [helper.make_node("Gather", ["table", "idx"], ["picked"], axis=0),    # [6, 2] -> [4, 2]
             helper.make_node("Add", ["x", "picked"], ["y"])] + _to_scores("y")
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    model = _graph(nodes, {"table": table, "idx": np.array([5, 2, 3, 0], np.int64), **AX0}, [1, 1, 4, 2])
    after, report = gpq.shrink_queries(model, [1, 3])
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal((1, 4, 2)).astype(np.float32)
    got = ort.InferenceSession(after.SerializeToString()).run(None, {"x": x[:, [1, 3]]})[0]
    np.testing.assert_array_equal(got, (x + table[[5, 2, 3, 0]])[None][:, :, [1, 3]])


def test_unconnected_per_query_constant_is_refused_not_guessed() -> None:
    """A second output [4] has the query count but no structural link to the queries."""
    nodes = [helper.make_node("Add", ["x", "pq"], ["y"]), helper.make_node("Identity", ["other"], ["aux"])] \
        + _to_scores("y")
    model = _graph(nodes, {"pq": np.ones((4, 2), np.float32), "other": np.ones(4, np.float32), **AX0},
                   [1, 1, 4, 2], [helper.make_tensor_value_info("aux", TensorProto.FLOAT, [4])])
    with pytest.raises(QueryAxisError, match=r"still have an axis of the old query count \[4\]"):
        gpq.shrink_queries(model, [0, 1])


def test_query_axis_split_by_reshape_is_refused() -> None:
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),                  # [1, 4, 2] -> [2, 2, 2]
             helper.make_node("Reshape", ["r", "back"], ["y"])] + _to_scores("y")
    inits = {"shape": np.array([2, 2, 2], np.int64), "back": np.array([1, 4, 2], np.int64), **AX0}
    model = _graph(nodes, inits, [1, 1, 4, 2])
    with pytest.raises(QueryAxisError, match="splits the query axis over several axes"):
        gpq.shrink_queries(model, [0, 1])
