"""Configuration of the reference models (frozen dataclasses, no torch import).

Shapes used throughout: ``B`` batch, ``Nq`` queries, ``Nk`` keys (image tokens),
``E`` embedding width, ``h`` heads, ``C`` classes, ``L`` decoder layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

ATTENTION_IMPLS = ("manual", "torch")
QUERY_CONTENTS = ("zeros", "position")
# Backbones implemented for whole-model (--scope full) export; kept here, torch-free, so that
# listing presets needs no torch. edgeprune.models.backbone.BACKBONES must match (tested).
WHOLE_MODEL_BACKBONES = ("resnet18", "resnet-tiny", "resnet50", "resnet101")


@dataclass(frozen=True)
class DecoderConfig:
    """The PETR-family transformer decoder and its class/box branches.

    ``attention='manual'`` writes multi-head attention as MatMul/Softmax code (what NVIDIA's
    deployment exports look like); ``'torch'`` uses ``nn.MultiheadAttention`` like the
    reference training code. Both have the same parameters and compute the same function.
    """

    num_layers: int = 6
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 2048
    num_classes: int = 10
    code_size: int = 10
    num_queries: int = 900        # learned (pre-defined) queries
    num_propagated: int = 0       # StreamPETR: queries propagated from the previous frame
    memory_len: int = 0           # StreamPETR: temporal memory tokens added to self-attention
    attention: str = "manual"
    # What the learned queries' content starts as: "zeros" (PETR) or "position", their position
    # embedding, so that the box branch knows the reference point it regresses an offset from.
    query_content: str = "zeros"

    def __post_init__(self) -> None:
        if self.query_content not in QUERY_CONTENTS:
            raise ValueError(f"query_content {self.query_content!r} is not one of {', '.join(QUERY_CONTENTS)}")
        if self.query_content == "position" and self.num_propagated:
            raise ValueError("query_content='position' applies to learned queries only; "
                             "use 'zeros' with num_propagated > 0 (StreamPETR)")

    @property
    def total_queries(self) -> int:
        """Queries the decoder runs: learned + propagated."""
        return self.num_queries + self.num_propagated

    @property
    def is_temporal(self) -> bool:
        return self.num_propagated > 0 or self.memory_len > 0


@dataclass(frozen=True)
class ModelPreset:
    """A named model row (tgGBC paper, Table 1) fixing backbone, image size and decoder."""

    name: str
    family: str                   # petr | focalpetr | streampetr | 3dppe | mbev | open
    backbone: str                 # resnet18 | resnet50 | resnet101 | vovnet
    image_size: tuple[int, int]   # (W, H)
    num_cameras: int = 6
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    description: str = ""
    # Trained weights shipped in edgeprune/models/weights/ (file name), loaded by default; "" = seeded random.
    weights: str = ""
    neck_kernel: int = 3          # the FPN neck's smoothing conv (PETR's CPFPN: 3x3)

    @property
    def feature_size(self) -> tuple[int, int]:
        """(W/16, H/16): the stride-16 feature map the decoder attends to."""
        w, h = self.image_size
        return w // 16, h // 16

    @property
    def num_keys(self) -> int:
        """Image tokens = cameras x H/16 x W/16."""
        fw, fh = self.feature_size
        return self.num_cameras * fw * fh

    @property
    def supports_full_export(self) -> bool:
        return self.backbone in WHOLE_MODEL_BACKBONES

    def with_decoder(self, **changes: object) -> "ModelPreset":
        """A copy with some decoder fields changed (e.g. attention='torch', num_layers=2)."""
        return replace(self, decoder=replace(self.decoder, **changes))
