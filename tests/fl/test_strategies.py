"""Every registered strategy run by the real ``RoundEngine`` on mock replies, without Ray.

The clients are ``MockClient``s (fedalign's ClientApp on a few dozen synthetic examples each) behind
a ``MockGrid``; what each one returned is kept, so every test recomputes the server's result from
exactly those replies with the library function the strategy is meant to call (a weighted mean,
``pipeline.aggregate``, ``fusion.pfnm.pfnm``) and compares. Misbehaving clients exercise the
engine's checks, retries and accounting.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict
from torch import nn

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.fusion.neural_matching import pfnm
from fedalign.algorithms.pipeline import aggregate
from fedalign.algorithms.stats import received_statistics
from fedalign.client.training import evaluate
from fedalign.config.components import run_model
from fedalign.config.load import from_dict
from fedalign.config.schema import RunConfig
from fedalign.core.errors import RoundFailedError
from fedalign.core.tensors import weighted_average
from fedalign.core.types import ClientStats, StateDict
from fedalign.fl.engine import (
    INFO_TIMEOUT_SECONDS,
    REPLY_POLL_SECONDS,
    EvaluateFn,
    RoundEngine,
    StrategySnapshot,
)
from fedalign.fl.records import to_arrays
from fedalign.fl.round import sample_partitions
from fedalign.fl.strategies import FedAvg
from fedalign.fl.strategy import Strategy, build_strategy
from fedalign.models import fit_to_state
from fedalign.runs.server_app import server_evaluation
from tests.fl.mock_grid import (
    IN_FEATURES,
    NUM_CLASSES,
    MockClient,
    MockGrid,
    Targets,
    TrainReply,
    mock_clients,
    mock_grid,
    synthetic_data,
    task_identity,
)

MLP = {"name": "mlp", "in_features": IN_FEATURES, "hidden": [6], "num_classes": NUM_CLASSES}
TWO_HIDDEN = {**MLP, "hidden": [6, 5]}  # REPAIR's targets reach a layer; FedMA matches two
SIZES = (24, 32, 40, 48)  # training examples per client: unequal, so the weights matter


def make_config(
    num_clients: int, model: dict[str, Any] | None = None, **sections: dict[str, Any]
) -> RunConfig:
    """A tiny run: the MLP on ``num_clients`` mock clients, one round of one local epoch;
    ``sections`` update the base config's sections key by key."""
    values: dict[str, Any] = {
        "data": {"num_clients": num_clients},
        "model": model or MLP,
        "train": {"local_epochs": 1, "batch_size": 8, "lr": 0.1},
        "strategy": {"rounds": 1, "min_train_clients": 2},
        "output": {"plot": False, "save_model": False, "checkpoint_every": 0},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value}
    return from_dict(values)


@dataclass
class Run:
    """One engine run on mock clients, and everything a test checks of it."""

    final: OrderedDict[str, torch.Tensor]
    rows: list[dict[str, Any]]
    strategy: Strategy
    grid: MockGrid
    clients: list[MockClient]
    model: nn.Module  # the architecture at its initial widths
    initial: OrderedDict[str, torch.Tensor]
    after_round: dict[int, tuple[StateDict, str]]  # the model and the strategy's state (JSON)
    strategy_tensors: dict[int, dict[str, torch.Tensor]]  # the strategy's tensors, per round

    @property
    def row(self) -> dict[str, Any]:
        return self.rows[-1]

    def replies(
        self, partitions: Sequence[int] | None = None, attempt: int = 0
    ) -> list[TrainReply]:
        """The train replies of round 1's ``attempt`` (of ``partitions``, else of all clients)."""
        chosen = [c for c in self.clients if partitions is None or c.partition_id in partitions]
        return [
            t
            for c in chosen
            for t in c.trained
            if t.config["server-round"] == 1 and t.config["attempt"] == attempt
        ]


