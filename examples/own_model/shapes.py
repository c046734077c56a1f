"""A user's own model and data set, as dwconvert sees them: ``--arch`` and ``py:`` specs.

``ShapesNet`` is a small CNN for 3x32x32 images; ``train_set`` and ``test_set``
return ``Dataset`` s of ``(image, label)`` pairs: four classes of noisy patterns
(horizontal stripes, vertical stripes, checkerboard, a bright disc), drawn from
a fixed seed, so the example needs no download. Name them on the command line as

    --arch shapes:ShapesNet --data py:shapes:test_set --calib py:shapes:train_set

from this folder (dwconvert imports MODULE from the working directory).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

CLASSES = ("horizontal", "vertical", "checkerboard", "disc")


class ShapesNet(nn.Module):
    """conv3x3(3->32) - conv3x3(32->64, stride 2) - conv3x3(64->64, stride 2) - linear."""

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        return self.head(self.features(x))


def _patterns(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (count, 3, 32, 32), roughly zero mean, and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % len(CLASSES)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = torch.empty(count, 3, 32, 32)
    for i, label in enumerate(labels.tolist()):
        period = 4 + 4 * float(torch.rand(1, generator=g))
        phase = 2 * math.pi * float(torch.rand(1, generator=g))
        if label == 0:
            pattern = torch.sin(2 * math.pi * yy / period + phase)
        elif label == 1:
            pattern = torch.sin(2 * math.pi * xx / period + phase)
        elif label == 2:
            pattern = torch.sin(2 * math.pi * yy / period) * torch.sin(2 * math.pi * xx / period)
        else:
            cy, cx = (8 + 16 * torch.rand(2, generator=g)).tolist()
            pattern = 2.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 36).float() - 0.5
        colour = 0.5 + torch.rand(3, 1, 1, generator=g)
        images[i] = colour * pattern + 1.5 * torch.randn(3, 32, 32, generator=g)
    return images, labels


def train_set() -> Dataset:
    """2,000 training images."""
    return TensorDataset(*_patterns(2000, seed=1))


def test_set(split: str = "test") -> Dataset:
    """1,000 images for evaluation (``split="train"`` gives the training images)."""
    return train_set() if split == "train" else TensorDataset(*_patterns(1000, seed=2))
