"""A round lost with a dead Ray worker, rerun by a restarted simulation (``runner.restart_point``):
its row names the death and the restart, and summary.json counts the restarts. The real engine on
mock clients, one of which answers round 2 as a dead actor does, once."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
from flwr.app import Message, MessageType, RecordDict

from fedalign.config.components import run_model
from fedalign.core.errors import ActorPoolBroken
from fedalign.fl.engine import DEAD_ACTOR, RoundEngine
from fedalign.fl.round_log import RoundLog
from fedalign.fl.strategy import build_strategy
from fedalign.report.results import summarise
from fedalign.runs.runner import carry_restart
from tests.fl.mock_grid import mock_clients, mock_grid, task_identity
from tests.fl.test_strategies import SIZES, make_config

DEATH = f"The {DEAD_ACTOR} because its worker process has died"


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


def test_a_round_lost_with_a_dead_worker_is_rerun_naming_the_death_and_the_restart() -> None:
    # every client must answer: the death fails round 2 (no retry), so the simulation restarts
    cfg = make_config(3, strategy={"rounds": 3, "min_train_clients": 3, "round_retries": 0})
    clients = mock_clients(SIZES[:3])
    dying, died = clients[1], []

    def dies_in_round_2_once(msg: Message) -> RecordDict | None:
        train = msg.metadata.message_type == MessageType.TRAIN
        if train and msg.content["config"]["server-round"] == 2 and not died:
            died.append(True)
            raise RuntimeError(DEATH)
        return dying(msg)

    grid = mock_grid(clients)
    grid.handlers[dying.node_id] = dies_in_round_2_once
    model = run_model(cfg, clients[0].shapes, init_seed=cfg.resolved_seeds.init)
    after: dict[int, OrderedDict] = {}
    rows: list[dict[str, Any]] = []

    def engine(carried: dict[int, RoundLog] | None = None) -> RoundEngine:
        return RoundEngine(
            cfg,
            build_strategy(cfg, copy.deepcopy(model)),
            on_round=rows.append,
            on_round_end=lambda number, state, snapshot: after.update({number: state}),
            carried=carried,
        )

    with pytest.raises(ActorPoolBroken) as broken:
        engine().run(grid, OrderedDict(model.state_dict()))
    lost = broken.value.lost
    assert (lost.round, lost.clients_failed) == (2, 1)
    assert [r["round"] for r in rows] == [0, 1]  # round 2 never finished: no row, no checkpoint

    carried: dict[int, RoundLog] = {}
    carry_restart(carried, lost, checkpoint_round=1)
    engine(carried).run(grid, after[1], first_round=2)  # its carried failure is not its own
    assert carried == {}  # taken by the round it was for
    rerun = rows[2]
    assert (rerun["round"], rerun["clients_ok"], rerun["clients_failed"]) == (2, 3, 1)
    assert [f["partition"] for f in rerun["failures"]] == [1]
    assert DEAD_ACTOR in rerun["failures"][0]["reason"]
    assert [r.get("restarts", 0) for r in rows] == [0, 0, 1, 0]
    assert summarise(rows)["restarts"] == 1


def test_a_restart_after_a_checkpointed_round_counts_on_the_next_round() -> None:
    """The round the worker died in finished with the others and was checkpointed: its row names
    the failure already; the restart is counted on the round the new simulation starts with, and
    a second restart of it adds to the first."""
    lost = RoundLog(2, clients_failed=1, failures=[{"partition": 1, "reason": DEATH}])
    carried: dict[int, RoundLog] = {}
    carry_restart(carried, lost, checkpoint_round=2)
    carry_restart(carried, None, checkpoint_round=2)
    assert list(carried) == [3]
    assert (carried[3].clients_failed, carried[3].extra) == (0, {"restarts": 2})
    assert "restarts" not in summarise([{"round": 0}, {"round": 1, "clients_failed": 0}])
