"""FedDyn and MOON (issue 23) on the real engine and mock clients (no Ray), each checked against its
paper's update written out here: FedDyn's Algorithm 1 (client objective, client state, server
state ``h`` and model) run by hand in float64 over the same clients, data and sample; MOON's
model-contrastive loss (Eq. 1) by hand on fixed tensors and one local step of its objective by
hand. Both keep state on their clients and on the server, and resume from a checkpoint bit for
bit."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedalign.client.training import model_contrastive_loss, train_local
from fedalign.config.load import from_dict
from fedalign.config.reference import defaults_yaml
from fedalign.core.errors import ConfigError
from fedalign.core.types import StateDict
from fedalign.fl.records import to_state_dict
from fedalign.fl.strategies.feddyn import DRIFT
from fedalign.fl.strategies.moon import PREVIOUS
from fedalign.models import MLP as MLPModel
from fedalign.runs.checkpoint import load_latest
from tests.fl.mock_grid import IN_FEATURES, NUM_CLASSES, MockClient, mock_clients, task_identity
from tests.fl.test_catalogue import resumes_bitwise
from tests.fl.test_strategies import SIZES, assert_same_state, make_config, run

LINEAR = {"name": "mlp", "in_features": IN_FEATURES, "hidden": [], "num_classes": NUM_CLASSES}
FULL_BATCH = {"local_epochs": 3, "batch_size": 64, "lr": 0.3}  # every step deterministic GD


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


# ---- FedDyn --------------------------------------------------------------------------------------


def feddyn_by_hand(
    model: torch.nn.Module,
    initial: StateDict,
    clients: list[MockClient],
    rounds: int,
    alpha: float,
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Algorithm 1 of Acar et al. 2021 in float64: each sampled client runs full-batch gradient
    descent on ``L_k(w) - <g_k, w> + alpha/2 ||w - w^{t-1}||^2`` and sets
    ``g_k <- g_k - alpha (w_k - w^{t-1})``; the server sets ``h <- h - alpha/m sum_k (w_k -
    w^{t-1})`` and ``w^t = mean_k w_k - h / alpha``. The sample of each round is the engine's
    (read from what each client trained). Returns the final model and every client's ``g_k``."""
    names = [name for name, _ in model.named_parameters()]
    theta = {k: initial[k].double() for k in names}
    g = {c.partition_id: {k: torch.zeros_like(v) for k, v in theta.items()} for c in clients}
    h = {k: torch.zeros_like(v) for k, v in theta.items()}
    m, lr, steps = len(clients), FULL_BATCH["lr"], FULL_BATCH["local_epochs"]
    reference = copy.deepcopy(model).double()
    for t in range(1, rounds + 1):
        sampled = [c for c in clients if any(r.config["server-round"] == t for r in c.trained)]
        trained = []
        for c in sampled:
            X = torch.as_tensor(c.data.X_train).double()
            y = torch.as_tensor(c.data.y_train)
            w = {k: v.clone().requires_grad_() for k, v in theta.items()}
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(reference, w, (X,)), y)
                loss = loss - sum((g[c.partition_id][k] * w[k]).sum() for k in w)
                loss = loss + alpha / 2 * sum(((w[k] - theta[k]) ** 2).sum() for k in w)
                grads = torch.autograd.grad(loss, list(w.values()))
                w = {k: (w[k] - lr * d).detach().requires_grad_() for (k, d) in zip(w, grads)}
            w = {k: v.detach() for k, v in w.items()}
            g[c.partition_id] = {k: g[c.partition_id][k] - alpha * (w[k] - theta[k]) for k in w}
            trained.append(w)
        h = {k: h[k] - alpha / m * sum(w[k] - theta[k] for w in trained) for k in h}
        theta = {k: sum(w[k] for w in trained) / len(trained) - h[k] / alpha for k in theta}
    return theta, g


