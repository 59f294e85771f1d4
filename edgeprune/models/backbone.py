"""ResNet backbones in plain torch (no torchvision), returning the stride-16 and stride-32 maps.

PETR-family detectors read the last two ResNet stages (``out_indices=(2, 3)``): C4 at stride
16 and C5 at stride 32; the neck fuses them into one stride-16 map. Parameter names follow
the usual ResNet layout (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, blocks with
``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample.0/.1``), so a converted torchvision-style
ResNet state dict maps onto ``backbone.*`` by prefixing. The Bottleneck puts its stride on
the 3x3 conv (ResNet v1.5, as torchvision and mmdet's ``style='pytorch'``).

``resnet-tiny`` (the ``demo`` preset's) is ResNet-18 at an eighth of its width with one block per
stage. Only ResNets are implemented for whole-model export; VoVNet presets work with
``--scope decoder`` (the backbone name then only fixes the key count).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from edgeprune.errors import ModelNotFoundError


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, residual (ResNet-50/101)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk: ``images [B', 3, H, W]`` -> ``(C4 [B', c4, H/16, W/16], C5 [B', c5, H/32, W/32])``.

    ``B'`` is batch x cameras: the detector folds the cameras into the batch. ``H`` and ``W``
    must be multiples of 32 so that C5 upsampled x2 lines up with C4.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, int, int, int],
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin = widths[0]
        self.layer1 = self._make_layer(block, widths[0], depths[0], 1)
        self.layer2 = self._make_layer(block, widths[1], depths[1], 2)
        self.layer3 = self._make_layer(block, widths[2], depths[2], 2)
        self.layer4 = self._make_layer(block, widths[3], depths[3], 2)
        self.out_channels = (widths[2] * block.expansion, widths[3] * block.expansion)  # (C4, C5)
        self._init_weights()

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], width: int, depth: int,
                    stride: int) -> nn.Sequential:
        cout = width * block.expansion
        downsample = None
        if stride != 1 or self._cin != cout:
            downsample = nn.Sequential(_conv1x1(self._cin, cout, stride), nn.BatchNorm2d(cout))
        blocks = [block(self._cin, width, stride, downsample)]
        self._cin = cout
        blocks += [block(cout, width) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        """He init for convs, identity BatchNorm; see :func:`calibrate_batchnorm` for stats."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))   # [B', 64, H/4, W/4]
        x = self.layer2(self.layer1(x))                         # [B', c, H/8, W/8]
        c4 = self.layer3(x)                                     # [B', c4, H/16, W/16]
        c5 = self.layer4(c4)                                    # [B', c5, H/32, W/32]
        return c4, c5


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, sample: Tensor) -> None:
    """Set every BatchNorm's running statistics from one forward pass over ``sample``.

    With random weights and identity statistics (mean 0, var 1) activations grow stage by
    stage (ResNet-101 reaches ~1e4); a trained network's BatchNorm keeps them near unit
    scale. One pass in train mode with ``momentum=None`` (cumulative average) gives every
    BatchNorm the statistics of its actual input, so the seeded random model is numerically
    like a trained one. Deterministic for a given ``sample``. Leaves the module in eval mode.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    module(sample)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    module.eval()


def resnet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet_tiny() -> ResNet:
    """ResNet-18's shape at an eighth of its widths (16..128 channels, one block per stage):
    the demo detector's backbone, small enough to train from scratch on two CPU cores."""
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128))


def resnet50() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3))


def resnet101() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3))


BACKBONES: dict[str, Callable[[], ResNet]] = {
    "resnet18": resnet18,
    "resnet-tiny": resnet_tiny,
    "resnet50": resnet50,
    "resnet101": resnet101,
}


def build_backbone(name: str, preset_name: str | None = None) -> ResNet:
    """The backbone called ``name``; unknown names (VoVNet) fail with what to use instead."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        what = "VoVNet" if name.startswith("vov") else f"backbone {name!r}"
        for_preset = f" for preset {preset_name!r}" if preset_name else ""
        raise ModelNotFoundError(
            f"{what} is not implemented for whole-model export{for_preset}; available backbones: "
            f"{', '.join(BACKBONES)}; --scope decoder works for that preset "
            "(the backbone only fixes its key count there)"
        ) from None
    return factory()
