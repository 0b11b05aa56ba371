"""Fisher-weighted averaging (Matena & Raffel 2022): each parameter averaged with the weights of
the clients' diagonal Fishers, ``theta = sum_i F_i theta_i / sum_i F_i`` (elementwise).

A parameter a client's data barely constrains (small Fisher) defers to clients whose data does.
The floor keeps the ratio defined where every Fisher is zero (dead units), where the rule falls
back to the plain weighted mean; ``normalise`` divides each Fisher by its total first, so every
client's model counts equally whatever its scale. Models must be aligned first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Annotated

import torch
from torch import nn

from fedalign.algorithms.align.spec import Perms, PermutationSpec, apply_permutation
from fedalign.algorithms.checks import nonnegative_problem
from fedalign.algorithms.stats import FISHER_MODES, STATISTICS, StatContext, diagonal_fisher
from fedalign.core.options import Range
from fedalign.core.tensors import normalised_weights, weighted_average
from fedalign.core.types import ClientStats, StateDict

from .rules import FUSE_RULES


def fisher_average(
    state_dicts: Sequence[StateDict],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    floor: float = 1e-6,
    normalise: bool = False,
) -> OrderedDict[str, torch.Tensor]:
    """Entries with a Fisher in every client: Fisher-weighted mean (times ``weights``, e.g. the
    clients' example counts); other entries (buffers): the weighted mean."""
    if len(fishers) != len(state_dicts):
        raise ValueError(f"got {len(fishers)} Fishers for {len(state_dicts)} state dicts")
    w = normalised_weights(weights, len(state_dicts))
    fused = weighted_average(state_dicts, w.tolist())
    keys = set(fishers[0])
    for j, f in enumerate(fishers):
        if set(f) != keys:
            raise ValueError(
                f"client {j}'s Fisher covers {sorted(set(f) ^ keys)} differently from client 0's"
            )
    totals = [sum(float(f[k].double().sum()) for k in keys) for f in fishers] if normalise else None
    for key in sorted(keys):
        if key not in fused:
            raise ValueError(f"Fisher for {key!r}, which is not an entry of the model")
        num = torch.zeros_like(fused[key], dtype=torch.float64)
        den = torch.zeros_like(num)
        for j, (sd, f) in enumerate(zip(state_dicts, fishers)):
            if f[key].shape != sd[key].shape:
                raise ValueError(
                    f"client {j}: Fisher of {key!r} is {tuple(f[key].shape)}, "
                    f"the entry {tuple(sd[key].shape)}"
                )
            F = f[key].double() / (totals[j] if totals and totals[j] > 0 else 1.0)
            F = w[j] * (F + floor)
            num += F * sd[key].double()
            den += F
        fused[key] = (num / den).to(fused[key].dtype)
    return fused


def _fisher(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    context: StatContext,
    *,
    fisher_labels: str = "sample",
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher with labels sampled from the model, summed over all classes (``exact``) or
    the data's own (``empirical``)."""
    if fisher_labels not in FISHER_MODES:
        raise ValueError(
            f"fisher_labels must be one of {', '.join(FISHER_MODES)}, got {fisher_labels!r}"
        )
    return diagonal_fisher(model, X, y, mode=fisher_labels, seed=context.seed)


def _permute_fisher(
    spec: PermutationSpec, perms: Perms, fisher: Mapping[str, torch.Tensor], state: StateDict
) -> dict[str, torch.Tensor]:
    """A Fisher has the parameters' shapes: it moves exactly like them."""
    return apply_permutation(spec, perms, fisher)


def check_fisher(fisher: Mapping[str, torch.Tensor], state: StateDict, examples: int) -> str | None:
    """A Fisher is one finite, non-negative tensor per parameter, shaped like it."""
    for key, value in fisher.items():
        if key not in state:
            return f"{key}: not an entry of the model"
        if (problem := nonnegative_problem(key, value, tuple(state[key].shape))) is not None:
            return problem
    return None


def fisher_scale(fisher: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The Fisher's total (it is a mean over examples already): a client that scales its Fisher
    by 1e12 would make the fused model its own."""
    return {"total": sum(float(v.double().sum()) for v in fisher.values())}


STATISTICS.register(
    "fisher", _fisher, permute=_permute_fisher, check=check_fisher, scale=fisher_scale
)


@FUSE_RULES.register("fisher", needs={"train": ("fisher",)})
def fisher_rule(
    states: Sequence[StateDict],
    weights: Sequence[float],
    stats: Sequence[ClientStats],
    *,
    fisher_floor: Annotated[float, Range(low=0)] = 1e-6,
    fisher_normalise: bool = False,
    stats_every: Annotated[int, Range(low=1)] = 1,
) -> OrderedDict[str, torch.Tensor]:
    """Fisher-weighted averaging (``fisher_floor``: the Fishers' floor, ``fisher_normalise``:
    divide each client's Fisher by its total first; ``stats_every``: the rounds that ask for
    Fishers, see ``pipeline.Plan.for_round``; a Fisher costs one model's bytes)."""
    return fisher_average(
        states,
        [s["fisher"] for s in stats],
        weights=weights,
        floor=fisher_floor,
        normalise=fisher_normalise,
    )
