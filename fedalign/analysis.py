"""Measurements of alignment: linear-mode-connectivity barriers and CKA (no Flower).

``interpolation_barrier`` evaluates ``theta(l) = (1 - l) A + l B`` on a grid; for BatchNorm models
the running statistics are re-estimated at every point (otherwise the curve measures BN mismatch,
not the weights). ``linear_cka`` / ``rbf_cka`` compare representations (Kornblith et al. 2019),
optionally with the unbiased HSIC estimator (Song et al. 2012).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from fedalign.training import evaluate

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class BarrierResult:
    lambdas: list[float]
    loss: list[float]
    accuracy: list[float]
    loss_barrier: float        # max over l of loss(l) - chord(l)
    midpoint_loss_barrier: float
    accuracy_barrier: float    # max over l of chord(l) - accuracy(l)
    midpoint_accuracy_barrier: float

    def to_dict(self) -> dict:
        return asdict(self)


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """``(1 - lam) a + lam b`` for floating entries; integer buffers are taken from ``a``."""
    return {k: (1 - lam) * v + lam * b[k] if v.is_floating_point() else v.clone() for k, v in a.items()}


@torch.no_grad()
def reset_bn_statistics(model: nn.Module, X: torch.Tensor, batch_size: int = 500) -> None:
    """Re-estimate BatchNorm running statistics on ``X`` (cumulative average, not momentum)."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:              # only BN in train mode: dropout stays off while re-estimating
        m.train()
    X = torch.as_tensor(X)
    # a last batch of one sample cannot give BatchNorm1d a variance: fold it into the previous one
    cuts = list(range(0, len(X), batch_size))
    if len(cuts) > 1 and len(X) - cuts[-1] == 1:
        cuts.pop()
    for start, end in zip(cuts, cuts[1:] + [len(X)]):
        model(X[start:end])
    model.eval()


def interpolation_barrier(
    model: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    X: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    points: int = 25,
    batch_size: int = 1000,
    bn_data: torch.Tensor | np.ndarray | None = None,
) -> BarrierResult:
    """Loss and accuracy along the segment from ``state_a`` to ``state_b`` and its barriers.

    ``bn_data`` (default ``X``) is used to re-estimate BN statistics at every point of BN models.
    """
    net = copy.deepcopy(model)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    bn_X = torch.as_tensor(bn_data) if bn_data is not None else X
    lambdas = np.linspace(0.0, 1.0, points).tolist()
    losses, accs = [], []
    for lam in lambdas:
        net.load_state_dict(interpolate(state_a, state_b, lam))
        reset_bn_statistics(net, bn_X, batch_size)
        loss, acc = evaluate(net, X, y, batch_size)
        losses.append(loss)
        accs.append(acc)
    lam_arr, loss_arr, acc_arr = np.array(lambdas), np.array(losses), np.array(accs)
    loss_chord = (1 - lam_arr) * loss_arr[0] + lam_arr * loss_arr[-1]
    acc_chord = (1 - lam_arr) * acc_arr[0] + lam_arr * acc_arr[-1]
    mid = int(np.argmin(np.abs(lam_arr - 0.5)))
    return BarrierResult(
        lambdas, losses, accs,
        loss_barrier=float(np.max(loss_arr - loss_chord)),
        midpoint_loss_barrier=float(loss_arr[mid] - loss_chord[mid]),
        accuracy_barrier=float(np.max(acc_chord - acc_arr)),
        midpoint_accuracy_barrier=float(acc_chord[mid] - acc_arr[mid]),
    )


# ---- CKA --------------------------------------------------------------------------------------

def _as_float64(x) -> torch.Tensor:
    t = torch.as_tensor(x).double()
    return t.reshape(len(t), -1)


def _hsic(K: torch.Tensor, L: torch.Tensor, debiased: bool) -> torch.Tensor:
    """HSIC of two n x n Gram matrices (biased: centred product; debiased: Song et al. 2012)."""
    n = K.shape[0]
    if not debiased:
        H = torch.eye(n, dtype=K.dtype) - 1.0 / n
        return torch.sum((H @ K @ H) * L)
    K = K.clone().fill_diagonal_(0)
    L = L.clone().fill_diagonal_(0)
    ones = torch.ones(n, dtype=K.dtype)
    term = torch.sum(K * L) + (ones @ K @ ones) * (ones @ L @ ones) / ((n - 1) * (n - 2))
    term = term - 2.0 / (n - 2) * (ones @ K @ L @ ones)
    return term / (n * (n - 3))


def _cka_from_grams(K: torch.Tensor, L: torch.Tensor, debiased: bool) -> float:
    if debiased and K.shape[0] < 4:
        raise ValueError("debiased CKA needs at least 4 samples")
    xy = _hsic(K, L, debiased)
    return float(xy / torch.sqrt(_hsic(K, K, debiased) * _hsic(L, L, debiased)))


def linear_cka(X, Y, debiased: bool = False) -> float:
    """Linear CKA of representations ``X`` (n, p) and ``Y`` (n, q) of the same n inputs.

    The biased form is computed in feature space, ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``
    on column-centred features (no n x n matrices).
    """
    X, Y = _as_float64(X), _as_float64(Y)
    if len(X) != len(Y):
        raise ValueError(f"X and Y must describe the same inputs, got {len(X)} and {len(Y)} rows")
    if debiased:
        return _cka_from_grams(X @ X.T, Y @ Y.T, True)
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    xy = torch.linalg.matrix_norm(Y.T @ X) ** 2
    return float(xy / (torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)))


def _rbf_gram(X: torch.Tensor, threshold: float) -> torch.Tensor:
    sq = torch.cdist(X, X) ** 2
    bandwidth = threshold**2 * torch.quantile(sq.flatten(), 0.5)  # np.median, as Kornblith et al.
    return torch.exp(-sq / (2 * bandwidth.clamp_min(1e-12)))


def rbf_cka(X, Y, threshold: float = 1.0, debiased: bool = False) -> float:
    """CKA with RBF kernels, bandwidth ``threshold`` x the median pairwise distance."""
    X, Y = _as_float64(X), _as_float64(Y)
    return _cka_from_grams(_rbf_gram(X, threshold), _rbf_gram(Y, threshold), debiased)
