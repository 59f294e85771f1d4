"""The interface every model edgeprune exports: ``forward(*inputs) -> (all_cls_scores, all_bbox_preds)``.

Two scopes implement it: :class:`DecoderModel` (the PETRHead alone, inputs ``memory``,
``key_pos`` and StreamPETR's temporal tensors) and
:class:`edgeprune.models.detector.PETRDetector` (images through backbone, neck and 3D
position embedding into the same head). Both expose the head as ``.head`` so exporters
and oracles can reach its intermediate tensors through :meth:`ExportableModel.run`.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from edgeprune.errors import ParameterError
from edgeprune.models.config import ModelPreset
from edgeprune.models.decoder import HeadOutput, PETRHead

OUTPUT_NAMES = ("all_cls_scores", "all_bbox_preds")
SCOPES = ("decoder", "full")


def check_batch(batch: int) -> None:
    """Batch sizes below 1 are a user error (``--batch 0``)."""
    if not isinstance(batch, int) or batch < 1:
        raise ParameterError(f"batch must be an integer >= 1 (got {batch!r}); use e.g. --batch 1")


class ExportableModel(nn.Module):
    """Base of the exportable scopes. Subclasses set ``scope`` and implement
    :meth:`input_names`, :meth:`example_inputs` and :meth:`run`."""

    scope: str = ""

    def __init__(self, preset: ModelPreset, head: PETRHead) -> None:
        super().__init__()
        self.preset = preset
        self.head = head

    def input_names(self) -> list[str]:
        raise NotImplementedError

    def output_names(self) -> list[str]:
        return list(OUTPUT_NAMES)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
        raise NotImplementedError

    def run(self, **inputs: Any) -> HeadOutput:
        """Named inputs (+ ``pruning=``, ``query_indices=`` for the oracles) -> HeadOutput."""
        raise NotImplementedError

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs in :meth:`input_names` order -> ``(all_cls_scores [L, B, Nq, C], all_bbox_preds [L, B, Nq, code])``."""
        out = self.run(**self.name_inputs(inputs))
        return out.all_cls_scores, out.all_bbox_preds

    def name_inputs(self, inputs: Sequence[Tensor]) -> dict[str, Tensor]:
        """Positional inputs -> ``{name: tensor}``, checking the count."""
        names = self.input_names()
        if len(inputs) != len(names):
            raise ParameterError(f"{self.preset.name} ({self.scope} scope) takes {len(names)} inputs "
                                 f"{names}, got {len(inputs)}")
        return dict(zip(names, inputs))


class DecoderModel(ExportableModel):
    """Scope ``decoder``: the PETRHead alone; keys ``[B, Nk, E]`` come in as inputs."""

    scope = "decoder"

    def input_names(self) -> list[str]:
        return self.head.input_names()

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
        """Seeded N(0, 1) memory/key_pos ``[B, Nk, E]`` (+ temporal inputs), Nk from the preset."""
        check_batch(batch)
        return self.head.example_inputs(batch, seed, num_keys=self.preset.num_keys)

    def run(self, **inputs: Any) -> HeadOutput:
        return self.head(**inputs)
