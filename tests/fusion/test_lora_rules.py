"""The LoRA aggregation rules (fedalign.lora_update): exact rules exact, FedIT not, aligned-lora
undoing rank permutations and rotations, heterogeneous ranks, and bad input as one line."""

from __future__ import annotations

import pytest
import torch

from fedalign.algorithms.lora import LORA_RULES, best_adapter, lora_aggregate, lora_update

ALPHA = 16.0
WEIGHTS = [3.0, 1.0, 2.0]


def random_adapter(
    g: torch.Generator, rank: int, out: int = 20, inp: int = 12, dtype=torch.float64
):
    return (
        torch.randn(rank, inp, generator=g, dtype=dtype),
        torch.randn(out, rank, generator=g, dtype=dtype),
    )


def clients(ranks, dtype=torch.float64, seed: int = 0) -> list[dict]:
    """One client per rank, two layers of different shapes."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"q": random_adapter(g, r, 20, 12, dtype), "v": random_adapter(g, r, 9, 15, dtype)}
        for r in ranks
    ]


def exact(adapters, weights, alpha=ALPHA) -> dict[str, torch.Tensor]:
    """sum p_i (alpha / r_i) B_i A_i in float64, written out."""
    total = sum(weights)
    return {
        layer: sum(
            (w / total) * (alpha / a.shape[0]) * (b.double() @ a.double())
            for (a, b), w in ((c[layer], w) for c, w in zip(adapters, weights))
        )
        for layer in adapters[0]
    }


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["fedex-lora", "flora"])
def test_exact_rules_give_the_weighted_mean_of_products(rule, dtype):
    adapters = clients([4, 4, 4], dtype)
    want = exact(adapters, WEIGHTS)
    updates = lora_aggregate(rule, adapters, WEIGHTS, alpha=ALPHA)
    for layer, u in updates.items():
        assert u.delta.dtype == dtype
        assert relative_error(u.delta, want[layer]) < 1e-5
        # what is broadcast adds up to the same: base + (alpha / r') B' A'
        sent = u.adapter.product() + (0 if u.base is None else u.base)
        assert u.adapter.scale == ALPHA / u.adapter.rank
        assert relative_error(sent, want[layer]) < 1e-5
    fedit = lora_update("fedit", adapters, WEIGHTS, alpha=ALPHA)
    assert all(relative_error(fedit[k], want[k]) > 0.1 for k in want)  # measurably far


def test_fedex_lora_broadcasts_fedits_adapter_and_the_residual_in_the_base():
    adapters = clients([3, 3, 3])
    fedex = lora_aggregate("fedex-lora", adapters, WEIGHTS, alpha=ALPHA)["q"]
    fedit = lora_aggregate("fedit", adapters, WEIGHTS, alpha=ALPHA)["q"]
    torch.testing.assert_close(fedex.adapter.A, fedit.adapter.A)
    torch.testing.assert_close(fedex.adapter.B, fedit.adapter.B)
    torch.testing.assert_close(fedex.base, exact(adapters, WEIGHTS)["q"] - fedit.delta)


def test_ffa_lora_is_exact_when_A_is_shared_and_refuses_otherwise():
    adapters = clients([4, 4, 4])
    shared = [{k: (adapters[0][k][0], c[k][1]) for k in c} for c in adapters]
    want = exact(shared, WEIGHTS)
    got = lora_aggregate("ffa-lora", shared, WEIGHTS, alpha=ALPHA)
    for layer, u in got.items():
        assert relative_error(u.delta, want[layer]) < 1e-12
        assert torch.equal(u.adapter.A, shared[0][layer][0])  # A stays the frozen one
    with pytest.raises(ValueError, match="client 1's A differs"):
        lora_update("ffa-lora", adapters, WEIGHTS)


def test_fedsa_lora_shares_the_mean_A_and_keeps_each_B():
    adapters = clients([4, 4, 4])
    u = lora_aggregate("fedsa-lora", adapters, WEIGHTS, alpha=ALPHA)["q"]
    mean_a = sum(w * c["q"][0] for w, c in zip(WEIGHTS, adapters)) / sum(WEIGHTS)
    for own, c in zip(u.personal, adapters):
        torch.testing.assert_close(own.A, mean_a)
        assert torch.equal(own.B, c["q"][1])
    # the global update: the weighted mean of the personalised models' changes
    mean_personal = sum(w * a.product() for w, a in zip(WEIGHTS, u.personal)) / sum(WEIGHTS)
    torch.testing.assert_close(u.delta, mean_personal)


def rank_permuted(a: torch.Tensor, b: torch.Tensor, count: int, g: torch.Generator, rotate: bool):
    """``count`` copies (R^T A, B R) of one adapter: R a signed permutation, or a random
    orthogonal matrix when ``rotate``."""
    copies = []
    for _ in range(count):
        if rotate:
            r = torch.linalg.qr(torch.randn(a.shape[0], a.shape[0], generator=g).double())[0]
        else:
            signs = torch.where(torch.rand(a.shape[0], generator=g) < 0.5, -1.0, 1.0)
            r = torch.eye(a.shape[0]).double()[:, torch.randperm(a.shape[0], generator=g)]
            r = r * signs.double()
        copies.append({"q": (r.T @ a, b @ r)})
    return copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reference", ["largest", "mean"])
@pytest.mark.parametrize(
    "method,rotate",
    [("hungarian", False), ("procrustes", False), ("procrustes", True)],
)
def test_aligned_lora_undoes_rank_permutations_and_fedit_does_not(method, rotate, reference, dtype):
    g = torch.Generator().manual_seed(1)
    a, b = random_adapter(g, 6, 32, 24)
    copies = rank_permuted(a, b, 4, g, rotate)
    copies = [{"q": tuple(t.to(dtype) for t in c["q"])} for c in copies]
    weights = [1.0, 4.0, 2.0, 3.0]
    target = ALPHA / 6 * b @ a
    got = lora_aggregate(
        "aligned-lora", copies, weights, alpha=ALPHA, method=method, reference=reference
    )["q"]
    assert relative_error(got.delta, target) < 1e-5
    if reference == "largest":  # the adapter is the largest client's, in its own basis
        torch.testing.assert_close(got.adapter.A, copies[1]["q"][0])
        torch.testing.assert_close(got.adapter.B, copies[1]["q"][1])
    assert relative_error(lora_update("fedit", copies, weights, alpha=ALPHA)["q"], target) > 0.3


def test_aligned_lora_lowers_fedits_error_on_independent_adapters():
    """Unrelated adapters have no exact alignment, yet matching components before averaging
    still leaves less of the products' mean out than FedIT."""
    adapters = clients([6, 6, 6], seed=3)
    want = exact(adapters, WEIGHTS)
    fedit = lora_update("fedit", adapters, WEIGHTS, alpha=ALPHA)
    for method in ("hungarian", "procrustes"):
        aligned = lora_update("aligned-lora", adapters, WEIGHTS, alpha=ALPHA, method=method)
        for k in want:
            assert relative_error(aligned[k], want[k]) < relative_error(fedit[k], want[k])


