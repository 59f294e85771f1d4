"""tgGBC on deployment graphs that output only the last layer: logits recomputed with the shared class head.

The graphs: edgeprune's own decoder exported by ``export_onnx`` (both exporters, batch 1 and
2), then cut to what a deployment export returns: the last layer's scores and boxes only, no
decoder map, earlier class heads removed as dead code. Oracles: the full graph pruned with the
same settings, and the torch reference ``model.head(..., pruning=TgGBCConfig)``.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from model_cache import cache_dir
from test_passes_tggbc import MIN_GAP, peaked_inputs, pruned, run, selection_margin
from edgeprune.errors import PatternNotFoundError
from edgeprune.graph.edit import cleanup
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.discovery.guidance import require_parts
from edgeprune.passes.keys.tggbc import PREFIX

TOL = 1e-4
LAYERS = 3
CONFIG = TgGBCConfig(r=120, n=2, k=10)          # 192 keys: drops [60, 60], 72 keys in the last layer
SEED = 1


@functools.lru_cache(maxsize=None)
def tiny_model() -> Any:
    """A small focalpetr decoder (192 keys, 40 queries, width 64): exports in seconds."""
    from edgeprune.models.build import build_model
    from edgeprune.models.config import DecoderConfig
    from edgeprune.models.presets import get_preset

    preset = dataclasses.replace(get_preset("focalpetr-r18-704x256"), name="tiny-head", image_size=(128, 64),
                                 decoder=DecoderConfig(num_layers=LAYERS, num_queries=40, ffn_dims=128,
                                                       embed_dims=64, num_heads=4))
    return build_model(preset, "decoder")


@functools.lru_cache(maxsize=None)
def exports(exporter: str, batch: int) -> tuple[Path, Path]:
    """(full export with all layers' outputs, its final-layer-only version)."""
    from edgeprune.export.exporter import export_onnx

    full = cache_dir() / f"class-head-{exporter}-b{batch}.onnx"
    export_onnx(tiny_model(), full, exporter=exporter, batch=batch)
    final = full.with_name(full.stem + "-final.onnx")
    onnx.save(final_layer_only(onnx.load(str(full))), str(final))
    return full, final


def final_layer_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Outputs ``cls_scores``/``bbox_preds``: the last layer's [B, Nq, C] (the stack's last input),
    no decoder map; earlier layers' heads become dead and are removed."""
    keep = [p for p in model.metadata_props if p.key != "edgeprune.decoder_map"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    producer = {o: n for n in model.graph.node for o in n.output}
    renames = {}
    for stacked, name in (("all_cls_scores", "cls_scores"), ("all_bbox_preds", "bbox_preds")):
        unsqueeze = producer[producer[stacked].input[-1]]                 # [1, B, Nq, C] of the last layer
        renames[unsqueeze.input[0]] = name
    for node in model.graph.node:
        node.input[:] = [renames.get(t, t) for t in node.input]
        node.output[:] = [renames.get(t, t) for t in node.output]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in renames.values())
    return onnx.shape_inference.infer_shapes(cleanup(model))          # outputs typed, as an exporter writes them


@functools.lru_cache(maxsize=None)
def reference(cfg: TgGBCConfig) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """Torch tgGBC at batch 2 (batch 1 is its first element): inputs, last layer's scores and boxes, margin."""
    model = tiny_model()
    inputs = peaked_inputs(model.head, 2, SEED)
    with torch.no_grad():
        out = model.head(**inputs, pruning=cfg)
    margin = selection_margin(out.layer_logits, out.cross_attn_probs, cfg)
    return ({k: v.numpy() for k, v in inputs.items()}, out.all_cls_scores[-1].numpy(),
            out.all_bbox_preds[-1].numpy(), margin)


@pytest.mark.parametrize("exporter,batch", [
    pytest.param("torchscript", 2, id="torchscript-b2"),
    pytest.param("torchscript", 1, id="torchscript-b1", marks=pytest.mark.slow),
    pytest.param("dynamo", 1, id="dynamo-b1", marks=pytest.mark.slow),
    pytest.param("dynamo", 2, id="dynamo-b2", marks=pytest.mark.slow),
])
def test_final_layer_only_graph_prunes_like_the_full_graph(exporter: str, batch: int, tmp_path: Path) -> None:
    inputs, cls, box, margin = reference(CONFIG)
    assert margin >= MIN_GAP, f"near tie in the reference selection (gap {margin:.1e}): choose another seed"
    inputs, cls, box = {k: v[:batch] for k, v in inputs.items()}, cls[:batch], box[:batch]
    full, final = exports(exporter, batch)

    structure = discover(onnx.load(str(final)))
    head = structure.class_head
    assert head is not None and structure.source == "matched"
    assert [layer.logits_recomputed for layer in structure.layers] == [True] * (LAYERS - 1) + [False]
    assert structure.layers[-1].logits == head.exit == "cls_scores"

    out = pruned(final, tmp_path / "pf.onnx", CONFIG)
    pruned(full, tmp_path / "pt.onnx", CONFIG)
    got, want = run(tmp_path / "pf.onnx", inputs), run(tmp_path / "pt.onnx", inputs)
    unpruned = run(final, inputs)
    np.testing.assert_allclose(got[0], want[0][-1], rtol=0, atol=TOL, err_msg="scores vs the full graph pruned")
    np.testing.assert_allclose(got[1], want[1][-1], rtol=0, atol=TOL, err_msg="boxes vs the full graph pruned")
    np.testing.assert_allclose(got[0], cls, rtol=0, atol=TOL, err_msg="scores vs torch tgGBC")
    np.testing.assert_allclose(got[1], box, rtol=0, atol=TOL, err_msg="boxes vs torch tgGBC")
    assert np.abs(unpruned[0] - got[0]).max() > 0.05                  # pruning changed the result clearly

    ops = collections.Counter(n.name.split("/")[2] for n in out.graph.node
                              if n.name.startswith(PREFIX) and "/class_head/" in n.name)
    assert ops == {"class_head": 2 * len(head.nodes)}                 # one copy for each pruning layer


def test_missing_logits_are_asked_for_all_layers_at_once() -> None:
    """Without a scores output there is no head to copy: one error names every layer's logits."""
    model = onnx.load(str(exports("torchscript", 2)[1]))
    kept = [o for o in model.graph.output if o.name != "cls_scores"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    structure = discover(cleanup(model))
    assert structure.class_head is None
    flags = " ".join(f"--override layer.{i}.logits=TENSOR" for i in range(LAYERS))
    with pytest.raises(PatternNotFoundError, match=f"needs {LAYERS} decoder parts.*: {flags}$"):
        require_parts(structure, ["probs", "key", "value", "logits"], "--method tggbc")


def test_inspect_shows_which_logits_are_recomputed(capsys: pytest.CaptureFixture) -> None:
    from edgeprune.cli.main import main

    final = str(exports("torchscript", 2)[1])
    capsys.readouterr()
    assert main(["inspect", final, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    structure = discover(onnx.load(final))
    assert info["class_head"]["recomputes_layers"] == list(range(LAYERS - 1))
    assert info["class_head"]["nodes"] == list(structure.class_head.nodes)
    sources = [layer["logits_source"] for layer in info["layers"]]
    assert sources[-1] == "in the graph"
    assert sources[:-1] == [f"recomputed with the shared class head from {layer.head_input}"
                            for layer in structure.layers[:-1]]
    assert main(["inspect", final]) == 0
    text = capsys.readouterr().out
    assert "class head: " in text and "layer 0 logits: recomputed with the shared class head" in text
