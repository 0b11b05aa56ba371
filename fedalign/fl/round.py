"""What a strategy sees of one round: the ``Round`` and the client updates it hands back.

A ``Round`` holds its number, the global model it started from and its log, and runs the round's
exchanges with the clients through the engine (``train``, ``query``, ``score``), each accounted to
a named phase and checked the same way, so a strategy with several phases a round gets the same
checks and accounting as plain FedAvg. Nothing here imports Flower: strategies, and the registry
lookups that load them, stay usable without it; only the engine speaks Flower's messages.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedalign.algorithms.checks import (
    received_problem,
    scale_outliers,
    update_checks,
    update_outliers,
)
from fedalign.core.types import ClientStats, StateDict
from fedalign.fl.round_log import RoundLog

log = logging.getLogger("fedalign")

Check = Callable[["ClientUpdate"], "str | None"]


@dataclass(frozen=True)
class EngineSettings:
    """What the engine applies to every round, whatever the strategy (the config's
    ``strategy`` section but the strategy's own options, plus the federation's size and the
    sampling seed). Strategies read what they need of it through ``Round.settings``."""

    num_clients: int
    sampling_seed: int
    rounds: int = 10
    fraction_train: float = 1.0
    min_train_clients: int = 2
    fraction_evaluate: float = 0.0
    eval_every: int = 1
    overlap_evaluation: bool = True
    timeout: float = 3600.0
    round_retries: int = 1
    max_update_norm: float | None = None
    max_update_ratio: float | None = 100.0
    max_client_examples: int | None = None
    max_stat_ratio: float | None = 1e4
    max_fused_ratio: float | None = 10.0
    stats_samples: int = 2000


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


class Engine(Protocol):
    """What a ``Round`` asks of the engine that runs it (``fedalign.fl.engine.RoundEngine``, or
    a test's stand-in): the only way a round reaches the clients."""

    settings: EngineSettings
    node_of_partition: dict[int, int]

    def sample(
        self, server_round: int, fraction: float, minimum: int, purpose: str, attempt: int
    ) -> list[int]: ...

    def exchange(
        self,
        rnd: Round,
        phase: str,
        purpose: str,
        records: Mapping[int, Mapping[str, Any]],
        configs: Mapping[int, Mapping[str, Any]],
        count_failures: bool = True,
    ) -> dict[int, Any]: ...

    def parse_update(self, rnd: Round, phase: str, pid: int, reply: Any) -> ClientUpdate | None: ...

    def parse_statistics(self, reply: Any) -> tuple[ClientStats, int]: ...

    def pooled_accuracy(self, replies: Iterable[Any]) -> float: ...

    def statistics_examples(self, num_examples: int) -> int: ...

    def example_bound(self, partition: int) -> int | None: ...

    def statistic_rows(self) -> Mapping[str, Mapping[str, float]]: ...


class Round:
    """What a strategy sees of one round: its number, the global model it started from, its log,
    and the exchanges with the clients (each accounted to a named phase)."""

    def __init__(
        self,
        engine: Engine,
        number: int,
        reference: OrderedDict[str, torch.Tensor],
        log_: RoundLog,
    ) -> None:
        self._engine = engine
        self.number = number
        self.reference = reference
        self.log = log_
        self.settings = engine.settings
        self.attempt = 0

    def sample(self, fraction: float | None = None, minimum: int | None = None) -> list[int]:
        """The partitions this round (and attempt) trains (default: the config's fraction)."""
        s = self.settings
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
        replies = self._engine.exchange(self, phase, "train", records, configs)
        t0 = time.perf_counter()
        # each reply is dropped once parsed: the server never holds every update twice
        parsed = [
            self._engine.parse_update(self, phase, pid, replies.pop(pid)) for pid in list(replies)
        ]
        parsed = [update for update in parsed if update is not None]
        self.log.timed("parse", t0)
        t0 = time.perf_counter()
        bound = self.settings.max_update_norm
        # the norms _drop_large_updates compares, measured with the checks
        compare = self.settings.max_update_ratio is not None
        problems, norms = update_checks(  # every reply's tensors checked in one batch
            [sent[u.partition_id] for u in parsed],
            [u.state_dict for u in parsed],
            [None if u.partition_id in local else bound for u in parsed],
            [compare and u.partition_id not in local for u in parsed],
        )
        change_norm = {u.partition_id: n for u, n in zip(parsed, norms, strict=True)}
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
                    self._engine.statistic_rows(),
                )
            if problem is None and check is not None:
                problem = check(update)
            if problem is not None:
                self.log.fail(pid, update.node_id, problem, phase)
                continue
            updates.append(update)
        updates = self._drop_large_updates(phase, updates, change_norm, local)
        self.log.timed("validate", t0)
        updates = self._drop_outliers(
            phase, updates, [u.statistics or {} for u in updates], lambda u: u.partition_id
        )
        self.log.clients_ok += len(updates)
        return sorted(updates, key=lambda u: u.partition_id)

    def _drop_large_updates(
        self,
        phase: str,
        updates: list[ClientUpdate],
        change_norm: Mapping[int, float | None],
        local: Collection[int],
    ) -> list[ClientUpdate]:
        """``updates`` without those whose change from what they were sent (``change_norm``, by
        partition, measured with the checks) is far larger than the other clients'
        (``algorithms.checks.update_outliers``), each dropped with its reason; clients that
        trained from their own init (``local``) changed no sent model and pass."""
        compared = [u for u in updates if u.partition_id not in local]
        if self.settings.max_update_ratio is None or len(compared) < 2:
            return updates
        norms = [change_norm[u.partition_id] for u in compared]
        outliers = update_outliers(norms, self.settings.max_update_ratio)
        dropped = {compared[j].partition_id for j in outliers}
        for j, reason in outliers.items():
            pid = compared[j].partition_id
            self.log.fail(pid, compared[j].node_id, reason, phase)
        return [u for u in updates if u.partition_id not in dropped]

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
        (``algorithms.checks.scale_outliers``), each dropped with its reason."""
        outliers = scale_outliers(stats, self.settings.max_stat_ratio)
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
            self, phase, "statistics", records, dict.fromkeys(records, config)
        )
        answers = {}
        for pid, reply in replies.items():
            try:
                stats, reported = self._engine.parse_statistics(reply)
            except (KeyError, TypeError, ValueError) as exc:
                self.log.fail(pid, self.node(pid), f"malformed statistics: {exc!r}", phase)
                continue
            examples = self._engine.statistics_examples(self._clip_examples(pid, reported))
            stats, problem = received_problem(
                stats, records[pid]["arrays"], examples, self._engine.statistic_rows()
            )
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
            "evaluate",
            # one dict shared by every partition on purpose: exchange only reads it
            dict.fromkeys(partitions, {"arrays": state}),  # noqa: RUF024
            dict.fromkeys(partitions, {"split": split}),  # noqa: RUF024
            count_failures=False,
        )
        return self._engine.pooled_accuracy(replies.values())