def singular_tail(matrix: torch.Tensor, rank: int) -> float:
    """The relative error of the best rank-``rank`` approximation (Eckart-Young)."""
    s = torch.linalg.svdvals(matrix)
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def test_heterogeneous_ranks_flora_stacks_and_truncates_flexlora_redistributes():
    ranks = [2, 4, 8]
    adapters = clients(ranks)
    want = exact(adapters, WEIGHTS)
    stacked = lora_aggregate("flora", adapters, WEIGHTS, alpha=ALPHA)["q"]
    assert stacked.adapter.rank == sum(ranks)
    assert relative_error(stacked.delta, want["q"]) < 1e-12

    cut = lora_aggregate("flora", adapters, WEIGHTS, alpha=ALPHA, rank=4)["q"]
    assert cut.adapter.rank == 4 and cut.adapter.scale == ALPHA / 4
    assert relative_error(cut.delta, want["q"]) == pytest.approx(singular_tail(want["q"], 4))

    flex = lora_aggregate("flexlora", adapters, WEIGHTS, alpha=ALPHA)["q"]
    assert relative_error(flex.delta, want["q"]) < 1e-12  # the server's model: the full mean
    assert [a.rank for a in flex.personal] == ranks
    for a, r in zip(flex.personal, ranks):
        assert a.scale == ALPHA / r
        assert relative_error(a.product(), want["q"]) == pytest.approx(singular_tail(want["q"], r))
        # a client rank no sampled client had: the same truncation, from the dense update
        dense = best_adapter(flex.delta, r, alpha=ALPHA)
        assert dense.rank == r and dense.scale == ALPHA / r
        torch.testing.assert_close(dense.product(), a.product(), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "rule", sorted(n for n in LORA_RULES if LORA_RULES.get(n).meta.get("equal_ranks"))
)
def test_equal_rank_rules_refuse_mixed_ranks_in_one_line(rule):
    with pytest.raises(
        ValueError, match=r"needs equal ranks; layer 'q' has ranks \[2, 4, 2\]"
    ) as e:
        lora_update(rule, clients([2, 4, 2]))
    assert "\n" not in str(e.value)