def run(
    cfg: RunConfig,
    clients: list[MockClient],
    strategy: Strategy | None = None,
    initial: StateDict | None = None,
    first_round: int = 1,
    evaluate_fn: EvaluateFn | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """The real engine and the registered strategy (built as ``fl.strategy.build_strategy`` does)
    on the mock clients, with the server's test-set evaluation ``evaluate_fn`` when given;
    ``on_round`` is called on each row too."""
    model = run_model(cfg, clients[0].shapes, init_seed=cfg.resolved_seeds.init)
    strategy = strategy or build_strategy(cfg, copy.deepcopy(model))
    start = OrderedDict((k, v.clone()) for k, v in (initial or model.state_dict()).items())
    rows: list[dict[str, Any]] = []
    after: dict[int, tuple[StateDict, str]] = {}
    tensors: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(number: int, state: StateDict, strategy: StrategySnapshot) -> None:
        # copies, as a checkpoint file holds them: a strategy may update its tensors in place
        after[number] = (clone(state), json.dumps(strategy.state))
        tensors[number] = clone(strategy.tensors)

    grid = mock_grid(clients)
    example = clients[0].data
    engine = RoundEngine(
        cfg,
        strategy,
        evaluate_fn=evaluate_fn,
        on_round=rows.append if on_round is None else lambda row: (rows.append(row), on_round(row)),
        on_round_end=snapshot,
        # what the server knows of each partition in a simulation (server_app passes the same)
        example_limits={c.partition_id: len(c.data.y_train) for c in clients},
        example=(torch.as_tensor(example.X_train[:1]), torch.as_tensor(example.y_train[:1])),
    )
    final = engine.run(grid, OrderedDict(start), first_round=first_round)
    return Run(final, rows, strategy, grid, clients, model, start, after, tensors)


def clone(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v.detach().clone()) for k, v in state.items())


def mean_of(replies: Sequence[TrainReply]) -> OrderedDict[str, torch.Tensor]:
    """FedAvg's rule on ``replies``: their states weighted by their example counts."""
    return weighted_average([t.state for t in replies], [t.num_examples for t in replies])


