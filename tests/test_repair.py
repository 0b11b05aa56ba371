"""REPAIR, its closed form and BatchNorm reset: statistics hit their targets; barriers shrink."""

import copy

import pytest
import torch

from fedalign.algorithms.align import apply_permutation, permutation_spec, weight_matching
from fedalign.algorithms.analysis import interpolate, reset_bn_statistics
from fedalign.algorithms.repair import (
    bn_reset_from_stats,
    fold_affine,
    hidden_layers,
    repair,
    repair_closed_form,
    repair_targets,
    repair_with_data,
)
from fedalign.algorithms.stats import (
    activation_moments,
    add_moments,
    batchnorm_input_moments,
    mean_std,
)
from fedalign.client.training import evaluate, train_local
from fedalign.core.tensors import weighted_average
from fedalign.data import load_dataset
from tests.helpers import seeded_model, with_state


def _mlp(seed, hidden=(32, 32)):
    return seeded_model("mlp", seed, hidden=list(hidden), in_features=64)


def test_repaired_statistics_match_their_targets():
    a, b = _mlp(0), _mlp(1)
    X = torch.randn(300, 1, 8, 8)
    fused = with_state(a, weighted_average([a.state_dict(), b.state_dict()]))
    layers = hidden_layers(fused)
    assert layers == ["layers.0", "layers.1"]
    targets = repair_targets([activation_moments(m, X, layers) for m in (a, b)])
    repaired = with_state(fused, repair_with_data(fused, [a, b], X))
    after = activation_moments(repaired, X, layers)
    before = activation_moments(fused, X, layers)
    for name, (goal_mean, goal_std) in targets.items():
        mean, std = mean_std(after[name])
        torch.testing.assert_close(mean, goal_mean, atol=1e-3, rtol=0)
        torch.testing.assert_close(std, goal_std, atol=1e-3, rtol=1e-3)
        assert (
            mean_std(before[name])[1] - goal_std
        ).abs().max() > 0.01  # there was something to fix


