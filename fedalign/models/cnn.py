"""Plain convolutional nets: NIID-Bench's LeNet-style CNN and FedMA's VGG-9."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


def _conv_output_side(image_size: int, pools: int) -> int:
    side = image_size
    for _ in range(pools):
        side //= 2
    return side


class LeNet(nn.Module):
    """conv5x6 - pool - conv5x16 - pool - fc120 - fc84 - fc(num_classes) (NIID-Bench's SimpleCNN).

    44,426 parameters on 1x28x28 inputs with 10 classes. ``widths`` changes the four hidden widths
    (matched averaging grows them).
    """

    WIDTHS = (6, 16, 120, 84)

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        widths: tuple[int, ...] = WIDTHS,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"LeNet has 2 conv and 2 hidden linear layers, got widths {widths}")
        c1, c2, h1, h2 = widths
        self.image_size = image_size
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.pool = nn.MaxPool2d(2)
        side = ((image_size - 4) // 2 - 4) // 2
        if side <= 0:
            raise ValueError(f"LeNet needs images of at least 12x12, got {image_size}")
        self.fc1 = nn.Linear(c2 * side * side, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class VGG9(nn.Module):
    """FedMA's VGG-9: six 3x3 convs (32, 64, 128, 128, 256, 256; pool after every second) and
    three linear layers (512, 512, num_classes; ``hidden`` may give the two hidden widths apart).

    Sized for 1x28x28 (Fashion-MNIST) and 3x32x32 (CIFAR-10) inputs through ``in_channels`` and
    ``image_size``.
    """

    WIDTHS = (32, 64, 128, 128, 256, 256)

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        widths: tuple[int, ...] = WIDTHS,
        hidden: int | tuple[int, int] = 512,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        if len(widths) != 6:
            raise ValueError(f"VGG9 has 6 conv layers, got widths {widths}")
        channels = [in_channels, *widths]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in pairwise(channels))
        self.pool = nn.MaxPool2d(2)
        side = _conv_output_side(image_size, 3)
        if side <= 0:
            raise ValueError(f"VGG9 needs images of at least 8x8, got {image_size}")
        h1, h2 = (hidden, hidden) if isinstance(hidden, int) else hidden
        self.fc1 = nn.Linear(widths[-1] * side * side, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i % 2 == 1:
                x = self.pool(x)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)
