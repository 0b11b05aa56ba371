"""CKA and interpolation barriers."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedalign.algorithms.analysis import (
    interpolate,
    interpolation_barrier,
    linear_cka,
    rbf_cka,
    reset_bn_statistics,
)
from fedalign.models import build_model


def _reps(seed=0, n=80, p=12, q=7):
    """Two related representations: Y is a noisy linear read-out of part of X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    Y = X[:, :q] @ torch.randn(q, q, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, q, generator=g, dtype=torch.float64
    )
    return X, Y


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


def test_cka_of_identical_inputs_is_one():
    X, _ = _reps()
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X.numpy(), X.numpy(), debiased=True) == pytest.approx(1.0)
    assert rbf_cka(X, X) == pytest.approx(1.0)
    assert rbf_cka(X, X, debiased=True) == pytest.approx(1.0)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(debiased):
    X, Y = _reps()
    Q = _orthogonal(7, seed=1)
    base = linear_cka(X, Y, debiased)
    assert 0.1 < base < 0.99
    assert linear_cka(X, Y @ Q, debiased) == pytest.approx(base, rel=1e-9)
    assert linear_cka(X, 3.7 * Y, debiased) == pytest.approx(base, rel=1e-9)
    assert linear_cka(0.2 * X @ _orthogonal(12, seed=2), 3.7 * Y @ Q, debiased) == pytest.approx(
        base, rel=1e-9
    )
    assert rbf_cka(X, 2.0 * Y @ Q, debiased=debiased) == pytest.approx(
        rbf_cka(X, Y, debiased=debiased), rel=1e-9
    )


def test_cka_is_not_invariant_to_a_generic_invertible_map():
    X, Y = _reps()
    A = torch.randn(7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.linalg.matrix_rank(A) == 7
    assert abs(linear_cka(X, Y @ A) - linear_cka(X, Y)) > 1e-2
    assert abs(linear_cka(X, Y @ A, debiased=True) - linear_cka(X, Y, debiased=True)) > 1e-2


def test_linear_cka_matches_direct_gram_computations():
    X, Y = _reps(seed=3, n=30)
    K, L = (X @ X.T).numpy(), (Y @ Y.T).numpy()  # raw (uncentred) linear Grams
    n = K.shape[0]
    H = np.eye(n) - 1 / n

    def hsic_biased(K, L):
        return np.trace(K @ H @ L @ H)

    def hsic_unbiased(K, L):  # Song et al. (2012), eq. (5), written out
        Kt, Lt = K.copy(), L.copy()
        np.fill_diagonal(Kt, 0)
        np.fill_diagonal(Lt, 0)
        one = np.ones(n)
        return (
            np.trace(Kt @ Lt)
            + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ Kt @ Lt @ one)
        ) / (n * (n - 3))

    for hsic, debiased in ((hsic_biased, False), (hsic_unbiased, True)):
        direct = hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))
        assert linear_cka(X, Y, debiased=debiased) == pytest.approx(direct, rel=1e-9)
    assert linear_cka(X, Y, debiased=True) != pytest.approx(linear_cka(X, Y), rel=1e-3)


def test_debiasing_removes_the_small_sample_bias_of_unrelated_features():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(50, 400, generator=g), torch.randn(50, 400, generator=g)  # independent
    assert linear_cka(X, Y) > 0.5  # plain CKA is far from 0 with p >> n
    assert abs(linear_cka(X, Y, debiased=True)) < 0.05


def test_rbf_cka_is_a_similarity_in_the_unit_interval():
    X, Y = _reps(seed=4)
    unrelated = torch.randn(80, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    related, independent = rbf_cka(X, Y), rbf_cka(X, unrelated)
    assert 0.0 <= independent < related < 1.0
    assert rbf_cka(X, Y, threshold=0.5) != pytest.approx(related, rel=1e-3)  # the bandwidth matters


def test_rbf_bandwidth_uses_the_usual_median():
    X, Y = _reps(seed=5, n=6, p=4, q=3)

    def gram(Z, threshold):  # Kornblith et al.'s gram_rbf, with np.median
        Z = Z.numpy()
        sq = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
        return np.exp(-sq / (2 * threshold**2 * np.median(sq)))

    H = np.eye(6) - 1 / 6

    def hsic(A, B):
        return np.trace(A @ H @ B @ H)

    for threshold in (1.0, 0.7):
        K, L = gram(X, threshold), gram(Y, threshold)
        expected = hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))
        assert rbf_cka(X, Y, threshold=threshold) == pytest.approx(expected, rel=1e-12)


