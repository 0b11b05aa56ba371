"""Client statistics: sums that pool across clients, computed without touching the model."""

import pytest
import torch
from torch import nn

from fedalign.models import build_model
from fedalign.stats import (
    activation_moments,
    add_moments,
    batchnorm_input_moments,
    diagonal_fisher,
    gram_matrices,
    mean_std,
)


def _lenet():
    torch.manual_seed(0)
    return build_model("lenet")


def test_pooled_client_statistics_equal_central_statistics():
    model = _lenet()
    X = torch.rand(90, 1, 28, 28)
    parts = [X[:20], X[20:55], X[55:]]
    central_g, central_m = gram_matrices(model, X, batch_size=32), activation_moments(model, X, batch_size=32)
    grams = [gram_matrices(model, p, batch_size=16) for p in parts]
    moments = [activation_moments(model, p, batch_size=16) for p in parts]
    for name, G in central_g.items():
        torch.testing.assert_close(sum(g[name] for g in grams), G)
    pooled = add_moments(add_moments(moments[0], moments[1]), moments[2])
    for name, m in central_m.items():
        for k in ("count", "sum", "sumsq"):
            torch.testing.assert_close(pooled[name][k], m[k])
    fishers = [diagonal_fisher(model, p, labels="exact") for p in parts]
    central_f = diagonal_fisher(model, X, labels="exact")
    for k, F in central_f.items():
        pooled_f = sum(len(p) * f[k] for p, f in zip(parts, fishers)) / len(X)
        torch.testing.assert_close(pooled_f, F, rtol=1e-4, atol=1e-9)


def test_conv_gram_is_the_gram_of_unfolded_patches_with_a_bias_column():
    model = _lenet()
    X = torch.rand(7, 1, 28, 28)
    G = gram_matrices(model, X)["conv2"]
    h = torch.max_pool2d(torch.relu(model.conv1(X)), 2)          # conv2's input
    cols = [h[:, :, i:i + 5, j:j + 5].reshape(7, -1) for i in range(h.shape[2] - 4) for j in range(h.shape[3] - 4)]
    rows = torch.cat(cols).double()
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(G, rows.T @ rows, rtol=1e-6, atol=1e-6)
    assert G[-1, -1] == len(rows)                                # the count
    channel = gram_matrices(model, X, conv="channel")["conv2"]
    assert channel.shape == (7, 7)                               # 6 channels + bias
    flat = torch.cat([h.permute(0, 2, 3, 1).reshape(-1, 6).double(), torch.ones(7 * 12 * 12, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(channel, flat.T @ flat, rtol=1e-6, atol=1e-6)


def test_moments_are_pre_activations_and_the_model_is_left_as_found():
    model = build_model("resnet20", in_channels=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = torch.rand(16, 1, 28, 28)
    moments = activation_moments(model, X)
    bn = batchnorm_input_moments(model, X)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    stem = next(iter(moments))
    mean, _ = mean_std(moments[stem])
    assert (mean < 0).any()                                      # before the ReLU
    assert len(bn) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fisher_exact_equals_a_loop_over_examples_and_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    X = torch.randn(5, 3)
    F = diagonal_fisher(model, X, labels="exact")
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for x in X:
        p = torch.softmax(model(x[None]), -1)[0].detach()
        for c in range(3):
            model.zero_grad()
            torch.log_softmax(model(x[None]), -1)[0, c].backward()
            for k, q in model.named_parameters():
                expected[k] += p[c] * q.grad**2 / len(X)
    for k, value in expected.items():
        torch.testing.assert_close(F[k], value, rtol=1e-4, atol=1e-8)
    empirical = diagonal_fisher(model, X, torch.tensor([0, 1, 2, 0, 1]), labels="empirical")
    assert not torch.allclose(empirical["0.weight"], F["0.weight"])
    with pytest.raises(ValueError, match="true labels"):
        diagonal_fisher(model, X, labels="empirical")
