"""The round engine: everything a federated round does that is not the strategy's rule.

The engine owns node discovery, seeded sampling, building and sending messages, reply checks,
timeouts, retries, byte and time accounting, the evaluation schedule and the metrics row. A
strategy (``Strategy``) only says what to send and how to combine what comes back; it sees one
``Round`` per round, a small typed context whose ``train``, ``query`` and ``score`` exchanges run
through the engine, so a strategy with several phases a round (FedMA's layers, the pipeline's
align and repair phases, PFNM's grid scores) gets the same checks and accounting as plain FedAvg.

It differs from Flower's own strategies where a research framework must:

- client sampling is seeded (the run's sampling seed, the purpose, the round and the attempt) and
  addresses partitions, not the random node ids Flower assigns, so runs repeat exactly;
- every reply is validated (``fedalign.algorithms.checks``) and failures are counted with their
reasons
  instead of aborting the round; too few valid replies retry the round with a fresh sample;
- replies are handed to the strategy in partition order; each round's metrics (accuracy, losses,
  clients ok/failed, bytes down/up, seconds per phase) go to a callback as the run goes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedalign.algorithms.checks import (
    fused_problem,
    received_problem,
    scale_outliers,
    update_problems,
)
from fedalign.algorithms.server_opt import OptimizerState, is_identity, server_step
from fedalign.algorithms.stats import unflatten
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ActorPoolBroken, RoundFailedError, RunInterrupted
from fedalign.core.tensors import weighted_average
from fedalign.core.types import ClientStats, StateDict
from fedalign.fl.dispatch import registered_partitions
from fedalign.fl.records import (
    DATA_COPY_KEY,
    config_record,
    message_bytes,
    to_arrays,
    to_state_dict,
)

log = logging.getLogger("fedalign")

EvaluateFn = Callable[[int, StateDict], dict[str, float]]
RoundCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class StrategySnapshot:
    """The strategy's checkpointable state at the end of a round: ``Strategy.state()`` (JSON) and
    ``Strategy.tensors()``."""

    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


RoundEndCallback = Callable[[int, StateDict, StrategySnapshot], None]
"""``(round, global model, the strategy's state at the end of that round)``: what a checkpoint
holds."""
Check = Callable[["ClientUpdate"], "str | None"]

REPLY_POLL_SECONDS = 0.01
DEAD_ACTOR = "actor is dead"
"""What Ray's error says when the worker process behind a client's actor has died."""
INFO_TIMEOUT_SECONDS = 120.0


@dataclass
class ClientUpdate:
    """One client's accepted training reply."""

    partition_id: int
    node_id: int
    state_dict: OrderedDict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, Any]
    statistics: dict[str, Any] | None = None  # what the strategy asked for, unflattened
    records: dict[str, OrderedDict[str, torch.Tensor]] = field(default_factory=dict)
    """The reply's other array records by name (SCAFFOLD's ``control-delta``)."""


