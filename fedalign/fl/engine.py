"""The round engine: everything a federated round does that is not the strategy's rule.

The engine owns node discovery, seeded sampling, building and sending messages, reply checks,
timeouts, retries, byte and time accounting, the evaluation schedule and the metrics row. A
strategy (``fedalign.fl.strategy``) only says what to send and how to combine what comes back; it
sees one ``Round`` per round (``fedalign.fl.round``), whose ``train``, ``query`` and ``score``
exchanges run through the engine, so a strategy with several phases a round (FedMA's layers, the
pipeline's align and repair phases, PFNM's grid scores) gets the same checks and accounting as
plain FedAvg. This is the one module of the round that speaks Flower's messages.

It differs from Flower's own strategies where a research framework must:

- client sampling is seeded (the run's sampling seed, the purpose, the round and the attempt) and
  addresses partitions, not the random node ids Flower assigns, so runs repeat exactly;
- every reply is validated (``fedalign.algorithms.checks``) and failures are counted with their
  reasons instead of aborting the round; too few valid replies retry the round with a fresh sample;
- replies are handed to the strategy in partition order; each round's metrics (accuracy, losses,
  clients ok/failed, bytes down/up, seconds per phase) go to a callback as the run goes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedalign.algorithms.checks import rows_per_example
from fedalign.algorithms.pipeline import PHASES
from fedalign.algorithms.stats import unflatten
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ActorPoolBroken, RoundFailedError, RunInterrupted
from fedalign.core.types import ClientStats, StateDict
from fedalign.fl.dispatch import registered_partitions
from fedalign.fl.records import (
    DATA_COPY_KEY,
    config_record,
    message_bytes,
    to_arrays,
    to_state_dict,
)
from fedalign.fl.round import ClientUpdate, EngineSettings, Round, sample_partitions
from fedalign.fl.round_log import RoundLog, error_summary
from fedalign.fl.strategy import Strategy

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

REPLY_POLL_SECONDS = 0.01
DEAD_ACTOR = "actor is dead"
"""What Ray's error says when the worker process behind a client's actor has died."""
INFO_TIMEOUT_SECONDS = 120.0

MESSAGE_TYPES = {
    "train": MessageType.TRAIN,
    "evaluate": MessageType.EVALUATE,
    "statistics": f"{MessageType.QUERY}.statistics",
}
"""A round's exchanges by purpose (``Round`` names them so; Flower's message type for each)."""


def engine_settings(cfg: RunConfig) -> EngineSettings:
    """What the engine reads of a run's config: the ``strategy`` section's round settings, the
    federation's size, the statistics' sample size and the sampling seed."""
    s = cfg.strategy
    return EngineSettings(
        num_clients=cfg.data.num_clients,
        sampling_seed=cfg.resolved_seeds.sampling,
        rounds=s.rounds,
        fraction_train=s.fraction_train,
        min_train_clients=s.min_train_clients,
        fraction_evaluate=s.fraction_evaluate,
        eval_every=s.eval_every,
        overlap_evaluation=s.overlap_evaluation,
        timeout=s.timeout,
        round_retries=s.round_retries,
        max_update_norm=s.max_update_norm,
        max_update_ratio=s.max_update_ratio,
        max_client_examples=s.max_client_examples,
        max_stat_ratio=s.max_stat_ratio,
        max_fused_ratio=s.max_fused_ratio,
        stats_samples=cfg.aggregation.stats_samples,
    )


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
        example: tuple[torch.Tensor, torch.Tensor] | None = None,
        should_stop: Callable[[], bool] | None = None,
        data_copy: str | None = None,
        carried: dict[int, RoundLog] | None = None,
    ) -> None:
        self.settings = engine_settings(cfg)
        # rounds whose record starts from what an earlier simulation of this run left, taken out
        # as they start: a restart, and the attempt lost with a dead worker (carry_restart)
        self.carried = {} if carried is None else carried
        # every message names the run's shared data copy, so clients map it instead of loading
        self.message_config = {} if data_copy is None else {DATA_COPY_KEY: data_copy}
        self.example_limits = dict(example_limits or {})
        # the rows per example of every counted statistic, from one example (the server's):
        # a client's counts must be exactly these times its examples
        plan = strategy.context.plan
        self._statistic_rows = (
            {}
            if example is None
            else rows_per_example(
                [k for phase in PHASES for k in plan.statistics(phase)],
                strategy.context.model,
                example,
                plan.resolved_options(),
            )
        )
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
        timeout = max(self.settings.timeout, INFO_TIMEOUT_SECONDS)
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
        expected = self.settings.num_clients
        t0 = time.monotonic()
        while len(nodes := sorted(grid.get_node_ids())) < expected:
            waited = time.monotonic() - t0
            if waited > min(patience, timeout) and len(nodes) >= self.settings.min_train_clients:
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
        bounds = [self.example_limits.get(partition), self.settings.max_client_examples]
        return min((b for b in bounds if b is not None), default=None)

    def statistic_rows(self) -> Mapping[str, Mapping[str, float]]:
        """Per statistic kind, the rows each part holds per example of the run's model
        (``algorithms.checks.rows_per_example``; without an example: empty, and counts are
        checked as whole multiples only)."""
        return self._statistic_rows

    def statistics_examples(self, num_examples: int) -> int:
        """The examples a client computes its statistics on (``aggregation.stats_samples`` of
        them at most): every statistic's row count is a multiple of it."""
        cap = self.settings.stats_samples
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
            self.settings.sampling_seed,
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
        purpose: str,
        records: Mapping[int, Mapping[str, Any]],
        configs: Mapping[int, Mapping[str, Any]],
        count_failures: bool = True,
    ) -> dict[int, Message]:
        """Send each partition its records (state dicts, or nested statistics) and config in a
        message of ``purpose`` (``MESSAGE_TYPES``); return
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
                Message(
                    record,
                    dst_node_id=self.node_of_partition[pid],
                    message_type=MESSAGE_TYPES[purpose],
                )
            )
        down = message_bytes(messages)
        rnd.log.timed("build", t0)
        replies = list(self.grid.send_and_receive(messages, timeout=self.settings.timeout))
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
                    f"no reply within strategy.timeout={self.settings.timeout:g} s",
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

    @staticmethod
    def parse_statistics(reply: Message) -> tuple[ClientStats, int]:
        """A statistics reply's statistics (unflattened) and the example count it reports."""
        stats = unflatten(to_state_dict(reply.content["statistics"]))
        return stats, int(reply.content["metrics"]["num-examples"])

    @staticmethod
    def pooled_accuracy(replies: Iterable[Message]) -> float:
        """The accuracy of evaluate replies pooled over their examples (0 when none)."""
        correct, total = 0.0, 0
        for reply in replies:
            m = reply.content["metrics"]
            correct += float(m["val-accuracy"]) * int(m["num-examples"])
            total += int(m["num-examples"])
        return correct / total if total else 0.0

    def check_stop(self, server_round: int) -> None:
        """Stop here (``RunInterrupted``) if the user asked to: after an exchange, before the next
        round; finished rounds are checkpointed already."""
        if self.should_stop is not None and self.should_stop():
            raise RunInterrupted(f"stopped on request in round {server_round}")

    # ---- the run -------------------------------------------------------------------------------

    def should_evaluate(self, server_round: int) -> bool:
        s = self.settings
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
        s = self.settings
        if rnd.number > 0 and s.fraction_evaluate > 0:
            partitions = self.sample(rnd.number, s.fraction_evaluate, 1, purpose="evaluate")
            replies = self.exchange(
                rnd,
                "federated_evaluate",
                "evaluate",
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
        overlap = self.settings.overlap_evaluation and self.evaluate_fn is not None
        # Without the clients' evaluation a round's whole report (the server's test-set pass,
        # its row, its checkpoint) runs on the pool beside the next round's training, and its row
        # appears as soon as the pass ends. The clients' evaluation needs the grid, which only
        # this thread uses: such a round's report waits for the next round's training.
        on_pool = overlap and self.settings.fraction_evaluate == 0
        pending: tuple[Round, OrderedDict, StrategySnapshot, Future | None] | None = None
        reporting: Future | None = None  # the report of the round before, on the pool
        with ThreadPoolExecutor(1, thread_name_prefix="fedalign-evaluate") as pool:
            try:
                for number in range(first_round, self.settings.rounds + 1):
                    self.check_stop(number)
                    rnd = Round(self, number, state, self.carried.pop(number, RoundLog(number)))
                    earlier = len(rnd.log.failures)  # carried: not this simulation's workers
                    t_round = time.perf_counter()
                    try:
                        state = self.strategy.server_update(rnd, self.strategy.run_round(rnd))
                    except RoundFailedError as exc:
                        if lost_actor(rnd.log, earlier):
                            raise ActorPoolBroken(f"round {number}: {exc}", rnd.log) from exc
                        raise
                    rnd.log.seconds["total"] = time.perf_counter() - t_round
                    if reporting is not None:  # rows and checkpoints stay in round order
                        reporting, done = None, reporting
                        done.result()  # raises what the report raised
                    if pending is not None:
                        finished, pending = pending, None
                        self._finish(*finished)
                    lost = lost_actor(rnd.log, earlier)
                    if not overlap or lost:
                        self._finish(rnd, state, self._snapshot(copy=False), None)
                    else:
                        # on copies: a strategy may update its global state in place
                        frozen = OrderedDict((k, v.detach().clone()) for k, v in state.items())
                        snapshot = self._snapshot(copy=True)
                        if on_pool:
                            reporting = pool.submit(self._finish, rnd, frozen, snapshot, None, True)
                        else:
                            server = None
                            if self.should_evaluate(number):
                                server = pool.submit(self.evaluate_fn, number, frozen)
                            pending = (rnd, frozen, snapshot, server)
                    if lost and number < self.settings.rounds:
                        raise ActorPoolBroken(
                            f"a client's Ray worker died in round {number}", rnd.log
                        )
                if reporting is not None:
                    reporting.result()
                if pending is not None:
                    finished, pending = pending, None
                    self._finish(*finished)
            except BaseException:
                # a finished round keeps its row and its checkpoint: one on the pool ends before
                # the pool is left
                if pending is not None:
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
        beside: bool = False,
    ) -> None:
        """Evaluate round ``rnd`` (or collect its overlapped evaluation), then report it and call
        ``on_round_end`` with the strategy's state as the round left it: a checkpoint is never
        ahead of its metrics row. ``beside``: this runs on the evaluation pool while the next
        round trains. With overlap, the round's ``seconds_total`` is its training and
        aggregation; ``seconds_evaluate`` its evaluation's (beside the next round) or, with the
        clients' evaluation, what evaluation added after the next round's training."""
        t0 = time.perf_counter()
        metrics = self.evaluate(rnd, state, server) if self.should_evaluate(rnd.number) else {}
        if server is None and not beside:
            rnd.log.seconds["total"] += time.perf_counter() - t0
        self._emit(rnd.log, metrics)
        if self.on_round_end is not None:
            self.on_round_end(rnd.number, state, strategy_state)

    def _emit(self, rlog: RoundLog, metrics: dict[str, float]) -> None:
        if self.on_round is not None:
            self.on_round(rlog.row(metrics))


def lost_actor(rlog: RoundLog, since: int = 0) -> bool:
    """Whether a client's Ray worker died in this round (in its failures from ``since`` on): the
    round completes with the others, but the actor pool keeps the dead actor, so the next round
    needs a fresh pool."""
    return any(DEAD_ACTOR in f["reason"] for f in rlog.failures[since:])


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