def assert_same_state(actual: StateDict, expected: StateDict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def distance(a: StateDict, b: StateDict) -> float:
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


def nbytes(state: StateDict) -> int:
    """What ``state`` weighs in a message: its arrays as Flower serialises them."""
    return sum(len(array.data) for array in to_arrays(state).values())


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


# ---- FedAvg -------------------------------------------------------------------------------------


@pytest.fixture
def fedavg(_flower_identity: None) -> Run:
    """FedAvg over two honest clients and three broken ones, with federated evaluation."""
    cfg = make_config(5, strategy={"fraction_evaluate": 1.0})
    return run(cfg, mock_clients((*SIZES, 30), misbehave={2: "nan", 3: "wrong-shape", 4: "raise"}))


def test_fedavg_is_the_weighted_mean_of_exactly_the_honest_replies(fedavg: Run) -> None:
    honest = fedavg.replies([0, 1])
    assert [t.misbehaved for t in honest] == [None, None]
    assert_same_state(fedavg.final, mean_of(honest))
    losses = np.array([t.loss for t in honest])
    examples = np.array([t.num_examples for t in honest])
    assert fedavg.row["train_loss"] == pytest.approx((losses * examples).sum() / examples.sum())
    assert fedavg.row["attempts"] == 1


def test_fedavg_rejects_broken_replies_with_their_reasons(fedavg: Run) -> None:
    row = fedavg.row
    assert (row["clients_sampled"], row["clients_ok"], row["clients_failed"]) == (5, 2, 3)
    reasons = {f["partition"]: f["reason"] for f in row["failures"]}
    assert reasons == {
        2: "layers.0.weight: contains NaN or Inf",
        3: "layers.0.weight: shape (6, 9), expected (6, 8)",
        4: "client error: client 4 failed on purpose",
    }
    nodes = {f["partition"]: f["node"] for f in row["failures"]}
    assert nodes == {c.partition_id: c.node_id for c in fedavg.clients[2:]}


def test_fedavg_counts_the_bytes_of_every_message(fedavg: Run) -> None:
    row, model = fedavg.row, nbytes(fedavg.initial)
    answered = [t for c in fedavg.clients for t in c.trained]  # the raising client sent nothing
    phases = row["bytes_by_phase"]
    assert phases["train"] == {"down": 5 * model, "up": sum(nbytes(t.state) for t in answered)}
    assert phases["federated_evaluate"] == {"down": 5 * model, "up": 0}
    assert row["bytes_down"] == sum(p["down"] for p in phases.values()) > 0
    assert row["bytes_up"] == sum(p["up"] for p in phases.values()) > 0
    assert fedavg.rows[0]["round"] == 0 and fedavg.rows[0]["bytes_down"] == 0
    assert fedavg.grid.pull_interval == REPLY_POLL_SECONDS


def test_fedavg_federated_evaluation_weights_clients_by_examples(fedavg: Run) -> None:
    model = fit_to_state(copy.deepcopy(fedavg.model), fedavg.final)
    results = [
        (evaluate(model, c.data.X_val, c.data.y_val)[1], len(c.data.y_val)) for c in fedavg.clients
    ]
    expected = sum(a * n for a, n in results) / sum(n for _, n in results)
    assert fedavg.row["val_accuracy"] == pytest.approx(expected)


# ---- too few valid replies ----------------------------------------------------------------------

RETRY = {"fraction_train": 0.75, "min_train_clients": 3}


def samples(cfg: RunConfig, attempts: int) -> list[list[int]]:
    """The partitions round 1 samples in each attempt."""
    s = cfg.strategy
    partitions = list(range(cfg.data.num_clients))
    return [
        sample_partitions(
            cfg.resolved_seeds.sampling,
            partitions,
            1,
            s.fraction_train,
            s.min_train_clients,
            "train",
            a,
        )
        for a in range(attempts)
    ]


def test_too_few_replies_retry_the_round_with_a_fresh_sample() -> None:
    cfg = make_config(4, strategy={**RETRY, "round_retries": 1})
    first, second = samples(cfg, 2)
    silent = next(p for p in first if p not in second)  # sampled in the first attempt only
    r = run(cfg, mock_clients(SIZES, misbehave={silent: "silent"}))
    assert r.row["attempts"] == 2
    reason = f"no reply within strategy.timeout={cfg.strategy.timeout:g} s"
    assert r.row["failures"] == [
        {"partition": silent, "node": r.clients[silent].node_id, "reason": reason}
    ]
    partition_of = {c.node_id: c.partition_id for c in r.clients}
    trained = [m for m in r.grid.sent if m.metadata.message_type == "train"]
    asked = {
        a: sorted(
            partition_of[m.metadata.dst_node_id]
            for m in trained
            if m.content["config"]["attempt"] == a
        )
        for a in (0, 1)
    }
    assert asked == {0: first, 1: second}
    assert_same_state(r.final, mean_of(r.replies(second, attempt=1)))
    assert r.row["clients_sampled"] == 6
    assert r.row["clients_ok"] + r.row["clients_failed"] == r.row["clients_sampled"]


def test_too_few_replies_without_retries_fail_the_run() -> None:
    cfg = make_config(4, strategy={**RETRY, "round_retries": 0})
    silent = samples(cfg, 1)[0][0]
    expected = rf"min_train_clients=3 valid replies in 1 attempt.*client {silent}: no reply within"
    with pytest.raises(RoundFailedError, match=expected):
        run(cfg, mock_clients(SIZES, misbehave={silent: "silent"}))


@pytest.mark.parametrize(
    "kind",
    [
        "raise",
        "silent",
    ],
)
def test_a_client_failing_in_every_attempt_fails_once_per_attempt(kind: str) -> None:
    cfg = make_config(4, strategy={**RETRY, "min_train_clients": 2, "round_retries": 1})
    first, second = samples(cfg, 2)
    always = next(p for p in first if p in second)  # sampled in both attempts
    once = next(p for p in first if p not in second)
    r = run(cfg, mock_clients(SIZES, misbehave={always: kind, once: kind}))
    assert r.row["attempts"] == 2
    assert sorted(f["partition"] for f in r.row["failures"]) == sorted([always, always, once])
    assert r.row["clients_ok"] + r.row["clients_failed"] == r.row["clients_sampled"] == 6


def test_the_info_query_has_its_own_timeout() -> None:
    """A node's first message starts it (imports, data): a short training timeout must not cut
    the discovery before round 1."""
    cfg = make_config(2, strategy={"timeout": 1.5})
    grid = mock_grid(mock_clients(SIZES[:2]))
    timeouts: list[float | None] = []
    send = grid.send_and_receive

    def recording(messages: Any, *, timeout: float | None = None) -> list:
        timeouts.append(timeout)
        return send(messages, timeout=timeout)

    grid.send_and_receive = recording  # type: ignore[method-assign]
    model = run_model(cfg, mock_clients(SIZES[:1])[0].shapes)
    engine = RoundEngine(cfg, build_strategy(cfg, model))
    engine.discover(grid)
    assert timeouts == [INFO_TIMEOUT_SECONDS] and INFO_TIMEOUT_SECONDS > 1.5
    assert engine.node_of_partition == {0: grid.get_node_ids()[0], 1: grid.get_node_ids()[1]}


# ---- FedProx ------------------------------------------------------------------------------------


def test_fedprox_is_fedavg_with_the_proximal_client_objective() -> None:
    prox = make_config(3, strategy={"name": "fedprox"}, train={"proximal_mu": 2.0})
    plain = make_config(3)
    assert (prox.objective, plain.objective) == ("proximal", "plain")
    a, b = run(prox, mock_clients(SIZES[:3])), run(plain, mock_clients(SIZES[:3]))
    assert type(a.strategy) is FedAvg
    assert_same_state(a.initial, b.initial)
    for anchored, free in zip(a.replies(), b.replies(), strict=True):
        # the penalty pulls each client towards the weights it was sent
        assert 0 < distance(anchored.state, a.initial) < distance(free.state, b.initial)
    assert_same_state(a.final, mean_of(a.replies()))


# ---- the align -> fuse -> repair pipeline -------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregation", "phases"),
    [
        ({"align": "weight", "fuse": "regmean", "repair": "repair"}, {"train", "repair"}),
        # from their own inits, the clients' units need real permutations
        ({"align": "activation", "own_init": True}, {"train", "align"}),
    ],
)
def test_the_pipeline_fuses_as_aggregate_does_on_the_same_replies(
    aggregation: dict[str, Any], phases: set[str]
) -> None:
    cfg = make_config(3, model=TWO_HIDDEN, aggregation=aggregation)
    r = run(cfg, mock_clients(SIZES[:3]))
    replies = r.replies()
    states = [t.state for t in replies]
    weights = [float(t.num_examples) for t in replies]
    plan = cfg.to_plan()

    def ask_cross(ref: int, others: list[int]) -> dict[int, ClientStats]:
        kinds = list(plan.align_statistics())
        return {
            j: r.clients[j].measured(cfg, kinds, states[j], reference=states[ref]) for j in others
        }

    def ask_fused(fused: StateDict, targets: Targets | None) -> list[ClientStats]:
        kinds = list(plan.repair_statistics())
        return [c.measured(cfg, kinds, fused, targets=targets) for c in r.clients]

    outcome = aggregate(
        plan,
        permutation_spec(r.model),
        states,
        weights,
        [received_statistics(t.statistics or {}, t.state) for t in replies],
        ask_cross,
        ask_fused,
        seed=cfg.resolved_seeds.sampling + 1,
    )
    assert_same_state(r.final, outcome.state)
    with pytest.raises(AssertionError):  # the pipeline is not FedAvg's mean in disguise
        assert_same_state(r.final, weighted_average(states, weights))
    info = r.row["aggregation"]
    assert (info["align"], info["fuse"], info["repair"]) == (
        aggregation["align"],
        aggregation.get("fuse", "mean"),
        aggregation.get("repair", "none"),
    )
    assert info["reference_partition"] == int(np.argmax(SIZES[:3]))
    by_phase = r.row["bytes_by_phase"]
    assert set(by_phase) == phases
    assert all(p["down"] > 0 and p["up"] > 0 for p in by_phase.values())
    if "align" in phases:  # the two other clients get their own model and the reference's
        assert by_phase["align"]["down"] == 2 * 2 * nbytes(r.initial)
    assert (r.row["clients_ok"], r.row["clients_failed"]) == (3, 0)


