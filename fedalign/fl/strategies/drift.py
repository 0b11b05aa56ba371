"""SCAFFOLD (Karimireddy et al. 2020) and FedNova (Wang et al. 2020) as strategies: FedAvg's
server rule (the pipeline's fuse rule, then the server optimizer) with a correction of client drift
(``fedalign.algorithms.drift``).

SCAFFOLD sends the server's control variate ``c`` with every model (as many bytes again down), and
each client returns the change of its own ``c_i`` with its weights (as many bytes again up). The
client keeps ``c_i`` in its ``Context.state``; the server keeps a copy of every ``c_i``, computed
with the same function from the client's own reply, for two reasons: a checkpoint holds it (a
resumed simulation starts its nodes with empty states, so the server sends each client its copy
the first time it samples it again, and the run continues bit for bit), and it checks what the
client reports against it. A client whose reply is rejected has already moved its own ``c_i``: it
gets the server's copy with its next message too.

FedNova reads the ``local-steps`` every client reports (bounded by what its data allows) and
rescales the clients' updates to a common number of effective steps before the fuse rule.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fedalign.algorithms.drift import (
    client_control,
    control_problem,
    normalised_states,
    server_control,
    steps_problem,
    zero_controls,
)
from fedalign.config.schema import RunConfig
from fedalign.core.types import StateDict
from fedalign.fl.engine import ClientUpdate, Round
from fedalign.fl.records import CLIENT_CONTROL, CONTROL, CONTROL_DELTA

from .fedavg import FedAvg


def plain_sgd_problem(cfg: RunConfig, name: str, momentum: bool) -> str | None:
    """Both rules derive the clients' gradients from their updates under local SGD."""
    t = cfg.train
    if t.optimizer != "sgd":
        return f"{name} assumes local SGD (train.optimizer: sgd), got {t.optimizer!r}"
    if not momentum and t.momentum != 0:
        return f"{name} assumes local SGD without momentum (train.momentum: 0), got {t.momentum}"
    a = cfg.aggregation
    if a.align != "none" or a.own_init:
        return f"{name} corrects updates of the global model: use aggregation.align: none"
    return None


def reported_steps(rnd: Round, update: ClientUpdate) -> str | None:
    t = rnd.cfg.train
    return steps_problem(
        update.metrics.get("local-steps"), update.num_examples, t.local_epochs, t.batch_size
    )


class FedNova(FedAvg):
    name = "fednova"

    @staticmethod
    def config_problem(cfg: RunConfig) -> str | None:
        return plain_sgd_problem(cfg, "fednova", momentum=True)

    def check(self, rnd: Round, update: ClientUpdate) -> str | None:
        return super().check(rnd, update) or reported_steps(rnd, update)

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        states, tau = normalised_states(
            rnd.reference,
            [u.state_dict for u in updates],
            [float(u.num_examples) for u in updates],
            [int(u.metrics["local-steps"]) for u in updates],
            self.cfg.train.momentum,
        )
        for update, state in zip(updates, states):
            update.state_dict = OrderedDict(state)
        rnd.log.extra["fednova"] = {"tau_eff": tau}
        return super().aggregate(rnd, updates)


class Scaffold(FedAvg):
    name = "scaffold"

    @staticmethod
    def config_problem(cfg: RunConfig) -> str | None:
        return plain_sgd_problem(cfg, "scaffold", momentum=False)

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.keys = [name for name, _ in model.named_parameters()]
        self.control = zero_controls(model.state_dict(), self.keys)
        self.clients: dict[int, OrderedDict[str, torch.Tensor]] = {}  # the server's copy of c_i
        self.restore: set[int] = set()  # partitions whose own c_i must be sent with their model
        self.sampled: set[int] = set()
        self.expected: dict[int, OrderedDict[str, torch.Tensor]] = {}  # this round's c_i+

    def own(self, partition: int) -> StateDict:
        return self.clients.get(partition) or zero_controls(self.control, self.keys)

    def extra_records(self, rnd: Round, partitions: list[int]) -> dict[int, dict[str, StateDict]]:
        self.sampled.update(partitions)
        return {
            p: {CONTROL: self.control}
            | ({CLIENT_CONTROL: self.own(p)} if p in self.restore else {})
            for p in partitions
        }

    def check(self, rnd: Round, update: ClientUpdate) -> str | None:
        """The step count is possible and the control change is the one the client's own update
        implies (the server recomputes ``c_i+`` from the model it sent and the one it got)."""
        problem = super().check(rnd, update) or reported_steps(rnd, update)
        if problem is not None:
            return problem
        pid = update.partition_id
        own = self.own(pid)
        new = client_control(
            own,
            self.control,
            rnd.reference,
            update.state_dict,
            int(update.metrics["local-steps"]),
            self.cfg.train.lr,
        )
        problem = control_problem(
            update.records.get(CONTROL_DELTA), OrderedDict((k, new[k] - own[k]) for k in new)
        )
        if problem is None:
            self.expected[pid] = new
        return problem

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        fused = super().aggregate(rnd, updates)
        accepted = [u.partition_id for u in updates]
        changes = [
            OrderedDict((k, self.expected[p][k] - self.own(p)[k]) for k in self.keys)
            for p in accepted
        ]
        self.control = server_control(self.control, changes, self.cfg.data.num_clients)
        self.clients.update({p: self.expected[p] for p in accepted})
        self.restore = (self.restore | self.sampled) - set(accepted)
        self.sampled, self.expected = set(), {}
        return fused

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **super().tensors(),
            **{f"scaffold/control/{k}": v for k, v in self.control.items()},
            **{
                f"scaffold/client/{p}/{k}": v
                for p, controls in self.clients.items()
                for k, v in controls.items()
            },
        }

    def state(self) -> dict[str, Any]:
        return {"scaffold_restore": sorted(self.restore)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.restore = {int(p) for p in state.get("scaffold_restore", [])}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``c`` and the copies of every ``c_i``; a resumed simulation's nodes start with
        empty states, so every client with a ``c_i`` gets it with its next model."""
        super().load_tensors(tensors)
        self.control = OrderedDict((k, tensors[f"scaffold/control/{k}"]) for k in self.keys)
        self.clients = {}
        for name, value in tensors.items():
            if name.startswith("scaffold/client/"):
                partition, key = name[len("scaffold/client/") :].split("/", 1)
                self.clients.setdefault(int(partition), OrderedDict())[key] = value
        self.clients = {
            p: OrderedDict((k, c[k]) for k in self.keys) for p, c in self.clients.items()
        }
        self.restore |= set(self.clients)
