"""ResNet-20 for small images (He et al. 2016, CIFAR variant) with a width multiplier.

Three stages of three basic blocks (16w, 32w, 64w channels), projection shortcuts (1x1 conv + norm)
where the shape changes, global average pooling, one linear classifier. ``norm="batch"`` is the
usual model; ``norm="layer"`` uses a per-sample LayerNorm over (C, H, W) with per-channel affine
(``GroupNorm(1, C)``), the variant Git Re-Basin aligns without BN statistics.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"norm must be 'batch' or 'layer', got {kind!r}")


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                _norm(norm, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width multiplier must be >= 1, got {width}")
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, widths[0])
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, out_channels in enumerate(widths):
            for i in range(3):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, norm))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        x = torch.mean(x, dim=(2, 3))
        return self.fc(x)
