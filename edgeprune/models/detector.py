"""The whole PETR-family detector: multi-view images -> backbone -> neck -> PETRHead.

Data flow (``N = 6`` cameras, ``h, w = H/16, W/16``, ``E = 256``)::

    images [B, N, 3, H, W] -> fold cameras -> [B*N, 3, H, W]
      backbone (ResNet)   -> C4 [B*N, c4, h, w], C5 [B*N, c5, h/2, w/2]
      neck (FPN)          -> [B*N, E, h, w] -> memory  [B, N*h*w, E]
      position_encoder    -> [B, N, E, h, w] -> key_pos [B, N*h*w, E]
      head (PETRHead)     -> all_cls_scores [L, B, Nq, C], all_bbox_preds [L, B, Nq, code]

Tokens are ordered camera-major, then feature row, then column: key ``j`` is camera
``j // (h*w)``, row ``(j % (h*w)) // w``, column ``j % w``. StreamPETR presets also take the
head's temporal inputs (``prev_query``, ``prev_ref``, ``temp_memory``, ``temp_pos``) with the
head's names and shapes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from edgeprune.errors import ParameterError
from edgeprune.models.backbone import build_backbone
from edgeprune.models.config import ModelPreset
from edgeprune.models.decoder import HeadOutput, PETRHead
from edgeprune.models.exportable import ExportableModel, check_batch
from edgeprune.models.neck import FPNNeck
from edgeprune.models.position import PositionEncoder

_HEAD_KEY_INPUTS = ("memory", "key_pos")


def check_image_size(preset: ModelPreset) -> None:
    """Whole-model export needs W and H divisible by 32 (C5 upsampled x2 must match C4)."""
    w, h = preset.image_size
    if w % 32 or h % 32 or w <= 0 or h <= 0:
        raise ParameterError(f"image size {w}x{h} of {preset.name} is not a positive multiple of 32 "
                             "in both sides; whole-model export needs that (e.g. 704x256)")


class PETRDetector(ExportableModel):
    """Scope ``full``: ``images [B, 6, 3, H, W]`` (+ temporal inputs) -> the head's outputs.

    Submodules (and so checkpoint key prefixes): ``backbone``, ``neck``, ``position_encoder``,
    ``head``.
    """

    scope = "full"

    def __init__(self, preset: ModelPreset, head: PETRHead) -> None:
        check_image_size(preset)
        super().__init__(preset, head)
        embed = preset.decoder.embed_dims
        self.backbone = build_backbone(preset.backbone, preset.name)
        self.neck = FPNNeck(self.backbone.out_channels, embed, preset.neck_kernel)
        self.position_encoder = PositionEncoder(preset.image_size, embed, num_cameras=preset.num_cameras)

    def input_names(self) -> list[str]:
        return ["images"] + [n for n in self.head.input_names() if n not in _HEAD_KEY_INPUTS]

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
        """Seeded N(0, 1) images (normalised pixels) ``[B, 6, 3, H, W]`` + the head's temporal inputs."""
        check_batch(batch)
        w, h = self.preset.image_size
        gen = torch.Generator().manual_seed(seed)
        inputs = {"images": torch.randn((batch, self.preset.num_cameras, 3, h, w), generator=gen)}
        if len(self.input_names()) > 1:
            head_inputs = self.head.example_inputs(batch, seed, num_keys=self.preset.num_keys)
            inputs.update((n, t) for n, t in head_inputs.items() if n not in _HEAD_KEY_INPUTS)
        return inputs

    def image_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images [B, N, 3, H, W]`` -> ``(memory [B, N*h*w, E], key_pos [B, N*h*w, E])``."""
        self._check_images(images)
        b, n = images.shape[:2]
        c4, c5 = self.backbone(images.flatten(0, 1))            # [B*N, c4, h, w], [B*N, c5, h/2, w/2]
        feats = self.neck(c4, c5)                               # [B*N, E, h, w]
        e, fh, fw = feats.shape[1:]
        memory = feats.reshape(b, n, e, fh, fw).permute(0, 1, 3, 4, 2).reshape(b, n * fh * fw, e)
        pos = self.position_encoder(b)                          # [B, N, E, h, w]
        key_pos = pos.permute(0, 1, 3, 4, 2).reshape(b, n * fh * fw, e)
        return memory, key_pos

    def run(self, images: Tensor, **head_inputs: Any) -> HeadOutput:  # type: ignore[override]
        """``images`` (+ temporal inputs, ``pruning=``, ``query_indices=``) -> HeadOutput."""
        memory, key_pos = self.image_tokens(images)
        return self.head(memory, key_pos, **head_inputs)

    def _check_images(self, images: Tensor) -> None:
        w, h = self.preset.image_size
        expected = (self.preset.num_cameras, 3, h, w)
        if images.dim() != 5 or tuple(images.shape[1:]) != expected:
            raise ParameterError(f"{self.preset.name} takes images [B, {', '.join(map(str, expected))}] "
                                 f"(B, cameras, RGB, H, W); got {list(images.shape)}")
