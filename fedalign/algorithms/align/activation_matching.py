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
from typing import Any, Literal

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

from .solvers import solve_assignment, solve_heads
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


def unit_samples(
    activation: torch.Tensor, units: int, heads: tuple[int, int] | None = None
) -> torch.Tensor:
    """(samples, units): NCHW -> every position a sample; (N, C*H*W) -> likewise; (N, T, H) ->
    every time step a sample; split into heads (``heads``: the head and dimension axes, as a
    ``Site`` says) -> every other position a sample, the units head by head."""
    a = activation.detach().double()
    if heads is not None:
        return a.movedim(heads, (-2, -1)).reshape(-1, units)
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
    sites: str = "first",
) -> dict[str, CrossMoments]:
    """Per permutation group of ``spec`` (default: ``permutation_spec(reference)``), float64 sums
    over ``X`` (a tensor, or an iterable of tensors or ``(X, y)`` pairs) of

    - ``count``: samples (every conv position and every time step of a sequence is a sample),
    - ``sum_ref``, ``sum`` (d,): activations of ``reference`` and of ``model``,
    - ``sq_ref``, ``sq`` (d,): their squares,
    - ``cross`` (d, d): ``sum a_ref a_model^T``,

    which add up over clients; ``align.activation_matching.correlation`` turns pooled sums into the
    cross-correlation the assignment is solved on. The activation of a group is read where
    ``spec.activations`` says: the input of its first consumer as traced (post-ReLU and
    post-pooling outputs of hidden layers, the stem's post-ReLU output for a residual stream, the
    embedding output, the LSTM's last hidden state, the heads' concatenated outputs before an
    attention's output projection) and, for an attention's query/key group, its queries and its
    keys: a dimension moves in both, so the samples of both count (pooled in one set of sums).
    ``sites="all"`` pools a group's later readings too (``Site.later``): a residual stream at the
    input of every block and of the head, not only where it is first read.
    """
    if sites not in SITES:
        raise ValueError(f"activation_sites must be one of {', '.join(SITES)}, got {sites!r}")
    if spec is None:
        spec = permutation_spec(reference, _example(X))
    missing = [g for g in spec.sizes if not spec.activations.get(g)]
    if missing:
        raise ValueError(
            f"the spec has no activation site for groups {missing}: activation matching reads "
            "each group's units in a traced node's output, which neither the queries and keys "
            "inside nn.MultiheadAttention nor heads matched as blocks only (heads='blocks') "
            "have; align them by weight matching, or derive the spec with heads='both'"
        )
    read = {
        g: [s for s in spec.activations[g] if sites == "all" or not s.later] for g in spec.sizes
    }
    nodes = {site.node for g in spec.sizes for site in read[g]}
    capture_ref, capture = _Capture(reference, nodes), _Capture(model, nodes)
    stats: dict[str, CrossMoments] = {}
    with evaluation(reference), evaluation(model):
        for xb in batches(X, batch_size):
            acts_ref, acts = capture_ref(xb), capture(xb)
            for g, n in spec.sizes.items():
                for site in read[g]:
                    a_ref = unit_samples(acts_ref[site.node], n, site.heads)
                    a = unit_samples(acts[site.node], n, site.heads)
                    add_sums(stats, g, cross_sums(a_ref, a))
    return stats


SITES = ("first", "all")
"""Which readings of a group activation matching pools (``cross_moments``' ``sites``)."""


def _example(X: Data) -> torch.Tensor | None:
    """Two rows of the data ``X`` (a tensor, or the first tensor or ``(X, y)`` pair of an
    iterable): the input a spec is traced on (token ids, images: as the clients train on them)."""
    if isinstance(X, torch.Tensor):
        return X[:2]
    return None


def activation_statistics(
    spec: PermutationSpec,
    reference: nn.Module,
    model: nn.Module,
    data: torch.Tensor | Iterable,
    sites: str = "first",
) -> Stats:
    """What a client sends for activation matching: ``fedalign.algorithms.stats.cross_moments`` of
    ``reference`` and ``model`` on ``data`` per group of ``spec`` (float64 ``count``, ``sum_ref``,
    ``sum``, ``sq_ref``, ``sq``, ``cross``). Both models run in eval mode (BatchNorm on its running
    statistics; a train-mode pass would update them) and are left in the mode they were in. Sums
    add up over clients; ``sites`` as in ``cross_moments``."""
    return cross_moments(reference, model, data, spec, sites=sites)


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
    spec: PermutationSpec | None = None,
) -> Perms:
    """One assignment per group from pooled statistics, aligning ``model``'s units to the
    reference's (apply with ``apply_permutation`` to the model): ``criterion`` is
    ``"correlation"`` (Pearson) or ``"cross_moment"`` (E[a b^T]). The groups of ``spec``'s head
    sets (attention) are solved together, heads kept whole (``solvers.solve_heads``: a head's
    score against another is the best within-head match of its query/key and value
    dimensions); without ``spec`` every group is solved on its own."""
    if criterion not in ("correlation", "cross_moment"):
        raise ValueError(f"criterion must be 'correlation' or 'cross_moment', got {criterion!r}")
    options = dict(solver_options or {})
    scores = {
        g: correlation(s) if criterion == "correlation" else s["cross"] / s["count"]
        for g, s in stats.items()
    }
    perms: Perms = {}
    for head_set in spec.heads if spec is not None else ():
        together = {g: scores[g] for g in head_set.groups}
        perms.update(solve_heads(together, head_set.count, head_set.move, solver, **options))
    for g, s in scores.items():
        if g not in perms:
            perms[g] = solve_assignment(s, solver, **options)
    return perms


def _cross_statistic(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    context: StatContext,
    *,
    activation_sites: Literal["first", "all"] = "first",
) -> Stats:
    """Cross-moments per group of the reference's spec, traced on the client's own input (the
    server's spec for activation matching has the same groups: ``heads='both'``).
    ``activation_sites: all`` reads a residual stream at every block's input, not only at the
    first (what pays for transformers: docs/transformers.md)."""
    return cross_moments(context.reference_model(), model, X, sites=activation_sites)


def check_cross(cross: Stats, state: StateDict, examples: int) -> str | None:
    """Per permutation group, consistent cross sums (the groups' widths are the spec's, which
    the aligner checks against the model)."""
    for group, c in cross.items():
        if (problem := cross_problem(group, c, (None, None), examples)) is not None:
            return problem
    return None


STATISTICS.register("cross", _cross_statistic, permute=None, check=check_cross)