def test_closed_form_repair_is_exact_on_the_first_layer():
    a, b = _mlp(0), _mlp(1)
    X = torch.randn(400, 1, 8, 8)
    fused = with_state(a, weighted_average([a.state_dict(), b.state_dict()], [0.3, 0.7]))
    endpoint = [activation_moments(m, X, ["layers.0"]) for m in (a, b)]
    za = a.layers[0](X.flatten(1)).double()
    zb = b.layers[0](X.flatten(1)).double()
    za, zb = za - za.mean(0), zb - zb.mean(0)
    rho = (za * zb).mean(0) / (za.std(0, unbiased=False) * zb.std(0, unbiased=False))
    state = repair_closed_form(fused.state_dict(), endpoint, {"layers.0": rho.detach()}, [0.3, 0.7])
    goal_mean, goal_std = repair_targets(endpoint, [0.3, 0.7])["layers.0"]
    mean, std = mean_std(activation_moments(with_state(fused, state), X, ["layers.0"])["layers.0"])
    torch.testing.assert_close(mean, goal_mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(std, goal_std, atol=1e-4, rtol=1e-4)


def test_bn_reset_from_client_moments_equals_a_reset_on_the_data():
    model = seeded_model("resnet20", in_channels=1, width=1)
    X = torch.rand(64, 1, 28, 28)
    expected = copy.deepcopy(model)
    reset_bn_statistics(expected, X, batch_size=64)
    state = bn_reset_from_stats(model, batchnorm_input_moments(model, X, batch_size=64))
    for k, v in expected.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5)
    # two clients of 32, each one batch: the same batches as a reset with batch_size 32, so the
    # pooled means are the reset's; the pooled variance is the union's (torch averages the batches'
    # variances, which misses the spread between the clients' means)
    clients = [batchnorm_input_moments(model, part, batch_size=32) for part in (X[:32], X[32:])]
    pooled = bn_reset_from_stats(model.state_dict(), add_moments(*clients))
    reset_bn_statistics(expected, X, batch_size=32)
    for k, v in expected.state_dict().items():
        if "running_mean" in k:
            torch.testing.assert_close(pooled[k], v, rtol=1e-4, atol=1e-5)
    union = (
        torch.cat([model.conv1(p) for p in (X[:32], X[32:])]).detach().transpose(0, 1).flatten(1)
    )
    torch.testing.assert_close(pooled["bn1.running_var"], union.var(1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no running statistics"):
        bn_reset_from_stats(model, {"conv1": batchnorm_input_moments(model, X)["bn1"]})


@pytest.mark.parametrize("layer", ["conv2", "bn"])
def test_folding_equals_an_affine_layer_after_the_module(layer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.GroupNorm(1, 4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    name = {"conv2": "2", "bn": "3"}[layer]
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    module = dict(model.named_modules())[name]
    X = torch.randn(5, 2, 5, 5)
    handle = module.register_forward_hook(
        lambda m, i, out: out * scale[:, None, None] + shift[:, None, None]
    )
    expected = model(X)
    handle.remove()
    folded = copy.deepcopy(model)
    folded.load_state_dict(
        {**model.state_dict(), **fold_affine(model.state_dict(), name, scale, shift)}
    )
    torch.testing.assert_close(folded(X), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no weight and bias"):
        fold_affine(model.state_dict(), "1", scale, shift)


def test_repair_of_a_layernorm_resnet_hits_the_targets_through_its_norms():
    """Bias-free convs: the correction is folded into the GroupNorm after each of them."""
    models = []
    for seed in (0, 1):
        models.append(seeded_model("resnet20", seed, in_channels=1, norm="layer"))
    X = torch.rand(48, 1, 28, 28)
    fused = with_state(models[0], weighted_average([m.state_dict() for m in models]))
    layers = hidden_layers(fused)
    targets = repair_targets([activation_moments(m, X, layers) for m in models])
    repaired_state = repair(
        fused.state_dict(), targets, activation_moments(fused, X, targets=targets)
    )
    after = activation_moments(with_state(fused, repaired_state), X)
    for name, (goal_mean, goal_std) in targets.items():
        mean, std = mean_std(after[name])
        torch.testing.assert_close(mean, goal_mean, atol=2e-3, rtol=0)
        torch.testing.assert_close(std, goal_std, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="no statistics of the fused model"):
        repair(fused.state_dict(), targets, {})


def test_repair_shrinks_the_midpoint_barrier_of_aligned_mlps():
    """Two MLPs trained from different inits on sklearn's digits, aligned by weight matching."""
    X, y = (torch.as_tensor(a) for a in load_dataset("digits", "train"))
    models = []
    for seed in (0, 1):
        m = _mlp(seed, hidden=(64, 64))
        train_local(m, X, y, epochs=15, batch_size=32, optimizer="adam", lr=1e-3, seed=seed)
        models.append(m.eval())
    spec = permutation_spec(models[0])
    aligned = apply_permutation(
        spec,
        weight_matching(spec, models[0].state_dict(), models[1].state_dict()),
        models[1].state_dict(),
    )
    b = with_state(models[0], aligned)
    mid = with_state(models[0], interpolate(models[0].state_dict(), aligned, 0.5))
    repaired = with_state(mid, repair_with_data(mid, [models[0], b], X))
    loss = {
        name: evaluate(m, X, y)[0]
        for name, m in (("a", models[0]), ("b", b), ("mid", mid), ("rep", repaired))
    }
    chord = (loss["a"] + loss["b"]) / 2
    barrier, repaired_barrier = loss["mid"] - chord, loss["rep"] - chord
    message = (
        f"midpoint barrier {barrier:.4f} -> {repaired_barrier:.4f} after REPAIR; losses {loss}"
    )
    assert barrier > 0 and repaired_barrier < 0.8 * barrier, message  # measured: 0.049 -> 0.024
