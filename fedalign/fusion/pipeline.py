"""The server's align -> fuse -> repair pipeline as pure functions (the Flower layer only moves
models and statistics; ``fedalign.fl.aggregation_strategy`` calls these).

Which statistics a pipeline needs, and in which phase, follows from its steps:

- phase ``train`` (the clients' own trained models): ``grams`` for RegMean, ``fisher`` for Fisher
  averaging, ``moments`` (pre-activation channel moments) as REPAIR's targets;
- phase ``align`` (a reference model broadcast with each client's own model): ``cross``
  (post-activation cross-moments, activation matching) and ``preact-cross`` (pre-activation
  cross-moments, the matched-unit correlations of closed-form REPAIR);
- phase ``repair`` (the fused candidate broadcast): ``bn`` (BatchNorm input moments) or
  ``moments`` measured through reset layers set to the targets (REPAIR).

Statistics arrive in each client's own basis; ``permute_statistics`` moves them into the aligned
basis with the same permutations as the weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedalign.align import (
    Perms,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    merge_many,
    permutations_from_statistics,
)
from fedalign.align.activation_matching import correlation
from fedalign.align.parallel import match_all
from fedalign.config import AggregationConfig as _Config
from fedalign.repair import bn_reset, repair, repair_closed_form, repair_targets
from fedalign.stats import Moments, add_moments

from .fisher import fisher_average
from .mean import weighted_average
from .regmean import permute_grams, regmean

StateDict = Mapping[str, torch.Tensor]
Stats = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Plan:
    """The steps of one pipeline; the defaults are the run config's (``AggregationConfig``), kept
    in that one place."""

    align: str = _Config.align
    solver: str = _Config.solver
    fuse: str = _Config.fuse
    repair: str = _Config.repair
    regmean_alpha: float = _Config.regmean_alpha
    ridge: float = _Config.ridge
    fisher_floor: float = _Config.fisher_floor
    fisher_normalise: bool = _Config.fisher_normalise
    workers: int = _Config.workers
    device: str = "cpu"

    def train_statistics(self) -> tuple[str, ...]:
        """What the clients compute on their own trained models in the train phase."""
        needed = {"regmean": ("grams",), "fisher": ("fisher",)}.get(self.fuse, ())
        if self.repair in ("repair", "repair-closed-form"):
            needed += ("moments",)
        return needed

    def align_statistics(self) -> tuple[str, ...]:
        """What the clients compute against a broadcast reference (empty: no align phase)."""
        return (("cross",) if self.align == "activation" else ()) + \
            (("preact-cross",) if self.repair == "repair-closed-form" else ())

    def repair_statistics(self) -> tuple[str, ...]:
        """What the clients compute on the fused candidate (empty: no repair phase)."""
        return {"bn-reset": ("bn",), "repair": ("moments",)}.get(self.repair, ())


def align(
    plan: Plan, spec: PermutationSpec, states: Sequence[StateDict], weights: Sequence[float],
    reference: int = 0, cross: Sequence[Stats] | None = None, seed: int = 0,
) -> list[Perms]:
    """Permutations putting every client's units in one basis (the reference client's, or for
    weight matching the MergeMany consensus)."""
    if plan.align == "none":
        return [identity_permutation(spec) for _ in states]
    if plan.align == "weight":
        return merge_many(spec, states, weights, solver=plan.solver, seed=seed)[1]
    if plan.align == "sinkhorn-rebasin":        # independent per client: a worker pool when asked
        others = [sd for j, sd in enumerate(states) if j != reference]
        perms = match_all(spec, states[reference], others, "sinkhorn-rebasin", workers=plan.workers, seed=seed,
                          solver=plan.solver)
        perms.insert(reference, identity_permutation(spec))
        return perms
    if plan.align == "activation":
        if cross is None:
            raise ValueError("activation alignment needs the clients' cross-moments against the reference")
        return [identity_permutation(spec) if j == reference else
                permutations_from_statistics(cross[j], solver=plan.solver) for j in range(len(states))]
    raise ValueError(f"align {plan.align!r} is not a permutation alignment (pfnm fuses by itself)")


def _to(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    return {k: _to(v, device) for k, v in tree.items()}


def align_on(
    plan: Plan, spec: PermutationSpec, states: Sequence[StateDict], weights: Sequence[float], reference: int,
    cross: Sequence[Stats], seed: int,
) -> list[Perms]:
    """``align`` with its score matrices and solvers on ``plan.device`` (the server's GPU, when
    it has one); the permutations come back on the CPU."""
    device = torch.device(plan.device)
    if device.type == "cpu":
        return align(plan, spec, states, weights, reference, cross, seed=seed)
    perms = align(plan, spec, [_to(dict(sd), device) for sd in states], weights, reference,
                  [_to(c, device) for c in cross], seed=seed)
    return [{g: p.cpu() for g, p in pm.items()} for pm in perms]


def output_group(spec: PermutationSpec, layer: str) -> str | None:
    """The group carried by the output channels of Linear/Conv2d ``layer`` (None: unpermuted)."""
    axes = spec.axes_of(f"{layer}.weight")
    return axes[0][0] if 0 in axes else None


def permute_moments(spec: PermutationSpec, perms: Perms, moments: Mapping[str, Moments]) -> dict[str, Moments]:
    """Channel moments of each layer reordered like the layer's output units."""
    out = {}
    for layer, m in moments.items():
        group = output_group(spec, layer)
        out[layer] = dict(m) if group is None else {k: v if v.dim() == 0 else v[perms[group]] for k, v in m.items()}
    return out


