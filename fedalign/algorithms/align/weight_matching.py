"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): align units by their weights alone.

Maximises ``sum_k <A_k, P(B_k)>`` over the entries ``k`` the spec permutes (BN running statistics
excluded) by block coordinate ascent: for one group, with every other group fixed, the objective is
linear in its permutation, and the score matrix is a sum of matrix products over the axes the group
acts on. A group's update is kept only when the objective rises (a group acting on two axes of one
entry, like an LSTM's hidden units on ``weight_hh``, makes the per-group problem quadratic, so the
linear solution is checked), hence the objective never decreases.

The groups of a head set (attention's query/key and value/output dimensions, ``spec.HeadSet``)
are updated together, in one step that solves the heads and the dimensions inside them jointly
(``solvers.solve_heads``): a head's cost against another is the best within-head match of every
group summed, so the step is exact as an ordinary group's is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedalign.core.tensors import normalised_weights, weighted_average
from fedalign.core.types import StateDict

from .solvers import solve_assignment, solve_heads
from .spec import (
    Perms,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    permuted_entry,
    random_permutation,
    units_first,
)


def group_scores(
    spec: PermutationSpec, group: str, reference: StateDict, other: StateDict, perms: Perms
) -> torch.Tensor:
    """(n, n) float64 score matrix ``S[i, j]``: the objective's gain from putting ``other``'s unit
    ``j`` at ``reference``'s unit ``i``, every other axis permuted by ``perms``."""
    scores: torch.Tensor | None = None
    n = spec.sizes[group]
    for ref in spec.objective_refs(group):
        a = units_first(reference[ref.key].double(), ref, n)
        b = units_first(
            permuted_entry(spec, perms, ref.key, other[ref.key], ref.axis).double(), ref, n
        )
        # the first product is the buffer the others accumulate into (no zeroed n x n matrix)
        scores = a @ b.T if scores is None else scores.addmm_(a, b.T)
    if scores is None:
        device = next(iter(reference.values())).device
        return torch.zeros(n, n, dtype=torch.float64, device=device)
    return scores


def score_dependencies(spec: PermutationSpec) -> dict[str, frozenset[str]]:
    """Group -> the groups whose permutations enter its score matrix (``group_scores`` permutes
    every other axis of the entries it reads; a group acting on two axes of one entry, like an
    LSTM's hidden units on ``weight_hh``, depends on itself)."""
    deps = {}
    for group in spec.sizes:
        found: set[str] = set()
        for ref in spec.objective_refs(group):
            for other, other_ref in spec.refs_of(ref.key):
                if other_ref.axis != ref.axis:
                    found.add(other)
        deps[group] = frozenset(found)
    return deps


def _objective_keys(spec: PermutationSpec) -> list[str]:
    return sorted(spec.keys - spec.buffers)


def _term(
    spec: PermutationSpec, key: str, reference: StateDict, other: StateDict, perms: Perms
) -> float:
    return float(
        torch.vdot(
            reference[key].double().reshape(-1),
            permuted_entry(spec, perms, key, other[key]).double().reshape(-1),
        )
    )


def objective(spec: PermutationSpec, reference: StateDict, other: StateDict, perms: Perms) -> float:
    """``sum_k <A_k, P(B_k)>`` over the entries the spec permutes (buffers excluded)."""
    return sum(_term(spec, k, reference, other, perms) for k in _objective_keys(spec))


@dataclass
class MatchResult:
    """Outcome of weight matching: the permutations, their objective and the objective before
    the first sweep and after every sweep of the run that won (non-decreasing)."""

    perms: Perms
    objective: float
    trace: list[float] = field(default_factory=list)


def update_steps(spec: PermutationSpec) -> list[tuple[str, ...]]:
    """The groups coordinate ascent updates together, in the spec's order: every head set is one
    step, every other group a step of its own."""
    steps, seen = [], set()
    for group in spec.sizes:
        if group not in seen:
            head_set = spec.head_sets.get(group)
            step = head_set.groups if head_set is not None else (group,)
            steps.append(step)
            seen.update(step)
    return steps


def solve_step(
    spec: PermutationSpec,
    step: tuple[str, ...],
    reference: StateDict,
    other: StateDict,
    perms: Perms,
    solver: str,
    solver_options: Mapping,
) -> Perms:
    """The best permutations of ``step``'s groups with every other group fixed (a head set's
    groups keep their heads together)."""
    head_set = spec.head_sets.get(step[0])
    if head_set is None:
        scores = group_scores(spec, step[0], reference, other, perms)
        return {step[0]: solve_assignment(scores, solver, **solver_options).cpu()}
    scores = {g: group_scores(spec, g, reference, other, perms) for g in step}
    return solve_heads(scores, head_set.count, head_set.move, solver, **solver_options)


def _coordinate_ascent(
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
    perms: Perms,
    solver: str,
    solver_options: Mapping,
    max_iter: int,
    generator: torch.Generator,
) -> MatchResult:
    """Sweeps over the groups in random order until a sweep changes nothing. The objective is
    kept as per-entry terms so that a group's update only recomputes the entries it touches.

    A group whose score matrix cannot have changed since its last solve (none of the groups it
    depends on moved since) is skipped: the solver is deterministic, so it would return the same
    assignment, already accepted or already rejected. For a one-hidden-layer MLP this halves the
    work (the confirming second sweep solved the same matrix again)."""
    steps = update_steps(spec)
    touched = {s: sorted({ref.key for g in s for ref in spec.objective_refs(g)}) for s in steps}
    group_depends = score_dependencies(spec)
    depends = {s: frozenset().union(*(group_depends[g] for g in s)) for s in steps}
    terms = {k: _term(spec, k, reference, other, perms) for k in _objective_keys(spec)}
    current = sum(terms.values())
    trace = [current]
    count, solved_at, moved_at = 0, {}, dict.fromkeys(spec.sizes, 0)
    for _ in range(max_iter):
        improved = False
        for i in torch.randperm(len(steps), generator=generator).tolist():
            s = steps[i]
            count += 1
            if s in solved_at and all(moved_at[d] < solved_at[s] for d in depends[s]):
                continue
            solved_at[s] = count
            # the step's n x n float64 scores are freed before the terms are recomputed
            candidate = {
                **perms,
                **solve_step(spec, s, reference, other, perms, solver, solver_options),
            }
            if all(torch.equal(candidate[g], perms[g]) for g in s):
                continue
            new_terms = {k: _term(spec, k, reference, other, candidate) for k in touched[s]}
            gain = sum(new_terms.values()) - sum(terms[k] for k in touched[s])
            if gain > 1e-12 * max(1.0, abs(current)):
                perms, improved = candidate, True
                moved_at.update(dict.fromkeys(s, count))
                terms.update(new_terms)
                current = sum(terms.values())
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
    solver_options: Mapping | None = None,
) -> MatchResult:
    """Best of ``restarts`` coordinate-ascent runs: the first from ``init`` (default identity),
    the others from random permutations (residual nets often stall from one start). ``max_iter``
    caps the sweeps of each run; ``seed`` fixes the group orders and random starts."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    keys = _objective_keys(spec)
    reference = {k: reference[k].double() for k in keys}  # converted once, not per group update
    other = {k: other[k].double() for k in keys}
    generator = torch.Generator().manual_seed(seed)
    best: MatchResult | None = None
    for r in range(restarts):
        if r == 0:
            start = dict(init) if init is not None else identity_permutation(spec)
        else:
            start = random_permutation(spec, generator)
        result = _coordinate_ascent(
            spec, reference, other, start, solver, solver_options or {}, max_iter, generator
        )
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
    solver_options: Mapping | None = None,
) -> Perms:
    """Permutations that align ``other``'s units to ``reference``'s:
    ``apply_permutation(spec, perms, other)`` is then close to ``reference``. See
    ``weight_matching_result`` for the objective trace."""
    return weight_matching_result(
        spec, reference, other, solver, restarts, seed, max_iter, solver_options=solver_options
    ).perms


def match_to_reference(
    spec: PermutationSpec, reference: StateDict, state_dicts: Sequence[StateDict], **options
) -> list[Perms]:
    """Each state dict matched to one reference (e.g. the previous global model); ``options`` go
    to ``weight_matching``."""
    return [weight_matching(spec, reference, sd, **options) for sd in state_dicts]


def merge_many(
    spec: PermutationSpec,
    state_dicts: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    solver: str = "hungarian",
    max_iter: int = 20,
    seed: int = 0,
    solver_options: Mapping | None = None,
) -> tuple[dict[str, torch.Tensor], list[Perms]]:
    """MergeMany: match every model to the weighted mean of the (aligned) others, in random
    order, until a round changes no model's permutations (each change strictly improves that
    model's objective against the current mean) or ``max_iter`` rounds ran; return the weighted
    average of the aligned models (integer buffers such as BN's ``num_batches_tracked`` take the
    maximum) and each model's perms."""
    n = len(state_dicts)
    if n < 2:
        raise ValueError("merge_many needs at least two state dicts")
    w = normalised_weights(weights, n)
    keys = _objective_keys(spec)
    perms = [identity_permutation(spec) for _ in range(n)]
    aligned = [{k: sd[k].double() for k in keys} for sd in state_dicts]
    total = {k: sum(w[i] * aligned[i][k] for i in range(n)) for k in keys}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for j in torch.randperm(n, generator=generator).tolist():
            rest = 1 - w[j]
            if rest <= 0:
                continue  # a model holding all the weight has no "others" to match
            mean_of_others = {k: (total[k] - w[j] * aligned[j][k]) / rest for k in keys}
            result = weight_matching_result(
                spec,
                mean_of_others,
                state_dicts[j],
                solver,
                init=perms[j],
                seed=int(torch.randint(2**31, (1,), generator=generator)),
                solver_options=solver_options,
            )
            if any(not torch.equal(result.perms[g], perms[j][g]) for g in spec.sizes):
                changed = True
                perms[j] = result.perms
                moved = apply_permutation(
                    spec, perms[j], {k: state_dicts[j][k].double() for k in keys}
                )
                total = {k: total[k] + w[j] * (moved[k] - aligned[j][k]) for k in keys}
                aligned[j] = moved
        if not changed:
            break
    merged = weighted_average(
        [apply_permutation(spec, p, sd) for p, sd in zip(perms, state_dicts)], w.tolist()
    )
    return dict(merged), perms
