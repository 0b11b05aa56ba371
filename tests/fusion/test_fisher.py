"""Diagonal Fisher (per-example gradients by vmap) and Fisher-weighted averaging."""

import pytest
import torch

from fedalign.algorithms.fusion import fisher_average
from fedalign.algorithms.stats import diagonal_fisher
from tests.helpers import seeded_model, tiny_net


def _loop_fisher(model, X, weight_of):
    """Hand loop over examples and classes: sum_n sum_c weight_of(n, c, p) * grad log p_c(x_n)^2
    / N."""
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for n, x in enumerate(X):
        p = torch.softmax(model(x[None]), -1)[0].detach()
        for c in range(len(p)):
            w = weight_of(n, c, p)
            if w == 0:
                continue
            model.zero_grad()
            torch.log_softmax(model(x[None]), -1)[0, c].backward()
            for k, q in model.named_parameters():
                expected[k] += w * q.grad**2 / len(X)
    return expected


def test_exact_and_empirical_fisher_equal_a_loop_over_examples_and_classes():
    model = tiny_net()
    X, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    F = diagonal_fisher(model, X, mode="exact", batch_size=2)
    for k, value in _loop_fisher(model, X, lambda n, c, p: p[c]).items():
        torch.testing.assert_close(F[k], value, rtol=1e-4, atol=1e-8)
    empirical = diagonal_fisher(model, X, y, mode="empirical", batch_size=3)
    for k, value in _loop_fisher(model, X, lambda n, c, p: float(c == y[n])).items():
        torch.testing.assert_close(empirical[k], value, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(empirical["0.weight"], F["0.weight"])
    with pytest.raises(ValueError, match="true labels"):
        diagonal_fisher(model, X, mode="empirical")
    with pytest.raises(ValueError, match="mode must be"):
        diagonal_fisher(model, X, mode="true")


def test_sampled_fisher_is_seeded_and_estimates_the_exact_one():
    model = tiny_net()
    X = torch.randn(8, 3).repeat(300, 1)  # many label draws per input
    exact = diagonal_fisher(model, X[:8], mode="exact")
    a, b = diagonal_fisher(model, X, seed=3), diagonal_fisher(model, X, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], diagonal_fisher(model, X, seed=4)["0.weight"])
    for k, value in exact.items():
        torch.testing.assert_close(a[k], value, rtol=0.15, atol=1e-4)


def test_pooled_client_fishers_equal_the_fisher_of_the_union():
    model = seeded_model("lenet")
    model.train()
    X = torch.rand(30, 1, 28, 28)
    parts = [X[:7], X[7:19], X[19:]]
    central = diagonal_fisher(model, X, mode="exact", batch_size=16)
    clients = [diagonal_fisher(model, p, mode="exact", batch_size=5) for p in parts]
    assert model.training
    for k, F in central.items():
        torch.testing.assert_close(
            sum(len(p) * f[k] for p, f in zip(parts, clients)) / len(X), F, rtol=1e-4, atol=1e-10
        )


def test_fisher_average_weights_each_parameter_by_its_fisher():
    a = {"w": torch.tensor([1.0, 1.0, 1.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 3.0, 3.0]), "n": torch.tensor(5)}
    fa = {"w": torch.tensor([1.0, 0.0, 0.0])}
    fb = {"w": torch.tensor([1.0, 1.0, 0.0])}
    fused = fisher_average([a, b], [fa, fb], floor=1e-12)
    torch.testing.assert_close(fused["w"][:2], torch.tensor([2.0, 3.0]))
    assert int(fused["n"]) == 5  # buffers: the weighted mean
    weighted = fisher_average([a, b], [fa, fb], weights=[3.0, 1.0], floor=1e-12)
    torch.testing.assert_close(weighted["w"][0], torch.tensor(1.5))  # (3*1 + 1*3) / 4
    scaled = fisher_average([a, b], [fa, {"w": 100 * fb["w"]}], normalise=True)
    torch.testing.assert_close(
        scaled["w"], fisher_average([a, b], [fa, {"w": fb["w"] / 2}])["w"], rtol=1e-4, atol=1e-4
    )


def test_identical_models_come_back_and_the_floor_prevents_division_by_zero():
    model = seeded_model("mlp", hidden=[8])
    state = model.state_dict()
    X = torch.rand(12, 1, 28, 28)
    fisher = diagonal_fisher(model, X, mode="exact")
    fused = fisher_average(
        [state, state, state], [fisher, {k: 2 * v for k, v in fisher.items()}, fisher]
    )
    for k, v in state.items():
        torch.testing.assert_close(fused[k], v)
    zero = {k: torch.zeros_like(v) for k, v in fisher.items()}
    other = {k: v + 1 for k, v in state.items()}
    mean = fisher_average([state, other], [zero, zero], weights=[1.0, 3.0])  # no Fisher anywhere
    for k, v in state.items():
        assert torch.isfinite(mean[k]).all()
        torch.testing.assert_close(mean[k], v + 0.75)
    with pytest.raises(ValueError, match="Fisher of 'layers.0.weight'"):
        fisher_average([state, state], [fisher, dict(fisher, **{"layers.0.weight": torch.ones(2)})])
    with pytest.raises(ValueError, match="2 Fishers for 3 state dicts"):
        fisher_average([state] * 3, [fisher] * 2)
