"""Assignment solvers: the one place a score matrix becomes a hard assignment.

Every matching method names its solver by a string (``"hungarian"`` or ``"sinkhorn"``), so users
switch solvers everywhere with one config entry. Solvers maximise the total score of an ``n x m``
matrix (``n <= m``) and return, for each row, its column.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np
import torch

from fedalign.core.registry import Registry


def hungarian(scores: torch.Tensor) -> torch.Tensor:
    """Exact maximum-score assignment of rows to distinct columns (Jonker-Volgenant, on the CPU)."""
    columns = hungarian_columns(scores.detach().cpu().double().numpy())
    return torch.from_numpy(columns).to(scores.device)


def hungarian_columns(scores: np.ndarray) -> np.ndarray:
    """:func:`hungarian` on a float64 array (finite, n <= m), returning each row's column as an
    int64 array: for callers that solve many small problems and use the answer in NumPy (PFNM
    solves ~60 per fusion, where every torch op and conversion around a solve counted)."""
    # imported here: importing scipy.optimize costs every process that imports the registries
    # (each Ray worker included) about 0.5 s of start-up, and only a server that matches solves
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(scores, maximize=True)
    out = np.empty(scores.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def _sinkhorn_potentials(
    s: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Alternate row and column normalisations of ``exp((s + f + g) / eps)`` (square ``s``, unit
    marginals) until every row sums to 1 within ``tol`` or ``max_iter`` iterations ran.

    The potentials ``f``, ``g`` are in score units so they carry over between temperatures.
    """
    for i in range(1, max_iter + 1):
        f = -eps * torch.logsumexp((s + g[None, :]) / eps, dim=1)
        g = -eps * torch.logsumexp((s + f[:, None]) / eps, dim=0)
        # columns are exact after the g-update; check the rows now and then (it costs an iteration)
        if i % 10 == 0:
            row_sums = torch.logsumexp((s + f[:, None] + g[None, :]) / eps, dim=1).exp()
            if (row_sums - 1).abs().max() < tol:
                return f, g, i
    return f, g, max_iter


def sinkhorn_plan(
    scores: torch.Tensor,
    reg: float = 1e-3,
    tol: float = 1e-3,
    max_iter: int = 10_000,
    scaling: float = 0.5,
) -> torch.Tensor:
    """Entropic transport plan (log domain) of rows onto columns, maximising the scores.

    The temperature is relative: ``eps = reg * (max - min)`` of the scores, so one ``reg`` works
    at any scale. Small temperatures converge slowly from scratch, so the plan is computed at
    ``spread, spread * scaling, ...`` down to ``eps``, each stage warm-starting the next
    (eps-scaling); intermediate stages stop at a marginal error of ``max(tol, 0.01)``, the last at
    ``tol``; ``max_iter`` caps the iterations of every stage. A rectangular ``n x m`` problem
    (``n < m``) is padded with ``m - n`` dummy rows scoring the minimum everywhere, so every row and
    column carries mass 1; the dummy rows are dropped from the plan. Runs on the scores' device.
    Returns the ``n x m`` plan (rows sum to 1, columns to at most 1).
    """
    if not 0 < scaling < 1:
        raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    if reg <= 0:
        raise ValueError(f"reg must be positive, got {reg}")
    s = scores.double()
    n, m = s.shape
    if n < m:
        s = torch.cat([s, s.min().expand(m - n, m)])
    spread = float((s.max() - s.min()).clamp_min(1e-12))
    target = reg * spread
    f = torch.zeros(m, dtype=s.dtype, device=s.device)
    g = torch.zeros_like(f)
    eps = spread
    while eps > target:
        f, g, _ = _sinkhorn_potentials(s, f, g, eps, max(tol, 1e-2), max_iter)
        eps = max(eps * scaling, target)
    f, g, _ = _sinkhorn_potentials(s, f, g, target, tol, max_iter)
    return ((s + f[:, None] + g[None, :]) / target).exp()[:n]


