"""Sinkhorn re-basin (Peña et al. 2023): learn soft permutations by gradient descent.

Each group gets a free matrix; its Sinkhorn normalisation (log domain) is a doubly stochastic
"soft permutation" that acts on the other model's parameters by matrix products, so any
differentiable loss can steer the alignment: a data-free distance to the reference, or the loss of
the two models' midpoint on data. Gradients flow through the unrolled Sinkhorn iterations (no
implicit differentiation, whose linear system can be singular). At the end each plan is hardened
by the Hungarian algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .solvers import solve_assignment
from .spec import AxisRef, Perms, PermutationSpec

LOSSES = ("l2", "l1", "cosine", "midpoint")


def log_sinkhorn(logits: torch.Tensor, tau: float, n_iter: int) -> torch.Tensor:
    """(..., n, n) doubly stochastic plans ``exp`` of ``logits / tau`` after ``n_iter``
    alternating row and column normalisations in the log domain (differentiable; the last step
    makes columns exact). Leading axes are a batch of independent plans."""
    log_p = logits / tau
    for _ in range(n_iter):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp()


def _plans(
    logits: Mapping[int, torch.Tensor], groups: Mapping[int, list[str]], tau: float, n_iter: int
) -> dict[str, torch.Tensor]:
    """Each group's soft permutation, normalised with the other groups of its size as one batch:
    a transformer's groups come in a few sizes (the residual stream, every block's feed-forward
    units, every block's heads), so a step runs ``2 * n_iter`` normalisations per size instead
    of per group, forward and backward."""
    plans = {}
    for n, stacked in logits.items():
        plans.update(zip(groups[n], log_sinkhorn(stacked, tau, n_iter).unbind(0)))
    return plans


def soft_permute_axis(value: torch.Tensor, plan: torch.Tensor, ref: AxisRef) -> torch.Tensor:
    """``value`` with the axis ``ref`` mixed by ``plan`` (n x n): unit i <- sum_j plan[i, j]
    unit j."""
    t = value.movedim(ref.axis, 0)
    rest = t.shape[1:]
    t = t.reshape(ref.repeat, plan.shape[1], ref.block, -1)
    t = torch.einsum("ij,rjbk->ribk", plan, t)
    return t.reshape(-1, *rest).movedim(0, ref.axis)


def soft_permute(
    spec: PermutationSpec, plans: Mapping[str, torch.Tensor], key: str, value: torch.Tensor
) -> torch.Tensor:
    for group, ref in spec.axes_of(key).values():
        value = soft_permute_axis(value, plans[group], ref)
    return value


def sinkhorn_rebasin(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    loss: str = "l2",
    model: nn.Module | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    steps: int = 300,
    lr: float = 0.1,
    tau: float = 1.0,
    n_iter: int = 20,
    seed: int = 0,
    solver: str = "hungarian",
) -> Perms:
    """Permutations aligning ``other`` to ``reference`` learnt through soft permutations.

    ``loss``: ``"l2"``, ``"l1"``, ``"cosine"`` (data-free distances between ``reference`` and the
    soft-permuted ``other`` over the permuted parameters, BN running statistics excluded) or
    ``"midpoint"`` (cross-entropy of the midpoint model ``(reference + P(other)) / 2`` on
    ``data = (X, y)``, evaluated with ``model``'s architecture through ``functional_call``).
    Each group's ``n x n`` logits start at ``I + 0.1 * randn`` and are trained by Adam (``steps``,
    ``lr``); the soft permutation is ``log_sinkhorn(logits, tau, n_iter)``, the groups of one size
    normalised as one batch (``_plans``). At the end every plan is hardened by ``solver``.
    Apply the result with ``apply_permutation(spec, perms, other)``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    spec.require_free_groups("Sinkhorn re-basin")
    if loss == "midpoint" and (model is None or data is None):
        raise ValueError("loss='midpoint' needs the model (architecture) and data=(X, y)")
    generator = torch.Generator().manual_seed(seed)
    starts = {
        g: torch.eye(n) + 0.1 * torch.randn(n, n, generator=generator)
        for g, n in spec.sizes.items()
    }
    groups: dict[int, list[str]] = {}
    for g, n in spec.sizes.items():
        groups.setdefault(n, []).append(g)
    logits = {n: torch.stack([starts[g] for g in gs]).requires_grad_() for n, gs in groups.items()}
    # the distance ignores BN running statistics; the midpoint model needs them all
    keys = sorted(spec.keys if loss == "midpoint" else spec.keys - spec.buffers)
    ref = {k: reference[k].detach().float() for k in keys}
    oth = {k: other[k].detach().float() for k in keys}
    if loss == "midpoint":
        X, y = data
        fixed = {
            k: (0.5 * (v.detach() + other[k].detach()) if v.is_floating_point() else v)
            for k, v in reference.items()
            if k not in spec.keys
        }
    scale = sum(float((v**2).sum()) for k, v in ref.items() if k not in spec.buffers) ** 0.5
    optimizer = torch.optim.Adam(logits.values(), lr=lr)
    for _ in range(steps):
        plans = _plans(logits, groups, tau, n_iter)
        moved = {k: soft_permute(spec, plans, k, oth[k]) for k in keys}
        if loss == "midpoint":
            params = {**fixed, **{k: 0.5 * (ref[k] + moved[k]) for k in keys}}
            objective = F.cross_entropy(functional_call(model, params, (X,)), y)
        else:
            a = torch.cat([ref[k].reshape(-1) for k in keys])
            b = torch.cat([moved[k].reshape(-1) for k in keys])
            if loss == "l2":
                objective = ((a - b) ** 2).sum() / scale**2
            elif loss == "l1":
                objective = (a - b).abs().sum() / scale
            else:
                objective = 1 - F.cosine_similarity(a, b, dim=0)
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
    with torch.no_grad():
        plans = _plans(logits, groups, tau, n_iter)
        return {g: solve_assignment(plans[g], solver) for g in spec.sizes}
