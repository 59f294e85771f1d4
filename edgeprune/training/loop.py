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

from edgeprune.errors import ParameterError
from edgeprune.io import atomic_path
from edgeprune.methods.gpq import GPQPruner
from edgeprune.models.checkpoint import load_checkpoint
from edgeprune.models.attention import set_need_weights
from edgeprune.models.build import build_model
from edgeprune.models.config import ModelPreset
from edgeprune.passes.queries.inputs import save_keep_indices
from edgeprune.training.data import TrainingSet, batch_indices
from edgeprune.training.dense import TokenHead, token_loss
from edgeprune.training.denoise import denoise_loss, make_queries, run_queries
from edgeprune.training.geometry import warm_start_geometry
from edgeprune.training.losses import BOX_WEIGHT, CLS_WEIGHT, set_loss
from edgeprune.training.setup import (PRIOR_PROB, grow_decoder, half_state, init_for_training, lr_factor, optimizer,
                                      prior_bias, run_layers)

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
    geometry_steps: int = 60            # geometric warm start of the position embeddings (0: none)
    batch: int = 1
    lr: float = 1.5e-4
    backbone_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    clip: float = 0.1
    token_weight: float = 1.0           # dense token supervision (edgeprune.training.dense); 0: off
    denoise_copies: int = 2             # denoising queries per box and kind (edgeprune.training.denoise); 0: off
    init: str | None = None             # start from these weights (full depth, no warm start): a fine-tune
    gpq_keep: int | None = None         # GPQ fine-tune: prune queries gradually down to this many
    gpq_prune_fraction: float = 0.5     # ... over this share of --steps, then fine-tune the rest
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


@dataclass
class Trainee:
    """What a run trains: the detector, its training-only token head, and a GPQ pruner if any."""

    model: torch.nn.Module
    tokens: TokenHead
    pruner: GPQPruner | None = None

    @property
    def query_indices(self) -> list[int] | None:
        return None if self.pruner is None else self.pruner.kept_indices


