"""Training the demo detector: the Hungarian matcher against brute force, the focal loss against
its formula, the geometric warm-start targets against the rig, and real optimiser steps on a
tiny model and dataset (loss falls; resume continues; the fp16 weights load)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.data.synth import generate_dataset
from edgeprune.models.build import build_model
from edgeprune.models.config import DecoderConfig, ModelPreset
from edgeprune.models.position import frustum_points
from edgeprune.training.geometry import attention_targets
from edgeprune.training.loop import TrainConfig, prepare, train, train_step
from edgeprune.training.losses import set_loss, sigmoid_focal_loss
from edgeprune.training.matcher import focal_class_cost, hungarian
from edgeprune.training.setup import reference_points

PC_RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
TINY = ModelPreset("tiny-train", "petr", "resnet-tiny", (64, 32), neck_kernel=1,
                   decoder=DecoderConfig(num_layers=2, embed_dims=32, num_heads=2, ffn_dims=32,
                                         num_classes=4, num_queries=24))


@pytest.mark.parametrize("rows,cols", [(4, 4), (6, 3), (3, 5), (1, 1), (5, 0)])
def test_hungarian_finds_the_brute_force_minimum(rows: int, cols: int) -> None:
    cost = np.random.default_rng(rows * 10 + cols).normal(size=(rows, cols))
    r, c = hungarian(cost)
    assert len(r) == min(rows, cols) and len(set(r)) == len(r) and len(set(c)) == len(c)
    if cols == 0:
        return
    small, large = sorted((rows, cols))
    best = min(sum(cost[p, j] if rows >= cols else cost[j, p] for j, p in enumerate(perm))
               for perm in itertools.permutations(range(large), small))
    assert math.isclose(cost[r, c].sum(), best, rel_tol=1e-12, abs_tol=1e-12)


def test_focal_loss_and_focal_cost_match_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=gen) * 3
    targets = (torch.rand(7, 4, generator=gen) > 0.7).float()
    alpha, gamma = 0.25, 2.0
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        total += -alpha * (1 - p) ** gamma * math.log(p) if t else -(1 - alpha) * p ** gamma * math.log(1 - p)
    assert math.isclose(float(sigmoid_focal_loss(logits.double(), targets.double())), total, rel_tol=1e-9)
    labels = torch.tensor([2, 0])
    cost = focal_class_cost(logits.double(), labels)                       # positive minus negative loss
    p = logits.double().sigmoid()[:, labels]
    expected = -alpha * (1 - p) ** gamma * p.log() + (1 - alpha) * p ** gamma * (1 - p).log()
    assert torch.allclose(cost, expected, atol=1e-6)


def test_geometry_targets_peak_on_the_token_whose_ray_passes_through_the_point() -> None:
    """A point on token (camera 0, row 5, column 11)'s ray at 20 m: the target peaks there."""
    size = (352, 128)
    pts = frustum_points(size)                                             # [6, h, w, D, 3] normalised
    lo, hi = torch.tensor(PC_RANGE[:3], dtype=torch.float64), torch.tensor(PC_RANGE[3:], dtype=torch.float64)
    near, far = lo + pts[0, 5, 11, 0] * (hi - lo), lo + pts[0, 5, 11, -1] * (hi - lo)
    point = near + (far - near) * 0.3
    target = attention_targets(((point - lo) / (hi - lo)).float()[None], size, PC_RANGE)
    assert math.isclose(float(target.sum()), 1.0, rel_tol=1e-5)
    assert int(target.argmax()) == 0 * 22 * 8 + 5 * 22 + 11


def test_reference_points_cover_the_ground_disk() -> None:
    ref = reference_points(500, 0, PC_RANGE)
    lo, hi = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:])
    xyz = lo + ref * (hi - lo)
    radius = xyz[:, :2].norm(dim=1)
    assert radius.min() >= 3.0 - 1e-4 and radius.max() <= 37.0 + 1e-4
    assert torch.allclose(xyz[:, 2], torch.full((500,), -1.04), atol=1e-4)


def test_reference_points_leave_no_holes_where_objects_stand() -> None:
    """300 points: every spot 4-35 m out has one within 3 m (300 uniform random points leave
    holes near 6 m), and the inner half of the ring holds more of them than its share of area."""
    lo, hi = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:])
    ref = (lo + reference_points(300, 0, PC_RANGE) * (hi - lo))[:, :2]
    gen = torch.Generator().manual_seed(1)
    radius, angle = torch.rand(20000, generator=gen) * 31 + 4, torch.rand(20000, generator=gen) * 2 * math.pi
    spots = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    assert float(torch.cdist(spots, ref).min(1).values.max()) < 3.0
    inner = float((ref.norm(dim=1) < 20.0).float().mean())
    assert inner > (20.0 ** 2 - 3.0 ** 2) / (37.0 ** 2 - 3.0 ** 2) + 0.05


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train") / "scenes"
    generate_dataset(path, 4, 3, TINY.image_size)
    return path


def _mean_loss(model: torch.nn.Module, data) -> float:
    with torch.no_grad():
        images, targets, _ = data.batch(np.arange(len(data)))
        return float(set_loss(*model(images), targets, data.pc_range)[0])