def test_barrier_endpoints_are_each_models_own_loss_and_self_interpolation_has_none():
    torch.manual_seed(0)
    X, y = torch.randn(300, 784), torch.randint(0, 10, (300,))
    a, b = build_model("mlp", hidden=[32]), build_model("mlp", hidden=[32])
    r = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=5, batch_size=64)
    with torch.no_grad():
        for model, loss, acc in ((a, r.loss[0], r.accuracy[0]), (b, r.loss[-1], r.accuracy[-1])):
            assert loss == pytest.approx(F.cross_entropy(model(X), y).item(), rel=1e-5)
            assert acc == pytest.approx((model(X).argmax(1) == y).float().mean().item())
    assert r.lambdas == pytest.approx([0, 0.25, 0.5, 0.75, 1]) and r.midpoint == 2
    assert r.to_dict()["loss_barrier"] == r.loss_barrier
    same = interpolation_barrier(a, a.state_dict(), a.state_dict(), X, y, points=5)
    assert abs(same.loss_barrier) < 1e-6 and abs(same.accuracy_barrier) < 1e-9


def test_convex_model_has_no_barrier():
    torch.manual_seed(0)
    X, y = torch.randn(400, 20), torch.randint(0, 3, (400,))
    a, b = nn.Linear(20, 3), nn.Linear(20, 3)  # cross-entropy of a linear model is convex in theta
    for m in (a, b):
        m.weight.data.mul_(5)
    r = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=11)
    assert max(r.loss) > min(r.loss) + 0.1  # a curve that varies, yet stays below the chord
    assert r.loss_barrier <= 1e-6 and r.midpoint_loss_barrier < 0


def _bn_net():
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def test_bn_statistics_used_at_every_point_are_those_of_the_data():
    torch.manual_seed(0)
    X, y = torch.randn(256, 5) * 2 + 1, torch.randint(0, 3, (256,))
    a, b = _bn_net(), _bn_net()
    for m in (a[1], b[1]):
        m.running_mean.uniform_(-3, 3)  # stale statistics
        m.running_var.uniform_(5, 9)
    used = []  # the statistics each evaluation pass uses
    a[1].register_forward_hook(
        lambda m, i, o: used.append(m.running_mean.clone()) if not m.training else None
    )
    r = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=3, batch_size=256)
    assert len(used) == 3 and a[1].running_mean.abs().max() > 0.5  # model's own stats untouched
    for k, lam in enumerate(r.lambdas):
        net = _bn_net()
        net.load_state_dict(interpolate(a.state_dict(), b.state_dict(), lam))
        pre = net[0](X).detach()  # one batch of all X: exact batch moments
        torch.testing.assert_close(used[k], pre.mean(0), rtol=1e-5, atol=1e-5)
        net[1].running_mean.copy_(pre.mean(0))
        net[1].running_var.copy_(pre.var(0))
        with torch.no_grad():
            assert r.loss[k] == pytest.approx(F.cross_entropy(net.eval()(X), y).item(), rel=1e-5)
    with torch.no_grad():  # the stale statistics give another curve
        assert r.loss[0] != pytest.approx(F.cross_entropy(a.eval()(X), y).item(), rel=1e-3)


def test_bn_reset_uses_bn_reset_data_when_given():
    torch.manual_seed(0)
    X, y, other = torch.randn(64, 5), torch.randint(0, 3, (64,)), torch.randn(64, 5) + 4
    a = _bn_net()
    used = []
    a[1].register_forward_hook(
        lambda m, i, o: used.append(m.running_mean.clone()) if not m.training else None
    )
    interpolation_barrier(
        a, a.state_dict(), a.state_dict(), X, y, points=2, batch_size=64, bn_reset_data=other
    )
    torch.testing.assert_close(used[0], a[0](other).detach().mean(0), rtol=1e-5, atol=1e-5)


def test_bn_reset_cumulates_batches_folds_a_last_batch_of_one_and_keeps_dropout_off():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Dropout(0.9), nn.Linear(4, 3)
    )
    X = torch.randn(21, 5)
    reset_bn_statistics(net, X, batch_size=10)  # batches of 10 and 11 (the last 1 folded in)
    pre = net[0](X).detach()
    expected = (pre[:10].mean(0) + pre[10:].mean(0)) / 2  # cumulative average of the batch means
    torch.testing.assert_close(net[1].running_mean, expected, rtol=1e-5, atol=1e-6)
    assert not net.training and not net[2].training and net[1].momentum == 0.3


def test_bn_reset_handles_conv_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    X = torch.randn(8, 1, 6, 6)
    reset_bn_statistics(copy.deepcopy(net), X)
    reset_bn_statistics(net, X)
    torch.testing.assert_close(
        net[1].running_mean, net[0](X).detach().mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )
