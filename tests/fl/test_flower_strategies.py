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

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.app.message import arrayrecord as flwr_arrayrecord
from flwr.server.strategy import aggregate as legacy
from flwr.serverapp import strategy as flwr_strategy

from fedalign.algorithms.fusion import FUSE_RULES
from fedalign.algorithms.server_opt import SERVER_OPTIMIZERS
from fedalign.core.types import StateDict
from fedalign.fl.records import config_record, to_arrays, to_state_dict
from tests.fl.mock_grid import mock_clients, mock_grid, task_identity
from tests.fl.test_strategies import make_config, mean_of, run

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
    "Bulyan": (  # Flower's Bulyan selects by Multi-Krum in one shot (the paper: recursively)
        flwr_strategy.Bulyan(num_malicious_nodes=1),
        {"aggregation": {"fuse": "bulyan", "num_byzantine": 1, "selection": "one-shot"}},
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
        # rule against rule: Flower's strategies have no update-norm screen, so ours is off
        strategy={"rounds": ROUNDS, "min_train_clients": 2, "max_update_ratio": None},
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


def test_recursive_bulyan_equals_flowers_legacy_aggregate_bulyan() -> None:
    """Flower's legacy ``aggregate_bulyan`` (``flwr.server.strategy``) selects as the paper does,
    Krum run again on the clients left; fedalign's default ``selection: recursive`` must agree with
    it on random arrays (and the one-shot selection of the ServerApp's ``Bulyan`` must not, on
    some of them)."""
    rng = np.random.default_rng(0)
    one_shot_differs = 0
    for n, f in [(7, 1), (8, 1), (11, 2), (12, 2), (15, 3)] * 4:
        arrays = [
            [rng.normal(size=(3, 2)) * s, rng.normal(size=4) * s]
            for s in rng.choice([1.0, 1.0, 1.0, 20.0], size=n)
        ]
        theirs = legacy.aggregate_bulyan(
            [(a, 10) for a in arrays], f, legacy.aggregate_krum, to_keep=0
        )
        states = [OrderedDict(w=torch.from_numpy(a[0]), b=torch.from_numpy(a[1])) for a in arrays]
        rule = FUSE_RULES.get("bulyan").obj
        ours = rule(states, [10.0] * n, [{}] * n, num_byzantine=f)
        for mine, flowers in zip(ours.values(), theirs, strict=True):
            np.testing.assert_allclose(mine.numpy(), flowers, rtol=1e-12, atol=1e-12)
        one_shot = rule(states, [10.0] * n, [{}] * n, num_byzantine=f, selection="one-shot")
        one_shot_differs += not all(
            np.allclose(a.numpy(), b) for a, b in zip(one_shot.values(), theirs, strict=True)
        )
    assert one_shot_differs > 0


@pytest.mark.parametrize(
    ("name", "flower", "names"),
    [
        (
            "momentum",
            flwr_strategy.FedAvgM(),
            {"lr": "server_learning_rate", "momentum": "server_momentum"},
        ),
        (
            "adam",
            flwr_strategy.FedAdam(),
            {"lr": "eta", "betas": ("beta_1", "beta_2"), "tau": "tau"},
        ),
        (
            "yogi",
            flwr_strategy.FedYogi(),
            {"lr": "eta", "betas": ("beta_1", "beta_2"), "tau": "tau"},
        ),
        ("adagrad", flwr_strategy.FedAdagrad(), {"lr": "eta", "tau": "tau"}),
    ],
)
def test_server_optimizer_defaults_are_flowers(
    name: str, flower: Any, names: dict[str, Any]
) -> None:
    """``server_opt`` says a config naming only the rule gets Flower's strategy of that name: each
    default equals the attribute Flower's default-constructed strategy holds."""
    defaults = SERVER_OPTIMIZERS.get(name).options
    for option, attribute in names.items():
        expected = (
            tuple(getattr(flower, a) for a in attribute)
            if isinstance(attribute, tuple)
            else getattr(flower, attribute)
        )
        given = tuple(defaults[option]) if isinstance(attribute, tuple) else defaults[option]
        assert given == expected, (name, option)