def with_layer(adapters, client, layer, pair):
    changed = [dict(c) for c in adapters]
    changed[client][layer] = pair
    return changed


@pytest.mark.parametrize(
    "case,message",
    [
        ("rank mismatch", "A is \\(4, 12\\) and B \\(20, 3\\)"),
        ("other shape", "client 2, layer 'v': adapts an out x in = 9 x 16 weight"),
        ("nan", "client 1, layer 'q': B has NaN or Inf"),
        ("negative weight", "weights must be finite, non-negative"),
        ("weight count", "got 2 weights for 3"),
        ("missing layer", "client 1 adapts layers \\['q'\\], client 0 \\['q', 'v'\\]"),
        ("unknown rule", "unknown lora rule 'fedavg'"),
        ("unknown option", "does not take \\['rnak'\\]; it takes rank"),
        ("bad option", "method: expected one of 'hungarian', 'procrustes'"),
        ("bad alpha", "alpha must be a positive number"),
    ],
)
def test_bad_input_is_one_clear_line(case, message):
    g = torch.Generator().manual_seed(2)
    adapters = clients([4, 4, 4])
    rule, weights, options = "flora", WEIGHTS, {}
    if case == "rank mismatch":
        adapters = with_layer(adapters, 0, "q", (adapters[0]["q"][0], adapters[0]["q"][1][:, :3]))
    elif case == "other shape":
        adapters = with_layer(adapters, 2, "v", random_adapter(g, 4, 9, 16))
    elif case == "nan":
        b = adapters[1]["q"][1].clone()
        b[0, 0] = float("nan")
        adapters = with_layer(adapters, 1, "q", (adapters[1]["q"][0], b))
    elif case == "negative weight":
        weights = [1.0, -1.0, 1.0]
    elif case == "weight count":
        weights = [1.0, 1.0]
    elif case == "missing layer":
        adapters[1] = {"q": adapters[1]["q"]}
    elif case == "unknown rule":
        rule = "fedavg"
    elif case == "unknown option":
        options = {"rnak": 2}
    elif case == "bad option":
        rule, options = "aligned-lora", {"method": "greedy"}
    elif case == "bad alpha":
        options = {"alpha": -1.0}
    with pytest.raises(ValueError, match=message) as e:
        lora_update(rule, adapters, weights, **options)
    assert "\n" not in str(e.value)


def test_rule_options_are_their_signatures_keyword_defaults():
    assert LORA_RULES.get("aligned-lora").options == {
        "method": "hungarian",
        "reference": "mean",
        "iterations": 10,
        "signs": True,
    }
    assert LORA_RULES.get("flora").options == {"rank": 0}
    assert LORA_RULES.get("fedit").options == {}


def test_lora_update_is_public():
    import fedalign

    assert fedalign.lora_update is lora_update and fedalign.LORA_RULES is LORA_RULES
    assert {"lora_update", "LORA_RULES"} <= set(fedalign.__all__)