# ---- PFNM ---------------------------------------------------------------------------------------


def test_pfnm_matches_the_accepted_clients_as_fusion_pfnm_does() -> None:
    # below the default sigma of 1, the clients' own-init neurons are too far apart to all match
    pfnm_strategy = {"name": "pfnm", "fraction_evaluate": 1.0, "sigma": 0.2}
    cfg = make_config(4, strategy=pfnm_strategy)
    r = run(cfg, mock_clients(SIZES, misbehave={1: "bad-counts"}))
    row = r.row
    assert row["failures"] == [
        {"partition": 1, "node": r.clients[1].node_id, "reason": "malformed class-counts"}
    ]
    assert (row["clients_ok"], row["clients_failed"]) == (3, 1)
    accepted = r.replies([0, 2, 3])
    assert all(t.config["client-init"] == "local" for t in accepted)
    models = [fit_to_state(copy.deepcopy(r.model), t.state) for t in accepted]
    counts = [
        np.bincount(r.clients[p].data.y_train, minlength=NUM_CLASSES).tolist() for p in (0, 2, 3)
    ]
    m = cfg.strategy.options  # the resolved options: every one pfnm takes, with its value
    assert m["gamma"] == 1.0  # PFNM's own default, not FedMA's
    fused, assignment = pfnm(
        models,
        counts,
        seed=cfg.resolved_seeds.sampling,
        **{k: v for k, v in m.items() if not k.startswith("grid")},
    )
    assert_same_state(r.final, fused.state_dict())
    assert row["pfnm"]["gamma"] == 1.0  # PFNM's own default, not FedMA's
    assert row["pfnm"]["widths"] == assignment.widths == [r.final["layers.0.weight"].shape[0]]
    assert row["pfnm"]["widths"][0] > MLP["hidden"][0]
    assert row["val_accuracy"] is not None  # the clients evaluate the grown model


