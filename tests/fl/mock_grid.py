"""A Flower grid without Flower's runtime: strategies tested on mock replies, without Ray.

``MockGrid`` has the two methods ``RoundEngine`` calls (``get_node_ids``, ``send_and_receive``)
and routes each message, by its ``dst_node_id``, to a Python handler that answers it in-process, as
Flower's own strategy tests do (flwr's ``serverapp/strategy/fedavgm_test.py``). ``MockClient`` is
such a handler: fedalign's ClientApp (``fedalign.fl.client_app``) on a few dozen synthetic examples,
built from that module's own helpers so it trains, measures and answers as a real client does, and
able to misbehave on demand so the engine's rejection paths can be exercised.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedalign.algorithms.fusion.gram_transport import unpack, upper_triangle
from fedalign.algorithms.stats import flatten, received_statistics, unflatten
from fedalign.client.training import evaluate
from fedalign.config.components import local_init_seed, phase_training, run_model, train_client
from fedalign.config.schema import FaultConfig, RunConfig
from fedalign.core.types import ClientStats, StateDict
from fedalign.data.federation import ClientData
from fedalign.fl.client_app import (
    _kinds,
    _run_config,
    _statistics,
    store,
    strategy_state,
    train_reply_metrics,
)
from fedalign.fl.faults import apply_fault
from fedalign.fl.records import RUN_CONFIG_KEY, to_arrays, to_state_dict
from fedalign.fl.strategies.scaffold import CONTROL_DELTA

Targets = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # REPAIR's (mean, std) per layer
Handler = Callable[[Message], RecordDict | None]
"""Answers one message: a reply's content, None for no reply (a timeout), or raises (an error
reply carrying the exception's message)."""

MISBEHAVIOURS = (
    "nan",
    "wrong-shape",
    "scale",
    "bad-counts",
    "short-counts",
    "bad-steps",
    "bad-control",
    "raise",
    "silent",
    *("inflated-counts", "inflated-class-counts"),  # claims far more data than it holds
    *("negative-gram", "nan-gram", "wrong-shape-gram", "nan-fisher", "scaled-fisher"),
    *("odd-length-gram", "huge-factor-gram", "unpacked-gram"),
    "count-scaled-gram",  # Gram and example count scaled alike: per-row scale and multiple kept
)
IN_FEATURES, NUM_CLASSES = 8, 3  # the synthetic data: what the tests' MLP takes and predicts


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """The process identity Flower's runtime sets before a ServerApp runs: without it, building a
    ``Message`` (the engine does) raises ``TaskIdentity.run_id is not set``. Restored afterwards,
    so a simulation later in the same process starts from what it found."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # 0: the server
    try:
        yield
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


def reply_metadata(msg: Message, node_id: int) -> Metadata:
    """A reply's metadata from ``node_id``, built explicitly: ``Message(content, reply_to=msg)``
    stamps the process's own node id, which is the server's in a test process."""
    return Metadata(
        run_id=0,
        message_id="",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=10.0,
        message_type=msg.metadata.message_type,
    )


class MockGrid:
    """Routes every message to the handler of its destination node and collects the answers;
    ``sent`` keeps every message, in order, so a test can check whom the engine asked for what."""

    def __init__(self, handlers: Mapping[int, Handler]) -> None:
        self.handlers = dict(handlers)
        self.pull_interval = 0.1  # Flower's in-memory grid's default; the engine lowers it
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Every message answered in turn; a handler that returns None leaves its message
        unanswered, as a node that misses ``timeout`` does."""
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                content = self.handlers[node](msg)
            except Exception as exc:  # noqa: BLE001 - any client failure becomes an error reply
                error = Error(code=0, reason=str(exc))
                replies.append(Message(metadata=reply_metadata(msg, node), error=error))
                continue
            if content is not None:
                replies.append(Message(metadata=reply_metadata(msg, node), content=content))
        return replies


class Shapes(NamedTuple):
    """What ``run_model`` reads of a federation to size the model."""

    input_shape: tuple[int, ...]
    num_classes: int


