"""fedalign's Flower strategies on the Message API.

``FedAvg`` is a ``flwr.serverapp.strategy.Strategy``: the usual ``configure_train`` /
``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate`` hooks over a template loop
(``start``). It differs from Flower's own FedAvg where a research framework must:

- client sampling is seeded (the run's sampling seed and the round), and addresses partitions, not
  the random node ids Flower assigns, so runs repeat exactly;
- every reply is validated (``fedalign.validation``) before fusion and failures are counted with
  their reasons instead of aborting the round;
- replies are fused in partition order in float64, and integer buffers are not averaged;
- each round's metrics (accuracy, losses, clients ok/failed, bytes down/up, seconds per phase) go
  to a callback, so a run folder is written as the run goes.

Subclasses change one hook: ``FedProx`` adds the proximal term to the clients' config; the
matching strategies override ``fuse`` (and, for several phases a round, ``run_round``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedalign.config import RunConfig
from fedalign.fl.records import config_record, message_bytes, to_arrays, to_state_dict
from fedalign.fusion.mean import weighted_average
from fedalign.validation import update_problem

log = logging.getLogger("fedalign")

EvaluateFn = Callable[[int, ArrayRecord], dict[str, float] | None]
RoundCallback = Callable[[dict[str, Any]], None]
RoundEndCallback = Callable[[int, ArrayRecord], None]


REPLY_POLL_SECONDS = 0.01


class RoundFailedError(RuntimeError):
    """A round could not gather enough valid replies, even after its retries."""


@dataclass
class ClientUpdate:
    """One client's accepted training reply."""

    partition_id: int
    node_id: int
    state_dict: OrderedDict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    statistics: OrderedDict[str, torch.Tensor] | None = None   # what the aggregation pipeline asked for


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

    def fail(self, partition_id: int | None, node_id: int, reason: str) -> None:
        self.clients_failed += 1
        self.failures.append({"partition": partition_id, "node": node_id, "reason": reason})
        log.warning("round %d: client %s rejected: %s", self.round, partition_id, reason)


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
    seed: int, available: list[int], server_round: int, fraction: float, minimum: int,
    purpose: str = "train", attempt: int = 0,
) -> list[int]:
    """The partitions a round addresses: ``max(round(fraction * n), minimum)`` of ``available``,
    drawn from the sampling seed, the purpose, the round and the attempt (a plain loop that
    reproduces a run draws the same clients with this)."""
    size = min(len(available), max(round(fraction * len(available)), minimum))
    stream = ("train", "evaluate").index(purpose)
    rng = np.random.default_rng([seed, stream, server_round, attempt])
    return sorted(rng.choice(available, size=size, replace=False).tolist())


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017) with seeded sampling and validated replies."""

    name = "fedavg"

    def __init__(
        self,
        cfg: RunConfig,
        evaluate_fn: EvaluateFn | None = None,
        on_round: RoundCallback | None = None,
        on_round_end: RoundEndCallback | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_config_json = cfg.to_json()
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.on_round_end = on_round_end
        # Flower's aggregate_train hook gets only the replies: the global model the round started
        # from and the round's log are kept here for it by run_round/start.
        self._reference: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.node_of_partition: dict[int, int] = {}
        self.partition_of_node: dict[int, int] = {}
        self.train_sizes: dict[int, int] = {}
        self._round_log: RoundLog | None = None

    # ---- sampling -----------------------------------------------------------------------------

    def discover(self, grid: Grid, timeout: float) -> None:
        """Ask every node which partition it holds (one small query before round 1)."""
        node_ids = self.wait_for_nodes(grid, timeout)
        messages = [
            Message(
                RecordDict({"config": config_record(self.run_config_json)}),
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
            metrics = reply.content["metrics"]
            pid = int(metrics["partition-id"])
            self.node_of_partition[pid] = reply.metadata.src_node_id
            self.partition_of_node[reply.metadata.src_node_id] = pid
            self.train_sizes[pid] = int(metrics["num-train"])
        if not self.node_of_partition:
            raise RuntimeError("no client answered the info query: " + "; ".join(errors[:3]))

    def wait_for_nodes(self, grid: Grid, timeout: float, patience: float = 60.0) -> list[int]:
        """Node ids once all ``num_clients`` nodes are connected (nodes register asynchronously);
        after ``patience`` seconds, those connected if they are enough to train."""
        expected = self.cfg.data.num_clients
        t0 = time.monotonic()
        while len(nodes := sorted(grid.get_node_ids())) < expected:
            waited = time.monotonic() - t0
            if waited > min(patience, timeout) and len(nodes) >= self.cfg.strategy.min_train_clients:
                log.warning("%d of %d nodes connected after %.0f s; starting with those",
                            len(nodes), expected, waited)
                break
            if waited > timeout:
                raise RuntimeError(f"only {len(nodes)} of {expected} nodes connected in {timeout:.0f} s")
            time.sleep(0.05)
        return nodes

    def sample(self, server_round: int, fraction: float, minimum: int, purpose: str = "train",
               attempt: int = 0) -> list[int]:
        """Partition ids for this round, drawn from the sampling seed, the purpose, the round and
        the attempt (a retried round draws afresh)."""
        return sample_partitions(self.cfg.resolved_seeds.sampling, sorted(self.node_of_partition), server_round,
                                 fraction, minimum, purpose, attempt)

    # ---- Flower Strategy hooks ---------------------------------------------------------------

    def train_config(self, server_round: int) -> dict[str, Any]:
        """Entries of the train ConfigRecord besides the run config."""
        return {"server-round": server_round}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        s = self.cfg.strategy
        attempt = int(config.get("attempt", 0))
        partitions = self.sample(server_round, s.fraction_train, s.min_train_clients, attempt=attempt)
        record = RecordDict(
            {"arrays": arrays,
             "config": config_record(self.run_config_json, **config, **self.train_config(server_round))}
        )
        return [
            Message(record, dst_node_id=self.node_of_partition[p], message_type=MessageType.TRAIN)
            for p in partitions
        ]

    def accept_replies(
        self, replies: Iterable[Message], reference: OrderedDict[str, torch.Tensor], rlog: RoundLog
    ) -> list[ClientUpdate]:
        """Validated training replies, in partition order; the rest are logged as failures."""
        updates = []
        for reply in replies:
            node = reply.metadata.src_node_id
            pid = self.partition_of_node.get(node)
            if reply.has_error():
                rlog.fail(pid, node, f"client error: {error_summary(reply.error.reason)}")
                continue
            try:
                content = reply.content
                state = to_state_dict(content["arrays"])
                metrics = dict(content["metrics"])
                num_examples = int(metrics["num-examples"])
                statistics = to_state_dict(content["statistics"]) if "statistics" in content else None
            except (KeyError, TypeError, ValueError) as exc:
                rlog.fail(pid, node, f"malformed reply: {exc!r}")
                continue
            problem = update_problem(reference, state, self.cfg.strategy.max_update_norm)
            if problem is None and num_examples <= 0:
                problem = f"num-examples is {num_examples}"
            if problem is not None:
                rlog.fail(pid, node, problem)
                continue
            updates.append(ClientUpdate(pid, node, state, num_examples, metrics, statistics))
        return sorted(updates, key=lambda u: u.partition_id)

    def fuse(
        self, server_round: int, reference: OrderedDict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        """The aggregation rule: a weighted mean by number of examples."""
        return weighted_average([u.state_dict for u in updates], [u.num_examples for u in updates])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rlog = self._round_log or RoundLog(server_round)
        reference = self._reference
        updates = self.accept_replies(replies, reference, rlog)
        rlog.clients_ok += len(updates)
        if len(updates) < self.cfg.strategy.min_train_clients:
            log.warning("round %d: %d valid replies, fewer than min_train_clients=%d",
                        server_round, len(updates), self.cfg.strategy.min_train_clients)
            return None, None
        fused = self.fuse(server_round, reference, updates)
        weights = np.array([u.num_examples for u in updates], dtype=float)
        losses = np.array([u.metrics.get("train-loss", np.nan) for u in updates], dtype=float)
        rlog.train_loss = float(np.sum(weights * losses) / weights.sum())
        nodes = {u.metrics["ray-node"] for u in updates if "ray-node" in u.metrics}
        if nodes:
            rlog.extra["ray_nodes"] = [f"{int(n):012x}" for n in sorted(nodes)]
        metrics = MetricRecord({"train-loss": rlog.train_loss, "num-examples": int(weights.sum())})
        return to_arrays(fused), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        s = self.cfg.strategy
        if s.fraction_evaluate <= 0:
            return []
        partitions = self.sample(server_round, s.fraction_evaluate, 1, purpose="evaluate")
        record = RecordDict(
            {"arrays": arrays, "config": config_record(self.run_config_json, **config,
                                                       **{"server-round": server_round})}
        )
        return [
            Message(record, dst_node_id=self.node_of_partition[p], message_type=MessageType.EVALUATE)
            for p in partitions
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        total, loss, correct = 0, 0.0, 0.0
        for reply in replies:
            if reply.has_error():
                continue
            m = reply.content["metrics"]
            n = int(m["num-examples"])
            total += n
            loss += n * float(m["val-loss"])
            correct += n * float(m["val-accuracy"])
        if total == 0:
            return None
        return MetricRecord({"val-loss": loss / total, "val-accuracy": correct / total})

    def state(self) -> dict[str, Any]:
        """JSON-serialisable strategy state for checkpoints (FedAvg has none)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state`` returned."""

    def summary(self) -> None:
        s = self.cfg.strategy
        log.info("%s: %d rounds, fraction_train=%.2f, min_train_clients=%d", self.name, s.rounds,
                 s.fraction_train, s.min_train_clients)

    # ---- the template loop -------------------------------------------------------------------

    def exchange(self, grid: Grid, messages: list[Message], rlog: RoundLog, phase: str) -> list[Message]:
        """Send, wait for the replies, and account bytes and seconds to ``phase``."""
        t0 = time.perf_counter()
        down = message_bytes(messages)
        replies = list(grid.send_and_receive(messages, timeout=self.cfg.strategy.timeout))
        up = message_bytes([r for r in replies if not r.has_error()])
        rlog.bytes_down += down
        rlog.bytes_up += up
        totals = rlog.phase_bytes.setdefault(phase, {"down": 0, "up": 0})
        totals["down"] += down
        totals["up"] += up
        rlog.seconds[phase] = rlog.seconds.get(phase, 0.0) + time.perf_counter() - t0
        return replies

    def run_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, rlog: RoundLog) -> ArrayRecord:
        """One round: train on the sampled clients, validate, fuse. Returns the new global model.

        When fewer than ``min_train_clients`` valid replies arrive, the round is retried with a
        fresh sample up to ``round_retries`` times, then the run stops (``RoundFailedError``);
        finished rounds stay in the run folder and its checkpoints.
        """
        self._reference = to_state_dict(arrays)
        retries = self.cfg.strategy.round_retries
        for attempt in range(retries + 1):
            messages = list(self.configure_train(server_round, arrays, ConfigRecord({"attempt": attempt}), grid))
            rlog.clients_sampled += len(messages)
            replies = self.exchange(grid, messages, rlog, "train")
            answered = {r.metadata.src_node_id for r in replies}
            for m in messages:
                if m.metadata.dst_node_id not in answered:
                    node = m.metadata.dst_node_id
                    rlog.fail(self.partition_of_node.get(node), node,
                              f"no reply within strategy.timeout={self.cfg.strategy.timeout:g} s")
            t0 = time.perf_counter()
            fused, _ = self.aggregate_train(server_round, replies)
            rlog.seconds["aggregate"] = rlog.seconds.get("aggregate", 0.0) + time.perf_counter() - t0
            if fused is not None:
                rlog.extra["attempts"] = attempt + 1
                return fused
        raise RoundFailedError(
            f"round {server_round}: fewer than min_train_clients={self.cfg.strategy.min_train_clients} "
            f"valid replies in {retries + 1} attempt(s); last failures: "
            + "; ".join(f"client {f['partition']}: {f['reason']}" for f in rlog.failures[-3:])
        )

    def should_evaluate(self, server_round: int) -> bool:
        s = self.cfg.strategy
        return server_round % s.eval_every == 0 or server_round == s.rounds

    def evaluate_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, rlog: RoundLog) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.evaluate_fn is not None:
            metrics.update(self.evaluate_fn(server_round, arrays) or {})
        if server_round > 0:
            messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
            if messages:
                replies = self.exchange(grid, messages, rlog, "federated_evaluate")
                federated = self.aggregate_evaluate(server_round, replies)
                metrics.update(dict(federated or {}))
        rlog.seconds["evaluate"] = time.perf_counter() - t0
        return metrics

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Discover the clients, then rounds ``first_round..num_rounds`` of run_round and
        evaluation, reporting each (``first_round > 1`` resumes from a checkpoint)."""
        result = Result()
        # Flower's in-memory grid (simulation) polls for replies every 0.1 s; a reply that lands
        # just after a poll waits up to that long, in every phase of every round. 10 ms costs a
        # few state lookups more and nothing else.
        if getattr(grid, "pull_interval", 0.0) > REPLY_POLL_SECONDS:
            grid.pull_interval = REPLY_POLL_SECONDS
        self.discover(grid, timeout)
        arrays = initial_arrays
        if first_round == 1:
            initial = RoundLog(0)
            metrics0 = self.evaluate_round(0, grid, arrays, initial)
            self._emit(initial, metrics0)
            if metrics0:
                result.evaluate_metrics_serverapp[0] = MetricRecord(metrics0)
        for server_round in range(first_round, num_rounds + 1):
            rlog = RoundLog(server_round)
            self._round_log = rlog
            t_round = time.perf_counter()
            arrays = self.run_round(server_round, grid, arrays, rlog)
            metrics = self.evaluate_round(server_round, grid, arrays, rlog) if self.should_evaluate(server_round) else {}
            rlog.seconds["total"] = time.perf_counter() - t_round
            self._round_log = None
            self._emit(rlog, metrics)
            if self.on_round_end is not None:
                self.on_round_end(server_round, arrays)
            if rlog.train_loss is not None:
                result.train_metrics_clientapp[server_round] = MetricRecord({"train-loss": rlog.train_loss})
            if metrics:
                result.evaluate_metrics_serverapp[server_round] = MetricRecord(metrics)
        result.arrays = arrays
        return result

    def _emit(self, rlog: RoundLog, metrics: dict[str, float]) -> None:
        if self.on_round is None:
            return
        row: dict[str, Any] = {
            "round": rlog.round,
            "test_accuracy": metrics.get("test-accuracy"),
            "test_loss": metrics.get("test-loss"),
            "val_accuracy": metrics.get("val-accuracy"),
            "train_loss": rlog.train_loss,
            "clients_sampled": rlog.clients_sampled,
            "clients_ok": rlog.clients_ok,
            "clients_failed": rlog.clients_failed,
            "bytes_down": rlog.bytes_down,
            "bytes_up": rlog.bytes_up,
            **{f"seconds_{k}": round(v, 4) for k, v in rlog.seconds.items()},
            "bytes_by_phase": rlog.phase_bytes,
            "failures": rlog.failures,
            **rlog.extra,
        }
        self.on_round(row)


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg whose clients add ``mu/2 ||w - w_global||^2``."""

    name = "fedprox"

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {**super().train_config(server_round), "proximal-mu": self.cfg.train.proximal_mu}


def make_strategy(cfg: RunConfig, **kwargs: Any) -> FedAvg:
    """The strategy the config names (matching strategies live in their own modules)."""
    from fedalign.fl.aggregation_strategy import AlignFuseRepair
    from fedalign.fl.fedma_strategy import FedMA
    from fedalign.fl.pfnm_strategy import PFNM

    if cfg.aggregation.active or cfg.aggregation.own_init:
        return AlignFuseRepair(cfg, **kwargs)
    classes: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "pfnm": PFNM, "fedma": FedMA}
    return classes[cfg.strategy.name](cfg, **kwargs)
