"""Activation matching from additive statistics, and Sinkhorn re-basin."""

import pytest
import torch
import torch.nn.functional as F

from fedalign.algorithms.align import (
    activation_statistics,
    add_statistics,
    apply_permutation,
    invert_permutation,
    permutation_spec,
    permutations_from_statistics,
    random_permutation,
    sinkhorn_rebasin,
)
from fedalign.algorithms.align.sinkhorn_rebasin import log_sinkhorn
from fedalign.algorithms.analysis import interpolate
from fedalign.models import build_model
from tests.helpers import seeded_model


def _planted(name, **kwargs):
    a = seeded_model(name, **kwargs).eval()
    spec = permutation_spec(a)
    planted = random_permutation(spec, torch.Generator().manual_seed(1))
    b = build_model(name, **kwargs).eval()
    b.load_state_dict(apply_permutation(spec, planted, a.state_dict()))
    return spec, a, b, planted


@pytest.mark.parametrize(
    "name, kwargs, data",
    [
        ("mlp", {"hidden": [32, 16]}, lambda: torch.randn(200, 784)),
        ("lenet", {}, lambda: torch.randn(100, 1, 28, 28)),
        (
            "vgg9",
            {"widths": (16, 16, 32, 32, 32, 32), "hidden": 64},
            lambda: torch.randn(32, 1, 28, 28),
        ),
        ("resnet20", {}, lambda: torch.randn(16, 1, 28, 28)),
        ("char_lstm", {"hidden": 24}, lambda: torch.randint(0, 98, (64, 10))),
    ],
)
def test_activation_matching_recovers_every_live_unit(name, kwargs, data):
    spec, a, b, planted = _planted(name, **kwargs)
    stats = activation_statistics(spec, a, b, data())
    perms = permutations_from_statistics(stats)
    expected = invert_permutation(planted)
    for g in spec.sizes:
        s = stats[g]
        var = s["sq_ref"] / s["count"] - (s["sum_ref"] / s["count"]) ** 2
        live = var > 1e-12  # units dead on this data are interchangeable here
        assert live.any(), g
        assert torch.equal(perms[g][live], expected[g][live]), g


def test_statistics_are_additive_over_clients():
    spec, a, b, _ = _planted("lenet")
    X = torch.randn(60, 1, 28, 28)
    whole = activation_statistics(spec, a, b, X)
    pooled = add_statistics(
        activation_statistics(spec, a, b, X[:25]),
        activation_statistics(spec, a, b, [(X[25:40], None), (X[40:], None)]),
    )
    for g in whole:
        for k in whole[g]:
            torch.testing.assert_close(pooled[g][k], whole[g][k], rtol=1e-10, atol=1e-8)
    assert whole["conv1"]["count"].item() == 60 * 12 * 12  # every spatial position is a sample
    assert whole["conv1"]["cross"].shape == (6, 6)


def test_cross_moment_criterion_and_bad_criterion():
    spec, a, b, _ = _planted("mlp", hidden=[16])
    stats = activation_statistics(spec, a, b, torch.randn(300, 784))
    perms = permutations_from_statistics(stats, criterion="cross_moment")
    assert perms["layers.0"].shape == (16,)
    with pytest.raises(ValueError, match="criterion"):
        permutations_from_statistics(stats, criterion="cosine")


@pytest.mark.parametrize("loss", ["l2", "l1", "cosine"])
def test_sinkhorn_rebasin_recovers_a_planted_permutation_without_data(loss):
    spec, a, b, _ = _planted("mlp", hidden=[32, 32])
    perms = sinkhorn_rebasin(spec, a.state_dict(), b.state_dict(), loss=loss)
    back = apply_permutation(spec, perms, b.state_dict())
    assert all(torch.equal(back[k], a.state_dict()[k]) for k in back)


def test_log_sinkhorn_normalises_a_batch_of_plans_each_as_on_its_own():
    """Sinkhorn re-basin normalises the groups of one size as one batch."""
    logits = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0))
    batch = log_sinkhorn(logits, tau=0.5, n_iter=30)
    for plan, single in zip(batch, logits):
        torch.testing.assert_close(plan, log_sinkhorn(single, tau=0.5, n_iter=30))
    torch.testing.assert_close(batch.sum(-2), torch.ones(3, 6))  # columns exact
    torch.testing.assert_close(batch.sum(-1), torch.ones(3, 6), atol=1e-3, rtol=0)


def test_sinkhorn_rebasin_midpoint_loss_lowers_the_midpoint_loss():
    torch.manual_seed(0)
    a, b = build_model("mlp", hidden=[32]), build_model("mlp", hidden=[32])
    spec = permutation_spec(a)
    X = torch.randn(512, 784)
    y = (a(X) + b(X)).argmax(1)
    perms = sinkhorn_rebasin(
        spec, a.state_dict(), b.state_dict(), loss="midpoint", model=a, data=(X, y)
    )

    def midpoint_loss(state_b):
        net = build_model("mlp", hidden=[32])
        net.load_state_dict(interpolate(a.state_dict(), state_b, 0.5))
        return F.cross_entropy(net(X), y).item()

    assert midpoint_loss(apply_permutation(spec, perms, b.state_dict())) < midpoint_loss(
        b.state_dict()
    )
    with pytest.raises(ValueError, match="needs the model"):
        sinkhorn_rebasin(spec, a.state_dict(), b.state_dict(), loss="midpoint")
