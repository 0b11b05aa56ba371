"""What the neuron-matching strategies share: their clients' class counts, and PFNM's fusion.

PFNM and FedMA weight each client's classifier units by its share of each class (and PFNM as the
pipeline's align step likewise); every client reports its counts with its weights
(``class-counts``), and the server checks them on arrival: a client cannot claim more examples of
a class than it holds in all. ``pfnm_fusion`` is PFNM over the accepted updates, for the ``pfnm``
strategy and for fedavg with ``align: pfnm`` alike.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fedalign.algorithms.fusion import pfnm
from fedalign.core.types import StateDict
from fedalign.fl.round import ClientUpdate
from fedalign.models import fit_to_state


def class_counts_problem(update: ClientUpdate, reference: StateDict) -> str | None:
    """Why the update's class counts are unusable: they must be one non-negative number per class
    of the model (its last layer's outputs), together no more than its (bounded) example count."""
    classes = reference[[k for k in reference if k.endswith(".weight")][-1]].shape[0]
    counts = update.metrics.get("class-counts")
    if not isinstance(counts, list) or len(counts) != classes or any(c < 0 for c in counts):
        return "malformed class-counts"
    if sum(counts) > update.num_examples:
        return f"class-counts sum to {sum(counts)}, more than its {update.num_examples} examples"
    return None


def class_counts(updates: list[ClientUpdate]) -> list[list[float]]:
    """Each update's class counts (checked on arrival by ``class_counts_problem``)."""
    return [[float(c) for c in u.metrics["class-counts"]] for u in updates]


RECORDED = ("sigma", "sigma0", "gamma")
"""The BBP-MAP options a round's record names (those PFNM's grid chooses)."""


def client_models(template: nn.Module, updates: list[ClientUpdate]) -> list[nn.Module]:
    """Each update's weights in the run's architecture, at the widths they have."""
    return [fit_to_state(copy.deepcopy(template), u.state_dict) for u in updates]


def pfnm_fusion(
    template: nn.Module, updates: list[ClientUpdate], seed: int, device: str, **options: Any
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
    """PFNM over the updates with BBP-MAP's ``options``: the fused state, and the round's record
    of what it ran with (sigma, sigma0, gamma) and the widths it grew to."""
    fused, assignment = pfnm(
        client_models(template, updates), class_counts(updates), seed, device, **options
    )
    record = {**{k: options[k] for k in RECORDED}, "widths": assignment.widths}
    return OrderedDict(fused.state_dict()), record