def test_pfnm_as_the_align_step_takes_its_options_from_aggregation_as_the_strategy_does() -> None:
    """BBP-MAP's options have one home (``pfnm``'s signature): the ``pfnm`` aligner under fedavg
    reads them from ``aggregation``, the ``pfnm`` strategy from ``strategy``, and on the same
    clients with the same options both fuse to the same model."""
    aligner = make_config(
        3, aggregation={"align": "pfnm", "own_init": True, "sigma": 0.2, "gamma": 2.0}
    )
    strategy = make_config(3, strategy={"name": "pfnm", "sigma": 0.2, "gamma": 2.0})
    assert aligner.aggregation.options["sigma"] == strategy.strategy.options["sigma"] == 0.2
    by_aligner = run(aligner, mock_clients(SIZES[:3]))
    by_strategy = run(strategy, mock_clients(SIZES[:3]))
    assert by_aligner.row["aggregation"]["gamma"] == by_strategy.row["pfnm"]["gamma"] == 2.0
    assert_same_state(by_aligner.final, by_strategy.final)


def test_pfnm_counts_rejected_class_counts_against_the_minimum() -> None:
    cfg = make_config(4, strategy={"name": "pfnm", "min_train_clients": 2, "round_retries": 0})
    with pytest.raises(RoundFailedError):
        run(cfg, mock_clients(SIZES, misbehave=dict.fromkeys([0, 1, 2], "bad-counts")))


# ---- FedMA --------------------------------------------------------------------------------------


def fedma_config() -> RunConfig:
    return make_config(3, model=TWO_HIDDEN, strategy={"name": "fedma", "rounds": 2})


@pytest.fixture
def fedma(_flower_identity: None) -> Run:
    """Two FedMA rounds on an MLP with two hidden layers."""
    return run(fedma_config(), mock_clients(SIZES[:3]))