def test_feddyn_follows_algorithm_1_on_the_clients_and_the_server() -> None:
    """Four clients, two sampled a round (so ``1/m`` and ``1/|P_t|`` differ), three rounds, a
    non-default ``alpha`` (which the clients must take from the strategy's section)."""
    alpha = 0.1
    cfg = make_config(
        4,
        model=LINEAR,
        train=FULL_BATCH,
        strategy={"name": "feddyn", "alpha": alpha, "rounds": 3, "fraction_train": 0.5},
    )
    r = run(cfg, mock_clients(SIZES))
    assert any(len(c.trained) < 3 for c in r.clients)  # partial participation
    theta, g = feddyn_by_hand(r.model, r.initial, r.clients, 3, alpha)
    for k, want in theta.items():
        torch.testing.assert_close(r.final[k].double(), want, rtol=1e-5, atol=1e-5, msg=k)
    for c in r.clients:  # each client's stored D_k is -g_k / alpha, and the server's copy is it
        if c.trained:
            stored = to_state_dict(c.context_state[DRIFT])
            for k, want in g[c.partition_id].items():
                torch.testing.assert_close(stored[k].double(), -want / alpha, rtol=1e-5, atol=1e-5)
            assert_same_state(r.strategy.drifts.copies[c.partition_id], stored)
    # the dynamic regulariser matters: the same clients under FedAvg's rule end elsewhere
    fedavg = run(
        make_config(
            4, model=LINEAR, train=FULL_BATCH, strategy={"rounds": 3, "fraction_train": 0.5}
        ),
        mock_clients(SIZES),
    )
    assert max(float((fedavg.final[k] - r.final[k]).abs().max()) for k in theta) > 1e-2


def test_feddyn_restores_a_rejected_clients_state_from_the_servers_copy() -> None:
    """A client whose round-1 reply is rejected has moved its own ``D_k``; round 2 sends it the
    server's (zeros: it has no accepted update), and every client's copy matches the server's."""
    cfg = make_config(4, strategy={"name": "feddyn", "rounds": 2})
    r = run(cfg, mock_clients(SIZES, misbehave={1: "nan"}, misbehave_times=1))
    assert [f["partition"] for f in r.rows[1]["failures"]] == [1]
    restored = {
        c.partition_id: to_state_dict(m.content[DRIFT])
        for c in r.clients
        for m in r.grid.sent
        if m.metadata.dst_node_id == c.node_id and DRIFT in m.content
    }
    assert list(restored) == [1]
    assert all(float(v.abs().max()) == 0 for v in restored[1].values())
    for c in r.clients:
        assert_same_state(
            to_state_dict(c.context_state[DRIFT]), r.strategy.drifts.copies[c.partition_id]
        )


def test_feddyn_resumes_bitwise_restoring_the_clients_state(tmp_path: Path) -> None:
    cfg = make_config(
        4,
        model=LINEAR,
        train=FULL_BATCH,
        strategy={"name": "feddyn", "rounds": 3},
        server_optimizer={"name": "adam", "lr": 0.05},
    )
    resumes_bitwise(cfg, SIZES, tmp_path)
    names = {
        k.split("/")[1]
        for k in load_latest(tmp_path / "stopped").tensors
        if k.startswith("feddyn/")
    }
    assert names == {"h", "drift"}


# ---- MOON ----------------------------------------------------------------------------------------


