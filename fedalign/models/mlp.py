"""Multi-layer perceptron with any hidden widths (the model PFNM matches layer by layer)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn


class MLP(nn.Module):
    """``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``.

    Layers live in ``self.layers`` (``layers.0`` .. ``layers.L``) so matching code can walk them in
    order; the input is flattened, so ``(n, 784)`` and ``(n, 1, 28, 28)`` batches both work.
    """

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (100,), num_classes: int = 10
    ) -> None:
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden), int(num_classes)]
        if any(w <= 0 for w in widths):
            raise ValueError(f"MLP widths must be positive, got {widths}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)
