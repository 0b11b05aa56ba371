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

``weighting`` declares the objective. The server step is Algorithm 1's, ``x += eta_g mean_S(dy_i)``
(the fuse rule, then the server optimizer as ``eta_g``) and ``c += (|S|/N) mean_S(dc_i)``, with the
clients weighted alike in both. ``uniform``: plain means, as in the paper; the fixed point
minimises the plain mean of the client losses, ``sum_i f_i / N``. ``examples`` (the default): both
weighted by the clients' example counts, ``c`` kept the example-weighted mean of all ``N`` clients'
``c_i`` (``drift.server_control``, which is ``(|S|/N)`` times the sampled clients' weighted mean
when every client takes part); the fixed point minimises the example-weighted loss
``sum_i n_i f_i / n``. That is the objective FedAvg, FedProx and FedNova optimise here, so the
default makes a comparison of SCAFFOLD with them one of methods, not of objectives; with equal
client sizes the two weightings are one. docs/aggregation.md shows both on federated least squares.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal

import torch

from fedalign.algorithms.drift import (
    client_control,
    control_problem,
    control_total,
    server_control,
    weighted_control_change,
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
    """SCAFFOLD's server: control variates beside FedAvg's rule; ``weighting`` (``examples`` or the
    paper's ``uniform``) weights the model and ``c`` alike and so declares the objective."""

    name = "scaffold"
    options_from = ()
    client_state = ScaffoldClient

    @classmethod
    def problem(cls, context: StrategyContext) -> str | None:
        """Local SGD, with or without momentum. With heavy-ball momentum rho, option II's
        ``(x - y_i) / (K lr)`` reads the K steps' displacement as K plain steps, up to
        ``1 / (1 - rho)`` times larger: the control variates overestimate the gradients by up to
        that factor. NIID-Bench ran SCAFFOLD so (SGD momentum 0.9); fedalign allows it to
        reproduce that setting (docs/aggregation.md, docs/benchmarks.md's momentum study)."""
        return plain_sgd_problem(context, "scaffold", momentum=True)

    def __init__(
        self, context: StrategyContext, *, weighting: Literal["uniform", "examples"] = "examples"
    ) -> None:
        super().__init__(context)
        if weighting not in ("uniform", "examples"):
            raise ValueError(f"weighting must be 'uniform' or 'examples', got {weighting!r}")
        self.weighting = weighting
        model = context.model
        self.keys = [name for name, _ in model.named_parameters()]
        self.control = zero_controls(model.state_dict(), self.keys)
        self.clients: dict[int, OrderedDict[str, torch.Tensor]] = {}  # the server's copy of c_i
        self.weights: dict[int, float] = {}  # the weight each copy carries in c
        self.restore: set[int] = set()  # partitions whose own c_i must be sent with their model
        self.sampled: set[int] = set()
        self.expected: dict[int, OrderedDict[str, torch.Tensor]] = {}  # this round's c_i+

    def weight(self, update: ClientUpdate) -> float:
        """A client's weight in both means: 1, or its (engine-clipped) example count."""
        return 1.0 if self.weighting == "uniform" else float(update.num_examples)

    def fusion_weights(self, updates: list[ClientUpdate]) -> list[float]:
        return [self.weight(u) for u in updates]

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
        weights = {u.partition_id: self.weight(u) for u in updates}
        changes = [
            weighted_control_change(
                self.expected[p], weights[p], self.own(p), self.weights.get(p, 0.0)
            )
            for p in accepted
        ]
        before = self.total()
        self.weights.update(weights)
        self.control = server_control(self.control, changes, self.total(), before)
        self.clients.update({p: self.expected[p] for p in accepted})
        self.restore = (self.restore | self.sampled) - set(accepted)
        self.sampled, self.expected = set(), {}
        return fused

    def total(self) -> float:
        """``W``, the weight of all ``N`` clients ``c`` averages over (``drift.control_total``)."""
        weights = list(self.weights.values())
        return control_total(weights, self.context.num_clients) if weights else 0.0

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
        return {
            "scaffold_restore": sorted(self.restore),
            "scaffold_weights": {str(p): w for p, w in sorted(self.weights.items())},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.restore = {int(p) for p in state.get("scaffold_restore", [])}
        self.weights = {int(p): float(w) for p, w in state.get("scaffold_weights", {}).items()}

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