def sinkhorn(
    scores: torch.Tensor,
    reg: float = 1e-3,
    tol: float = 1e-3,
    max_iter: int = 10_000,
    scaling: float = 0.5,
) -> torch.Tensor:
    """Sinkhorn plan (see ``sinkhorn_plan``) rounded to a hard assignment by the Hungarian
    algorithm on the plan."""
    return hungarian(sinkhorn_plan(scores, reg, tol, max_iter, scaling))


SOLVERS = Registry("solver")
"""Solver name -> ``solve(scores, **options) -> assignment``: a LongTensor giving each row's
column."""
SOLVERS.register("hungarian", hungarian)
SOLVERS.register("sinkhorn", sinkhorn)


def solver_names() -> tuple[str, ...]:
    """The valid ``solver=`` strings."""
    return SOLVERS.names()


def solve_assignment(
    scores: torch.Tensor | np.ndarray, solver: str = "hungarian", **options
) -> torch.Tensor:
    """For each row of ``scores`` (n x m, n <= m) the column it is assigned to, maximising the
    total score; a LongTensor of length n on the scores' device.

    ``solver`` is ``"hungarian"`` (exact, no options) or ``"sinkhorn"`` (entropic, rounded;
    options ``reg``, ``tol``, ``max_iter``, ``scaling``, see ``sinkhorn_plan``).
    """
    fn = SOLVERS.get(solver).obj
    # (options only: reading the signature cost PFNM's ~60 small solves more than some solves)
    accepted = list(inspect.signature(fn).parameters)[1:] if options else []
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"solver {solver!r} does not take {unknown}; it takes {accepted or 'no options'}"
        )
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] > scores.shape[1]:
        raise ValueError(f"scores must be n x m with n <= m, got shape {tuple(scores.shape)}")
    # the sum is finite unless an entry is NaN/Inf (or the sum overflows, then look entry-wise):
    # one pass without an n x m boolean mask, which cost ~0.15 s at n = 4096
    if not torch.isfinite(scores.sum()) and not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    if scores.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return fn(scores, **options)


def solve_heads(
    scores: Mapping[str, torch.Tensor],
    count: int,
    move: bool = True,
    solver: str = "hungarian",
    **options,
) -> dict[str, torch.Tensor]:
    """Assignments of a head set's groups (``spec.HeadSet``) that keep the ``count`` heads
    together, maximising the total score of ``scores`` (group -> n x n, the groups' units in
    heads of ``n // count``).

    Inside a head the groups are independent (query/key dimensions, value dimensions), so the
    best way to put head ``k`` at head ``i`` is the sum over the groups of the best assignment
    of ``k``'s units to ``i``'s (one small assignment per group and pair); with ``move`` the heads
    are then assigned on those sums, which gives the exact optimum over every head order and
    every within-head order at once. Without ``move`` every head stays in place and only its
    units are assigned. The result indexes units as any assignment: unit ``p[i]`` of the other
    model lands at ``i``."""
    pairs = [(i, k) for i in range(count) for k in (range(count) if move else (i,))]
    best: dict[tuple[str, int, int], torch.Tensor] = {}
    value = torch.zeros(count, count, dtype=torch.float64)
    for g, s in scores.items():
        d = s.shape[0] // count
        for i, k in pairs:
            block = s[i * d : (i + 1) * d, k * d : (k + 1) * d]
            best[g, i, k] = solve_assignment(block, solver, **options)
            value[i, k] += float(block[torch.arange(d, device=block.device), best[g, i, k]].sum())
    order = solve_assignment(value, solver, **options).cpu() if move else torch.arange(count)
    return {
        g: torch.cat(
            [int(k) * (s.shape[0] // count) + best[g, i, int(k)].cpu() for i, k in enumerate(order)]
        )
        for g, s in scores.items()
    }
