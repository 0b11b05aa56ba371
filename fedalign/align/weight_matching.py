"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): align units by their weights alone.

Maximises ``sum_k <A_k, P(B_k)>`` over the spec's groups by block coordinate ascent: for one group,
with every other group fixed, the objective is linear in its permutation, and the score matrix is a
sum of matrix products over the axes the group acts on. A group's update is kept only when the
full objective does not drop (a group acting on two axes of one parameter, like an LSTM's hidden
units on ``weight_hh``, makes the per-group problem quadratic), so the objective never decreases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedalign.fusion.mean import weighted_average

from .solvers import solve_assignment
from .spec import AxisRef, PermutationSpec, Perms, apply_permutation, identity_permutation, permuted_entry

StateDict = Mapping[str, torch.Tensor]


def _units_first(tensor: torch.Tensor, ref: AxisRef) -> torch.Tensor:
    """(n, rest): the group's units as rows (blocks and repeats folded into the columns)."""
    t = tensor.movedim(ref.axis, 0)
    t = t.reshape(ref.repeat, -1, ref.block, *t.shape[1:]).movedim(1, 0)
    return t.reshape(t.shape[0], -1)


def group_scores(
    spec: PermutationSpec, group: str, reference: StateDict, other: StateDict, perms: Perms
) -> torch.Tensor:
    """Score matrix ``S[i, j]``: gain of putting ``other``'s unit j at ``reference``'s unit i."""
    n = spec.sizes[group]
    scores = torch.zeros(n, n, dtype=torch.float64, device=next(iter(reference.values())).device)
    for ref in spec.objective_refs(group):
        a = _units_first(reference[ref.key].double(), ref)
        b = _units_first(permuted_entry(spec, perms, ref.key, other[ref.key], ref.axis).double(), ref)
        scores += a @ b.T
    return scores


def objective(spec: PermutationSpec, reference: StateDict, other: StateDict, perms: Perms) -> float:
    """``sum_k <A_k, P(B_k)>`` over the entries the spec permutes (buffers excluded)."""
    total = 0.0
    for key in spec.keys - spec.buffers:
        total += float(torch.vdot(reference[key].double().reshape(-1),
                                  permuted_entry(spec, perms, key, other[key]).double().reshape(-1)))
    return total


@dataclass
class MatchResult:
    perms: Perms
    objective: float
    trace: list[float] = field(default_factory=list)  # objective after each sweep, non-decreasing


def _coordinate_ascent(
    spec: PermutationSpec, reference: StateDict, other: StateDict, perms: Perms,
    solver: str, max_iter: int, generator: torch.Generator,
) -> MatchResult:
    groups = list(spec.sizes)
    current = objective(spec, reference, other, perms)
    trace = [current]
    for _ in range(max_iter):
        improved = False
        for i in torch.randperm(len(groups), generator=generator).tolist():
            g = groups[i]
            candidate = {**perms, g: solve_assignment(group_scores(spec, g, reference, other, perms), solver)}
            if torch.equal(candidate[g], perms[g]):
                continue
            value = objective(spec, reference, other, candidate)
            if value > current + 1e-12 * max(1.0, abs(current)):
                perms, current, improved = candidate, value, True
        trace.append(current)
        if not improved:
            break
    return MatchResult(perms, current, trace)


def weight_matching_result(
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
    solver: str = "hungarian",
    restarts: int = 1,
    seed: int = 0,
    max_iter: int = 100,
    init: Perms | None = None,
) -> MatchResult:
    """Best of ``restarts`` coordinate-ascent runs (the first from ``init`` or the identity, the
    others from random permutations); residual nets often stall from one start."""
    generator = torch.Generator().manual_seed(seed)
    best: MatchResult | None = None
    for r in range(max(1, restarts)):
        if r == 0:
            start = dict(init) if init is not None else identity_permutation(spec)
        else:
            start = {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}
        result = _coordinate_ascent(spec, reference, other, start, solver, max_iter, generator)
        if best is None or result.objective > best.objective:
            best = result
    return best


def weight_matching(
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
    solver: str = "hungarian",
    restarts: int = 1,
    seed: int = 0,
    max_iter: int = 100,
) -> Perms:
    """Permutations that align ``other``'s units to ``reference``'s:
    ``apply_permutation(spec, perms, other)`` is then close to ``reference``."""
    return weight_matching_result(spec, reference, other, solver, restarts, seed, max_iter).perms


def match_to_reference(
    spec: PermutationSpec, reference: StateDict, state_dicts: Sequence[StateDict], **options
) -> list[Perms]:
    """Each state dict matched to one reference (e.g. the previous global model)."""
    return [weight_matching(spec, reference, sd, **options) for sd in state_dicts]


def merge_many(
    spec: PermutationSpec,
    state_dicts: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    solver: str = "hungarian",
    max_iter: int = 20,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], list[Perms]]:
    """MergeMany: match every model to the weighted mean of the others, until no model's
    permutation changes; return the weighted average of the aligned models and their perms."""
    n = len(state_dicts)
    if n < 2:
        raise ValueError("merge_many needs at least two state dicts")
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
    perms = [identity_permutation(spec) for _ in range(n)]
    aligned = [dict(sd) for sd in state_dicts]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for j in torch.randperm(n, generator=generator).tolist():
            others = [i for i in range(n) if i != j]
            mean = weighted_average([aligned[i] for i in others], w[others].tolist())
            result = weight_matching_result(spec, mean, state_dicts[j], solver, init=perms[j],
                                            seed=int(torch.randint(2**31, (1,), generator=generator)))
            if any(not torch.equal(result.perms[g], perms[j][g]) for g in spec.sizes):
                perms[j], changed = result.perms, True
                aligned[j] = apply_permutation(spec, perms[j], state_dicts[j])
        if not changed:
            break
    return dict(weighted_average(aligned, w.tolist())), perms