def test_fedma_runs_one_phase_per_matched_layer(fedma: Run) -> None:
    groups = list(permutation_spec(fedma.model).groups)
    assert len(groups) == 2
    for row in fedma.rows[1:]:
        assert row["fedma"]["phases"] == 1 + len(groups)
        assert list(row["bytes_by_phase"]) == ["train", *(f"layer:{g}" for g in groups)]
        assert all(p["down"] > 0 and p["up"] > 0 for p in row["bytes_by_phase"].values())
        assert (row["clients_ok"], row["clients_failed"]) == (3, 0)
    assert all(len(c.trained) == 2 * (1 + len(groups)) for c in fedma.clients)
    widths = fedma.row["fedma"]["widths"]
    assert [widths[g] for g in groups] == [
        fedma.final[f"layers.{i}.weight"].shape[0] for i in range(len(groups))
    ]


@pytest.mark.parametrize(
    "kind",
    [
        "bad-counts",
        "short-counts",
    ],
)
def test_fedma_rejects_malformed_class_counts(kind: str) -> None:
    cfg = make_config(3, model=TWO_HIDDEN, strategy={"name": "fedma"})
    r = run(cfg, mock_clients(SIZES[:3], misbehave={1: kind}))
    assert r.row["failures"] == [
        {"partition": 1, "node": r.clients[1].node_id, "reason": "malformed class-counts"}
    ]
    assert (r.row["clients_ok"], r.row["clients_failed"]) == (2, 1)


def test_fedma_admits_in_a_later_round_a_client_it_has_not_matched() -> None:
    """A client that failed in round 1 joins round 2 from its own init (as a fresh one would)."""
    r = run(fedma_config(), mock_clients(SIZES[:3], misbehave={1: "raise"}, misbehave_times=1))
    assert [row["clients_ok"] for row in r.rows[1:]] == [2, 3]
    assert r.row["failures"] == []


def test_fedma_resumes_from_its_state(fedma: Run) -> None:
    """Round 2 from a fresh strategy given round 1's state (through JSON, as a checkpoint holds
    it) reproduces the uninterrupted run."""
    cfg = fedma_config()
    model_after_1, state_after_1 = fedma.after_round[1]
    restored = build_strategy(cfg, copy.deepcopy(fedma.model))
    restored.load_state(json.loads(state_after_1))
    assert json.dumps(restored.state()) == state_after_1
    resumed = run(
        cfg, mock_clients(SIZES[:3]), strategy=restored, initial=model_after_1, first_round=2
    )
    assert_same_state(resumed.final, fedma.final)
    assert [row["round"] for row in resumed.rows] == [2]


REFERENCE = {"protocol": "reference", "retrain_epochs": 2, "retrain_lr": 0.05}


def reference_config(name: str, rounds: int = 2, **train: Any) -> RunConfig:
    """IBM/FedMA's schedule: 3 local epochs at lr 0.1 in round 1, then 2 epochs at 0.05."""
    return make_config(
        3,
        model=TWO_HIDDEN,
        train={"local_epochs": 3, **train},
        strategy={"name": name, "rounds": rounds, **REFERENCE},
    )


