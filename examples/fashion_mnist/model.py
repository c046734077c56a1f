"""FashionResNet: the Fashion-MNIST benchmark model of dwconvert.

A small ResNet-style CNN with BatchNorm for 1x28x28 images, built only from plain
``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU`` and ``nn.Linear`` modules so that every
3x3 convolution is a candidate for conversion to depthwise + pointwise layers, and with
a forward pass that ``torch.fx.symbolic_trace`` can trace.

Inputs are expected scaled to [0, 1] and then normalised with the Fashion-MNIST training
set statistics ``FASHION_MNIST_MEAN = (0.2860,)`` and ``FASHION_MNIST_STD = (0.3530,)``,
i.e. ``x = (pixel / 255 - 0.2860) / 0.3530``. With dwconvert's data specs::

    make_loader("fashion-mnist:/usr/share/datasets/fashion-mnist", split="test",
                mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

Layout (default width=32, blocks=(1, 1, 1)):

    stem:   conv3x3(1->32) + BN + ReLU                          28x28
    stage1: BasicBlock(32->32, stride 1)                        28x28
    stage2: BasicBlock(32->64, stride 2, 1x1 projection)        14x14
    stage3: BasicBlock(64->128, stride 2, 1x1 projection)        7x7
    head:   global average pool, Linear(128->10)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

__all__ = ["FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "BasicBlock", "FashionResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or 1x1 strided projection shortcut.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first 3x3 convolution (and of the projection).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class FashionResNet(nn.Module):
    """ResNet-style classifier for 1x28x28 Fashion-MNIST images.

    Args:
        width: channels of the stem and of stage 1; stages 2 and 3 use 2x and 4x.
        num_classes: number of output logits.
        blocks: basic blocks in each of the three stages.
        in_channels: channels of the input images.
    """

    def __init__(
        self,
        width: int = 32,
        num_classes: int = 10,
        blocks: Sequence[int] = (1, 1, 1),
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"blocks {tuple(blocks)} must be three counts of at least 1")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        widths = (width, 2 * width, 4 * width)
        strides = (1, 2, 2)
        stages = []
        channels = width
        for stage_width, stride, count in zip(widths, strides, blocks):
            layers = [BasicBlock(channels, stage_width, stride)]
            layers += [BasicBlock(stage_width, stage_width, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = stage_width
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)
