"""FPN-style neck fusing C4 and C5 into one 256-channel stride-16 map (PETR's CPFPN shape).

PETR-family models attend to a single stride-16 feature level: lateral 1x1 convs bring C4
and C5 to 256 channels, C5 is upsampled x2 (nearest) and added to C4, and a 3x3 conv
smooths the sum (1x1 in the ``demo`` preset, where it would cost more than its whole backbone). There is no normalisation in the neck, as in PETR's CPFPN.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FPNNeck(nn.Module):
    """``(C4 [B', c4, h, w], C5 [B', c5, h/2, w/2])`` -> ``[B', out_channels, h, w]``."""

    def __init__(self, in_channels: tuple[int, int], out_channels: int = 256, smooth_kernel: int = 3) -> None:
        super().__init__()
        c4, c5 = in_channels
        self.lateral_c4 = nn.Conv2d(c4, out_channels, 1)
        self.lateral_c5 = nn.Conv2d(c5, out_channels, 1)
        self.fpn_conv = nn.Conv2d(out_channels, out_channels, smooth_kernel, padding=smooth_kernel // 2)
        self.out_channels = out_channels
        for conv in (self.lateral_c4, self.lateral_c5, self.fpn_conv):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, c4: Tensor, c5: Tensor) -> Tensor:
        top = self.lateral_c5(c5)                                   # [B', 256, h/2, w/2]
        top = F.interpolate(top, scale_factor=2.0, mode="nearest")  # [B', 256, h, w]
        return self.fpn_conv(self.lateral_c4(c4) + top)             # [B', 256, h, w]
