"""Grams packed for transport (symmetric triangle or low-rank factor) and read back by the server:
exact where promised, within the byte budget, and every malformed form rejected with its reason."""

from __future__ import annotations

import pytest
import torch

from fedalign.algorithms.checks import received_problem
from fedalign.algorithms.fusion.gram_transport import pack, unpack, upper_triangle
from fedalign.algorithms.fusion.regmean import GRAM_BUDGET
from fedalign.algorithms.stats import client_statistics, received_statistics
from fedalign.config.load import load_config
from fedalign.core.errors import ConfigError
from fedalign.models import build_model
from tests.helpers import ROOT


def _gram(rows: int, dim: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """``X^T X`` with a constant column last, as ``stats.gram_matrices`` builds it; ``rank``:
    the inputs span only that many directions."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(rows, dim, generator=g, dtype=torch.float64)
    if rank is not None:
        X = X[:, :rank] @ torch.rand(rank, dim, generator=g, dtype=torch.float64)
    X = torch.cat([X, torch.ones(rows, 1, dtype=torch.float64)], dim=1)
    return X.T @ X


def test_the_triangle_holds_half_the_values_and_unpacks_exactly():
    G = _gram(50, 11)
    packed = pack(G, weight_values=10**6, budget=GRAM_BUDGET)
    assert set(packed) == {"triangle"} and packed["triangle"].numel() == 12 * 13 // 2
    assert torch.equal(unpack("g", packed, (12,)), G.float())
    assert torch.equal(upper_triangle(G), G[torch.triu(torch.ones(12, 12)) > 0])


def test_a_factor_fits_the_budget_keeps_the_diagonal_and_is_exact_for_low_rank_inputs():
    n = 31
    budget_values = 0.5 * 20 * 30  # a 20 x 30 layer
    full = _gram(200, 30)
    packed = pack(full, weight_values=20 * 30, budget=0.5)
    assert set(packed) == {"factor", "diagonal"}
    rank = packed["factor"].shape[1]
    assert rank == int(budget_values) // n - 1 == 8
    assert packed["factor"].numel() + packed["diagonal"].numel() <= budget_values
    back = unpack("g", packed, (n,))
    torch.testing.assert_close(torch.diagonal(back), torch.diagonal(full), rtol=1e-6, atol=0)
    assert float(torch.linalg.eigvalsh(back).min()) > -1e-6 * float(back.diagonal().max())
    # the factor is the best rank-8 part: what is left off the diagonal is the other eigenvalues'
    off = back - full - torch.diag_embed(torch.diagonal(back - full))
    assert float(torch.linalg.matrix_norm(off, 2)) < 2 * float(torch.linalg.eigvalsh(full)[-9])
    # inputs spanning 5 directions plus the constant: rank 6 < 8, so nothing is lost
    low = _gram(200, 30, rank=5)
    back = unpack("g", pack(low, 20 * 30, 0.5), (n,))
    torch.testing.assert_close(back, low, rtol=1e-4, atol=1e-3)


def test_below_two_values_per_input_only_the_diagonal_goes():
    G = _gram(40, 9)
    packed = pack(G, weight_values=12, budget=1.0)  # 12 values: room for the diagonal alone
    assert packed["factor"].shape == (10, 0)
    torch.testing.assert_close(unpack("g", packed, (10,)), torch.diag_embed(torch.diagonal(G)))


@pytest.mark.parametrize(
    ("packed", "reason"),
    [
        ({"triangle": torch.ones(7)}, "g: (7,) values are no square's upper triangle"),
        ({"triangle": torch.ones(3, 2)}, "g: (3, 2) values are no square's upper triangle"),
        ({"triangle": torch.ones(0)}, "g: (0,) values are no square's upper triangle"),
        ({"triangle": torch.ones(15)}, "g: shape (5, 5), expected a square of size (4,)"),
        ({"triangle": torch.ones(10, dtype=torch.int64)}, "g: expected floating-point tensors"),
        (
            {"factor": torch.ones(10**7, 1), "diagonal": torch.ones(10**7)},
            "g: shape (10000000, 10000000), expected a square of size (4,)",
        ),
        (
            {"factor": torch.ones(4, 2), "diagonal": torch.ones(5)},
            "g: factor (4, 2) and diagonal (5,) do not fit one Gram",
        ),
        ({"factor": torch.ones(4, 4), "diagonal": torch.ones(4)}, "g: factor of rank 4 for a"),
        ({"full": torch.eye(4)}, "g: expected a triangle, or a factor and a diagonal, got ['fu"),
        (torch.eye(4), "g: expected a triangle, or a factor and a diagonal, got Tensor"),
    ],
)
def test_a_malformed_packed_gram_is_named_not_built(packed, reason):
    with pytest.raises(ValueError) as err:
        unpack("g", packed, (4,))
    assert str(err.value).startswith(reason)


def test_the_server_reads_sent_grams_or_says_why_not():
    model = build_model("mlp", in_features=30, hidden=[20])
    X, y = torch.rand(64, 30), torch.randint(0, 10, (64,))
    sent = client_statistics(["grams"], model, X, y)
    state = model.state_dict()
    decoded, problem = received_problem(sent, state, examples=64)
    assert problem is None and decoded["grams"]["layers.0"].shape == (31, 31)
    # a factor claiming the layer of another model: rejected before anything is built
    other = build_model("mlp", in_features=40, hidden=[20]).state_dict()
    assert received_problem(sent, other, 64) == (
        {},
        "grams: layers.0: shape (31, 31), expected a square of size (41,)",
    )
    assert received_problem({"grams": {"head": sent["grams"]["layers.0"]}}, state, 64)[1] == (
        "grams: head: the model has no entry head.weight"
    )
    nan = {"grams": {"layers.0": {"triangle": torch.full((31 * 32 // 2,), float("nan"))}}}
    assert received_problem(nan, state, 64)[1] == "grams: layers.0: contains NaN or Inf"
    with pytest.raises(ValueError, match="grams: expected Grams per layer"):
        received_statistics({"grams": torch.ones(3)}, state)


def test_a_gram_round_costs_at_most_one_and_a_quarter_fedavg_rounds():
    """The bytes accounting of the default: the 784-100-10 MLP's first-layer Gram (785 x 785, 7.8
    models in full) goes as a rank-48 factor and its diagonal, under half the layer's weights, so
    a client's download plus upload in a Gram round is at most 1.25x FedAvg's."""
    model = build_model("mlp", in_features=784, hidden=[100])
    X, y = torch.rand(200, 784), torch.randint(0, 10, (200,))
    sent = client_statistics(["grams"], model, X, y)["grams"]
    assert set(sent) == {"layers.0"} and sent["layers.0"]["factor"].shape == (785, 48)
    stats_values = sum(t.numel() for t in sent["layers.0"].values())
    model_values = sum(t.numel() for t in model.state_dict().values())
    assert stats_values <= GRAM_BUDGET * model.layers[0].weight.numel()
    assert (2 * model_values + stats_values) / (2 * model_values) <= 1 + GRAM_BUDGET / 2
    exact = client_statistics(["grams"], model, X, y, options={"gram_budget": None})["grams"]
    assert exact["layers.0"]["triangle"].numel() == 785 * 786 // 2


def test_a_bad_budget_stops_the_config_before_round_one():
    with pytest.raises(ConfigError, match="statistic grams: gram_budget must be a number > 0"):
        load_config(ROOT / "configs/fmnist_mlp_aligned.yaml", ["aggregation.gram_budget=-1"])
    cfg = load_config(ROOT / "configs/fmnist_mlp_aligned.yaml", ["aggregation.gram_budget=null"])
    assert cfg.to_plan().resolved_options()["gram_budget"] is None
