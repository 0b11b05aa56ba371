"""FedDyn (Acar et al. 2021, Algorithm 1) as a strategy: a dynamic regulariser on the clients and
the server's state ``h`` (``fedalign.algorithms.feddyn``).

The client keeps ``D_k``, the sum of its updates (its ``grad L_k`` is ``-alpha D_k``), in its node's
state (``FedDynClient``, the strategy's ``client_state``); nothing but the model travels, except
the server's copy of ``D_k`` after a resume or a rejected reply (``ClientCopies``). The server's
rule is the paper's own, not the align/fuse/repair pipeline: the uniform mean of the participants'
models minus ``h / alpha``, then the config's server optimizer. Its option ``alpha`` is read from
the client objective's signature (``feddyn_objective``), its one home: the clients take it from
the strategy's section.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedalign.algorithms.feddyn import accumulate_drift, feddyn_model, server_state, zero_drift
from fedalign.client.state import ClientState
from fedalign.client.training import TrainStats, feddyn_objective
from fedalign.core.registry import keyword_defaults
from fedalign.core.types import StateDict
from fedalign.fl.round import ClientUpdate, Round
from fedalign.fl.strategy import Strategy, StrategyContext

from .client_copies import ClientCopies

DRIFT = "feddyn-drift"
"""The array record of ``D_k``: the client's stored copy, and the server's sent to restore it."""


class FedDynClient(ClientState):
    """FedDyn on the client: ``D_k`` from the node's stored records (or the server's copy, when it
    sends one), the objective's ``drift``; after training, ``D_k + (w_k - w_received)`` is stored.
    The reply carries nothing besides the model: the server computes the same ``D_k``."""

    @classmethod
    def applies(cls, received: Mapping[str, StateDict]) -> bool:
        return True

    def __init__(self, received, stored, sent) -> None:
        super().__init__(received, stored, sent)
        self.drift = received[DRIFT] if DRIFT in received else stored.get(DRIFT)

    def objective_inputs(self) -> dict[str, Any]:
        return {"drift": self.drift}

    def after_train(self, trained: StateDict, stats: TrainStats, lr: float) -> dict[str, StateDict]:
        self.stored[DRIFT] = accumulate_drift(self.drift, self.sent, trained)
        return {}


class FedDyn(Strategy):
    name = "feddyn"
    options_from = (feddyn_objective,)
    client_state = FedDynClient

    def __init__(self, context: StrategyContext, **objective: Any) -> None:
        super().__init__(context)
        self.alpha = float({**keyword_defaults(feddyn_objective), **objective}["alpha"])
        self.keys = [name for name, _ in context.model.named_parameters()]
        state = context.model.state_dict()
        self.h = OrderedDict((k, torch.zeros_like(state[k])) for k in self.keys)
        self.drifts = ClientCopies("feddyn/drift")

    def extra_records(self, rnd: Round, partitions: list[int]) -> dict[int, dict[str, StateDict]]:
        restored = self.drifts.to_send(partitions, zero_drift(rnd.reference))
        return {p: {DRIFT: drift} for p, drift in restored.items()}

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        trained = [u.state_dict for u in updates]
        self.h = server_state(self.h, rnd.reference, trained, self.alpha, self.context.num_clients)
        self.drifts.accept(
            {
                u.partition_id: accumulate_drift(
                    self.drifts.copies.get(u.partition_id), rnd.reference, u.state_dict
                )
                for u in updates
            }
        )
        return feddyn_model(trained, self.h, self.alpha)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **super().tensors(),
            **{f"feddyn/h/{k}": v for k, v in self.h.items()},
            **self.drifts.tensors(),
        }

    def state(self) -> dict[str, Any]:
        return {"feddyn_restore": sorted(self.drifts.restore)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.drifts.restore = {int(p) for p in state.get("feddyn_restore", [])}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self.h = OrderedDict((k, tensors[f"feddyn/h/{k}"]) for k in self.keys)
        self.drifts.load(tensors, list(self.model.state_dict()))