def synthetic_data(partition_id: int, num_train: int, num_val: int = 8) -> ClientData:
    """Gaussian inputs labelled by one linear teacher shared by all clients (so the clients learn
    the same task and their models are worth fusing); each partition draws its own inputs."""
    teacher = np.random.default_rng(0).normal(size=(IN_FEATURES, NUM_CLASSES))
    rng = np.random.default_rng(1 + partition_id)
    X = rng.normal(size=(num_train + num_val, IN_FEATURES)).astype(np.float32)
    y = np.argmax(X @ teacher, axis=1).astype(np.int64)
    return ClientData(X[:num_train], y[:num_train], X[num_train:], y[num_train:])


@dataclass
class TrainReply:
    """What one train message got back from a client, as it left the client."""

    config: dict[str, Any]
    state: OrderedDict[str, torch.Tensor]
    num_examples: int
    loss: float
    statistics: ClientStats | None
    misbehaved: str | None
    steps: int  # local optimizer steps it reported


@dataclass
class MockClient:
    """fedalign's ClientApp on its own synthetic data, answering ``query.info``, ``train``,
    ``query.statistics`` and ``evaluate`` as ``fedalign.fl.client_app`` does.

    ``misbehave`` (one of ``MISBEHAVIOURS``) corrupts its train replies: NaN weights, a
    wrong-shaped first weight, every weight scaled by 1e6 (a well-formed Byzantine reply; these
    three are the real fault injection of ``fedalign.fl.faults``), negative class counts, class
    counts without the last class, a million local steps, a SCAFFOLD control change ten times what
    its update implies, an exception, no reply at all, an example count or class counts 1000
    times what it holds, or poisoned statistics (every Gram made negative definite, NaN or one row
    too large; a Fisher NaN or scaled by 1e12);
    ``misbehave_times`` limits that to its first train messages (None: all of them). Every train
    reply is kept in ``trained``; ``context_state`` is its ``Context.state`` (where SCAFFOLD's
    control variate lives across rounds).
    """

    partition_id: int
    node_id: int
    data: ClientData
    shapes: Shapes
    misbehave: str | None = None
    misbehave_times: int | None = None
    trained: list[TrainReply] = field(default_factory=list)
    context_state: RecordDict = field(default_factory=RecordDict)  # the ClientApp's Context.state

    def __post_init__(self) -> None:
        if self.misbehave is not None and self.misbehave not in MISBEHAVIOURS:
            raise ValueError(f"unknown misbehaviour {self.misbehave!r}; one of {MISBEHAVIOURS}")

    def __call__(self, msg: Message) -> RecordDict | None:
        handlers = {
            MessageType.TRAIN: self.train,
            MessageType.EVALUATE: self.evaluate,
            f"{MessageType.QUERY}.info": self.info,
            f"{MessageType.QUERY}.statistics": self.statistics,
        }
        return handlers[msg.metadata.message_type](msg)

    # ---- what a real client computes --------------------------------------------------------

    def _setup(self, msg: Message) -> tuple[RunConfig, ConfigRecord]:
        config: ConfigRecord = msg.content["config"]
        return _run_config(str(config[RUN_CONFIG_KEY])), config

    def model(self, cfg: RunConfig, state: StateDict) -> torch.nn.Module:
        """The run's architecture holding ``state`` (at its widths)."""
        return run_model(cfg, self.shapes, state=state)

    def measure(
        self,
        cfg: RunConfig,
        kinds: list[str],
        state: StateDict,
        reference: StateDict | None = None,
        targets: Targets | None = None,
    ) -> ArrayRecord:
        """The statistics ``kinds`` of ``state`` on this client's data, flattened for transport
        (``client_app._statistics``), against ``reference`` or through REPAIR ``targets``."""
        extra: dict[str, Any] = {}
        if reference is not None:
            extra["reference"] = self.model(cfg, reference)
        if targets is not None:
            extra["targets"] = targets
        return _statistics(
            cfg, kinds, self.model(cfg, state), self.data, self.partition_id, **extra
        )

    def measured(
        self,
        cfg: RunConfig,
        kinds: list[str],
        state: StateDict,
        reference: StateDict | None = None,
        targets: Targets | None = None,
    ) -> ClientStats:
        """``measure`` as the server reads it (unflattened, packed Grams unpacked): for tests that
        query a client directly, as the callables of ``fedalign.algorithms.pipeline.aggregate``
        do in a study."""
        sent = unflatten(to_state_dict(self.measure(cfg, kinds, state, reference, targets)))
        return received_statistics(sent, state)

    def _misbehaviour(self) -> str | None:
        if self.misbehave is None or self.misbehave_times == 0:
            return None
        if self.misbehave_times is not None:
            self.misbehave_times -= 1
        return self.misbehave

    # ---- the message handlers ---------------------------------------------------------------

    def info(self, msg: Message) -> RecordDict:
        metrics = {
            "partition-id": self.partition_id,
            "num-train": len(self.data.y_train),
            "num-val": len(self.data.y_val),
        }
        return RecordDict({"metrics": MetricRecord(metrics)})

    def train(self, msg: Message) -> RecordDict | None:
        """Train from the received model (or this client's own init with ``client-init=local``)
        on its data with the run's objective, as ``client_app.train``; then misbehave if told to."""
        fault = self._misbehaviour()
        if fault == "silent":
            return None
        if fault == "raise":
            raise RuntimeError(f"client {self.partition_id} failed on purpose")
        cfg, config = self._setup(msg)
        pid = self.partition_id
        hook = strategy_state(cfg, msg, self.context_state)
        model = None
        if str(config.get("client-init", "global")) == "local":
            model = run_model(cfg, self.shapes, init_seed=local_init_seed(cfg, pid))
        elif hook is not None:  # a base the client builds itself (LoRA)
            init = cfg.resolved_seeds.init
            model = hook.model(lambda: run_model(cfg, self.shapes, init_seed=init), cfg)
        if model is None:
            model = self.model(cfg, to_state_dict(msg.content["arrays"]))
        server_round = int(config.get("server-round", 0))
        frozen = [k for k in str(config.get("frozen", "")).split(",") if k]
        phase = phase_training(config)  # the server's overrides of train for this exchange
        stats = train_client(
            cfg,
            model,
            self.data.X_train,
            self.data.y_train,
            server_round,
            pid,
            frozen,
            objective_inputs=None if hook is None else hook.objective_inputs(),
            phase=phase,
        )
        counts = np.bincount(self.data.y_train, minlength=NUM_CLASSES).tolist()
        if fault == "bad-counts":
            counts = [-1] * len(counts)
        elif fault == "short-counts":
            counts = counts[:-1]
        elif fault == "inflated-class-counts":
            counts = [1000 * c for c in counts]
        metrics = train_reply_metrics(stats, pid, counts)
        if fault == "inflated-counts":
            metrics["num-examples"] *= 1000
        if fault == "count-scaled-gram":
            metrics["num-examples"] *= 10**12
        if fault == "bad-steps":
            metrics["local-steps"] = 10**6
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if hook is not None:
            for name, state in hook.after_train(
                model.state_dict(), stats, phase.get("lr", cfg.train.lr)
            ).items():
                content[name] = to_arrays(state)
            store(hook, self.context_state)
            if fault == "bad-control":
                content[CONTROL_DELTA] = to_arrays(
                    {k: v * 10 for k, v in to_state_dict(content[CONTROL_DELTA]).items()}
                )
        kinds = _kinds(config)
        if kinds:
            content["statistics"] = _statistics(cfg, kinds, model, self.data, pid)
            if fault in POISONS:
                poisoned = POISONS[fault](unflatten(to_state_dict(content["statistics"])))
                content["statistics"] = to_arrays(flatten(poisoned))
        state = OrderedDict(model.state_dict() if hook is None else hook.reply(model))
        if fault in ("nan", "wrong-shape", "scale"):
            state = apply_fault(FaultConfig(round=server_round, client=pid, kind=fault), state)
        content["arrays"] = to_arrays(state)
        statistics = unflatten(to_state_dict(content["statistics"])) if kinds else None
        self.trained.append(
            TrainReply(
                dict(config), state, stats.num_examples, stats.loss, statistics, fault, stats.steps
            )
        )
        return content

    def statistics(self, msg: Message) -> RecordDict:
        """``client_app.statistics``: of the model sent, against ``reference`` or through
        ``targets`` when those come with it."""
        cfg, config = self._setup(msg)
        content = msg.content
        reference = to_state_dict(content["reference"]) if "reference" in content else None
        targets = None
        if "targets" in content:
            flat = unflatten(to_state_dict(content["targets"]))
            targets = {layer: (t["mean"], t["std"]) for layer, t in flat.items()}
        record = self.measure(
            cfg, _kinds(config), to_state_dict(content["arrays"]), reference, targets
        )
        metrics = {"partition-id": self.partition_id, "num-examples": len(self.data.y_train)}
        return RecordDict({"statistics": record, "metrics": MetricRecord(metrics)})

    def evaluate(self, msg: Message) -> RecordDict:
        """``client_app.evaluate_local``: on the validation split, or the training split when the
        server asks with ``split=train``."""
        cfg, config = self._setup(msg)
        model = self.model(cfg, to_state_dict(msg.content["arrays"]))
        d = self.data
        X, y = (d.X_train, d.y_train) if config.get("split") == "train" else (d.X_val, d.y_val)
        loss, accuracy = evaluate(model, X, y)
        metrics = {
            "num-examples": len(y),
            "val-loss": 0.0 if np.isnan(loss) else loss,
            "val-accuracy": 0.0 if np.isnan(accuracy) else accuracy,
            "partition-id": self.partition_id,
        }
        return RecordDict({"metrics": MetricRecord(metrics)})


