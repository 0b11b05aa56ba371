"""Activation matching from sufficient statistics.

Two networks' units correspond when their activations on the same inputs agree. A client runs the
broadcast reference model and its own model on its data and returns, per group, sums of the
activations, of their squares and of the cross products (``d x d``) plus the count: these add up
across clients, so the server pools them and solves one assignment per group without ever seeing
data. Conv activations count every spatial position as a sample.

The sums are computed by ``fedalign.stats.cross_moments`` (activations read at nodes of the
traced graph, which also reaches functional activations such as ``torch.relu``); this module pools
them and solves the assignments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fedalign.stats import cross_moments

from .solvers import solve_assignment
from .spec import Perms, PermutationSpec

Stats = dict[str, dict[str, torch.Tensor]]


def activation_statistics(
    spec: PermutationSpec, reference: nn.Module, model: nn.Module, data: torch.Tensor | Iterable
) -> Stats:
    """What a client sends for activation matching: ``fedalign.stats.cross_moments`` of
    ``reference`` and ``model`` on ``data`` per group of ``spec`` (float64 ``count``, ``sum_ref``,
    ``sum``, ``sq_ref``, ``sq``, ``cross``). Both models run in eval mode (BatchNorm on its running
    statistics; a train-mode pass would update them) and are left in the mode they were in. Sums
    add up over clients."""
    return cross_moments(reference, model, data, spec)


def add_statistics(*parts: Mapping[str, Mapping[str, torch.Tensor]]) -> Stats:
    """Pool statistics of several clients (they are plain sums)."""
    total: Stats = {g: dict(s) for g, s in parts[0].items()}
    for part in parts[1:]:
        for g, s in part.items():
            total[g] = {k: total[g][k] + v for k, v in s.items()}
    return total


def correlation(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Pearson correlation (ref units x model units); dead units (zero variance) give 0."""
    n = stats["count"]
    mean_a, mean_b = stats["sum_ref"] / n, stats["sum"] / n
    cov = stats["cross"] / n - torch.outer(mean_a, mean_b)
    std_a = (stats["sq_ref"] / n - mean_a**2).clamp_min(0).sqrt()
    std_b = (stats["sq"] / n - mean_b**2).clamp_min(0).sqrt()
    corr = cov / torch.outer(std_a, std_b)
    return torch.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


def permutations_from_statistics(
    stats: Mapping[str, Mapping[str, torch.Tensor]],
    criterion: str = "correlation",
    solver: str = "hungarian",
    solver_options: Mapping | None = None,
) -> Perms:
    """One assignment per group from pooled statistics, aligning ``model``'s units to the
    reference's (apply with ``apply_permutation`` to the model): ``criterion`` is
    ``"correlation"`` (Pearson) or ``"cross_moment"`` (E[a b^T])."""
    if criterion not in ("correlation", "cross_moment"):
        raise ValueError(f"criterion must be 'correlation' or 'cross_moment', got {criterion!r}")
    perms = {}
    for g, s in stats.items():
        scores = correlation(s) if criterion == "correlation" else s["cross"] / s["count"]
        perms[g] = solve_assignment(scores, solver, **(solver_options or {}))
    return perms
