"""SCAFFOLD (Karimireddy et al. 2020) as a strategy: FedAvg's server rule (the pipeline's fuse
rule, then the server optimizer) with the clients' drift corrected by control variates
(``fedalign.algorithms.drift``), and the client side of it as a hook beside the strategy.

SCAFFOLD sends the server's control variate ``c`` with every model (as many bytes again down), and
each client returns the change of its own ``c_i`` with its weights (as many bytes again up). The
client keeps ``c_i`` between rounds (``ScaffoldClient``, the strategy's ``client_state``: the
ClientApp stores it in the node's state); the server keeps a copy of every ``c_i``, computed
with the same function from the client's own reply, for two reasons: a checkpoint holds it (a
resumed simulation starts its nodes with empty states, so the server sends each client its copy
the first time it samples it again, and the run continues bit for bit), and it checks what the
client reports against it. A client whose reply is rejected has already moved its own ``c_i``: it
gets the server's copy with its next message too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedalign.algorithms.drift import (
    client_control,
    control_problem,
    server_control,
    zero_controls,
)
from fedalign.client.state import ClientState
from fedalign.client.training import TrainStats
from fedalign.core.types import StateDict
from fedalign.fl.round import ClientUpdate, Round
from fedalign.fl.strategy import StrategyContext

from .fedavg import FedAvg
from .fednova import plain_sgd_problem, reported_steps

# The array records: the server's control variate (down), a client's own (down, to restore it;
# and the name of the client's stored copy), the client's change of it (up)
CONTROL, CLIENT_CONTROL, CONTROL_DELTA = "control", "client-control", "control-delta"


class ScaffoldClient(ClientState):
    """SCAFFOLD on the client: the server's ``c`` (sent with every train message) and this
    client's own ``c_i``, kept across rounds in the node's stored records. The server sends
    ``c_i`` too when the client's copy cannot be trusted to match its own (after a resume, which
    starts every node with an empty state, or after it rejected the client's last reply); that
    copy then replaces the client's."""

    @classmethod
    def applies(cls, received: Mapping[str, StateDict]) -> bool:
        return CONTROL in received

    def __init__(self, received, stored, sent) -> None:
        super().__init__(received, stored, sent)
        self.server = received[CONTROL]
        if CLIENT_CONTROL in received:
            self.own = received[CLIENT_CONTROL]
        elif CLIENT_CONTROL in stored:
            self.own = stored[CLIENT_CONTROL]
        else:
            self.own = zero_controls(sent, list(self.server))

    def objective_inputs(self) -> dict[str, Any]:
        """The client objective's input: ``c - c_i`` per parameter."""
        return {"correction": {k: self.server[k] - self.own[k] for k in self.server}}

    def after_train(self, trained: StateDict, stats: TrainStats, lr: float) -> dict[str, StateDict]:
        """Store ``c_i+`` (option II); reply with the change ``c_i+ - c_i``."""
        new = client_control(self.own, self.server, self.sent, trained, stats.steps, lr)
        self.stored[CLIENT_CONTROL] = new
        return {CONTROL_DELTA: OrderedDict((k, new[k] - self.own[k]) for k in new)}


class Scaffold(FedAvg):
    name = "scaffold"
    options_from = ()
    client_state = ScaffoldClient

    @classmethod
    def problem(cls, context: StrategyContext) -> str | None:
        return plain_sgd_problem(context, "scaffold", momentum=False)

    def __init__(self, context: StrategyContext) -> None:
        super().__init__(context)
        model = context.model
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
        problem = super().check(rnd, update) or reported_steps(self.context, update)
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
            self.context.train.lr,
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
        self.control = server_control(self.control, changes, self.context.num_clients)
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
