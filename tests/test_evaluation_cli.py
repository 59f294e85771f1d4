"""``eval`` and ``compare`` end to end on real exports: a tiny whole model on a tiny dataset
(checked against the torch model run on the same scenes), and a 2-layer decoder against
itself and against its tgGBC rewrite."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.cli.main import main
from edgeprune.data import boxes as box_code
from edgeprune.data.format import load_dataset, model_images
from edgeprune.data.synth import generate_dataset
from edgeprune.evaluation.decode import top_detections
from edgeprune.evaluation.evaluate import MIN_VISIBLE_PIXELS, TOP_N
from edgeprune.evaluation.metrics import evaluate
from edgeprune.export.exporter import export_onnx
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.models.build import build_model
from edgeprune.models.config import DecoderConfig, ModelPreset
from edgeprune.passes.driver import rewrite
from edgeprune.passes.keys.tggbc import KeyPruningPass
from edgeprune.passes.verify import compare_models
from model_cache import exported_decoder

TINY = ModelPreset("tiny-r18-128x64", "petr", "resnet18", (128, 64),
                   decoder=DecoderConfig(num_layers=1, embed_dims=64, num_heads=4, ffn_dims=128, num_queries=40,
                                         num_classes=4))


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("tiny")
    generate_dataset(str(root / "data"), 3, 5, TINY.image_size)
    model = build_model(TINY, "full", seed=0)
    export_onnx(model, root / "full.onnx", simplify=False)
    return root / "full.onnx", root / "data", model


def test_eval_matches_torch_model_on_the_same_scenes(tiny, tmp_path: Path) -> None:
    path, data, model = tiny
    code, text = _cli("eval", str(path), "--data", str(data), "--json", str(tmp_path / "m.json"))
    assert code == 0 and "mAP" in text
    got = json.loads((tmp_path / "m.json").read_text())
    ds = load_dataset(data)
    preds, gts = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            x = torch.from_numpy(model_images(ds.images(i)[None]))
            logits, code_ = model(x)
            preds.append(top_detections(logits[-1, 0].numpy(), code_[-1, 0].numpy(), TOP_N, ds.meta.point_cloud_range))
            gts.append(ds.ground_truth(i, MIN_VISIBLE_PIXELS))
    want = evaluate(gts, preds, ds.meta.classes)
    assert got["num_samples"] == 3
    assert got["num_gt"] == want.num_gt and sum(want.num_gt.values()) > 0
    assert got["mAP"] == pytest.approx(want.mean_ap, abs=1e-6)
    for name in ds.meta.classes:
        for metric, value in want.tp_errors[name].items():
            assert got["tp_errors"][name][metric] == pytest.approx(value, abs=1e-4, nan_ok=True)


def test_decoded_ground_truth_scores_one() -> None:
    """Model-shaped outputs whose top queries encode the ground truth -> mAP 1 (decode + metrics)."""
    ds_gt = [box_code.Boxes([[10.0, 2.0, -1.0], [-15.0, 8.0, -1.2]], [[1.9, 4.5, 1.6], [0.6, 0.7, 1.7]],
                            [0.3, -2.0], [0, 1])]
    pc_range = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    code = np.zeros((30, 10))
    code[:, :3] = 0.5
    code[:2] = box_code.encode(ds_gt[0], pc_range)
    logits = np.full((30, 4), -8.0)
    logits[0, 0], logits[1, 1] = 4.0, 3.0
    preds = [top_detections(logits, code, 2, pc_range)]   # any extra (low-score) box lowers recall-1.0 precision
    assert sorted(preds[0].labels.tolist()) == [0, 1]
    m = evaluate(ds_gt, preds, ("car", "pedestrian", "traffic_cone", "barrier"))
    assert m.ap["car"][0.5] == pytest.approx(1.0) and m.ap["pedestrian"][0.5] == pytest.approx(1.0)
    assert m.tp_errors["car"]["orient_err"] == pytest.approx(0.0, abs=1e-9)


def test_eval_errors_are_one_line(tiny, tmp_path: Path) -> None:
    path, data, _ = tiny
    other = generate_dataset(str(tmp_path / "big"), 1, 0, (256, 64)).root
    code, text = _cli("eval", str(path), "--data", str(other))
    assert code == 2 and "--image-size 128x64" in text and len(text.strip().splitlines()) == 1
    code, text = _cli("eval", str(path), "--data", str(tmp_path / "nothing"))
    assert code == 2 and "dataset synth" in text
    decoder = exported_decoder("focalpetr-r18-704x256", "torchscript", layers=1)
    code, text = _cli("eval", str(decoder), "--data", str(data), "--json", str(tmp_path / "x.json"))
    assert code == 2 and "--scope full" in text and not (tmp_path / "x.json").exists()


@pytest.fixture(scope="module")
def decoder_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cmp")
    path = exported_decoder("focalpetr-r18-704x256", "torchscript", layers=2)
    pruned = root / "pruned.onnx"
    rewrite(path, pruned, [KeyPruningPass(TgGBCConfig(r=3000, n=1, k=0))])
    model = build_model("focalpetr-r18-704x256", "decoder", num_layers=2)
    np.savez(root / "x.npz", **{k: v.numpy() for k, v in model.example_inputs(seed=3).items()})
    return path, pruned, root / "x.npz"


def test_compare_with_itself_passes(decoder_pair, tmp_path: Path) -> None:
    path, _, npz = decoder_pair
    code, text = _cli("compare", str(path), str(path), "--inputs", str(npz), "--max-abs", "0",
                      "--max-score-drift", "0", "--min-overlap", "1", "--json", str(tmp_path / "c.json"))
    report = json.loads((tmp_path / "c.json").read_text())
    assert code == 0 and text.strip().endswith("PASS")
    assert report["passed"] and report["agreement"]["overlap"] == 1.0 and report["agreement"]["score_drift"] == 0.0
    assert report["agreement"]["class_agreement"] == 1.0 and all(d["exact"] for d in report["drift"])


def test_compare_with_tggbc_rewrite_fails_strict_thresholds(decoder_pair, tmp_path: Path) -> None:
    path, pruned, npz = decoder_pair
    code, text = _cli("compare", str(path), str(pruned), "--inputs", str(npz), "--max-abs", "1e-6",
                      "--max-score-drift", "1e-6", "--min-overlap", "1", "--json", str(tmp_path / "c.json"))
    report = json.loads((tmp_path / "c.json").read_text())
    assert code == 1 and "FAIL: score drift" in text and not report["passed"]
    oracle = compare_models(path, pruned, inputs=dict(np.load(npz)))
    drift = {d["name"]: d["max_abs"] for d in report["drift"]}
    assert drift == {o.name: pytest.approx(o.max_abs) for o in oracle.outputs}
    assert drift["all_cls_scores"] > 1e-6
    assert report["agreement"]["score_drift"] > 1e-6 and report["agreement"]["samples"] == 1
    loose = _cli("compare", str(path), str(pruned), "--inputs", str(npz), "--min-overlap", "0",
                 "--max-score-drift", "1", "--min-class-agreement", "0", "--max-center-error", "100")
    assert loose[0] == 0


def test_compare_needs_one_input_source(decoder_pair) -> None:
    path, _, _ = decoder_pair
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        main(["compare", str(path), str(path)])
    assert exc.value.code == 2
