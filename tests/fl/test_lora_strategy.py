"""The LoRA strategy (issue 25) on the real engine and mock clients (no Ray): per rule, the global
model after a round is the base plus ``fedalign.lora_update`` of exactly the adapters the clients
trained; only adapters travel (the bytes counted are theirs, a frozen or local factor never sent);
FedEx-LoRA's and FLoRA's base changes reach the clients; a resumed run is bitwise the run without a
stop; bad configs are one ConfigError line; each round's row holds the rule's aggregation error."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from fedalign.algorithms.lora import lora_update, mean_products
from fedalign.core.errors import ConfigError
from fedalign.fl.records import content_bytes, to_arrays, to_state_dict
from fedalign.fl.strategies.lora import BASE, LOCAL
from fedalign.models.adapters import layer_pairs
from tests.fl.mock_grid import IN_FEATURES, NUM_CLASSES, mock_clients, task_identity
from tests.fl.test_catalogue import resumes_bitwise
from tests.fl.test_strategies import make_config, run

pytest.importorskip("peft")
MLP = {"name": "mlp", "in_features": IN_FEATURES, "hidden": [16], "num_classes": NUM_CLASSES}
SIZES = (20, 30, 40)
RULES = ("fedit", "ffa-lora", "fedsa-lora", "fedex-lora", "flora", "aligned-lora", "flexlora")


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


def lora_config(rule: str, rounds: int = 1, **adapters):
    return make_config(
        len(SIZES),
        model=MLP,
        strategy={"name": "lora", "rounds": rounds},
        adapters={"kind": "lora", "rank": 2, "alpha": 4.0, "rule": rule, **adapters},
    )


def train_messages(r, number: int) -> list:
    return [
        m
        for m in r.grid.sent
        if m.metadata.message_type == "train" and m.content["config"]["server-round"] == number
    ]


@pytest.mark.parametrize("rule", RULES)
def test_round_is_base_plus_the_rules_update_of_the_trained_adapters(rule: str) -> None:
    r = run(lora_config(rule), mock_clients(SIZES))
    strategy = r.strategy
    fresh = strategy._fresh
    adapters, weights = [], []
    for c in r.clients:
        (reply,) = c.trained
        full = OrderedDict(fresh)
        if LOCAL in c.context_state:  # FedSA-LoRA's B, as the client kept (and reported) it
            full.update(to_state_dict(c.context_state[LOCAL]))
        full.update(reply.state)
        adapters.append(layer_pairs(full))
        weights.append(reply.num_examples)
        # what travelled up: the adapters sent down, trained (a frozen factor never)
        assert set(reply.state) == set(strategy.sent_keys())
    expected = lora_update(rule, adapters, weights, alpha=4.0)
    assert set(expected) == set(strategy.layers)
    for name, layer in strategy.layers.items():
        torch.testing.assert_close(
            r.final[layer.weight], r.initial[layer.weight] + expected[name], rtol=0, atol=1e-6
        )
    adapted = {layer.weight for layer in strategy.layers.values()}
    for key, value in r.initial.items():  # the base's other tensors never move
        if key not in adapted:
            assert torch.equal(r.final[key], value)
    # the round's row: the rule's aggregation error against the mean of the clients' products
    exact = mean_products(adapters, weights, alpha=4.0)
    gap = sum(float((exact[n] - expected[n]).square().sum()) for n in exact)
    size = sum(float(exact[n].square().sum()) for n in exact)
    error = r.rows[-1]["lora"]["aggregation_error"]
    assert error == pytest.approx((gap / size) ** 0.5, rel=1e-6, abs=1e-9)
    if rule in ("ffa-lora", "fedex-lora", "flora", "flexlora"):
        assert error < 1e-6
    if rule == "fedit":
        assert error > 1e-3


def test_ffa_lora_never_sends_a_and_fedsa_lora_keeps_b_on_the_clients() -> None:
    ffa = run(lora_config("ffa-lora"), mock_clients(SIZES))
    assert all(".lora_B." in k for k in ffa.strategy.sent_keys())
    fedsa = run(lora_config("fedsa-lora", rounds=2), mock_clients(SIZES))
    sent = [to_state_dict(m.content["arrays"]) for m in train_messages(fedsa, 2)]
    assert sent and all(all(".lora_A." in k for k in s) for s in sent)
    assert all(LOCAL not in m.content for m in train_messages(fedsa, 2))  # nothing to restore
    row = fedsa.rows[1]
    assert row["bytes_up"] > row["bytes_down"]  # B goes up (the server's model), never down


def adapter_bytes(r) -> int:
    """What the adapters take in a message, as the engine counts it (serialised arrays)."""
    return content_bytes(RecordDict({"arrays": to_arrays(r.strategy.start())}))


def test_bytes_are_the_adapters_and_a_small_fraction_of_the_models() -> None:
    r = run(lora_config("fedit"), mock_clients(SIZES))
    full = run(make_config(len(SIZES), model=MLP), mock_clients(SIZES))
    assert r.rows[1]["bytes_up"] == r.rows[1]["bytes_down"] == len(SIZES) * adapter_bytes(r)
    assert r.rows[1]["bytes_up"] < full.rows[1]["bytes_up"]


@pytest.mark.parametrize("rule", ["fedex-lora", "flora"])
def test_base_changes_are_exact_and_reach_the_clients(rule: str) -> None:
    r = run(lora_config(rule, rounds=2), mock_clients(SIZES))
    strategy = r.strategy
    round_one = r.after_round[1][0]
    bases = [to_state_dict(m.content[BASE]) for m in train_messages(r, 2)]
    assert len(bases) == len(SIZES)
    for layer in strategy.layers.values():
        sent = bases[0][layer.weight]
        if rule == "flora":  # folded: the clients' base is the round's global model
            torch.testing.assert_close(sent, round_one[layer.weight], rtol=0, atol=0)
        else:  # FedEx-LoRA: base + residual, to which the averaged adapter adds the exact mean
            assert not torch.equal(sent, r.initial[layer.weight])
    if rule == "flora":
        fresh = r.strategy._fresh
        arrays = to_state_dict(train_messages(r, 2)[0].content["arrays"])
        assert all(torch.equal(arrays[k], fresh[k]) for k in arrays)  # fresh adapters again


@pytest.mark.parametrize(
    ("rule", "ranks"),
    [
        ("fedsa-lora", []),
        ("fedex-lora", []),
        ("flora", []),
        ("flora", [2, 4]),
        ("flexlora", [2, 4]),
    ],
)
def test_resume_is_bitwise(rule: str, ranks: list[int], tmp_path: Path) -> None:
    """A stop between rounds loses nothing a client starts from: FedSA's local factors, the
    changed bases (FLoRA's folded base is the global weight itself), FlexLoRA's per-rank
    truncations of the last update."""
    resumes_bitwise(lora_config(rule, rounds=3, client_ranks=ranks), SIZES, tmp_path)


@pytest.mark.parametrize("rule", ["flora", "flexlora"])
def test_heterogeneous_client_ranks(rule: str) -> None:
    """``client_ranks: [2, 4]``: client i trains rank 2 or 4; the global model is the base plus
    the rule's update of the mixed-rank adapters; round 2 starts each client at its own rank
    (FLoRA: fresh after folding; FlexLoRA: the best approximation of the update at that rank);
    the bytes are each client's own adapters."""
    ranks = [2, 4, 2]  # partition i: client_ranks[i % 2]
    r = run(lora_config(rule, rounds=2, client_ranks=[2, 4]), mock_clients(SIZES))
    strategy = r.strategy
    adapters, weights = [], []
    for c, rank in zip(r.clients, ranks):
        reply = c.trained[0]
        pairs = layer_pairs(reply.state)
        assert {a.shape[0] for a, _ in pairs.values()} == {rank}
        adapters.append(pairs)
        weights.append(reply.num_examples)
    expected = lora_update(rule, adapters, weights, alpha=4.0)
    round_one = r.after_round[1][0]
    for name, layer in strategy.layers.items():
        torch.testing.assert_close(
            round_one[layer.weight], r.initial[layer.weight] + expected[name], rtol=0, atol=1e-6
        )
    assert r.rows[1]["lora"]["aggregation_error"] < 1e-6
    sent = {
        m.metadata.dst_node_id: to_state_dict(m.content["arrays"]) for m in train_messages(r, 2)
    }
    assert len(sent) == len(SIZES)
    for c, rank in zip(r.clients, ranks):
        arrays = sent[c.node_id]
        for name, (a, b) in layer_pairs(arrays).items():
            assert a.shape[0] == b.shape[1] == rank
            if rule == "flora":  # folded into the base: fresh adapters at the client's rank
                assert torch.equal(a, strategy.fresh(rank)[f"{name}.lora_A.weight"])
            else:  # FlexLoRA: the best rank-r approximation of the round's update
                u, sv, vh = torch.linalg.svd(expected[name].double(), full_matrices=False)
                best = (u[:, :rank] * sv[:rank]) @ vh[:rank]  # all of it where rank > min(out, in)
                got = (4.0 / rank) * b.double() @ a.double()
                torch.testing.assert_close(got, best, rtol=0, atol=1e-6)
        assert {a.shape[0] for a, _ in layer_pairs(c.trained[1].state).values()} == {rank}
    own = sum(
        content_bytes(RecordDict({"arrays": to_arrays(strategy.fresh(rank))})) for rank in ranks
    )
    assert r.rows[1]["bytes_up"] == r.rows[1]["bytes_down"] == own


def test_bad_adapter_configs_are_one_line() -> None:
    with pytest.raises(ConfigError, match="client_ranks: rule fedit .* needs equal ranks"):
        lora_config("fedit", client_ranks=[2, 4])
    with pytest.raises(ConfigError, match="runs with strategy lora"):
        make_config(3, model=MLP, adapters={"kind": "lora"})
    with pytest.raises(ConfigError, match="needs adapters"):
        make_config(3, model=MLP, strategy={"name": "lora"})
    with pytest.raises(ConfigError, match="not an option of lora rule fedit"):
        lora_config("fedit", iterations=3)
    with pytest.raises(ConfigError, match="adapters.targets"):
        lora_config("fedit", targets=["nothing_here"])
    resolved = lora_config("aligned-lora", method="procrustes").adapters.options
    assert resolved["method"] == "procrustes" and resolved["iterations"] == 10
