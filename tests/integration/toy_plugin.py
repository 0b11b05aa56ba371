"""A user's own dataset, model, fuse rule and strategy, registered from outside the package through
the public API only (as a user's module or a ``--plugin`` file would); ``test_plugins`` runs them
in a real Flower simulation. Registration happens at import, so Ray workers that import this
module (told to by ``fedalign.core.plugins``) know the same names."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

import fedalign

CALLS: list[dict] = []  # what the fuse rule saw, in the server's process


def blobs(split: str, data_dir: str | None) -> fedalign.Arrays:
    """Four Gaussian blobs in 8 dimensions: 400 training and 200 test points."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 400 if split == "train" else 200
    y = rng.integers(0, 4, n)
    centres = np.random.default_rng(42).normal(0, 3, (4, 8))
    X = (centres[y] + rng.normal(0, 1, (n, 8))).astype(np.float32)
    return fedalign.Arrays(X, y.astype(np.int64), num_classes=4)


class TinyNet(nn.Module):
    """Linear -> ReLU -> Linear; takes the sizes the data implies."""

    def __init__(self, in_features: int = 8, num_classes: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def trimmed_mean(states, weights, stats, *, trim: int = 0):
    """Elementwise mean of the clients' values after dropping the ``trim`` largest and smallest."""
    CALLS.append({"clients": len(states), "trim": trim})
    fused = {}
    for key, first in states[0].items():
        stacked = torch.stack([sd[key] for sd in states]).double()
        kept = stacked.sort(0).values[trim : len(states) - trim]
        fused[key] = kept.mean(0).to(first.dtype)
    return fused


class BoostAvg(fedalign.Strategy):
    """FedAvg's weighted mean, with the step from the global model towards it scaled by
    ``boost`` (a server learning rate): a strategy with an option, as a user writes one."""

    def __init__(self, *args, boost: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.boost = boost

    def aggregate(self, rnd, updates) -> OrderedDict[str, torch.Tensor]:
        total = sum(u.num_examples for u in updates)
        fused = OrderedDict()
        for key, start in rnd.reference.items():
            mean = sum(u.state_dict[key].double() * u.num_examples for u in updates) / total
            fused[key] = (start + self.boost * (mean - start)).to(start.dtype)
        rnd.log.extra["boost"] = self.boost  # the option the strategy was built with, per round
        return fused


fedalign.register_dataset("toy-blobs", blobs, replace=True)
fedalign.register_model("toy-net", TinyNet, replace=True)
fedalign.register_fuse_rule("toy-trimmed-mean", trimmed_mean, replace=True)
fedalign.register_strategy("boost-avg", BoostAvg, replace=True)