def gpq_pruner(cfg: TrainConfig, num_queries: int) -> GPQPruner | None:
    """The pruner of a GPQ fine-tune: one query removed every ``interval`` steps over the first
    ``gpq_prune_fraction`` of the run (the paper's schedule, 6 of 24 epochs, compressed)."""
    if cfg.gpq_keep is None:
        return None
    if cfg.steps is None:
        raise ParameterError("a GPQ fine-tune (--gpq-keep) needs --steps: its pruning interval is a share of them")
    if not 0 < cfg.gpq_keep < num_queries:
        raise ParameterError(f"--gpq-keep must be in [1, {num_queries - 1}] (the model has {num_queries} queries); "
                             f"got {cfg.gpq_keep}")
    to_prune = num_queries - cfg.gpq_keep
    return GPQPruner(num_queries, to_prune, max(1, int(cfg.steps * cfg.gpq_prune_fraction) // to_prune))


def _save_state(cfg: TrainConfig, trainee: Trainee, opt: torch.optim.Optimizer, progress: Progress) -> None:
    with atomic_path(cfg.state) as tmp:
        pruner = trainee.pruner
        gpq = {} if pruner is None else {"gpq_kept": pruner.kept_indices, "gpq_removed": list(pruner.removed)}
        torch.save({"model": trainee.model.state_dict(), "tokens": trainee.tokens.state_dict(),
                    "optimizer": opt.state_dict(), "progress": asdict(progress), "config": asdict(cfg), **gpq}, tmp)


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


def prepare(cfg: TrainConfig) -> tuple[Trainee, TrainingSet, torch.optim.Optimizer, Progress]:
    """Model (from scratch, or ``init`` for a fine-tune), data, optimiser and progress of a run;
    resumes from ``state`` when asked, so a stopped run loses at most ``save_every_s`` of work."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, "full", seed=cfg.seed, shipped_weights=False)
    model.train()
    data = TrainingSet(cfg.data, model.preset.image_size, cfg.limit)
    if cfg.init:
        load_checkpoint(model, cfg.init)
    else:
        init_for_training(model, cfg.seed, data.pc_range)
    pruner = gpq_pruner(cfg, model.preset.decoder.num_queries)
    tokens = TokenHead(model.preset.decoder.embed_dims, model.preset.decoder.num_classes, prior_bias(PRIOR_PROB))
    opt = optimizer(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay, extra=tokens)
    progress = Progress(grown_at=0 if cfg.init else None)
    if cfg.resume and Path(cfg.state).is_file():
        saved = torch.load(cfg.state, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        tokens.load_state_dict(saved["tokens"])
        opt.load_state_dict(saved["optimizer"])
        progress = Progress(**saved["progress"])
        if pruner is not None:
            pruner.restore(saved["gpq_kept"], saved["gpq_removed"])
        log.info("resumed from %s at step %d", cfg.state, progress.step)
    run_layers(model, len(model.head.layers) if progress.grown_at is not None else cfg.shallow_layers)
    if progress.step == 0 and cfg.geometry_steps and not cfg.init:
        warm_start_geometry(model, data.pc_range, cfg.geometry_steps, seed=cfg.seed)
    set_need_weights(model, False)
    return Trainee(model, tokens, pruner), data, opt, progress


def train_step(trainee: Trainee, opt: torch.optim.Optimizer, data: TrainingSet, indices: np.ndarray,
               cfg: TrainConfig, step: int) -> tuple[float, dict[str, float]]:
    """One optimiser step on the scenes ``indices``; -> (loss, last-layer, token and denoising loss parts)."""
    images, targets, token_targets = data.batch(indices)
    memory, key_pos = trainee.model.image_tokens(images)
    head = trainee.model.head
    out = head(memory, key_pos, query_indices=trainee.query_indices)
    loss, parts = set_loss(out.all_cls_scores, out.all_bbox_preds, targets, data.pc_range)
    if cfg.token_weight > 0:
        dense, dense_parts = token_loss(trainee.tokens(memory), token_targets, trainee.tokens.num_classes)
        loss = loss + cfg.token_weight * dense
        parts.update(dense_parts)
    if cfg.denoise_copies > 0:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)     # a resumed run draws the same
        queries = make_queries(targets, data.pc_range, gen, cfg.denoise_copies)
        dn_logits, dn_boxes = run_queries(head, memory, key_pos, queries.ref)
        dn, dn_parts = denoise_loss(dn_logits, dn_boxes, queries, data.pc_range, CLS_WEIGHT, BOX_WEIGHT)
        loss = loss + dn
        parts.update(dn_parts)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in opt.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    opt.step()
    if trainee.pruner is not None:
        trainee.pruner.record(out.layer_logits[-1].detach())
        trainee.pruner.step()
        parts["queries"] = float(len(trainee.pruner.kept_indices))
    return float(loss.detach()), parts


def keep_indices_path(output: str) -> Path:
    """Where a GPQ fine-tune writes its kept query indices: beside the weights, ``NAME.keep.json``."""
    return Path(output).with_suffix(".keep.json")


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run the training of ``cfg``; returns a summary (steps, seconds, last losses)."""
    trainee, data, opt, progress = prepare(cfg)
    model = trainee.model
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
        loss_value, parts = train_step(trainee, opt, data, indices, cfg, progress.step)
        step_times.append(time.monotonic() - t0)
        if progress.step % cfg.log_every == 0:
            log.info("step %d (%.0f%%) layers %d queries %d loss %.4f last-layer cls %.4f box %.4f token cls %.4f depth "
                     "%.4f dn cls %.4f box %.4f lr %.2e %.2f s/step elapsed %.0f s", progress.step, 100 * fraction,
                     model.head.cfg.num_layers, parts.get("queries", model.head.cfg.num_queries), loss_value,
                     parts["cls"], parts["box"], parts.get("token_cls", 0.0),
                     parts.get("token_depth", 0.0), parts.get("dn_cls", 0.0), parts.get("dn_box", 0.0),
                     opt.param_groups[0]["lr"],
                     float(np.mean(step_times[-cfg.log_every:])), time.monotonic() - began)
        progress.step += 1
        if time.monotonic() - last_save >= cfg.save_every_s:
            _save_state(cfg, trainee, opt, progress)
            last_save = time.monotonic()
    if progress.grown_at is None:
        grow_decoder(model, cfg.shallow_layers)
        log.info("decoder grown to full depth at the end (step %d): its later layers are untrained copies",
                 progress.step)
    _save_state(cfg, trainee, opt, progress)
    model.eval()
    with atomic_path(cfg.output) as tmp:
        torch.save(half_state(model), tmp)
    if trainee.pruner is not None:
        kept = save_keep_indices(keep_indices_path(cfg.output), trainee.pruner.kept_indices)
        log.info("GPQ kept %d queries: %s (edgeprune rewrite MODEL.onnx --method gpq --keep-indices %s)",
                 len(trainee.pruner.kept_indices), kept, kept)
    summary = {"steps": float(progress.step), "seconds": time.monotonic() - began, "loss": loss_value, **parts}
    log.info("done: %s (--steps %d --grow-step %s repeat this schedule); weights %s, state %s", summary,
             progress.step, progress.grown_at, cfg.output, cfg.state)
    return summary
