"""fedalign's strategy catalogue against Flower's own strategies, three rounds on the same clients.

For every strategy Flower ships that fedalign has (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad,
FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan), two independent federations train the same
mock clients (fedalign's ClientApp training on synthetic data, ``mock_grid``) from the same initial
model:

- fedalign: the real ``RoundEngine`` with the config that names the server optimizer or fuse rule;
- Flower: Flower's strategy object drives the rounds the way its ``Strategy.start`` loop does,
  ``configure_train`` -> the grid -> ``aggregate_train``, its model fed back to the clients.

Each side's clients train on that side's own global model, so a difference in any round would
carry into the next; the global models after round 3 must agree to float tolerance (Flower
accumulates in float32 and FedAdam's step in float64, fedalign's mean in float64). The robust rules
run with one Byzantine client (every weight scaled by 1e6). No Ray here: one real Flower ServerApp
run on Ray is in ``tests/integration/test_strategy_catalogue.py``.
"""

from __future__ import annotations

import random
import types
from collections import OrderedDict
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.app.message import arrayrecord as flwr_arrayrecord
from flwr.serverapp import strategy as flwr_strategy

from fedalign.core.types import StateDict
from fedalign.fl.records import config_record, to_arrays, to_state_dict
from tests.fl.mock_grid import mock_clients, mock_grid, task_identity
from tests.fl.test_strategies import make_config, mean_of, run

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (24, 32, 40, 48, 28, 36, 44)  # seven clients: Bulyan with f = 1 needs 4f + 3
BYZANTINE = {6: "scale"}
ROUNDS = 3

CASES: dict[str, tuple[Any, dict[str, Any], bool]] = {
    # Flower strategy, fedalign config sections, whether a Byzantine client takes part
    "FedAvg": (flwr_strategy.FedAvg(), {}, False),
    "FedAvgM": (
        flwr_strategy.FedAvgM(server_learning_rate=0.8, server_momentum=0.9),
        {"server_optimizer": {"name": "momentum", "lr": 0.8, "momentum": 0.9}},
        False,
    ),
    "FedAdam": (
        flwr_strategy.FedAdam(eta=0.05),
        {"server_optimizer": {"name": "adam", "lr": 0.05}},
        False,
    ),
    "FedYogi": (
        flwr_strategy.FedYogi(eta=0.05),
        {"server_optimizer": {"name": "yogi", "lr": 0.05}},
        False,
    ),
    "FedAdagrad": (
        flwr_strategy.FedAdagrad(eta=0.05),
        {"server_optimizer": {"name": "adagrad", "lr": 0.05}},
        False,
    ),
    "FedMedian": (flwr_strategy.FedMedian(), {"aggregation": {"fuse": "median"}}, True),
    "FedTrimmedAvg": (
        flwr_strategy.FedTrimmedAvg(beta=0.2),
        {"aggregation": {"fuse": "trimmed-mean", "beta": 0.2}},
        True,
    ),
    "Krum": (
        flwr_strategy.Krum(num_malicious_nodes=1),
        {"aggregation": {"fuse": "krum", "num_byzantine": 1}},
        True,
    ),
    "MultiKrum": (
        flwr_strategy.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
        {"aggregation": {"fuse": "multi-krum", "num_byzantine": 1, "num_selected": 3}},
        True,
    ),
    "Bulyan": (
        flwr_strategy.Bulyan(num_malicious_nodes=1),
        {"aggregation": {"fuse": "bulyan", "num_byzantine": 1}},
        True,
    ),
}


