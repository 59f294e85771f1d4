"""The training loop of ``edgeprune train-demo``: time-budgeted, logged, checkpointed, resumable.

One step: a batch of scenes -> the whole detector in train mode (BatchNorm on batch x cameras
images, fused attention) -> :func:`edgeprune.training.losses.set_loss` over all running layers
-> AdamW with gradient clipping. Depth curriculum (:func:`edgeprune.training.setup.grow_decoder`):
the first ``shallow_layers`` decoder layers train alone until ``grow_at`` of the run, then the
decoder grows to full depth. "Of the run" is steps over ``--steps``, or with only a time budget,
elapsed over budget time (the step at which it grew and the final step are logged, so
``--steps N --grow-step M`` repeats that schedule exactly). Every ``save_every`` seconds the
full state goes to ``state`` so ``--resume`` continues; at the end the fp16 weights go to ``output``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgeprune.io import atomic_path
from edgeprune.models.attention import set_need_weights
from edgeprune.models.build import build_model
from edgeprune.models.config import ModelPreset
from edgeprune.training.data import TrainingSet, batch_indices
from edgeprune.training.geometry import warm_start_geometry
from edgeprune.training.losses import set_loss
from edgeprune.training.setup import grow_decoder, half_state, init_for_training, lr_factor, optimizer, run_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data: str
    output: str                         # fp16 weights file written at the end
    state: str                          # resumable training state
    model: str | ModelPreset = "demo"
    steps: int | None = None            # total steps; None: until the time budget ends
    time_budget_s: float | None = None
    grow_step: int | None = None        # step at which the decoder grows (default: grow_at of the run)
    grow_at: float = 0.75
    shallow_layers: int = 2
    geometry_steps: int = 100           # geometric warm start of the position embeddings (0: none)
    batch: int = 2
    lr: float = 2e-4
    backbone_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    clip: float = 0.1
    warmup: int = 30
    seed: int = 0
    threads: int = 2
    save_every_s: float = 300.0
    log_every: int = 10
    limit: int | None = None            # use the first N scenes only
    resume: bool = False


@dataclass
class Progress:
    """Where the run is: steps done and whether the decoder has grown (saved with the state)."""

    step: int = 0
    grown_at: int | None = None
    elapsed_s: float = 0.0


def _save_state(cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer, progress: Progress) -> None:
    with atomic_path(cfg.state) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "progress": asdict(progress),
                    "config": asdict(cfg)}, tmp)


def _fraction(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """How far the run is, 0 -> 1: by steps if ``steps`` is set, else by time."""
    if cfg.steps is not None:
        return step / cfg.steps
    return elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0


def _should_grow(cfg: TrainConfig, progress: Progress, fraction: float) -> bool:
    if progress.grown_at is not None:
        return False
    if cfg.grow_step is not None:
        return progress.step >= cfg.grow_step
    return fraction >= cfg.grow_at


def prepare(cfg: TrainConfig) -> tuple[torch.nn.Module, TrainingSet, torch.optim.Optimizer, Progress]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, "full", seed=cfg.seed, shipped_weights=False)
    model.train()
    data = TrainingSet(cfg.data, model.preset.image_size, cfg.limit)
    init_for_training(model, cfg.seed, data.pc_range)
    opt = optimizer(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay)
    progress = Progress()
    if cfg.resume and Path(cfg.state).is_file():
        saved = torch.load(cfg.state, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        progress = Progress(**saved["progress"])
        log.info("resumed from %s at step %d", cfg.state, progress.step)
    run_layers(model, len(model.head.layers) if progress.grown_at is not None else cfg.shallow_layers)
    if progress.step == 0 and cfg.geometry_steps:
        warm_start_geometry(model, data.pc_range, cfg.geometry_steps, seed=cfg.seed)
    set_need_weights(model, False)
    return model, data, opt, progress


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, data: TrainingSet, indices: np.ndarray,
               clip: float) -> tuple[float, dict[str, float]]:
    """One optimiser step on the scenes ``indices``; -> (loss, last-layer loss parts)."""
    images, targets = data.batch(indices)
    cls, boxes = model(images)
    loss, parts = set_loss(cls, boxes, targets, data.pc_range)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(loss.detach()), parts


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run the training of ``cfg``; returns a summary (steps, seconds, last losses)."""
    model, data, opt, progress = prepare(cfg)
    log.info("training %s on %d scenes of %s: %s", model.preset.name, len(data), cfg.data, asdict(cfg))
    model.train()
    began = time.monotonic() - progress.elapsed_s
    last_save = time.monotonic()
    step_times: list[float] = []
    parts: dict[str, float] = {}
    loss_value = float("nan")
    for indices in batch_indices(len(data), cfg.batch, cfg.seed, progress.step):
        progress.elapsed_s = time.monotonic() - began
        fraction = _fraction(cfg, progress.step, progress.elapsed_s)
        if fraction >= 1.0:
            break
        if _should_grow(cfg, progress, fraction):
            grow_decoder(model, cfg.shallow_layers)
            progress.grown_at = progress.step
            log.info("decoder grown to %d layers at step %d (--grow-step %d repeats this)",
                     len(model.head.layers), progress.step, progress.step)
        t0 = time.monotonic()
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(progress.step, fraction, cfg.warmup)
        loss_value, parts = train_step(model, opt, data, indices, cfg.clip)
        step_times.append(time.monotonic() - t0)
        if progress.step % cfg.log_every == 0:
            log.info("step %d (%.0f%%) layers %d loss %.4f last-layer cls %.4f box %.4f lr %.2e %.2f s/step "
                     "elapsed %.0f s", progress.step, 100 * fraction, model.head.cfg.num_layers, loss_value,
                     parts["cls"], parts["box"], opt.param_groups[0]["lr"],
                     float(np.mean(step_times[-cfg.log_every:])), time.monotonic() - began)
        progress.step += 1
        if time.monotonic() - last_save >= cfg.save_every_s:
            _save_state(cfg, model, opt, progress)
            last_save = time.monotonic()
    if progress.grown_at is None:
        grow_decoder(model, cfg.shallow_layers)
        log.info("decoder grown to full depth at the end (step %d): its later layers are untrained copies",
                 progress.step)
    _save_state(cfg, model, opt, progress)
    model.eval()
    with atomic_path(cfg.output) as tmp:
        torch.save(half_state(model), tmp)
    summary = {"steps": float(progress.step), "seconds": time.monotonic() - began, "loss": loss_value, **parts}
    log.info("done: %s (--steps %d --grow-step %s repeat this schedule); weights %s, state %s", summary,
             progress.step, progress.grown_at, cfg.output, cfg.state)
    return summary
