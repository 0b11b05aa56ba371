"""CKA and interpolation barriers."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import copy

from fedalign.analysis import interpolation_barrier, linear_cka, rbf_cka, reset_bn_statistics
from fedalign.models import build_model


def _reps(seed=0, n=80, p=12, q=7):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    Y = X[:, :q] @ torch.randn(q, q, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return X, Y


def test_cka_of_identical_inputs_is_one():
    X, _ = _reps()
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, X, debiased=True) == pytest.approx(1.0)
    assert rbf_cka(X, X) == pytest.approx(1.0)


def test_cka_invariances_and_a_non_invariance():
    X, Y = _reps()
    Q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    base = linear_cka(X, Y)
    assert 0.1 < base < 0.99
    assert linear_cka(X, 3.7 * Y @ Q) == pytest.approx(base, rel=1e-9)
    assert linear_cka(X, Y @ Q, debiased=True) == pytest.approx(linear_cka(X, Y, debiased=True), rel=1e-9)
    assert rbf_cka(X, 2.0 * Y @ Q) == pytest.approx(rbf_cka(X, Y), rel=1e-9)
    stretch = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 0.1], dtype=torch.float64))
    assert abs(linear_cka(X, Y @ stretch) - base) > 1e-3        # not invariant to any invertible map


def test_debiased_linear_cka_matches_a_direct_unbiased_hsic():
    X, Y = _reps(seed=3, n=30)
    K, L = (X @ X.T).numpy(), (Y @ Y.T).numpy()
    n = K.shape[0]

    def hsic_u(K, L):                       # Song et al. (2012), eq. (5), written out directly
        Kt, Lt = K.copy(), L.copy()
        np.fill_diagonal(Kt, 0)
        np.fill_diagonal(Lt, 0)
        one = np.ones(n)
        return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))

    direct = hsic_u(K, L) / np.sqrt(hsic_u(K, K) * hsic_u(L, L))
    assert linear_cka(X, Y, debiased=True) == pytest.approx(direct, rel=1e-9)
    assert linear_cka(X, Y, debiased=True) != pytest.approx(linear_cka(X, Y), rel=1e-3)


def test_barrier_endpoints_and_self_interpolation():
    torch.manual_seed(0)
    X, y = torch.randn(300, 784), torch.randint(0, 10, (300,))
    a, b = build_model("mlp", hidden=[32]), build_model("mlp", hidden=[32])
    r = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=5)
    loss_a = nn.functional.cross_entropy(a(X), y).item()
    assert r.loss[0] == pytest.approx(loss_a, rel=1e-5) and len(r.loss) == 5
    same = interpolation_barrier(a, a.state_dict(), a.state_dict(), X, y, points=5)
    assert abs(same.loss_barrier) < 1e-5 and abs(same.accuracy_barrier) < 1e-9


def test_convex_model_has_no_barrier():
    torch.manual_seed(0)
    X, y = torch.randn(400, 20), torch.randint(0, 3, (400,))
    a, b = nn.Linear(20, 3), nn.Linear(20, 3)         # cross-entropy of a linear model is convex
    r = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=11)
    assert r.loss_barrier <= 1e-6


def test_bn_statistics_are_reestimated_at_each_point():
    torch.manual_seed(0)
    X, y = torch.randn(256, 5) * 2 + 1, torch.randint(0, 3, (256,))

    def net():
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))

    a, b = net(), net()
    for m in (a[1], b[1]):
        m.running_mean.uniform_(-3, 3)                   # stale statistics
    reset = copy.deepcopy(a)
    reset_bn_statistics(reset, X, batch_size=256)      # one batch: exact moments
    pre = a[0](X).detach()
    torch.testing.assert_close(reset[1].running_mean, pre.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reset[1].running_var, pre.var(0), rtol=1e-4, atol=1e-5)
    r = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=3)
    reset.eval()
    a.eval()
    with torch.no_grad():
        assert r.loss[0] == pytest.approx(nn.functional.cross_entropy(reset(X), y).item(), rel=1e-5)
        assert r.loss[0] != pytest.approx(nn.functional.cross_entropy(a(X), y).item(), rel=1e-3)


def test_rbf_bandwidth_uses_the_usual_median():
    X, Y = _reps(seed=5, n=6, p=4, q=3)

    def gram(Z):                                      # Kornblith et al.'s gram_rbf, with np.median
        sq = torch.cdist(Z, Z).numpy() ** 2
        return torch.from_numpy(np.exp(-sq / (2 * np.median(sq))))

    K, L = gram(X), gram(Y)
    H = torch.eye(6, dtype=torch.float64) - 1 / 6
    hsic = lambda A, B: torch.sum((H @ A @ H) * B)   # noqa: E731
    expected = float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))
    assert rbf_cka(X, Y) == pytest.approx(expected, rel=1e-12)


def test_bn_reset_handles_a_last_batch_of_one_and_keeps_dropout_off():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.9), nn.Linear(4, 3))
    X = torch.randn(11, 5)
    reset_bn_statistics(net, X, batch_size=10)        # batches of 10 and 1 -> one batch of 11
    torch.testing.assert_close(net[1].running_mean, net[0](X).detach().mean(0), rtol=1e-5, atol=1e-6)
    assert not net.training and not net[2].training