def flower_run(strategy: Any, cfg: Any, byzantine: bool, initial: StateDict) -> StateDict:
    """Flower's strategy over ``ROUNDS`` rounds on fresh mock clients, as ``Strategy.start`` runs
    it: its ``configure_train`` messages go through the grid, its ``aggregate_train`` makes the
    next global model."""
    grid = mock_grid(mock_clients(SIZES, misbehave=BYZANTINE if byzantine else None))
    arrays = to_arrays(initial)
    random.seed(0)  # Flower samples (here: orders) the nodes with Python's random
    for server_round in range(1, ROUNDS + 1):
        config = config_record(cfg.to_json(), attempt=0)
        messages = strategy.configure_train(server_round, arrays, config, grid)
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        assert isinstance(arrays, ArrayRecord)
    return to_state_dict(arrays)


def fedalign_config(sections: dict[str, Any]) -> Any:
    return make_config(
        len(SIZES),
        strategy={"rounds": ROUNDS, "min_train_clients": 2},
        **sections,
    )


@pytest.fixture(scope="module")
def fedavg_final() -> StateDict:
    with task_identity():
        return run(fedalign_config({}), mock_clients(SIZES)).final


@pytest.fixture(autouse=True)
def _no_forced_gc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's ``ArrayRecord.to_numpy_ndarrays(keep_input=False)`` (Bulyan) runs a full
    ``gc.collect()`` per few kB of arrays, a second each in a test process holding torch: a memory
    hint that changes no number, left out here."""
    monkeypatch.setattr(flwr_arrayrecord, "gc", types.SimpleNamespace(collect=lambda: 0))


@pytest.mark.parametrize("name", list(CASES))
def test_fedalign_equals_flowers_strategy_after_three_rounds(
    name: str, fedavg_final: StateDict
) -> None:
    strategy, sections, byzantine = CASES[name]
    cfg = fedalign_config(sections)
    with task_identity():
        ours = run(cfg, mock_clients(SIZES, misbehave=BYZANTINE if byzantine else None))
        theirs = flower_run(strategy, cfg, byzantine, ours.initial)
    assert [row["round"] for row in ours.rows] == [0, 1, 2, 3]
    assert list(theirs) == list(ours.final)
    for key in ours.final:
        torch.testing.assert_close(
            theirs[key].to(torch.float32), ours.final[key], rtol=1e-4, atol=1e-5, msg=key
        )
    if byzantine:  # the rule is no mean in disguise: the mean of the same replies is wrecked
        last = [t for c in ours.clients for t in c.trained if t.config["server-round"] == ROUNDS]
        mean = mean_of(last)
        assert all(ours.final[k].abs().max() < 100 for k in ours.final)
        assert max(float(mean[k].abs().max()) for k in mean) > 1e4
    elif name != "FedAvg":  # the server optimizer changed the trajectory
        assert max(float((ours.final[k] - fedavg_final[k]).abs().max()) for k in ours.final) > 1e-3
        assert ours.row["server_optimizer"] == {
            "name": sections["server_optimizer"]["name"],
            "state": "kept",
        }


def test_flower_and_fedalign_differ_when_the_options_do() -> None:
    """The comparison can fail: FedAdam with another server learning rate is another model."""
    strategy = flwr_strategy.FedAdam(eta=0.02)
    cfg = fedalign_config({"server_optimizer": {"name": "adam", "lr": 0.05}})
    with task_identity():
        ours = run(cfg, mock_clients(SIZES))
        theirs = flower_run(strategy, cfg, False, ours.initial)
    gap = max(float((theirs[k].float() - ours.final[k]).abs().max()) for k in ours.final)
    assert gap > 1e-3


def test_the_default_server_step_returns_the_fused_model_bit_for_bit() -> None:
    """SGD with learning rate 1 is today's FedAvg exactly, recorded nowhere."""
    cfg = make_config(3, server_optimizer={"name": "sgd", "lr": 1.0})
    with task_identity():
        r = run(cfg, mock_clients(SIZES[:3]))
    expected = mean_of([t for c in r.clients for t in c.trained])
    assert all(torch.equal(r.final[k], expected[k]) for k in expected)
    assert "server_optimizer" not in r.row
    assert OrderedDict(r.strategy.tensors()) == OrderedDict()