def _map(stats: ClientStats, kind: str, f: Callable[[torch.Tensor], torch.Tensor]) -> ClientStats:
    return {**stats, kind: {k: f(v) for k, v in stats[kind].items()}}


def _gram_size(packed: Mapping[str, torch.Tensor]) -> int:
    if "factor" in packed:
        return len(packed["factor"])
    return (math.isqrt(8 * packed["triangle"].numel() + 1) - 1) // 2


def _map_grams(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[ClientStats], ClientStats]:
    """A poison of each Gram as the client computed it, sent packed as its upper triangle (the
    form the server reads whatever it holds)."""

    def poison(packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gram = unpack("g", packed, (_gram_size(packed),))
        return {"triangle": upper_triangle(f(gram.float()))}

    return lambda s: _map(s, "grams", poison)


POISONS: dict[str, Callable[[ClientStats], ClientStats]] = {
    "negative-gram": _map_grams(lambda G: -4 * G + 1e-3 * torch.eye(len(G))),
    "nan-gram": _map_grams(lambda G: torch.full_like(G, float("nan"))),
    "wrong-shape-gram": _map_grams(lambda G: torch.eye(len(G) + 1, dtype=G.dtype) * G[-1, -1]),
    # packed forms that do not fit: the server must name them without building the Gram
    "odd-length-gram": lambda s: _map(s, "grams", lambda _: {"triangle": torch.ones(7)}),
    "huge-factor-gram": lambda s: _map(
        s, "grams", lambda _: {"factor": torch.ones(10**6, 1), "diagonal": torch.ones(10**6)}
    ),
    "unpacked-gram": lambda s: _map(s, "grams", lambda _: {"full": torch.eye(9)}),
    "count-scaled-gram": _map_grams(lambda G: G * 1e12),
    "nan-fisher": lambda s: _map(s, "fisher", lambda F: torch.full_like(F, float("nan"))),
    "scaled-fisher": lambda s: _map(s, "fisher", lambda F: F * 1e12),
}
"""How a poisoning client rewrites its statistics before sending them."""


def mock_clients(
    sizes: Iterable[int],
    misbehave: Mapping[int, str] | None = None,
    misbehave_times: int | None = None,
) -> list[MockClient]:
    """One client per entry of ``sizes`` (its number of training examples), partition ``i`` on a
    node id unrelated to ``i`` (Flower's node ids are random), ``misbehave[i]`` corrupting its
    replies."""
    sizes = list(sizes)
    shapes = Shapes((IN_FEATURES,), NUM_CLASSES)
    return [
        MockClient(
            pid,
            7_000_003 * (len(sizes) - pid),
            synthetic_data(pid, n),
            shapes,
            (misbehave or {}).get(pid),
            misbehave_times,
        )
        for pid, n in enumerate(sizes)
    ]


def mock_grid(clients: Iterable[MockClient]) -> MockGrid:
    """A grid whose nodes are ``clients``."""
    return MockGrid({c.node_id: c for c in clients})
