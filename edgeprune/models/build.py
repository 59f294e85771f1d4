"""``build_model``: a preset (and scope) -> a seeded, eval-mode model ready for export.

Determinism: ``torch.manual_seed(seed)`` is set once, then the head is built first and the
image part (backbone, neck, position encoder) after it, so the same seed gives the same head
in both scopes. The random image path is calibrated on a seed-derived random batch so that
its activations stay near unit scale like a trained network's: BatchNorm statistics from one
pass (:func:`edgeprune.models.backbone.calibrate_batchnorm`), then the neck's last conv scaled
so the image tokens have unit standard deviation (otherwise ResNet-101's tokens reach std ~50
and swamp the position embedding).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from edgeprune.errors import ParameterError, UserError
from edgeprune.models.config import ATTENTION_IMPLS, ModelPreset
from edgeprune.models.decoder import PETRHead
from edgeprune.models.exportable import SCOPES, DecoderModel, ExportableModel
from edgeprune.models.presets import get_preset

log = logging.getLogger(__name__)

# Two images of up to 256x256 (C5 8x8: every BatchNorm sees >= 128 positions per channel);
# never larger than the model's own images, so tiny test models stay cheap to build.
_CALIBRATION_IMAGES, _CALIBRATION_MAX_SIDE = 2, 256


def resolve_preset(preset: ModelPreset | str, attention: str | None = None,
                   num_layers: int | None = None) -> ModelPreset:
    """A preset object or name, with optional decoder overrides validated."""
    resolved = get_preset(preset) if isinstance(preset, str) else preset
    changes: dict[str, object] = {}
    if attention is not None:
        if attention not in ATTENTION_IMPLS:
            raise ParameterError(f"unknown attention implementation {attention!r}; "
                                 f"choose one of: {', '.join(ATTENTION_IMPLS)}")
        changes["attention"] = attention
    if num_layers is not None:
        if num_layers < 1:
            raise ParameterError(f"num_layers must be >= 1 (got {num_layers})")
        changes["num_layers"] = num_layers
    return resolved.with_decoder(**changes) if changes else resolved


def init_head(head: PETRHead) -> None:
    """Xavier-uniform weights and zero biases for every Linear of the head.

    Keeps activations of the random decoder near unit scale, so class logits spread (tgGBC's
    scores are not all ~0.5) and export comparisons at 1e-4 are meaningful.
    """
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(preset: ModelPreset | str, scope: str = "decoder", *, seed: int = 0,
                checkpoint: str | None = None, attention: str | None = None,
                num_layers: int | None = None, shipped_weights: bool = True) -> ExportableModel:
    """Build ``preset`` at ``scope`` ("decoder": PETRHead alone; "full": images -> detections).

    Weights are seeded random unless ``checkpoint`` names a state dict (see
    :mod:`edgeprune.models.checkpoint` for the key names) or the preset ships trained weights
    (``preset.weights``, e.g. ``demo``; ``shipped_weights=False`` skips them, as training
    from scratch does). The model is in eval mode.
    """
    if scope not in SCOPES:
        raise UserError(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    resolved = resolve_preset(preset, attention, num_layers)
    torch.manual_seed(seed)
    head = PETRHead(resolved.decoder, resolved.num_keys)
    init_head(head)
    model: ExportableModel
    if scope == "decoder":
        model = DecoderModel(resolved, head)
    else:
        model = _build_detector(resolved, head, seed)
    if checkpoint is not None:
        from edgeprune.models.checkpoint import load_checkpoint
        load_checkpoint(model, checkpoint)
    elif shipped_weights and resolved.weights:
        from edgeprune.models.checkpoint import load_shipped_weights
        load_shipped_weights(model, resolved.weights)
    log.debug("built %s (%s scope, seed %d, %d parameters)", resolved.name, scope, seed,
              sum(p.numel() for p in model.parameters()))
    return model.eval()


def _build_detector(preset: ModelPreset, head: PETRHead, seed: int) -> ExportableModel:
    from edgeprune.models.backbone import calibrate_batchnorm
    from edgeprune.models.detector import PETRDetector
    detector = PETRDetector(preset, head)
    w, h = preset.image_size
    shape = (_CALIBRATION_IMAGES, 3, min(h, _CALIBRATION_MAX_SIDE), min(w, _CALIBRATION_MAX_SIDE))
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    calibrate_batchnorm(detector.backbone, sample)
    with torch.no_grad():
        feats = detector.neck(*detector.backbone(sample))          # [2, E, h', w']
        detector.neck.fpn_conv.weight.div_(feats.std())           # bias is zero: std becomes 1
    return detector
