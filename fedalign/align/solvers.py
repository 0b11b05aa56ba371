"""Assignment solvers: the one place a score matrix becomes a hard assignment.

Every matching method names its solver by a string (``"hungarian"`` or ``"sinkhorn"``), so users
switch solvers everywhere with one config entry.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def hungarian(scores: torch.Tensor) -> torch.Tensor:
    """Exact maximum-score assignment of rows to distinct columns (Jonker-Volgenant)."""
    rows, cols = linear_sum_assignment(scores.detach().cpu().double().numpy(), maximize=True)
    out = np.empty(scores.shape[0], dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out)


def sinkhorn_plan(
    scores: torch.Tensor, reg: float = 0.01, tol: float = 1e-6, max_iter: int = 2000
) -> torch.Tensor:
    """Entropic transport plan (log domain) of rows onto columns, maximising the scores.

    ``reg`` is relative: the temperature is ``reg * (max - min)`` of the scores, so the same value
    works whatever their scale. A rectangular ``n x m`` problem (``n < m``) is padded with
    ``m - n`` dummy rows scoring the minimum everywhere, so every row and column carries mass 1,
    and the dummy rows are dropped from the plan. Runs on the scores' device.
    """
    s = scores.double()
    n, m = s.shape
    if n < m:
        s = torch.cat([s, s.min().expand(m - n, m)])
    spread = (s.max() - s.min()).clamp_min(1e-12)
    log_k = s / (reg * spread)
    log_r = torch.zeros(m, dtype=s.dtype, device=s.device)
    log_c = torch.zeros(m, dtype=s.dtype, device=s.device)
    u = torch.zeros_like(log_r)
    v = torch.zeros_like(log_c)
    for i in range(max_iter):
        u = log_r - torch.logsumexp(log_k + v[None, :], dim=1)
        v = log_c - torch.logsumexp(log_k + u[:, None], dim=0)
        if i % 10 == 9:  # columns are exact after the v-update; check the rows now and then
            row_error = (torch.logsumexp(log_k + u[:, None] + v[None, :], dim=1).exp() - 1).abs().max()
            if row_error < tol:
                break
    return (log_k + u[:, None] + v[None, :]).exp()[:n]


def sinkhorn(scores: torch.Tensor, reg: float = 0.01, tol: float = 1e-6, max_iter: int = 2000) -> torch.Tensor:
    """Sinkhorn plan rounded to a hard assignment (Hungarian on the plan)."""
    return hungarian(sinkhorn_plan(scores, reg, tol, max_iter))


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"hungarian": hungarian, "sinkhorn": sinkhorn}


def solver_names() -> tuple[str, ...]:
    return tuple(SOLVERS)


def solve_assignment(scores: torch.Tensor | np.ndarray, solver: str = "hungarian", **options) -> torch.Tensor:
    """For each row of ``scores`` (n x m, n <= m) the column it is assigned to, maximising the
    total score; ``solver`` is ``"hungarian"`` (exact) or ``"sinkhorn"`` (entropic, rounded;
    options ``reg``, ``tol``, ``max_iter``)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] > scores.shape[1]:
        raise ValueError(f"scores must be n x m with n <= m, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    return SOLVERS[solver](scores, **options)
