"""Measurements of alignment: linear-mode-connectivity barriers and CKA (no Flower).

``interpolation_barrier`` evaluates ``theta(l) = (1 - l) A + l B`` on a grid; for BatchNorm models
the running statistics are re-estimated at every point, because the interpolated weights produce
activations whose moments match neither endpoint's statistics: without the reset the curve measures
that mismatch, not the weights. Studies that compare such corrections (none, REPAIR, a BatchNorm
reset from pooled moments) turn the reset off and pass their own ``correct``.

``linear_cka`` / ``rbf_cka`` compare representations (Kornblith et al. 2019), optionally with the
unbiased HSIC estimator (Song et al. 2012), which removes the bias that makes plain CKA of
unrelated high-dimensional features far from 0 on few samples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedalign.client.training import evaluate

ArrayLike = torch.Tensor | np.ndarray
Correction = Callable[[nn.Module, float], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class BarrierResult:
    """Loss and accuracy along the segment, and the barriers read off them.

    Barriers are measured against the chord between the endpoints' values, so two models of
    different quality are not charged for that difference: ``loss_barrier`` is
    ``max_l loss(l) - ((1 - l) loss(0) + l loss(1))``, ``accuracy_barrier`` is the chord minus the
    curve. The midpoint values are taken at the grid point nearest to 0.5 (exactly 0.5 for an odd
    number of points).
    """

    lambdas: list[float]
    loss: list[float]
    accuracy: list[float]
    loss_barrier: float
    midpoint_loss_barrier: float
    accuracy_barrier: float
    midpoint_accuracy_barrier: float

    @property
    def midpoint(self) -> int:
        """Index of the grid point nearest to 0.5."""
        return int(np.argmin(np.abs(np.asarray(self.lambdas) - 0.5)))

    def to_dict(self) -> dict:
        return asdict(self)


def interpolate(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """``(1 - lam) a + lam b`` for floating entries; integer buffers (``num_batches_tracked``)
    have no meaningful average and are taken from ``a``."""
    if a.keys() != b.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(set(a) ^ set(b))}")
    return {
        k: torch.lerp(v, b[k].to(v), lam) if v.is_floating_point() else v.clone()
        for k, v in a.items()
    }


def _batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers (any dimension) that keep running statistics; the others use batch
    statistics in eval mode too and have nothing to re-estimate."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reset_bn_statistics(
    model: nn.Module, X: ArrayLike, batch_size: int = 500, device: str | torch.device = "cpu"
) -> None:
    """Re-estimate the BatchNorm running statistics of ``model`` (in place) on ``X``.

    Train-mode forward passes with ``momentum=None`` give the cumulative average of the per-batch
    moments, so the estimate does not depend on a momentum or on the batch order. Only the
    BatchNorm layers are put in train mode (dropout stays off); the model is left in eval mode with
    its layers' momenta restored. Models without BatchNorm are left untouched.
    """
    bns = _batch_norms(model)
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    model.to(device).eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    X = torch.as_tensor(X)
    # a last batch of one sample gives BatchNorm no variance (an error): fold it into the
    # previous one
    cuts = list(range(0, len(X), batch_size))
    if len(cuts) > 1 and len(X) - cuts[-1] == 1:
        cuts.pop()
    for start, end in zip(cuts, cuts[1:] + [len(X)]):
        model(X[start:end].to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()


def interpolation_barrier(
    model: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    X: ArrayLike,
    y: ArrayLike,
    points: int = 25,
    batch_size: int = 1000,
    bn_reset_data: ArrayLike | None = None,
    device: str | torch.device = "cpu",
    reset_bn: bool = True,
    correct: Correction | None = None,
) -> BarrierResult:
    """Loss and accuracy of ``model`` with the weights ``(1 - l) state_a + l state_b`` at ``points``
    evenly spaced ``l`` in [0, 1], evaluated on ``(X, y)`` in batches, and the barriers.

    ``model`` gives the architecture only (a copy is loaded; the argument is not modified). Models
    with BatchNorm get their running statistics re-estimated at every point on ``bn_reset_data``
    (default ``X``; pass training inputs to keep the test set out of the estimate), including the
    endpoints, so every point is measured the same way; ``reset_bn=False`` evaluates every point
    with the running statistics interpolated like the weights, as a fused model arrives.

    ``correct(net, l)`` returns a corrected state for the interpolated model at every interior
    point (``0 < l < 1``), e.g. REPAIR toward ``(1 - l)`` and ``l`` of the endpoints' statistics.
    It skips the endpoints: they are the trained models, and a correction toward their own
    statistics would change them only by its numerical slack, yet move the chord. ``net`` is on
    the CPU, where the statistics helpers a correction calls expect their data.
    """
    if points < 2:
        raise ValueError(f"points must be at least 2 (both endpoints), got {points}")
    net = copy.deepcopy(model)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    bn_X = X if bn_reset_data is None else torch.as_tensor(bn_reset_data)
    lambdas = np.linspace(0.0, 1.0, points)
    curve = []
    for lam in lambdas:
        net.load_state_dict(interpolate(state_a, state_b, float(lam)))
        if reset_bn:
            reset_bn_statistics(net, bn_X, batch_size, device)
        if correct is not None and 0 < lam < 1:
            net.load_state_dict(correct(net.cpu(), float(lam)))
        curve.append(evaluate(net, X, y, batch_size, device))
    loss, acc = np.array(curve).T
    loss_gap = loss - ((1 - lambdas) * loss[0] + lambdas * loss[-1])
    acc_gap = (1 - lambdas) * acc[0] + lambdas * acc[-1] - acc
    mid = int(np.argmin(np.abs(lambdas - 0.5)))
    return BarrierResult(
        lambdas=lambdas.tolist(),
        loss=loss.tolist(),
        accuracy=acc.tolist(),
        loss_barrier=float(loss_gap.max()),
        midpoint_loss_barrier=float(loss_gap[mid]),
        accuracy_barrier=float(acc_gap.max()),
        midpoint_accuracy_barrier=float(acc_gap[mid]),
    )


# ---- CKA --------------------------------------------------------------------------------------


def _features(X: ArrayLike, Y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Both representations as float64 (n, features) matrices; conv maps are flattened per input."""
    X, Y = (torch.as_tensor(Z).detach().double() for Z in (X, Y))
    X, Y = X.reshape(len(X), -1), Y.reshape(len(Y), -1)
    if len(X) != len(Y):
        raise ValueError(f"X and Y must describe the same inputs, got {len(X)} and {len(Y)} rows")
    return X, Y


