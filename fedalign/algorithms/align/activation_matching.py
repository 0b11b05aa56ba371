"""Activation matching from sufficient statistics.

Two networks' units correspond when their activations on the same inputs agree. A client runs the
broadcast reference model and its own model on its data and returns, per group, sums of the
activations, of their squares and of the cross products (``d x d``) plus the count: these add up
across clients, so the server pools them and solves one assignment per group without ever seeing
data. Conv activations count every spatial position as a sample.

``cross_moments`` computes the sums (activations read at nodes of the traced graph, which also
reaches functional activations such as ``torch.relu``) and is registered as the client statistic
``cross``; this module also pools them and solves the assignments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from fedalign.algorithms.checks import cross_problem
from fedalign.algorithms.stats import (
    STATISTICS,
    CrossMoments,
    Data,
    StatContext,
    add_sums,
    batches,
    cross_sums,
    evaluation,
)
from fedalign.core.types import StateDict, Stats

from .solvers import solve_assignment
from .spec import Perms, PermutationSpec
from .trace import permutation_spec


class _Capture(fx.Interpreter):
    """Runs a model's traced graph and keeps the outputs of the nodes named in ``wanted``: forward
    hooks that also reach functional activations (``torch.relu``), which have no module to hook."""

    def __init__(self, model: nn.Module, wanted: set[str]) -> None:
        super().__init__(fx.symbolic_trace(model))
        self.wanted = wanted
        self.captured: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.wanted:
            self.captured[n.name] = result
        return result

    def __call__(self, X: torch.Tensor) -> dict[str, torch.Tensor]:
        self.captured = {}
        self.run(X)
        return self.captured


def unit_samples(activation: torch.Tensor, units: int) -> torch.Tensor:
    """(samples, units): NCHW -> every position a sample; (N, C*H*W) -> likewise; (N, T, H) ->
    every time step a sample."""
    a = activation.detach().double()
    if a.dim() == 4:
        return a.permute(0, 2, 3, 1).reshape(-1, units)
    if a.dim() == 2 and a.shape[1] != units:
        return a.reshape(a.shape[0], units, -1).permute(0, 2, 1).reshape(-1, units)
    return a.reshape(-1, units)


def cross_moments(
    reference: nn.Module,
    model: nn.Module,
    X: Data,
    spec: PermutationSpec | None = None,
    batch_size: int = 500,
) -> dict[str, CrossMoments]:
    """Per permutation group of ``spec`` (default: ``permutation_spec(reference)``), float64 sums
    over ``X`` (a tensor, or an iterable of tensors or ``(X, y)`` pairs) of

    - ``count``: samples (every conv position and every time step of a sequence is a sample),
    - ``sum_ref``, ``sum`` (d,): activations of ``reference`` and of ``model``,
    - ``sq_ref``, ``sq`` (d,): their squares,
    - ``cross`` (d, d): ``sum a_ref a_model^T``,

    which add up over clients; ``align.activation_matching.correlation`` turns pooled sums into the
    cross-correlation the assignment is solved on. The activation of a group is the input of its
    first consumer as traced (``spec.activations``): post-ReLU (and post-pooling) outputs of hidden
    layers, the stem's post-ReLU output for a residual stream, the embedding output, the LSTM's
    last hidden state.
    """
    if spec is None:
        spec = permutation_spec(reference)
    missing = [g for g in spec.sizes if g not in spec.activations]
    if missing:
        raise ValueError(f"the spec has no activation site for groups {missing}")
    nodes = {spec.activations[g] for g in spec.sizes}
    capture_ref, capture = _Capture(reference, nodes), _Capture(model, nodes)
    stats: dict[str, CrossMoments] = {}
    with evaluation(reference), evaluation(model):
        for xb in batches(X, batch_size):
            acts_ref, acts = capture_ref(xb), capture(xb)
            for g, n in spec.sizes.items():
                site = spec.activations[g]
                add_sums(
                    stats,
                    g,
                    cross_sums(unit_samples(acts_ref[site], n), unit_samples(acts[site], n)),
                )
    return stats


def activation_statistics(
    spec: PermutationSpec, reference: nn.Module, model: nn.Module, data: torch.Tensor | Iterable
) -> Stats:
    """What a client sends for activation matching: ``fedalign.algorithms.stats.cross_moments`` of
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


def _cross_statistic(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, context: StatContext
) -> Stats:
    return cross_moments(context.reference_model(), model, X)


def check_cross(cross: Stats, state: StateDict, examples: int) -> str | None:
    """Per permutation group, consistent cross sums (the groups' widths are the spec's, which
    the aligner checks against the model)."""
    for group, c in cross.items():
        if (problem := cross_problem(group, c, (None, None), examples)) is not None:
            return problem
    return None


STATISTICS.register("cross", _cross_statistic, permute=None, check=check_cross)