@dataclass
class RoundLog:
    """What one round measured; becomes one line of metrics.jsonl."""

    round: int
    clients_sampled: int = 0
    clients_ok: int = 0
    clients_failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    train_loss: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    phase_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def fail(
        self, partition_id: int | None, node_id: int, reason: str, phase: str = "train"
    ) -> None:
        """Count a client's failure; reasons from phases after ``train`` name their phase."""
        reason = reason if phase == "train" else f"{phase}: {reason}"
        self.clients_failed += 1
        self.failures.append({"partition": partition_id, "node": node_id, "reason": reason})
        log.warning("round %d: client %s rejected: %s", self.round, partition_id, reason)

    def timed(self, phase: str, t0: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def row(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """The metrics.jsonl line of this round."""
        return {
            "round": self.round,
            "test_accuracy": metrics.get("test-accuracy"),
            "test_loss": metrics.get("test-loss"),
            "val_accuracy": metrics.get("val-accuracy"),
            "train_loss": self.train_loss,
            "clients_sampled": self.clients_sampled,
            "clients_ok": self.clients_ok,
            "clients_failed": self.clients_failed,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            **{f"seconds_{k}": round(v, 4) for k, v in self.seconds.items()},
            "bytes_by_phase": self.phase_bytes,
            "failures": self.failures,
            **self.extra,
        }


def error_summary(reason: str) -> str:
    """The client's own exception message out of the Ray traceback Flower wraps it in."""
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1].strip().rstrip("'>").strip()
    else:
        lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else "unknown error"
    first_sentence = reason.split(". ", 1)[0]
    return first_sentence if len(first_sentence) >= 20 else reason[:200]


def sample_partitions(
    seed: int,
    available: list[int],
    server_round: int,
    fraction: float,
    minimum: int,
    purpose: str = "train",
    attempt: int = 0,
) -> list[int]:
    """The partitions a round addresses: ``max(round(fraction * n), minimum)`` of ``available``,
    drawn from the sampling seed, the purpose, the round and the attempt (a plain loop that
    reproduces a run draws the same clients with this)."""
    size = min(len(available), max(round(fraction * len(available)), minimum))
    stream = ("train", "evaluate").index(purpose)
    rng = np.random.default_rng([seed, stream, server_round, attempt])
    return sorted(rng.choice(available, size=size, replace=False).tolist())


def weighted_train_loss(updates: Iterable[ClientUpdate]) -> float:
    """The clients' training losses weighted by their example counts."""
    updates = list(updates)
    weights = np.array([u.num_examples for u in updates], dtype=float)
    losses = np.array([u.metrics.get("train-loss", np.nan) for u in updates], dtype=float)
    return float(np.sum(weights * losses) / weights.sum())


class Round:
    """What a strategy sees of one round: its number, the global model it started from, its log,
    and the exchanges with the clients (each accounted to a named phase)."""

    def __init__(
        self,
        engine: RoundEngine,
        number: int,
        reference: OrderedDict[str, torch.Tensor],
        log_: RoundLog,
    ) -> None:
        self._engine = engine
        self.number = number
        self.reference = reference
        self.log = log_
        self.cfg = engine.cfg
        self.attempt = 0

    def sample(self, fraction: float | None = None, minimum: int | None = None) -> list[int]:
        """The partitions this round (and attempt) trains (default: the config's fraction)."""
        s = self.cfg.strategy
        return self._engine.sample(
            self.number,
            s.fraction_train if fraction is None else fraction,
            s.min_train_clients if minimum is None else minimum,
            "train",
            self.attempt,
        )

    def node(self, partition: int) -> int:
        return self._engine.node_of_partition[partition]

    def train(
        self,
        phase: str,
        sent: Mapping[int, StateDict],
        config: Mapping[str, Any] | None = None,
        *,
        local_init: Iterable[int] = (),
        check: Check | None = None,
        extra: Mapping[int, Mapping[str, StateDict]] | None = None,
    ) -> list[ClientUpdate]:
        """Send each partition in ``sent`` its model to train, with ``config`` (and
        ``client-init=local`` for those in ``local_init``, which train from their own init) and
        the array records ``extra[partition]`` (SCAFFOLD's control variates), and return the
        valid replies in partition order. A reply is checked against the model it was
        sent (the shapes only for a local init, which is no update of it) and by ``check``; the
        rest are logged as failures."""
        local = set(local_init)
        base = {"server-round": self.number, "attempt": self.attempt, **(config or {})}
        configs = {p: {**base, "client-init": "local"} if p in local else base for p in sent}
        extra = extra or {}
        records = {p: {"arrays": sent[p], **extra.get(p, {})} for p in sent}
        replies = self._engine.exchange(self, phase, MessageType.TRAIN, records, configs)
        t0 = time.perf_counter()
        # each reply is dropped once parsed: the server never holds every update twice
        parsed = [
            self._engine.parse_update(self, phase, pid, replies.pop(pid)) for pid in list(replies)
        ]
        parsed = [update for update in parsed if update is not None]
        self.log.timed("parse", t0)
        t0 = time.perf_counter()
        bound = self.cfg.strategy.max_update_norm
        problems = update_problems(  # every reply's tensors checked in one batch
            [sent[u.partition_id] for u in parsed],
            [u.state_dict for u in parsed],
            [None if u.partition_id in local else bound for u in parsed],
        )
        updates = []
        for update, problem in zip(parsed, problems, strict=True):
            pid = update.partition_id
            if problem is None and update.num_examples <= 0:
                problem = f"num-examples is {update.num_examples}"
            if problem is None:
                update.num_examples = self._clip_examples(pid, update.num_examples)
            if problem is None and update.statistics:
                update.statistics, problem = received_problem(
                    update.statistics,
                    update.state_dict,
                    self._engine.statistics_examples(update.num_examples),
                )
            if problem is None and check is not None:
                problem = check(update)
            if problem is not None:
                self.log.fail(pid, update.node_id, problem, phase)
                continue
            updates.append(update)
        self.log.timed("validate", t0)
        updates = self._drop_outliers(
            phase, updates, [u.statistics or {} for u in updates], lambda u: u.partition_id
        )
        self.log.clients_ok += len(updates)
        return sorted(updates, key=lambda u: u.partition_id)

    def _clip_examples(self, pid: int, reported: int) -> int:
        """A client's example count (its weight in every rule) bounded by what its partition
        holds and ``strategy.max_client_examples``; a clipped count is recorded."""
        bound = self._engine.example_bound(pid)
        if bound is None or reported <= bound:
            return reported
        self.log.extra.setdefault("examples_clipped", {})[str(pid)] = reported
        log.warning(
            "round %d: client %d reported %d examples, clipped to %d",
            self.number,
            pid,
            reported,
            bound,
        )
        return bound

    def _drop_outliers(
        self, phase: str, items: list, stats: list[ClientStats], partition: Callable[[Any], int]
    ) -> list:
        """``items`` without those whose statistics are far larger than the other clients'
        (``validation.scale_outliers``), each dropped with its reason."""
        outliers = scale_outliers(stats, self.cfg.strategy.max_stat_ratio)
        for j, reason in outliers.items():
            pid = partition(items[j])
            self.log.fail(pid, self.node(pid), reason, phase)
        return [item for j, item in enumerate(items) if j not in outliers]

    def query(
        self, phase: str, kinds: Iterable[str], records: Mapping[int, Mapping[str, StateDict]]
    ) -> dict[int, ClientStats]:
        """Ask each partition in ``records`` for the statistics ``kinds`` of the models it is sent
        (``arrays``, and ``reference`` / ``targets`` when given); the parsed statistics of those
        that answered."""
        config = {"statistics": ",".join(kinds)}
        replies = self._engine.exchange(
            self, phase, f"{MessageType.QUERY}.statistics", records, dict.fromkeys(records, config)
        )
        answers = {}
        for pid, reply in replies.items():
            try:
                stats = unflatten(to_state_dict(reply.content["statistics"]))
                reported = int(reply.content["metrics"]["num-examples"])
            except (KeyError, TypeError, ValueError) as exc:
                self.log.fail(pid, self.node(pid), f"malformed statistics: {exc!r}", phase)
                continue
            examples = self._engine.statistics_examples(self._clip_examples(pid, reported))
            stats, problem = received_problem(stats, records[pid]["arrays"], examples)
            if problem is not None:
                self.log.fail(pid, self.node(pid), problem, phase)
                continue
            answers[pid] = stats
        kept = self._drop_outliers(phase, list(answers), list(answers.values()), int)
        return {pid: answers[pid] for pid in kept}

    def score(
        self, phase: str, state: StateDict, partitions: Iterable[int], split: str = "train"
    ) -> float:
        """The pooled accuracy of ``state`` on the partitions' own ``split`` (an evaluate
        exchange)."""
        partitions = list(partitions)
        replies = self._engine.exchange(
            self,
            phase,
            MessageType.EVALUATE,
            # one dict shared by every partition on purpose: exchange only reads it
            dict.fromkeys(partitions, {"arrays": state}),  # noqa: RUF024
            dict.fromkeys(partitions, {"split": split}),  # noqa: RUF024
            count_failures=False,
        )
        correct, total = 0.0, 0
        for reply in replies.values():
            m = reply.content["metrics"]
            correct += float(m["val-accuracy"]) * int(m["num-examples"])
            total += int(m["num-examples"])
        return correct / total if total else 0.0


class Strategy:
    """A federated strategy: what to send and how to combine the replies.

    Subclasses override ``train_config`` (entries of the train message's config),
    ``aggregate`` (the server rule over the accepted updates) and, for several phases a round,
    ``run_round``. ``model`` is the run's architecture at its initial widths: strategies derive
    permutation specs from it and never load data, so they are testable on mock replies.
    """

    name = "strategy"

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        self.cfg = cfg
        self.model = model
        self.optimizer_state: OptimizerState = {}

    def train_config(self, rnd: Round) -> dict[str, Any]:
        return {}

    def local_init(self, rnd: Round, partitions: list[int]) -> list[int]:
        """The partitions that train from their own initialisation this round."""
        return []

    def check(self, rnd: Round, update: ClientUpdate) -> str | None:
        """Why the strategy cannot use ``update`` (None: it can); checked with the engine's own
        checks, before the round counts its valid replies."""
        return None

    def extra_records(self, rnd: Round, partitions: list[int]) -> dict[int, dict[str, StateDict]]:
        """Array records sent with each partition's model beside it (SCAFFOLD's control
        variates); none by default."""
        return {}

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        raise NotImplementedError

    def run_round(self, rnd: Round) -> OrderedDict[str, torch.Tensor]:
        """Train the sampled clients, check, aggregate. With fewer than ``min_train_clients`` valid
        replies the round is retried with a fresh sample up to ``round_retries`` times, then the run
        stops (``RoundFailedError``); finished rounds stay in the run folder and its checkpoints."""
        s = self.cfg.strategy
        for attempt in range(s.round_retries + 1):
            rnd.attempt = attempt
            partitions = rnd.sample()
            rnd.log.clients_sampled += len(partitions)
            updates = rnd.train(
                "train",
                dict.fromkeys(partitions, rnd.reference),
                self.train_config(rnd),
                local_init=self.local_init(rnd, partitions),
                check=lambda update: self.check(rnd, update),
                extra=self.extra_records(rnd, partitions),
            )
            if len(updates) < s.min_train_clients:
                log.warning(
                    "round %d: %d valid replies, fewer than min_train_clients=%d",
                    rnd.number,
                    len(updates),
                    s.min_train_clients,
                )
                continue
            t0 = time.perf_counter()
            rnd.log.train_loss = weighted_train_loss(updates)
            nodes = {u.metrics["ray-node"] for u in updates if "ray-node" in u.metrics}
            if nodes:
                rnd.log.extra["ray_nodes"] = [f"{int(n):012x}" for n in sorted(nodes)]
            fused = self.checked_aggregate(rnd, updates)
            rnd.log.timed("aggregate", t0)
            rnd.log.extra["attempts"] = attempt + 1
            return fused
        raise RoundFailedError(
            f"round {rnd.number}: fewer than min_train_clients={s.min_train_clients} valid replies "
            f"in {s.round_retries + 1} attempt(s); last failures: "
            + "; ".join(f"client {f['partition']}: {f['reason']}" for f in rnd.log.failures[-3:])
        )

    def checked_aggregate(
        self, rnd: Round, updates: list[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        """``aggregate``, its result checked before it is broadcast (finite, its norm at most
        ``strategy.max_fused_ratio`` times the largest of the previous global's and the updates');
        a fusion that fails or fails the check falls back to the weighted mean of the validated
        updates, with the reason recorded (``fusion_fallback``)."""
        states = [u.state_dict for u in updates]
        try:
            fused = self.aggregate(rnd, updates)
            problem = fused_problem(
                fused, [rnd.reference, *states], self.cfg.strategy.max_fused_ratio
            )
        except RoundFailedError:
            raise
        except (RuntimeError, ValueError, ArithmeticError) as exc:
            problem = f"fusion failed: {exc}"
        if problem is None:
            return fused
        log.warning("round %d: %s; using the weighted mean of the updates", rnd.number, problem)
        rnd.log.extra["fusion_fallback"] = problem
        return weighted_average(states, [u.num_examples for u in updates])

    def keeps_basis(self, rnd: Round) -> bool:
        """Whether this round's fused model is a step from ``rnd.reference`` in its neurons' order
        (the clients trained from it); when not, the server optimizer's state is reset."""
        return not self.local_init(rnd, [0])

    def server_update(
        self, rnd: Round, fused: OrderedDict[str, torch.Tensor]
    ) -> OrderedDict[str, torch.Tensor]:
        """The server optimizer's step (``fedalign.algorithms.server_opt``) from the round's global
        model
        towards the fused one; the metrics row records the optimizer and whether its state was
        kept or reset (nothing is recorded for the identity step, SGD with ``lr: 1``)."""
        o = self.cfg.server_optimizer
        if is_identity(o.name, o.options):
            return fused
        new, self.optimizer_state, what = server_step(
            o.name, o.options, rnd.reference, fused, self.optimizer_state, self.keeps_basis(rnd)
        )
        rnd.log.extra["server_optimizer"] = {"name": o.name, "state": what}
        return new

    def state(self) -> dict[str, Any]:
        """JSON-serialisable strategy state for checkpoints."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state`` returned."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The strategy's tensor state for checkpoints (the server optimizer's moments)."""
        return {f"server_opt/{k}": v for k, v in self.optimizer_state.items()}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``tensors`` returned."""
        prefix = "server_opt/"
        self.optimizer_state = {
            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
        }


class RoundEngine:
    """Runs a strategy over a Flower grid: discovery, the rounds, evaluation, the metrics rows."""

    def __init__(
        self,
        cfg: RunConfig,
        strategy: Strategy,
        evaluate_fn: EvaluateFn | None = None,
        on_round: RoundCallback | None = None,
        on_round_end: RoundEndCallback | None = None,
        example_limits: Mapping[int, int] | None = None,
        should_stop: Callable[[], bool] | None = None,
        data_copy: str | None = None,
    ) -> None:
        self.cfg = cfg
        # every message names the run's shared data copy, so clients map it instead of loading
        self.message_config = {} if data_copy is None else {DATA_COPY_KEY: data_copy}
        self.example_limits = dict(example_limits or {})
        self.should_stop = should_stop
        self.strategy = strategy
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.on_round_end = on_round_end
        self.run_config_json = cfg.to_json()
        self.node_of_partition: dict[int, int] = {}
        self.partition_of_node: dict[int, int] = {}
        self.grid: Grid | None = None

    # ---- clients -------------------------------------------------------------------------------

    def discover(self, grid: Grid) -> None:
        """Map nodes to partitions: from the simulation's own registration when
        ``fedalign.fl.dispatch`` recorded it, else by asking every node (one small query before
        round 1; in deployment, or with ``simulation.fast_dispatch`` off). The query has its own
        timeout, at least ``INFO_TIMEOUT_SECONDS``: the first message a node gets starts it
        (imports, data), which a short ``strategy.timeout`` meant for training must not cut."""
        timeout = max(self.cfg.strategy.timeout, INFO_TIMEOUT_SECONDS)
        node_ids = self.wait_for_nodes(grid, timeout)
        known = registered_partitions()
        if known is not None and set(node_ids) <= known.keys():
            self.node_of_partition = {known[n]: n for n in node_ids}
            self.partition_of_node = {n: known[n] for n in node_ids}
            return
        messages = [
            Message(
                RecordDict({"config": config_record(self.run_config_json, **self.message_config)}),
                dst_node_id=node_id,
                message_type=f"{MessageType.QUERY}.info",
            )
            for node_id in node_ids
        ]
        errors = []
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                errors.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                log.warning("info query failed on %s", errors[-1])
                continue
            pid = int(reply.content["metrics"]["partition-id"])
            self.node_of_partition[pid] = reply.metadata.src_node_id
            self.partition_of_node[reply.metadata.src_node_id] = pid
        if not self.node_of_partition:
            raise RoundFailedError(
                f"no client answered the info query within {timeout:g} s"
                + (": " + "; ".join(errors[:3]) if errors else "")
            )

    def wait_for_nodes(self, grid: Grid, timeout: float, patience: float = 60.0) -> list[int]:
        """Node ids once all ``num_clients`` nodes are connected (nodes register asynchronously);
        after ``patience`` seconds, those connected if they are enough to train."""
        expected = self.cfg.data.num_clients
        t0 = time.monotonic()
        while len(nodes := sorted(grid.get_node_ids())) < expected:
            waited = time.monotonic() - t0
            if (
                waited > min(patience, timeout)
                and len(nodes) >= self.cfg.strategy.min_train_clients
            ):
                log.warning(
                    "%d of %d nodes connected after %.0f s; starting with those",
                    len(nodes),
                    expected,
                    waited,
                )
                break
            if waited > timeout:
                raise RuntimeError(
                    f"only {len(nodes)} of {expected} nodes connected in {timeout:.0f} s"
                )
            time.sleep(0.05)
        return nodes

    def example_bound(self, partition: int) -> int | None:
        """The most examples ``partition`` can claim: what it holds (known in a simulation, where
        the server partitions the data) and ``strategy.max_client_examples`` (None: unbounded)."""
        bounds = [self.example_limits.get(partition), self.cfg.strategy.max_client_examples]
        return min((b for b in bounds if b is not None), default=None)

    def statistics_examples(self, num_examples: int) -> int:
        """The examples a client computes its statistics on (``aggregation.stats_samples`` of
        them at most): every statistic's row count is a multiple of it."""
        cap = self.cfg.aggregation.stats_samples
        return min(num_examples, cap) if cap > 0 else num_examples

    def sample(
        self,
        server_round: int,
        fraction: float,
        minimum: int,
        purpose: str = "train",
        attempt: int = 0,
    ) -> list[int]:
        return sample_partitions(
            self.cfg.resolved_seeds.sampling,
            sorted(self.node_of_partition),
            server_round,
            fraction,
            minimum,
            purpose,
            attempt,
        )

    def exchange(
        self,
        rnd: Round,
        phase: str,
        message_type: str,
        records: Mapping[int, Mapping[str, Any]],
        configs: Mapping[int, Mapping[str, Any]],
        count_failures: bool = True,
    ) -> dict[int, Message]:
        """Send each partition its records (state dicts, or nested statistics) and config; return
        the replies without an error by partition. Bytes and seconds go to ``phase``; errors and
        missing replies are logged as failures (unless ``count_failures`` is off)."""
        t0 = time.perf_counter()
        converted: dict[int, ArrayRecord] = {}  # one ArrayRecord per distinct state object

        def arrays(value: Any) -> ArrayRecord:
            if id(value) not in converted:
                converted[id(value)] = to_arrays(value)
            return converted[id(value)]

        messages = []
        for pid, content in records.items():
            record = RecordDict({key: arrays(value) for key, value in content.items()})
            record["config"] = config_record(
                self.run_config_json, **self.message_config, **configs[pid]
            )
            messages.append(
                Message(record, dst_node_id=self.node_of_partition[pid], message_type=message_type)
            )
        down = message_bytes(messages)
        rnd.log.timed("build", t0)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.strategy.timeout))
        up = message_bytes([r for r in replies if not r.has_error()])
        rnd.log.bytes_down += down
        rnd.log.bytes_up += up
        totals = rnd.log.phase_bytes.setdefault(phase, {"down": 0, "up": 0})
        totals["down"] += down
        totals["up"] += up
        rnd.log.timed(phase, t0)
        self.check_stop(rnd.number)
        answered: dict[int, Message] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            pid = self.partition_of_node.get(node)
            if pid not in records:
                rnd.log.fail(pid, node, "reply from a client that was not asked", phase)
            elif reply.has_error():
                if count_failures:
                    rnd.log.fail(
                        pid,
                        node,
                        f"client error: {error_summary(reply.error.reason)}",
                        phase,
                    )
            else:
                answered[pid] = reply
        for pid in records.keys() - {
            self.partition_of_node.get(r.metadata.src_node_id) for r in replies
        }:
            if count_failures:
                rnd.log.fail(
                    pid,
                    self.node_of_partition[pid],
                    f"no reply within strategy.timeout={self.cfg.strategy.timeout:g} s",
                    phase,
                )
        return dict(sorted(answered.items()))

    def parse_update(self, rnd: Round, phase: str, pid: int, reply: Message) -> ClientUpdate | None:
        """A train reply as a ClientUpdate, or None (logged) when it is malformed."""
        try:
            content = reply.content
            state = to_state_dict(content["arrays"])
            metrics = dict(content["metrics"])
            num_examples = int(metrics["num-examples"])
            statistics = (
                unflatten(to_state_dict(content["statistics"])) if "statistics" in content else None
            )
            records = {
                name: to_state_dict(record)
                for name, record in content.array_records.items()
                if name not in ("arrays", "statistics")
            }
        except (KeyError, TypeError, ValueError) as exc:
            rnd.log.fail(pid, reply.metadata.src_node_id, f"malformed reply: {exc!r}", phase)
            return None
        return ClientUpdate(
            pid, reply.metadata.src_node_id, state, num_examples, metrics, statistics, records
        )

    def check_stop(self, server_round: int) -> None:
        """Stop here (``RunInterrupted``) if the user asked to: after an exchange, before the next
        round; finished rounds are checkpointed already."""
        if self.should_stop is not None and self.should_stop():
            raise RunInterrupted(f"stopped on request in round {server_round}")

    # ---- the run -------------------------------------------------------------------------------

    def should_evaluate(self, server_round: int) -> bool:
        s = self.cfg.strategy
        return server_round % s.eval_every == 0 or server_round == s.rounds

    def evaluate(
        self,
        rnd: Round,
        state: OrderedDict[str, torch.Tensor],
        server: Future | None = None,
    ) -> dict[str, float]:
        """The server's evaluation of ``state`` and, when configured, the clients' (federated).
        ``server``: the server's evaluation already started elsewhere (overlapped with the next
        round's training); its result is waited for here."""
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if server is not None:
            metrics.update(server.result() or {})
        elif self.evaluate_fn is not None:
            metrics.update(self.evaluate_fn(rnd.number, state) or {})
        s = self.cfg.strategy
        if rnd.number > 0 and s.fraction_evaluate > 0:
            partitions = self.sample(rnd.number, s.fraction_evaluate, 1, purpose="evaluate")
            replies = self.exchange(
                rnd,
                "federated_evaluate",
                MessageType.EVALUATE,
                # one dict shared by every partition on purpose: exchange only reads it
                dict.fromkeys(partitions, {"arrays": state}),  # noqa: RUF024
                dict.fromkeys(partitions, {}),  # noqa: RUF024
                count_failures=False,
            )
            metrics.update(federated_metrics(replies.values()))
        rnd.log.seconds["evaluate"] = time.perf_counter() - t0
        return metrics

    def run(
        self, grid: Grid, initial: OrderedDict[str, torch.Tensor], first_round: int = 1
    ) -> OrderedDict:
        """Discover the clients, then rounds ``first_round..rounds`` of the strategy and
        evaluation, reporting each (``first_round > 1`` resumes from a checkpoint); returns the
        final global model."""
        # Flower's in-memory grid (simulation) polls for replies every 0.1 s; a reply that lands
        # just after a poll waits up to that long, in every phase of every round. 10 ms costs a
        # few state lookups more and nothing else.
        if getattr(grid, "pull_interval", 0.0) > REPLY_POLL_SECONDS:
            grid.pull_interval = REPLY_POLL_SECONDS
        self.grid = grid
        self.discover(grid)
        state = initial
        if first_round == 1:
            rnd = Round(self, 0, state, RoundLog(0))
            self._emit(rnd.log, self.evaluate(rnd, state))
        overlap = self.cfg.strategy.overlap_evaluation and self.evaluate_fn is not None
        pending: tuple[Round, OrderedDict, StrategySnapshot, Future | None] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="fedalign-evaluate") as pool:
            try:
                for number in range(first_round, self.cfg.strategy.rounds + 1):
                    self.check_stop(number)
                    rnd = Round(self, number, state, RoundLog(number))
                    t_round = time.perf_counter()
                    try:
                        state = self.strategy.server_update(rnd, self.strategy.run_round(rnd))
                    except RoundFailedError as exc:
                        if lost_actor(rnd.log):
                            raise ActorPoolBroken(f"round {number}: {exc}") from exc
                        raise
                    rnd.log.seconds["total"] = time.perf_counter() - t_round
                    if pending is not None:
                        finished, pending = pending, None
                        self._finish(*finished)
                    server = None
                    if overlap and self.should_evaluate(number):
                        # the server's test-set pass of this round runs while the next one
                        # trains, on a copy (a strategy may update its global state in place)
                        frozen = OrderedDict((k, v.detach().clone()) for k, v in state.items())
                        server = pool.submit(self.evaluate_fn, number, frozen)
                    pending = (rnd, state, self._snapshot(copy=overlap), server)
                    if not overlap or lost_actor(rnd.log):
                        finished, pending = pending, None
                        self._finish(*finished)
                    if lost_actor(rnd.log) and number < self.cfg.strategy.rounds:
                        raise ActorPoolBroken(f"a client's Ray worker died in round {number}")
                if pending is not None:
                    finished, pending = pending, None
                    self._finish(*finished)
            except BaseException:
                if pending is not None:  # a finished round keeps its row and its checkpoint
                    self._finish(*pending)
                raise
        return state

    def _snapshot(self, copy: bool) -> StrategySnapshot:
        """The strategy's state and tensors as the round left them (tensors cloned when the next
        round runs before they are checkpointed)."""
        tensors = self.strategy.tensors()
        if copy:
            tensors = {k: v.detach().clone() for k, v in tensors.items()}
        return StrategySnapshot(self.strategy.state(), tensors)

    def _finish(
        self,
        rnd: Round,
        state: OrderedDict,
        strategy_state: StrategySnapshot,
        server: Future | None,
    ) -> None:
        """Evaluate round ``rnd`` (or collect its overlapped evaluation), then report it and call
        ``on_round_end`` with the strategy's state as the round left it: a checkpoint is never
        ahead of its metrics row. With overlap, the round's ``seconds_total`` is its training and
        aggregation; ``seconds_evaluate`` what evaluation added after the next round's
        training."""
        t0 = time.perf_counter()
        metrics = self.evaluate(rnd, state, server) if self.should_evaluate(rnd.number) else {}
        if server is None:
            rnd.log.seconds["total"] += time.perf_counter() - t0
        self._emit(rnd.log, metrics)
        if self.on_round_end is not None:
            self.on_round_end(rnd.number, state, strategy_state)

    def _emit(self, rlog: RoundLog, metrics: dict[str, float]) -> None:
        if self.on_round is not None:
            self.on_round(rlog.row(metrics))


def lost_actor(rlog: RoundLog) -> bool:
    """Whether a client's Ray worker died in this round: the round completes with the others, but
    the actor pool keeps the dead actor, so the next round needs a fresh pool."""
    return any(DEAD_ACTOR in f["reason"] for f in rlog.failures)


def federated_metrics(replies: Iterable[Message]) -> dict[str, float]:
    """The clients' validation loss and accuracy, weighted by their example counts."""
    total, loss, correct = 0, 0.0, 0.0
    for reply in replies:
        m = reply.content["metrics"]
        n = int(m["num-examples"])
        total += n
        loss += n * float(m["val-loss"])
        correct += n * float(m["val-accuracy"])
    return {} if total == 0 else {"val-loss": loss / total, "val-accuracy": correct / total}
