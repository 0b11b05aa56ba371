"""The base class of every strategy, and what a strategy is built with.

A strategy says what to send and how to combine what comes back; the engine does the rest. It is
built from a ``StrategyContext`` (``fedalign.config.components``: the model, the federation's
facts, its seed, the clients' training settings, the server optimizer, the pipeline) and its own
options, the keyword-only parameters of its constructor: the strategy registry reads them, with
their defaults and annotations, from that signature, as it reads a fuse rule's, so a user's
strategy has options without any change to the config::

    class BoostAvg(fedalign.Strategy):
        def __init__(self, *args, boost: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.boost = boost

    fedalign.register_strategy("boost-avg", BoostAvg)  # strategy: {name: boost-avg, boost: 2.5}

A strategy that keeps state on its clients between rounds (SCAFFOLD's control variates) declares
it as ``client_state``, a ``fedalign.client.state.ClientState`` beside the strategy: the generic
ClientApp runs that hook and knows nothing of the strategy.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from fedalign.algorithms.checks import fused_problem
from fedalign.algorithms.fusion import FUSE_RULES, fallback_rule
from fedalign.algorithms.server_opt import OptimizerState, is_identity, server_step
from fedalign.client.state import ClientState
from fedalign.config.components import StrategyContext, strategy_context
from fedalign.config.schema import RunConfig
from fedalign.core.errors import RoundFailedError
from fedalign.core.options import conform
from fedalign.core.registry import STRATEGIES
from fedalign.core.types import StateDict
from fedalign.fl.round import ClientUpdate, Round, weighted_train_loss

log = logging.getLogger("fedalign")


class Strategy:
    """A federated strategy: what to send and how to combine the replies.

    Subclasses override ``train_config`` (entries of the train message's config),
    ``aggregate`` (the server rule over the accepted updates) and, for several phases a round,
    ``run_round``; their options are their constructors' keyword-only parameters. ``problem``
    says why a context cannot run the strategy (checked when a config is loaded).
    """

    name = "strategy"
    client_state: ClassVar[type[ClientState] | None] = None
    """The hook the clients run for this strategy's state on them (None: it keeps none)."""
    options_from: ClassVar[tuple[Any, ...]] = ()
    """Callables whose keyword-only parameters are options of this strategy too (it passes them
    on): their defaults live in those signatures only."""

    def __init__(self, context: StrategyContext) -> None:
        self.context = context
        self.model = context.model
        self.optimizer_state: OptimizerState = {}

    @classmethod
    def problem(cls, context: StrategyContext) -> str | None:
        """Why this strategy cannot run in ``context`` (None: it can)."""
        return None

    def train_config(self, rnd: Round) -> dict[str, Any]:
        return {}

    def local_init(self, rnd: Round, partitions: list[int]) -> list[int]:
        """The partitions that train from their own initialisation this round."""
        return []

    def check(self, rnd: Round, update: ClientUpdate) -> str | None:
        """Why the strategy cannot use ``update`` (None: it can); checked with the engine's own
        checks, before the round counts its valid replies."""
        return None

    def client_models(self, rnd: Round, partitions: list[int]) -> dict[int, StateDict]:
        """What each sampled partition is sent to train from and replies in kind (each reply is
        checked against it): the global model by default; the LoRA strategy sends adapters."""
        return dict.fromkeys(partitions, rnd.reference)

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
        s = rnd.settings
        for attempt in range(s.round_retries + 1):
            rnd.attempt = attempt
            partitions = rnd.sample()
            rnd.log.clients_sampled += len(partitions)
            updates = rnd.train(
                "train",
                self.client_models(rnd, partitions),
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
        updates, or, when the pipeline's fuse rule is robust, to their coordinate-wise median (the
        weighted mean would let the attackers the rule was chosen against back in). The round's
        record says why and which (``fusion_fallback``, ``fallback_rule``)."""
        states = [u.state_dict for u in updates]
        try:
            fused = self.aggregate(rnd, updates)
            problem = fused_problem(fused, [rnd.reference, *states], rnd.settings.max_fused_ratio)
        except RoundFailedError:
            raise
        except (RuntimeError, ValueError, ArithmeticError) as exc:
            problem = f"fusion failed: {exc}"
        if problem is None:
            return fused
        fallback = fallback_rule(self.context.plan.fuse)
        log.warning(
            "round %d: %s; falling back to the %s of the updates", rnd.number, problem, fallback
        )
        rnd.log.extra["fusion_fallback"] = problem
        rnd.log.extra["fallback_rule"] = fallback
        return FUSE_RULES.get(fallback).obj(
            states, [float(u.num_examples) for u in updates], [u.statistics or {} for u in updates]
        )

    def keeps_basis(self, rnd: Round) -> bool:
        """Whether this round's fused model is a step from ``rnd.reference`` in its neurons' order
        (the clients trained from it); when not, the server optimizer's state is reset."""
        return not self.local_init(rnd, [0])

    def server_update(
        self, rnd: Round, fused: OrderedDict[str, torch.Tensor]
    ) -> OrderedDict[str, torch.Tensor]:
        """The server optimizer's step (``fedalign.algorithms.server_opt``) from the round's global
        model towards the fused one; the metrics row records the optimizer and whether its state
        was kept or reset (nothing is recorded for the identity step, SGD with ``lr: 1``)."""
        name, options = self.context.server_optimizer
        if is_identity(name, options):
            return fused
        new, self.optimizer_state, what = server_step(
            name, options, rnd.reference, fused, self.optimizer_state, self.keeps_basis(rnd)
        )
        rnd.log.extra["server_optimizer"] = {"name": name, "state": what}
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


def build_strategy(
    cfg: RunConfig, model: nn.Module, example_input: torch.Tensor | None = None
) -> Strategy:
    """The registered strategy ``cfg`` names, for ``model`` (the run's architecture at its
    initial widths), with the options the config gives it; ``example_input``: a batch of the
    run's training input, which permutation specs are traced on."""
    entry = STRATEGIES.get(cfg.strategy.name)
    options = {  # the resolved config holds lists where an option takes a tuple
        k: conform(f"strategy.{k}", v, entry.types.get(k, Any))
        for k, v in cfg.strategy.options.items()
    }
    return entry.obj(strategy_context(cfg, model, example_input), **options)