@pytest.mark.slow
def test_training_steps_reduce_the_loss(tiny_scenes: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(tiny_scenes), output=str(tmp_path / "w.pt"), state=str(tmp_path / "s.pt"),
                      model=TINY, steps=40, lr=1e-3, batch=2, geometry_steps=5, warmup=1)
    trainee, data, opt, _ = prepare(cfg)
    before = _mean_loss(trainee.model, data)
    for step in range(40):
        train_step(trainee, opt, data, np.array([2 * (step % 2), 2 * (step % 2) + 1]), cfg, step)
    after = _mean_loss(trainee.model, data)
    assert after < 0.7 * before, (before, after)


def test_train_resumes_and_writes_fp16_weights_that_load(tiny_scenes: Path, tmp_path: Path) -> None:
    common = dict(data=str(tiny_scenes), output=str(tmp_path / "w.pt"), state=str(tmp_path / "s.pt"),
                  model=TINY, geometry_steps=2, grow_step=2, log_every=1)
    train(TrainConfig(steps=3, **common))
    first = torch.load(tmp_path / "s.pt", weights_only=True)["progress"]
    assert first == {"step": 3, "grown_at": 2, "elapsed_s": first["elapsed_s"]}
    summary = train(TrainConfig(steps=5, resume=True, **common))
    assert summary["steps"] == 5 and torch.load(tmp_path / "s.pt", weights_only=True)["progress"]["grown_at"] == 2
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    loaded = build_model(TINY, "full", checkpoint=str(tmp_path / "w.pt"))
    assert torch.equal(loaded.head.reference_points.weight, weights["head.reference_points.weight"].float())


def test_shipped_weights_load_in_both_scopes(tiny_scenes: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A preset naming shipped weights loads them (fp16 file, fp32 model); a decoder takes head.*."""
    from dataclasses import replace

    from edgeprune.models import checkpoint
    train(TrainConfig(data=str(tiny_scenes), output=str(tmp_path / "w.pt"), state=str(tmp_path / "s.pt"),
                      model=TINY, steps=1, geometry_steps=1, grow_step=1))
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    shipped = replace(TINY, weights="w.pt")
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    model = build_model(shipped, "full")
    assert torch.equal(model.head.reference_points.weight, weights["head.reference_points.weight"].float())
    decoder = build_model(shipped, "decoder")
    assert torch.equal(decoder.head.layers[0].ffn[0].weight, weights["head.layers.0.ffn.0.weight"].float())
    assert not torch.equal(build_model(TINY, "full").head.reference_points.weight, model.head.reference_points.weight)


@pytest.mark.slow
def test_export_demo_full_scope_validates(tmp_path: Path) -> None:
    """``export --model demo --scope full`` builds the demo and passes its ORT-vs-torch check."""
    from edgeprune.cli.main import main
    out = tmp_path / "demo.onnx"
    assert main(["export", "--model", "demo", "--scope", "full", "-o", str(out)]) == 0
    import onnx
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [list(d.dim_value for d in i.type.tensor_type.shape.dim) for i in graph.input] == [[1, 6, 3, 128, 352]]


def test_gpq_fine_tune_prunes_gradually_and_writes_the_kept_indices(tiny_scenes: Path, tmp_path: Path) -> None:
    """From trained weights, --gpq-keep removes one query per interval over the first half of the
    run (24 -> 16 over 8 of 16 steps), resumes with the pruned set, and writes the kept indices."""
    import json

    from edgeprune.training.loop import keep_indices_path
    base = tmp_path / "base.pt"
    train(TrainConfig(data=str(tiny_scenes), output=str(base), state=str(tmp_path / "b.state"), model=TINY,
                      steps=2, geometry_steps=1, grow_step=1))
    common = dict(data=str(tiny_scenes), output=str(tmp_path / "ft.pt"), state=str(tmp_path / "ft.state"),
                  model=TINY, init=str(base), gpq_keep=16)
    train(TrainConfig(steps=16, **common))
    kept = json.loads(keep_indices_path(str(tmp_path / "ft.pt")).read_text())
    assert len(kept) == 16 and kept == sorted(set(kept)) and all(0 <= i < 24 for i in kept)
    saved = torch.load(tmp_path / "ft.state", weights_only=True)
    assert saved["gpq_kept"] == kept and len(saved["gpq_removed"]) == 8


def test_gpq_fine_tune_needs_steps_and_a_query_count_below_the_models(tiny_scenes: Path, tmp_path: Path) -> None:
    from edgeprune.errors import ParameterError
    from edgeprune.training.loop import gpq_pruner
    cfg = TrainConfig(data=str(tiny_scenes), output="w.pt", state="s.pt", model=TINY, gpq_keep=10)
    with pytest.raises(ParameterError, match="needs --steps"):
        gpq_pruner(cfg, 24)
    with pytest.raises(ParameterError, match=r"--gpq-keep must be in \[1, 23\]"):
        gpq_pruner(TrainConfig(**{**cfg.__dict__, "steps": 10, "gpq_keep": 24}), 24)
    assert gpq_pruner(TrainConfig(**{**cfg.__dict__, "steps": 100}), 24).interval == 50 // 14


def test_cli_refuses_gpq_keep_without_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeprune.cli.main import main
    code = main(["train-demo", "--data", str(tmp_path), "-o", str(tmp_path / "w.pt"), "--steps", "5",
                 "--gpq-keep", "100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--init WEIGHTS" in err[0]
    assert not (tmp_path / "w.pt").exists()

