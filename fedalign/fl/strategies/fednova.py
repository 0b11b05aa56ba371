"""FedNova (Wang et al. 2020) as a strategy: FedAvg's server rule (the pipeline's fuse rule, then
the server optimizer) with the clients' updates normalised first (``fedalign.algorithms.drift``).

It reads the ``local-steps`` every client reports (bounded by what its data allows) and rescales
the clients' updates to a common number of effective steps before the fuse rule.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedalign.algorithms.drift import normalised_states, steps_problem
from fedalign.fl.round import ClientUpdate, Round
from fedalign.fl.strategy import StrategyContext

from .fedavg import FedAvg


def plain_sgd_problem(context: StrategyContext, name: str, momentum: bool) -> str | None:
    """FedNova and SCAFFOLD derive the clients' gradients from their updates under local SGD."""
    t = context.train
    if t.optimizer != "sgd":
        return f"{name} assumes local SGD (train.optimizer: sgd), got {t.optimizer!r}"
    if not momentum and t.momentum != 0:
        return f"{name} assumes local SGD without momentum (train.momentum: 0), got {t.momentum}"
    if context.plan.align != "none" or context.own_init:
        return f"{name} corrects updates of the global model: use aggregation.align: none"
    return None


def reported_steps(context: StrategyContext, update: ClientUpdate) -> str | None:
    t = context.train
    return steps_problem(
        update.metrics.get("local-steps"), update.num_examples, t.local_epochs, t.batch_size
    )


class FedNova(FedAvg):
    name = "fednova"
    options_from = ()  # FedAvg's schedule options are not FedNova's

    @classmethod
    def problem(cls, context: StrategyContext) -> str | None:
        return plain_sgd_problem(context, "fednova", momentum=True)

    def check(self, rnd: Round, update: ClientUpdate) -> str | None:
        return super().check(rnd, update) or reported_steps(self.context, update)

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        states, tau = normalised_states(
            rnd.reference,
            [u.state_dict for u in updates],
            [float(u.num_examples) for u in updates],
            [int(u.metrics["local-steps"]) for u in updates],
            self.context.train.momentum,
        )
        for update, state in zip(updates, states):
            update.state_dict = OrderedDict(state)
        rnd.log.extra["fednova"] = {"tau_eff": tau}
        return super().aggregate(rnd, updates)
