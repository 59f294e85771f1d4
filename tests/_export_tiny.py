"""A tiny PETR-like decoder for export tests, written here (not via edgeprune.models).

It follows the interface the exporter expects from ``build_model``: ``forward`` returns
``(all_cls_scores, all_bbox_preds)``, plus ``example_inputs``, ``input_names``,
``output_names`` and a ``head`` whose forward returns an object with ``cross_attn_probs``
and ``layer_logits``. Attention comes from ``edgeprune.models.attention`` so both the
MatMul/Softmax and the ``nn.MultiheadAttention`` forms are exercised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgeprune.models.attention import build_attention


@dataclass
class TinyOutput:
    all_cls_scores: Tensor        # [L, B, Nq, C]
    all_bbox_preds: Tensor        # [L, B, Nq, code]
    cross_attn_probs: list[Tensor]  # L x [B, h, Nq, Nk]
    layer_logits: list[Tensor]    # L x [B, Nq, C]


class TinyLayer(nn.Module):
    def __init__(self, embed: int, heads: int, attention: str) -> None:
        super().__init__()
        self.self_attn = build_attention(attention, embed, heads)
        self.cross_attn = build_attention(attention, embed, heads)
        self.ffn = nn.Sequential(nn.Linear(embed, 2 * embed), nn.ReLU(), nn.Linear(2 * embed, embed))
        self.norms = nn.ModuleList(nn.LayerNorm(embed) for _ in range(3))

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, key_pos: Tensor) -> tuple[Tensor, Tensor]:
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.self_attn(q, q, tgt)[0])
        out, probs = self.cross_attn(tgt + query_pos, memory + key_pos, memory)
        tgt = self.norms[1](tgt + out)
        return self.norms[2](tgt + self.ffn(tgt)), probs


class TinyHead(nn.Module):
    def __init__(self, layers: int = 2, embed: int = 32, heads: int = 4, queries: int = 12,
                 classes: int = 5, code: int = 7, attention: str = "manual") -> None:
        super().__init__()
        self.reference_points = nn.Embedding(queries, 3)
        self.query_pos = nn.Sequential(nn.Linear(3, embed), nn.ReLU(), nn.Linear(embed, embed))
        self.layers = nn.ModuleList(TinyLayer(embed, heads, attention) for _ in range(layers))
        self.post_norm = nn.LayerNorm(embed)
        self.cls_branch = nn.Sequential(nn.Linear(embed, embed), nn.ReLU(), nn.Linear(embed, classes))
        self.reg_branch = nn.Sequential(nn.Linear(embed, embed), nn.ReLU(), nn.Linear(embed, code))

    def forward(self, memory: Tensor, key_pos: Tensor) -> TinyOutput:
        """memory, key_pos [B, Nk, E] -> per-layer scores, boxes, probs and logits."""
        bsz = memory.shape[0]
        ref = self.reference_points.weight.sigmoid()                          # [Nq, 3]
        query_pos = self.query_pos(ref).unsqueeze(0).expand(bsz, -1, -1)      # [B, Nq, E]
        tgt = torch.zeros_like(query_pos)
        scores, boxes, probs, logits = [], [], [], []
        for layer in self.layers:
            tgt, p = layer(tgt, query_pos, memory, key_pos)
            x = self.post_norm(tgt)
            cls = self.cls_branch(x)
            scores.append(cls)
            logits.append(cls)
            boxes.append(self.reg_branch(x).sigmoid())
            probs.append(p)
        return TinyOutput(torch.stack(scores), torch.stack(boxes), probs, logits)


class TinyDecoderModel(nn.Module):
    """Decoder-scope wrapper: (memory, key_pos) -> (all_cls_scores, all_bbox_preds)."""

    scope = "decoder"
    preset = None

    def __init__(self, keys: int = 40, **head_kwargs: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = TinyHead(**head_kwargs).eval()
        self.keys = keys
        self.embed = self.head.post_norm.normalized_shape[0]

    def forward(self, memory: Tensor, key_pos: Tensor) -> tuple[Tensor, Tensor]:
        out = self.head(memory, key_pos)
        return out.all_cls_scores, out.all_bbox_preds

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, self.keys, self.embed)
        return {"memory": torch.randn(shape, generator=gen), "key_pos": torch.randn(shape, generator=gen)}

    def input_names(self) -> list[str]:
        return ["memory", "key_pos"]

    def output_names(self) -> list[str]:
        return ["all_cls_scores", "all_bbox_preds"]