def permute_statistics(
    spec: PermutationSpec, perms: Perms, stats: Mapping[str, Stats], state: StateDict
) -> dict[str, Stats]:
    """A client's train-phase statistics in the aligned basis."""
    out: dict[str, Stats] = {}
    for kind, value in stats.items():
        if kind == "grams":
            out[kind] = permute_grams(spec, perms, value, state)
        elif kind == "fisher":
            out[kind] = apply_permutation(spec, perms, value)
        elif kind == "moments":
            out[kind] = permute_moments(spec, perms, value)
        else:
            raise ValueError(f"no rule to align statistic {kind!r}")
    return out


def fuse(
    plan: Plan, states: Sequence[StateDict], weights: Sequence[float], stats: Sequence[Mapping[str, Stats]]
) -> OrderedDict[str, torch.Tensor]:
    """The aligned states fused by the plan's rule."""
    if plan.fuse == "mean":
        return weighted_average(states, weights)
    if plan.fuse == "regmean":
        return regmean(states, [s["grams"] for s in stats], alpha=plan.regmean_alpha, weights=weights,
                       ridge=plan.ridge)
    if plan.fuse == "fisher":
        return fisher_average(states, [s["fisher"] for s in stats], weights=weights, floor=plan.fisher_floor,
                              normalise=plan.fisher_normalise)
    raise ValueError(f"unknown fuse {plan.fuse!r}")


def matched_correlations(preact_cross: Stats, spec: PermutationSpec, perms: Perms) -> dict[str, torch.Tensor]:
    """Per layer, the correlation of each reference unit with the client unit aligned to it
    (``corr[i, perm[i]]``), from pre-activation cross-moments taken before alignment."""
    out = {}
    for layer, s in preact_cross.items():
        corr = correlation(s)
        group = output_group(spec, layer)
        index = torch.arange(len(corr)) if group is None else perms[group]
        out[layer] = corr[torch.arange(len(corr)), index]
    return out


CrossQuery = Callable[[int, list[int]], dict[int, Stats]]
"""``(reference index, other indices) -> {index: statistics}`` of the clients that answered."""
FusedQuery = Callable[[OrderedDict, dict | None], list[Stats]]
"""``(fused state, REPAIR targets or None) -> each answering client's statistics of it``."""


@dataclass
class Outcome:
    """The fused state, the clients kept (indices into the inputs) and a record for the logs."""

    state: OrderedDict[str, torch.Tensor]
    kept: list[int]
    info: dict


def aggregate(
    plan: Plan, spec: PermutationSpec, states: Sequence[StateDict], weights: Sequence[float],
    stats: Sequence[Mapping[str, Stats]], ask_cross: CrossQuery, ask_fused: FusedQuery, seed: int = 0,
) -> Outcome:
    """One server aggregation: align (asking the clients for cross-moments when the plan needs
    them), move the statistics into the aligned basis, fuse, repair (asking for statistics of the
    fused candidate when needed). The queries are where the data lives: Flower messages in a
    federation, direct calls in a study. The reference is the client with the largest weight."""
    kept = list(range(len(states)))
    ref = int(np.argmax(weights))
    cross: dict[int, Stats] = {}
    if plan.align_statistics():
        cross = ask_cross(ref, [j for j in kept if j != ref])
        kept = [j for j in kept if j == ref or j in cross]
    sub = [states[j] for j in kept]
    w = [weights[j] for j in kept]
    r = kept.index(ref)
    perms = align_on(plan, spec, sub, w, r, [cross.get(j, {}).get("cross", {}) for j in kept], seed)
    aligned = [apply_permutation(spec, p, sd) for p, sd in zip(perms, sub)]
    moved = [permute_statistics(spec, p, stats[j], sd) for p, j, sd in zip(perms, kept, sub)]
    fused = fuse(plan, aligned, w, moved)
    info: dict = {"align": plan.align, "fuse": plan.fuse, "repair": plan.repair, "reference": ref}
    if plan.repair == "repair-closed-form":
        other = 1 - r
        rho = matched_correlations(cross[kept[other]]["preact-cross"], spec, perms[other])
        fused = repair_closed_form(fused, [s["moments"] for s in moved], rho, w)
    elif plan.repair in ("repair", "bn-reset"):
        targets = repair_targets([s["moments"] for s in moved], w) if plan.repair == "repair" else None
        answers = ask_fused(fused, targets)
        if not answers:
            info["repair_skipped"] = "no client answered the repair phase"
        else:
            kind = plan.repair_statistics()[0]
            pooled = answers[0][kind]
            for answer in answers[1:]:
                pooled = add_moments(pooled, answer[kind])
            fused = bn_reset(fused, pooled) if plan.repair == "bn-reset" else repair(fused, targets, pooled)
    return Outcome(fused, kept, info)
