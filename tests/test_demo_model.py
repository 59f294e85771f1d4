"""The shipped demo detector as a user gets it (`export --model demo`, onnxsim on): its weights
detect on a held-out split, and GPQ on the whole simplified graph equals the torch model with
the same queries (onnxsim turns its batch-1 class Linear into a Gemm on [Nq, C])."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.cli.main import main
from edgeprune.data.synth import generate_dataset
from edgeprune.models.build import build_model
from edgeprune.models.presets import get_preset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.onnx"
    assert main(["export", "--model", "demo", "--scope", "full", "-o", str(path)]) == 0
    return path


def test_shipped_demo_weights_detect_on_a_held_out_split(demo_onnx: Path, tmp_path: Path) -> None:
    """Scenes of a seed never used in training: mAP well above the random initialisation's 0."""
    from edgeprune.evaluation.evaluate import evaluate_model

    assert get_preset("demo").weights == "demo.pt"
    scenes = tmp_path / "scenes"
    generate_dataset(scenes, 20, 9001, get_preset("demo").image_size)
    metrics = evaluate_model(demo_onnx, scenes)
    assert metrics.mean_ap > 0.15, metrics.mean_ap


def test_gpq_on_the_whole_demo_equals_the_torch_model_with_those_queries(demo_onnx: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    kept = list(range(0, 300, 3))
    indices = tmp_path / "kept.json"
    indices.write_text(str(kept))
    small = tmp_path / "gpq.onnx"
    assert main(["rewrite", str(demo_onnx), "-o", str(small), "--method", "gpq", "--keep-indices", str(indices)]) == 0
    model = build_model("demo", "full").eval()
    images = model.example_inputs(seed=5)["images"]
    with torch.no_grad():
        out = model.run(images, query_indices=kept)
    sess = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    cls, boxes = sess.run(["all_cls_scores", "all_bbox_preds"], {"images": images.numpy()})
    assert cls.shape == (6, 1, 100, 4)
    np.testing.assert_allclose(cls, out.all_cls_scores.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, out.all_bbox_preds.numpy(), atol=1e-4, rtol=0)


def test_box_diagnosis_measures_offsets_against_the_reference_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/demo_box_diagnosis.py on the shipped weights: its at-reference baseline is the
    denoising jitter's mean |dx| (uniform in a 1 m disk: 4 / (3 pi) = 0.42 m) and the probe runs."""
    import math
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import demo_box_diagnosis

    scenes = tmp_path / "scenes"
    generate_dataset(scenes, 6, 3, get_preset("demo").image_size)
    model = demo_box_diagnosis.load(None, None)
    args = demo_box_diagnosis.parse_args(["--data", str(scenes), "--scenes", "6"])
    errors, at_ref, feats, offsets = demo_box_diagnosis.collect(model, args)
    assert errors.shape[1] == 10 and len(errors) == len(feats) == len(offsets) > 50
    assert abs(float(at_ref[:, :2].mean()) - 4 / (3 * math.pi)) < 0.1
    assert torch.allclose(at_ref[:, :2], offsets.abs(), atol=1e-3)     # both are |centre - reference|, in metres
    held_out, zero = demo_box_diagnosis.probe(feats, offsets, 0)
    assert math.isfinite(held_out) and zero > 0
    assert demo_box_diagnosis.main(["--data", str(scenes), "--scenes", "2"]) == 0
    assert "predicting 0" in capsys.readouterr().out
    del sys.modules["demo_box_diagnosis"]


def test_key_selection_report_on_the_shipped_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/demo_key_selection.py: random subsets keep about their share of object tokens,
    tgGBC's importance ranks object tokens above chance after layer 0 (the trained demo's layer 0
    attends to objects), the torch mAP is a proper fraction, and the report lands atomically."""
    import json
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "demo_key_selection", raising=False)
    import demo_key_selection

    scenes = tmp_path / "scenes"
    generate_dataset(scenes, 8, 9001, get_preset("demo").image_size)
    assert demo_key_selection.main(["--data", str(scenes), "--r", "528", "--seeds", "2", "--out", str(tmp_path)]) == 0
    out = tmp_path / "demo_key_selection.md"
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["scenes"] >= 6 and result["keys"] == 1056
    for seed in ("random s0", "random s1"):
        assert 0.3 < result["kept"][seed]["528"]["object_tokens"] < 0.7
    assert result["auc"]["S (tgGBC), layer 0"] > 0.7
    assert result["kept"]["tgGBC"]["528"]["object_tokens"] > result["kept"]["random s0"]["528"]["object_tokens"]
    assert all(0 < d["mAP"] <= 1 for d in result["detections"].values())
    assert "## What survives the pruning" in out.read_text()
    # the trained demo's later layers lean on a few fixed tokens (the same ones in most scenes)
    late = result["layers"][-1]["fixed_tokens"]
    assert late["share"] > 0.2 and late["overlap"] > 0.5
    assert all(c < 6 and r < result["grid"][0] and k < result["grid"][1] for c, r, k in late["camera_row_col"])
    # attention held by the kept keys: a proper share (half the keys are gone); tgGBC keeps layer 0's most
    held = result["attention_held"]
    assert all(0 < v < 1 for per_r in held.values() for v in per_r["528"])
    assert held["tgGBC"]["528"][0] > held["random s0"]["528"][0] + 0.1


def test_fixed_tokens_finds_the_keys_every_scene_attends(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "demo_key_selection", raising=False)
    import demo_key_selection as ks
    monkeypatch.setattr(ks, "FIXED_TOKENS", 2)
    rng = np.random.default_rng(0)
    attention = rng.random((5, 2 * 3 * 4)) * 0.01
    attention[:, [0, 13]] = 1.0                       # camera 0 (0, 0) and camera 1 (0, 1) in every scene
    found = ks.fixed_tokens(attention / attention.sum(1, keepdims=True), (3, 4))
    assert found["camera_row_col"] == [(0, 0, 0), (1, 0, 1)]
    assert found["share"] > 0.9 and found["overlap"] == 1.0
    attention[2:, [0, 13]] = 0.0                      # three scenes look elsewhere
    assert ks.fixed_tokens(attention / attention.sum(1, keepdims=True), (3, 4))["overlap"] < 1.0


def test_auc_and_kept_index_chaining(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "demo_key_selection", raising=False)
    import demo_key_selection as ks
    labels = np.array([True, False, True, False])
    assert ks.auc(np.array([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert ks.auc(np.array([0.1, 0.9, 0.2, 0.8]), labels) == 0.0
    assert ks.auc(np.ones(4), labels) == 0.5
    first, second = torch.tensor([[3, 0, 2]]), torch.tensor([[2, 0]])   # layer 1 keeps keys 2 and 0 of layer 0's kept
    assert ks.kept_original([first, None, second], 4).tolist() == [2, 3]
    assert ks.kept_original([None, None], 3).tolist() == [0, 1, 2]            # nothing pruned: every key kept
