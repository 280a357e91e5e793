"""Small building blocks shared by zoo models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


class Normalize(nn.Module):
    """``(x - mean) / std`` with stored statistics, so a model takes raw inputs.

    Shape:
        Input ``(N, C, ...)`` with per-channel statistics of length C, or ``(N, F)`` with per-feature
        statistics of length F.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], image: bool = True) -> None:
        super().__init__()
        self.image = image
        shape = (1, len(mean), 1, 1) if image else (1, len(mean))
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))
