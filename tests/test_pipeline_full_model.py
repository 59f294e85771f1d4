"""Whole model (images in) exported WITH onnxsim, then tgGBC-rewritten: equals the torch oracle.

onnxsim fuses Reshape(Reshape(x)) past the recorded ``memory`` tensor, so the value
projections read a tensor without a key axis; the exporter re-anchors them (record.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeprune.export.exporter import export_onnx
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.models.build import build_model
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys.tggbc import KeyPruningPass


@pytest.mark.slow
def test_simplified_whole_model_rewrites_and_matches_torch(tmp_path: Path) -> None:
    model = build_model("focalpetr-r18-704x256", "full", seed=0, num_layers=2)
    report = export_onnx(model, tmp_path / "full.onnx")                 # onnxsim on (default)
    assert report.decoder_map is not None and "onnxsim" in report.simplify_note
    config = TgGBCConfig(r=2000, n=1, k=175)
    rewrite(tmp_path / "full.onnx", tmp_path / "pruned.onnx", [KeyPruningPass(config)])
    inputs = model.example_inputs(batch=1, seed=5)
    with torch.no_grad():
        ref = model.run(**inputs, pruning=config)
    sess = ort.InferenceSession(str(tmp_path / "pruned.onnx"), providers=["CPUExecutionProvider"])
    cls, box = sess.run(["all_cls_scores", "all_bbox_preds"], {k: v.numpy() for k, v in inputs.items()})
    assert [p.shape[-1] for p in ref.cross_attn_probs] == [4224, 2224]
    np.testing.assert_allclose(cls, ref.all_cls_scores.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(box, ref.all_bbox_preds.numpy(), atol=1e-4, rtol=0)