def steps(reply: TrainReply, epochs: int) -> int:
    """Optimizer steps of ``epochs`` over the client's data in batches of 8."""
    return epochs * -(-reply.num_examples // 8)


def test_fedma_reference_protocol_trains_each_phase_as_the_reference_does() -> None:
    """Round 1: own inits, 3 epochs at lr 0.1, gamma 7; then every phase 2 epochs at 0.05, the
    phase training only the output layer 6 epochs at 0.005 with weight decay 1e-4; gamma 5 in
    round 2. The clients did train that long (their step counts), and the rows record it."""
    r = run(reference_config("fedma"), mock_clients(SIZES[:3]))
    layer, output = "layer:layers.0", "layer:layers.1"  # the last matched layer: output phase
    expected = {
        1: {"train": (3, 0.1, 0.0), layer: (2, 0.05, 0.0), output: (6, 0.005, 1e-4)},
        2: {"train": (2, 0.05, 0.0), layer: (2, 0.05, 0.0), output: (6, 0.005, 1e-4)},
    }
    for row in r.rows[1:]:
        recorded = {
            phase: (t["epochs"], pytest.approx(t["lr"]), t["weight_decay"])
            for phase, t in row["training"].items()
        }
        assert recorded == expected[row["round"]]
        assert row["fedma"]["protocol"] == "reference"
    assert [row["fedma"]["gamma"] for row in r.rows[1:]] == [7.0, 5.0]
    for client in r.clients:
        replies = client.trained
        assert len(replies) == 6  # 2 rounds x (train + 2 layer phases)
        assert replies[0].config.get("client-init") == "local"
        assert "epochs" not in replies[0].config  # round 1 trains as train says
        ran = [reply.steps for reply in replies]
        assert ran == [steps(replies[0], e) for e in (3, 2, 6, 2, 2, 6)]
        assert [reply.config.get("weight-decay") for reply in replies] == [
            *(None, None, 1e-4),
            *(None, None, 1e-4),
        ]


def test_fedma_reference_protocol_matches_with_its_own_gamma_after_round_1() -> None:
    """A larger gamma after round 1 opens more global neurons in round 2's matching than the
    same run with gamma 7 throughout (the config's round_gamma reaches the matching)."""
    widths = {}
    for gamma in (7.0, 1e6):
        cfg = make_config(
            3,
            model=TWO_HIDDEN,
            strategy={"name": "fedma", "rounds": 2, **REFERENCE, "round_gamma": gamma},
        )
        row = run(cfg, mock_clients(SIZES[:3])).row
        widths[gamma] = sum(row["fedma"]["widths"].values())
    assert widths[1e6] > widths[7.0]


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_reference_baselines_start_from_the_average_of_the_locally_trained_models(
    name: str,
) -> None:
    """The baselines' round 1 is FedMA's round-1 training (own inits, same epochs and seeds),
    averaged; round 2 retrains 2 epochs at 0.05 with weight decay 1e-4 from that average."""
    fedma = run(reference_config("fedma", rounds=1), mock_clients(SIZES[:3]))
    local = [c.trained[0] for c in fedma.clients]  # each client's round-1 "train" phase
    cfg = reference_config(name, **({"proximal_mu": 0.01} if name == "fedprox" else {}))
    baseline = run(cfg, mock_clients(SIZES[:3]))
    for client, reply in zip(baseline.clients, local):
        first, second = client.trained
        assert first.config.get("client-init") == "local"
        assert_same_state(first.state, reply.state)
        assert second.steps == steps(second, 2) and second.config["weight-decay"] == 1e-4
        assert second.config["lr"] == pytest.approx(0.05)
    assert_same_state(baseline.after_round[1][0], mean_of(local))
    assert baseline.rows[2]["training"]["train"]["epochs"] == 2


OVERLAPPED = {
    "fedavg": {"train": {"momentum": 0.9}},
    "fedprox": {"strategy": {"name": "fedprox"}, "train": {"proximal_mu": 0.5}},
    "scaffold": {"strategy": {"name": "scaffold"}},
    "fednova": {"strategy": {"name": "fednova"}, "train": {"momentum": 0.5}},
    "feddyn": {"strategy": {"name": "feddyn"}},
    "moon": {"strategy": {"name": "moon"}},
    "pfnm": {"strategy": {"name": "pfnm", "sigma": 0.2}},  # one-shot, then FedAvg fine-tuning
    "fedma": {"model": TWO_HIDDEN, "strategy": {"name": "fedma"}},
    "lora": {
        "model": {**MLP, "hidden": [16]},
        "strategy": {"name": "lora"},
        "adapters": {"kind": "lora", "rank": 2, "alpha": 4.0, "rule": "fedex-lora"},
    },
    "align+regmean": {"model": TWO_HIDDEN, "aggregation": {"align": "weight", "fuse": "regmean"}},
    "trimmed-mean": {"aggregation": {"fuse": "trimmed-mean"}},
}
"""Every registered strategy, the align -> fuse pipeline and a robust fuse rule, each as a config's
sections (over three rounds, the server's evaluation after every one)."""


@pytest.mark.parametrize(
    ("case", "clients_evaluate"),
    [(case, False) for case in OVERLAPPED] + [("fedavg", True), ("pfnm", True)],
)
def test_overlapped_evaluation_gives_the_sequential_rows_and_checkpoints(
    case: str, clients_evaluate: bool
) -> None:
    """strategy.overlap_evaluation (the default) runs the server's test-set pass of round r while
    round r+1 trains (with it, round r's row and checkpoint; with the clients' evaluation too,
    those wait for round r+1's training): the metrics rows (all but the seconds) and what each
    round end hands the checkpoint (model, strategy state and tensors, bit for bit) are those of
    the sequential run, in the same order. The test-set pass is the server's, and the mock
    clients answer in this process, as ``simulation.backend: inprocess`` does: the pass drawing
    from torch's global RNG while a client seeds it for its own init (LoRA's adapters every
    round) failed the lora case in 2 of 8 runs."""
    if case == "lora":
        pytest.importorskip("peft")
    test = synthetic_data(99, 200)
    sections = OVERLAPPED[case]
    model = sections.get("model", MLP)
    runs = {}
    for overlap in (False, True):
        base = {"rounds": 3, "eval_every": 1, "fraction_evaluate": 0.5 if clients_evaluate else 0.0}
        cfg = make_config(
            4,
            model=model,
            **{k: v for k, v in sections.items() if k not in ("model", "strategy")},
            strategy={**base, **sections.get("strategy", {}), "overlap_evaluation": overlap},
        )
        clients = mock_clients(SIZES)
        # the server's own test-set pass (``server_app.run_server``'s), on held-out examples
        evaluate_fn = server_evaluation(
            cfg, clients[0].shapes, test.X_train, test.y_train, torch.device("cpu")
        )
        runs[overlap] = run(cfg, clients, evaluate_fn=evaluate_fn)
    rows = {
        overlap: [{k: v for k, v in row.items() if not k.startswith("seconds")} for row in r.rows]
        for overlap, r in runs.items()
    }
    assert rows[True] == rows[False]
    assert all(row["test_accuracy"] is not None for row in rows[True])
    evaluated = [row["val_accuracy"] is not None for row in rows[True]]
    assert evaluated == [False, *[clients_evaluate] * 3]
    assert runs[True].after_round.keys() == runs[False].after_round.keys() == {1, 2, 3}
    for number, (state, strategy_state) in runs[False].after_round.items():
        assert_same_state(runs[True].after_round[number][0], state)
        assert runs[True].after_round[number][1] == strategy_state
        assert_same_state(runs[True].strategy_tensors[number], runs[False].strategy_tensors[number])


def test_an_overlapped_round_is_reported_while_the_next_one_trains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the clients' evaluation, round r's row is reported once its test-set pass ends,
    while round r+1 trains: round 2's clients here wait for round 1's row, which a row held back
    until round 2 ends would never let them see (they give up after 20 s)."""
    test = synthetic_data(99, 200)
    cfg = make_config(4, model=MLP, strategy={"rounds": 2, "eval_every": 1})
    assert cfg.strategy.overlap_evaluation and cfg.strategy.fraction_evaluate == 0
    clients = mock_clients(SIZES)
    reported, saw_row = threading.Event(), []
    train = MockClient.train

    def waiting_train(self: MockClient, msg: Message) -> RecordDict | None:
        if int(msg.content["config"]["server-round"]) == 2:
            saw_row.append(reported.wait(timeout=20))
        return train(self, msg)

    monkeypatch.setattr(MockClient, "train", waiting_train)
    evaluate_fn = server_evaluation(
        cfg, clients[0].shapes, test.X_train, test.y_train, torch.device("cpu")
    )

    def on_round(row: dict[str, Any]) -> None:
        if row["round"] == 1:
            reported.set()

    result = run(cfg, clients, evaluate_fn=evaluate_fn, on_round=on_round)
    assert saw_row == [True] * len(clients)
    assert [row["round"] for row in result.rows] == [0, 1, 2]
