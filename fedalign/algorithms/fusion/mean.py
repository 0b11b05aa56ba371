"""Weighted parameter averaging (FedAvg's fusion rule), registered as the fuse rule ``mean``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedalign.core.tensors import normalised_weights, weighted_average
from fedalign.core.types import ClientStats, StateDict

from .rules import FUSE_RULES


@FUSE_RULES.register("mean")
def mean_rule(
    states: Sequence[StateDict], weights: Sequence[float], stats: Sequence[ClientStats]
) -> OrderedDict[str, torch.Tensor]:
    """The weighted mean by number of examples (no statistics)."""
    return weighted_average(states, weights)


__all__ = ["mean_rule", "normalised_weights", "weighted_average"]
