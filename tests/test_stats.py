"""Client statistics: sums that pool across clients, computed without touching the model."""

import pytest
import torch
from torch import nn

from fedalign.algorithms.align import activation_statistics, cross_moments, permutation_spec
from fedalign.algorithms.stats import (
    activation_moments,
    add_moments,
    batchnorm_input_moments,
    gram_count,
    gram_matrices,
    hidden_layers,
    mean_std,
    preactivation_cross_moments,
)
from fedalign.models import build_model
from tests.helpers import seeded_model


def test_pooled_client_statistics_equal_central_statistics():
    model = seeded_model("lenet")
    torch.manual_seed(1)
    other = build_model("lenet")
    X = torch.rand(90, 1, 28, 28)
    parts = [X[:20], X[20:55], X[55:]]
    central_g, central_m = (
        gram_matrices(model, X, batch_size=32),
        activation_moments(model, X, batch_size=32),
    )
    grams = [gram_matrices(model, p, batch_size=16) for p in parts]
    moments = [activation_moments(model, p, batch_size=16) for p in parts]
    for name, G in central_g.items():
        torch.testing.assert_close(sum(g[name] for g in grams), G)
    assert (
        float(gram_count(central_g["fc1"])) == 90
        and float(gram_count(central_g["conv1"])) == 90 * 24 * 24
    )
    pooled = add_moments(add_moments(moments[0], moments[1]), moments[2])
    assert list(pooled) == ["conv1", "conv2", "fc1", "fc2"]  # the logits are not tracked
    for name, m in central_m.items():
        for k in ("count", "sum", "sumsq"):
            torch.testing.assert_close(pooled[name][k], m[k])
    for measure in (cross_moments, preactivation_cross_moments):
        central = measure(model, other, X, batch_size=32)
        parts_cross = [measure(model, other, p, batch_size=16) for p in parts]
        for group, s in central.items():
            for k, v in s.items():
                torch.testing.assert_close(
                    sum(c[group][k] for c in parts_cross), v, rtol=1e-5, atol=1e-5
                )


def test_conv_gram_is_the_gram_of_unfolded_patches_with_a_constant_column():
    model = seeded_model("lenet")
    X = torch.rand(7, 1, 28, 28)
    G = gram_matrices(model, X)["conv2"]
    h = torch.max_pool2d(torch.relu(model.conv1(X)), 2)  # conv2's input
    cols = [
        h[:, :, i : i + 5, j : j + 5].reshape(7, -1)
        for i in range(h.shape[2] - 4)
        for j in range(h.shape[3] - 4)
    ]
    rows = torch.cat(cols).double()
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(G, rows.T @ rows, rtol=1e-6, atol=1e-6)
    assert gram_count(G) == len(rows)
    channel = gram_matrices(model, X, conv="channel")["conv2"]
    assert channel.shape == (7, 7)  # 6 channels + the constant
    flat = torch.cat(
        [
            h.permute(0, 2, 3, 1).reshape(-1, 6).double(),
            torch.ones(7 * 12 * 12, 1, dtype=torch.float64),
        ],
        1,
    )
    torch.testing.assert_close(channel, flat.T @ flat, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="conv must be"):
        gram_matrices(model, X, conv="diagonal")


def test_bias_free_layers_carry_the_count_too():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1, norm="layer")
    grams = gram_matrices(model, torch.rand(3, 1, 28, 28))
    assert grams["conv1"].shape == (1 * 9 + 1, 1 * 9 + 1)  # conv1 has no bias
    assert float(gram_count(grams["conv1"])) == 3 * 28 * 28


def test_tracked_layers_are_derived_from_the_model():
    assert hidden_layers(build_model("mlp", hidden=[8, 8])) == ["layers.0", "layers.1"]
    assert hidden_layers(build_model("vgg9")) == [f"convs.{i}" for i in range(6)] + ["fc1", "fc2"]
    tracked = hidden_layers(build_model("resnet20", in_channels=1, norm="layer"))
    assert tracked[0] == "bn1" and "blocks.3.shortcut.1" in tracked and "fc" not in tracked
    assert all("conv" not in name for name in tracked)  # bias-free convs: their norm is tracked
    with pytest.raises(ValueError, match="no Linear/Conv2d/norm layers named"):
        activation_moments(build_model("mlp", hidden=[8]), torch.rand(2, 1, 28, 28), ["relu"])


def test_moments_are_outputs_before_the_nonlinearity_and_the_model_is_left_as_found():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = torch.rand(16, 1, 28, 28)
    moments = activation_moments(model, X)
    bn = batchnorm_input_moments(model, X)
    cross = cross_moments(model, model, X)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    mean, _ = mean_std(moments["blocks.0.bn1"])
    assert (mean < 0).any()  # before the ReLU
    assert len(bn) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert set(cross) == set(permutation_spec(model).sizes)


def test_cross_moments_are_what_activation_matching_consumes():
    torch.manual_seed(0)
    a, b = build_model("mlp", hidden=[6, 5]), build_model("mlp", hidden=[6, 5])
    X = torch.rand(40, 1, 28, 28)
    stats = cross_moments(a, b, X, batch_size=15)
    spec = permutation_spec(a)
    same = activation_statistics(
        spec, a, b, [(X[:25], None), (X[25:], None)]
    )  # a DataLoader's batches
    za = torch.relu(a.layers[0](X.flatten(1))).double()
    zb = torch.relu(b.layers[0](X.flatten(1))).double()
    group = next(g for g, n in spec.sizes.items() if n == 6)
    torch.testing.assert_close(stats[group]["cross"], za.T @ zb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[group]["sq"], (zb * zb).sum(0), rtol=1e-5, atol=1e-5)
    for g, s in stats.items():
        for k, v in s.items():
            torch.testing.assert_close(same[g][k], v, rtol=1e-5, atol=1e-5)
