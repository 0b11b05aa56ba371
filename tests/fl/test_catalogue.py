"""The strategy catalogue on the real engine and mock clients (no Ray): state through a real
checkpoint file and a resumed engine (FedAdam, SCAFFOLD), the server optimizer's reset where a
strategy changes the model's widths, SCAFFOLD and FedNova on problems whose answers are known
(SCAFFOLD reaches the optimum of heterogeneous strongly convex clients where FedAvg does not;
FedNova is FedAvg for equal step counts and its formula otherwise), and their checks of what the
clients report."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedalign.config.components import run_model
from fedalign.config.load import from_dict
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from fedalign.core.types import StateDict
from fedalign.data.federation import ClientData
from fedalign.fl.engine import RoundEngine, StrategySnapshot
from fedalign.fl.strategy import build_strategy
from fedalign.runs.checkpoint import Checkpoint, load_latest, save_checkpoint
from tests.fl.mock_grid import (
    IN_FEATURES,
    NUM_CLASSES,
    MockClient,
    mock_clients,
    mock_grid,
    task_identity,
)
from tests.fl.test_strategies import SIZES, assert_same_state, make_config, mean_of, nbytes, run


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


def checkpointed_run(
    cfg: RunConfig, clients: list[MockClient], folder: Path, resume: bool = False
) -> tuple[OrderedDict, list[dict[str, Any]]]:
    """The engine as ``server_app.run_server`` drives it: a checkpoint (model, JSON state, tensor
    state) after every round into ``folder``; with ``resume``, a fresh strategy loaded from the
    newest checkpoint there continues after its round."""
    model = run_model(cfg, clients[0].shapes, init_seed=cfg.resolved_seeds.init)
    strategy = build_strategy(cfg, copy.deepcopy(model))
    initial, first = OrderedDict(model.state_dict()), 1
    if resume:
        latest = load_latest(folder)
        assert latest is not None
        strategy.load_state(latest.state)
        strategy.load_tensors(latest.tensors)
        initial, first = latest.model, latest.round + 1
    rows: list[dict[str, Any]] = []

    def checkpoint(number: int, state: OrderedDict, snapshot: StrategySnapshot) -> None:
        save_checkpoint(
            folder, Checkpoint(number, OrderedDict(state), snapshot.state, snapshot.tensors)
        )

    engine = RoundEngine(cfg, strategy, on_round=rows.append, on_round_end=checkpoint)
    return engine.run(mock_grid(clients), initial, first_round=first), rows


def resumes_bitwise(cfg: RunConfig, sizes: tuple[int, ...], tmp_path: Path) -> list[dict]:
    """Rounds 1-2, a checkpoint, a fresh engine and strategy for round 3 (fresh clients too, as
    a resumed simulation has): the same model as three rounds without a stop."""
    whole, rows = checkpointed_run(cfg, mock_clients(sizes), tmp_path / "whole")
    first_half = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, rounds=2))
    checkpointed_run(first_half, mock_clients(sizes), tmp_path / "stopped")
    resumed, resumed_rows = checkpointed_run(
        cfg, mock_clients(sizes), tmp_path / "stopped", resume=True
    )
    assert [r["round"] for r in resumed_rows] == [3]
    assert_same_state(resumed, whole)
    return rows


def test_fedadam_resumes_bitwise_from_a_checkpoint(tmp_path: Path) -> None:
    cfg = make_config(4, strategy={"rounds": 3}, server_optimizer={"name": "adam", "lr": 0.05})
    rows = resumes_bitwise(cfg, SIZES, tmp_path)
    assert [r["server_optimizer"]["state"] for r in rows[1:]] == ["kept"] * 3
    assert set(load_latest(tmp_path / "whole").tensors) >= {"server_opt/step"}


def test_pfnm_one_shot_round_resets_the_server_optimizer_and_fine_tuning_keeps_it() -> None:
    """Round 1 fuses models trained from the clients' own inits (and may grow them): no step from
    the initial model; round 2 is FedAvg fine-tuning of the fused model, a step kept."""
    cfg = make_config(
        4,
        strategy={"name": "pfnm", "rounds": 2, "sigma": 0.2},
        server_optimizer={"name": "adam", "lr": 0.05},
    )
    r = run(cfg, mock_clients(SIZES))
    reset = "reset (clients trained from their own inits)"
    assert r.rows[1]["server_optimizer"] == {"name": "adam", "state": reset}
    assert r.rows[2]["server_optimizer"] == {"name": "adam", "state": "kept"}


# ---- SCAFFOLD and FedNova -----------------------------------------------------------------------

LINEAR = {"name": "mlp", "in_features": IN_FEATURES, "hidden": [], "num_classes": NUM_CLASSES}
CONVEX_TRAIN = {"local_epochs": 10, "batch_size": 64, "lr": 0.5, "weight_decay": 0.1}


def label_skewed_clients() -> list[MockClient]:
    """Four clients of 40 examples, each holding mostly one class: their own optima are far apart
    (full-batch local steps, so every step is deterministic gradient descent)."""
    clients = mock_clients([200] * 4)
    for client in clients:
        data = client.data
        keep = np.argsort(data.y_train != client.partition_id % NUM_CLASSES, kind="stable")[:40]
        client.data = ClientData(data.X_train[keep], data.y_train[keep], data.X_val, data.y_val)
    return clients


def federation_optimum(clients: list[MockClient], model: torch.nn.Module) -> StateDict:
    """The minimiser of the clients' mean objective (their cross-entropy plus the weight decay
    local SGD applies), by full-batch L-BFGS in float64 on the pooled data (equal client sizes)."""
    m = copy.deepcopy(model).double()
    X = torch.as_tensor(np.concatenate([c.data.X_train for c in clients])).double()
    y = torch.as_tensor(np.concatenate([c.data.y_train for c in clients]))
    opt = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12)
    decay = CONVEX_TRAIN["weight_decay"]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(m(X), y)
        loss = loss + 0.5 * decay * sum((p**2).sum() for p in m.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return OrderedDict((k, v.float()) for k, v in m.state_dict().items())


def gap(a: StateDict, b: StateDict) -> float:
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


def test_scaffold_reaches_the_optimum_of_heterogeneous_convex_clients_where_fedavg_does_not() -> (
    None
):
    rounds = {"rounds": 20}  # SCAFFOLD's gap: 0.13 after 5 rounds, 1e-3 after 15, 1e-4 after 20
    scaffold = make_config(
        4, model=LINEAR, train=CONVEX_TRAIN, strategy={"name": "scaffold", **rounds}
    )
    fedavg = make_config(4, model=LINEAR, train=CONVEX_TRAIN, strategy=rounds)
    s, f = run(scaffold, label_skewed_clients()), run(fedavg, label_skewed_clients())
    optimum = federation_optimum(s.clients, s.model)
    assert gap(s.initial, optimum) > 1.0
    assert gap(s.final, optimum) < 1e-3
    assert gap(f.final, optimum) > 0.05
    # the control variates travel both ways: c down with every model, the change of c_i up
    model_bytes = nbytes(s.initial)
    for row in s.rows[1:]:
        assert row["bytes_by_phase"]["train"]["down"] == 4 * 2 * model_bytes
        assert row["bytes_by_phase"]["train"]["up"] == 4 * 2 * model_bytes
    assert f.rows[1]["bytes_by_phase"]["train"]["down"] == 4 * model_bytes


def test_scaffold_resumes_bitwise_restoring_the_clients_control_variates(tmp_path: Path) -> None:
    """The resumed half runs on fresh clients (empty Context.state, as a resumed simulation's
    nodes are): the server sends each its control variate from the checkpoint, once."""
    cfg = make_config(
        4,
        model=LINEAR,
        train=CONVEX_TRAIN,
        strategy={"name": "scaffold", "rounds": 3},
        server_optimizer={"name": "adam", "lr": 0.05},
    )
    resumes_bitwise(cfg, SIZES, tmp_path)
    latest = load_latest(tmp_path / "stopped")
    assert {k.split("/")[1] for k in latest.tensors if k.startswith("scaffold/")} == {
        "control",
        "client",
    }


def test_scaffold_rejects_inconsistent_control_variates_and_bad_step_counts() -> None:
    cfg = make_config(4, strategy={"name": "scaffold", "rounds": 2})
    clients = mock_clients(SIZES, misbehave={1: "bad-control", 2: "bad-steps"}, misbehave_times=1)
    r = run(cfg, clients)
    reasons = {f["partition"]: f["reason"] for f in r.rows[1]["failures"]}
    assert reasons[1].startswith("control-delta: layers.0.weight is not the change its update")
    assert reasons[2] == "local-steps 1000000 outside [1, 5] for 40 examples"
    assert r.rows[2]["failures"] == [] and r.rows[2]["clients_ok"] == 4
    # the rejected clients had moved their own c_i: round 2 sent them the server's copy
    restored = [
        c.partition_id
        for c in r.clients
        if any(
            "client-control" in m.content
            for m in r.grid.sent
            if m.metadata.dst_node_id == c.node_id
        )
    ]
    assert restored == [1, 2]


def test_fednova_is_fedavg_when_step_counts_are_equal() -> None:
    equal = (32, 32, 32)
    nova = run(make_config(3, strategy={"name": "fednova"}), mock_clients(equal))
    avg = run(make_config(3), mock_clients(equal))
    assert_same_state(nova.final, avg.final)
    assert nova.rows[1]["fednova"]["tau_eff"] == 4.0  # 32 examples in batches of 8


def test_fednova_normalises_unequal_step_counts() -> None:
    cfg = make_config(4, strategy={"name": "fednova"}, train={"momentum": 0.5})
    r = run(cfg, mock_clients(SIZES))
    replies = r.replies()
    steps = [-(-t.num_examples // 8) for t in replies]  # one epoch of batches of 8
    rho = 0.5
    a = [(s - rho * (1 - rho**s) / (1 - rho)) / (1 - rho) for s in steps]
    p = np.array([t.num_examples for t in replies], dtype=float)
    p /= p.sum()
    tau = float(np.dot(p, a))
    expected = OrderedDict(
        (
            k,
            r.initial[k]
            - tau * sum(pi * (r.initial[k] - t.state[k]) / ai for pi, t, ai in zip(p, replies, a)),
        )
        for k in r.initial
    )
    for k in expected:
        torch.testing.assert_close(r.final[k], expected[k].float(), rtol=1e-5, atol=1e-6)
    assert r.rows[1]["fednova"]["tau_eff"] == pytest.approx(tau)
    with pytest.raises(AssertionError):  # not FedAvg's mean
        assert_same_state(r.final, mean_of(replies))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": {"name": "scaffold"}, "train": {"optimizer": "adam"}}, "assumes local SGD"),
        ({"strategy": {"name": "fednova"}, "train": {"optimizer": "adam"}}, "assumes local SGD"),
        (
            {"strategy": {"name": "scaffold"}, "aggregation": {"align": "weight"}},
            "use aggregation.align: none",
        ),
        ({"train": {"objective": "scaffold"}}, "objective runs with strategy scaffold"),
        (
            {"strategy": {"name": "scaffold"}, "train": {"objective": "plain"}},
            "trains with its own objective",
        ),
    ],
)
def test_drift_strategies_reject_what_they_cannot_run(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(values)


def test_scaffold_runs_with_local_momentum_as_niid_bench_does() -> None:
    """NIID-Bench trains SCAFFOLD's clients with SGD momentum 0.9; the momentum study needs it."""
    cfg = make_config(4, strategy={"name": "scaffold"}, train={"momentum": 0.9})
    assert cfg.strategy.name == "scaffold" and cfg.train.momentum == 0.9