def test_the_model_contrastive_loss_is_eq_1() -> None:
    z = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 2.0]])
    z_glob = torch.tensor([[1.5, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    z_prev = torch.tensor([[0.0, -1.0, 3.0], [1.0, 1.0, 1.0]])
    t = 0.5

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    by_hand = [
        -math.log(math.exp(cos(a, b) / t) / (math.exp(cos(a, b) / t) + math.exp(cos(a, c) / t)))
        for a, b, c in zip(z.tolist(), z_glob.tolist(), z_prev.tolist())
    ]
    got = model_contrastive_loss(z, z_glob, z_prev, t)
    assert float(got) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)


def test_one_local_step_of_moon_is_the_gradient_of_its_loss_by_hand() -> None:
    """CE + mu l_con with z the trained MLP's last hidden layer, z_glob the received model's,
    z_prev the previous local model's, one full-batch SGD step."""
    torch.manual_seed(0)
    received, previous = (
        MLPModel(IN_FEATURES, (6,), NUM_CLASSES),
        MLPModel(IN_FEATURES, (6,), NUM_CLASSES),
    )
    X, y = torch.randn(16, IN_FEATURES), torch.randint(0, NUM_CLASSES, (16,))
    mu, t, lr = 2.0, 0.3, 0.1

    def hidden(m: MLPModel) -> torch.Tensor:
        return torch.relu(m.layers[0](X))

    by_hand = copy.deepcopy(received)
    with torch.no_grad():
        z_glob, z_prev = hidden(received), hidden(previous)
    z = hidden(by_hand)
    pos, neg = F.cosine_similarity(z, z_glob, dim=1), F.cosine_similarity(z, z_prev, dim=1)
    l_con = (-(torch.exp(pos / t) / (torch.exp(pos / t) + torch.exp(neg / t))).log()).mean()
    loss = F.cross_entropy(by_hand(X), y) + mu * l_con
    grads = torch.autograd.grad(loss, list(by_hand.parameters()))
    expected = {n: p.detach() - lr * d for (n, p), d in zip(by_hand.named_parameters(), grads)}

    trained = copy.deepcopy(received)
    train_local(
        trained,
        X,
        y,
        batch_size=len(y),
        lr=lr,
        objective="moon",
        objective_options={"mu": mu, "temperature": t},
        objective_inputs={"previous": previous.state_dict()},
    )
    for name, p in trained.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    plain = copy.deepcopy(received)
    train_local(plain, X, y, batch_size=len(y), lr=lr)
    assert not torch.allclose(plain.layers[0].weight, trained.layers[0].weight)


def test_moon_is_fedavg_until_its_clients_have_a_previous_model() -> None:
    """Round 1: no previous local model, so no negative and a zero contrastive term (FedAvg bit for
    bit); round 2 contrasts, and the server's rule stays FedAvg's weighted mean of the replies."""
    moon = run(make_config(4, strategy={"name": "moon", "rounds": 2}), mock_clients(SIZES))
    fedavg = run(make_config(4, strategy={"rounds": 2}), mock_clients(SIZES))
    assert_same_state(moon.after_round[1][0], fedavg.after_round[1][0])
    assert max(float((moon.final[k] - fedavg.final[k]).abs().max()) for k in moon.final) > 1e-4
    for c in moon.clients:  # each client keeps its last trained model, the server a copy of it
        assert_same_state(to_state_dict(c.context_state[PREVIOUS]), c.trained[-1].state)
        assert_same_state(moon.strategy.previous.copies[c.partition_id], c.trained[-1].state)


def test_moon_restores_a_rejected_clients_previous_model_as_none() -> None:
    cfg = make_config(4, strategy={"name": "moon", "rounds": 2})
    r = run(cfg, mock_clients(SIZES, misbehave={2: "nan"}, misbehave_times=1))
    sent = [
        (c.partition_id, to_state_dict(m.content[PREVIOUS]))
        for c in r.clients
        for m in r.grid.sent
        if m.metadata.dst_node_id == c.node_id and PREVIOUS in m.content
    ]
    assert sent == [(2, OrderedDict())]  # the server accepted none of its models: it has none


def test_moon_resumes_bitwise_restoring_the_clients_previous_models(tmp_path: Path) -> None:
    cfg = make_config(
        4, strategy={"name": "moon", "rounds": 3}, server_optimizer={"name": "adam", "lr": 0.05}
    )
    resumes_bitwise(cfg, SIZES, tmp_path)
    tensors = load_latest(tmp_path / "stopped").tensors
    assert {k.split("/")[2] for k in tensors if k.startswith("moon/previous/")} == {
        "0",
        "1",
        "2",
        "3",
    }


# ---- both: options and what they refuse ----------------------------------------------------------


def test_the_defaults_list_their_options() -> None:
    text = defaults_yaml()
    assert "#   feddyn: {alpha: 0.01}" in text
    assert "#   moon: {mu: 1.0, temperature: 0.5}" in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": {"name": "feddyn", "alpha": 0}}, "strategy.alpha: must be > 0"),
        ({"strategy": {"name": "moon", "temperature": 0}}, "strategy.temperature: must be > 0"),
        ({"strategy": {"name": "moon", "mu": -1}}, "strategy.mu: must be >= 0"),
        ({"strategy": {"name": "moon"}, "aggregation": {"align": "weight"}}, "align: none"),
        ({"strategy": {"name": "feddyn"}, "aggregation": {"fuse": "median"}}, "pipeline runs"),
        ({"strategy": {"name": "fedavg", "alpha": 0.1}}, "not an option of strategy fedavg"),
        ({"train": {"objective": "moon"}}, "objective runs with strategy moon"),
        ({"strategy": {"name": "feddyn"}, "train": {"objective": "plain"}}, "its own objective"),
    ],
)
def test_feddyn_and_moon_refuse_what_they_cannot_run(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(values)
