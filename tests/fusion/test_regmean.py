"""RegMean: exactness, the aligned basis, channel Grams, bad input."""

import pytest
import torch
from torch import nn

from fedalign.algorithms.align import (
    apply_permutation,
    invert_permutation,
    permutation_spec,
    random_permutation,
)
from fedalign.algorithms.fusion.regmean import expand_channel_gram, permute_grams, regmean
from fedalign.algorithms.stats import gram_matrices
from fedalign.models import build_model


def _least_squares(X, Y):
    """Weight and bias of the least-squares fit with an intercept."""
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    theta = torch.linalg.lstsq(A, Y, driver="gelsd").solution.T  # SVD: rank-deficient inputs too
    return theta[:, :-1], theta[:, -1]


def test_regmean_of_least_squares_clients_is_the_pooled_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(5, 3, generator=g, dtype=torch.float64)
    datasets = []
    for n, shift in ((40, 0.0), (25, 2.0), (60, -1.0)):  # different input distributions
        X = torch.randn(n, 5, generator=g, dtype=torch.float64) + shift
        datasets.append((X, X @ true + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)))
    states, grams = [], []
    for X, Y in datasets:
        layer = nn.Linear(5, 3).double()
        W, b = _least_squares(X, Y)
        states.append({"weight": W, "bias": b})
        grams.append({"": gram_matrices(layer, X)[""]})
    states = [{f"fc.{k}": v for k, v in s.items()} for s in states]
    grams = [{"fc": g[""]} for g in grams]
    fused = regmean(states, grams, alpha=1.0, ridge=0.0)
    W, b = _least_squares(torch.cat([d[0] for d in datasets]), torch.cat([d[1] for d in datasets]))
    torch.testing.assert_close(fused["fc.weight"], W, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused["fc.bias"], b, rtol=1e-9, atol=1e-9)
    plain_mean = sum(s["fc.weight"] for s in states) / 3
    assert not torch.allclose(plain_mean, W, atol=1e-3)  # the clients really disagree
    alpha0 = regmean(states, grams, alpha=0.0, ridge=0.0)  # diagonal only: per-input weighted mean
    assert not torch.allclose(alpha0["fc.weight"], W, atol=1e-3)


@pytest.mark.parametrize(
    "name, kwargs, x",
    [
        ("mlp", {"hidden": [16, 12]}, torch.rand(64, 1, 28, 28)),
        ("lenet", {}, torch.rand(32, 1, 28, 28)),
        (
            "resnet20",
            {"in_channels": 1, "norm": "layer"},
            torch.rand(6, 1, 28, 28),
        ),  # bias-free convs, shortcuts
    ],
)
def test_grams_move_into_the_aligned_basis_with_the_weights(name, kwargs, x):
    """A permuted copy, its Grams sent in its own basis, aligned back: RegMean returns the model."""
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    spec = permutation_spec(model)
    perms = random_permutation(spec, torch.Generator().manual_seed(3))
    copy = build_model(name, **kwargs)
    copy.load_state_dict(apply_permutation(spec, perms, model.state_dict()))
    back = invert_permutation(perms)
    states = [model.state_dict(), apply_permutation(spec, back, copy.state_dict())]
    grams = [
        gram_matrices(model, x),
        permute_grams(spec, back, gram_matrices(copy, x), copy.state_dict()),
    ]
    for k, G in grams[0].items():
        torch.testing.assert_close(
            grams[1][k], G, rtol=1e-5, atol=1e-4
        )  # float32 sums in another order
    fused = regmean(states, grams, alpha=0.9)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fused[k], v, rtol=1e-3, atol=1e-4)


def test_channel_grams_expand_to_the_right_shape_and_reject_mismatches():
    torch.manual_seed(0)
    model = build_model("lenet")
    x = torch.rand(8, 1, 28, 28)
    channel = gram_matrices(model, x, conv="channel")
    assert expand_channel_gram(channel["conv2"], 25).shape == (151, 151)
    fused = regmean([model.state_dict()] * 2, [channel] * 2, alpha=0.5)
    assert fused["conv2.weight"].shape == model.conv2.weight.shape
    with pytest.raises(ValueError, match="client 1 sent Grams"):
        regmean([model.state_dict()] * 2, [channel, {"conv1": channel["conv1"]}])
    bad = dict(channel, fc1=torch.eye(3))
    with pytest.raises(ValueError, match="Gram of 'fc1'"):
        regmean([model.state_dict()] * 2, [bad, bad])
    stray = dict(channel, head=torch.eye(3))
    with pytest.raises(ValueError, match="no entry head.weight"):
        regmean([model.state_dict()] * 2, [stray, stray])
    with pytest.raises(ValueError, match="1 sets of Grams for 2 state dicts"):
        regmean([model.state_dict()] * 2, [channel])


def test_a_singular_gram_without_ridge_falls_back_to_least_squares():
    """An input no client ever uses makes sum G singular: Cholesky fails, lstsq still fits."""
    g = torch.Generator().manual_seed(0)
    states, grams, datasets = [], [], []
    for n in (30, 50):
        X = torch.randn(n, 4, generator=g, dtype=torch.float64)
        X[:, 2] = 0.0  # a dead input
        Y = X @ torch.randn(4, 2, generator=g, dtype=torch.float64)
        W, b = _least_squares(X, Y)
        states.append({"fc.weight": W, "fc.bias": b})
        grams.append({"fc": gram_matrices(nn.Linear(4, 2).double(), X)[""]})
        datasets.append((X, Y))
    fused = regmean(states, grams, alpha=1.0, ridge=0.0)
    X, Y = torch.cat([d[0] for d in datasets]), torch.cat([d[1] for d in datasets])
    assert all(torch.isfinite(v).all() for v in fused.values())
    best = X @ _least_squares(X, Y)[0].T + _least_squares(X, Y)[1]
    torch.testing.assert_close(
        X @ fused["fc.weight"].T + fused["fc.bias"], best, rtol=1e-8, atol=1e-8
    )