def _unbiased_hsic_terms(
    xy_frob2: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, n: int
) -> torch.Tensor:
    """``n (n - 3)`` times the unbiased HSIC (Song et al. 2012) of linear kernels on column-centred
    features, from ``||Y^T X||_F^2`` and the squared row norms ``dx``, ``dy`` (the Gram diagonals).

    With centred features ``K 1 = 0``, so for the zero-diagonal Grams ``K~ = K - diag(dx)``:
    ``tr(K~ L~) = ||Y^T X||^2 - dx.dy``, ``1^T K~ 1 = -sum dx``, ``1^T K~ L~ 1 = dx.dy``.
    """
    return xy_frob2 - n / (n - 2) * (dx @ dy) + dx.sum() * dy.sum() / ((n - 1) * (n - 2))


def linear_cka(X: ArrayLike, Y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA of representations ``X`` (n, p) and ``Y`` (n, q) of the same n inputs.

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred features, computed in feature
    space (p x q products, no n x n Gram matrices), also for the debiased variant.
    """
    X, Y = _features(X, Y)
    n = len(X)
    if debiased and n < 4:
        raise ValueError("debiased CKA needs at least 4 samples")
    X, Y = X - X.mean(0), Y - Y.mean(0)
    xy, xx, yy = (torch.linalg.matrix_norm(A.T @ B) ** 2 for A, B in ((Y, X), (X, X), (Y, Y)))
    if debiased:
        dx, dy = (X * X).sum(1), (Y * Y).sum(1)
        xy = _unbiased_hsic_terms(xy, dx, dy, n)
        xx = _unbiased_hsic_terms(xx, dx, dx, n)
        yy = _unbiased_hsic_terms(yy, dy, dy, n)
    return float(xy / torch.sqrt(xx * yy))


def _hsic(K: torch.Tensor, L: torch.Tensor, debiased: bool) -> torch.Tensor:
    """HSIC of two n x n Gram matrices up to a factor that cancels in CKA (biased: the centred
    product; debiased: Song et al. 2012 times ``n (n - 3)``)."""
    n = K.shape[0]
    if not debiased:
        Kc = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
        return torch.sum(Kc * L)
    K, L = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    k1, l1 = K.sum(1), L.sum(1)
    return torch.sum(K * L) + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)


def _rbf_gram(X: torch.Tensor, threshold: float) -> torch.Tensor:
    """RBF Gram matrix with the bandwidth of Kornblith et al.: ``threshold`` x the median distance
    (squared distances, median over all n^2 entries with the diagonal, as ``np.median`` there)."""
    sq = torch.cdist(X, X) ** 2
    median = float(np.median(sq.cpu().numpy()))
    return torch.exp(-sq / (2 * threshold**2 * max(median, 1e-12)))


def rbf_cka(X: ArrayLike, Y: ArrayLike, threshold: float = 1.0, debiased: bool = False) -> float:
    """CKA with RBF kernels of bandwidth ``threshold`` x the median pairwise distance (n x n
    Grams)."""
    X, Y = _features(X, Y)
    if debiased and len(X) < 4:
        raise ValueError("debiased CKA needs at least 4 samples")
    K, L = _rbf_gram(X, threshold), _rbf_gram(Y, threshold)
    return float(_hsic(K, L, debiased) / torch.sqrt(_hsic(K, K, debiased) * _hsic(L, L, debiased)))
