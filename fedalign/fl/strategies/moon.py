"""MOON (Li, He, Song 2021) as a strategy: FedAvg's server rule (the pipeline's fuse rule, then the
server optimizer) with the model-contrastive client objective (``moon`` in
``fedalign.client.training``).

Each client contrasts the representation its model gives a batch with the ones the received global
model and its own previous local model give it. The client keeps its previous model in its node's
state (``MoonClient``, the strategy's ``client_state``); nothing but the model travels, except the
server's copy of that model after a resume or a rejected reply (``ClientCopies``): the server keeps
every client's last accepted model, one model per client of memory and checkpoint. Its options
``mu`` and ``temperature`` are read from the client objective's signature (``moon_objective``),
their one home: the clients take them from the strategy's section.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedalign.client.state import ClientState
from fedalign.client.training import TrainStats, moon_objective
from fedalign.core.types import StateDict
from fedalign.fl.round import ClientUpdate, Round
from fedalign.fl.strategy import StrategyContext
from fedalign.models.features import classifier

from .client_copies import ClientCopies
from .fedavg import FedAvg

PREVIOUS = "moon-previous"
"""The array record of the client's previous local model: its stored copy, and the server's sent
to restore it (empty: the client has none)."""
NO_PREVIOUS: StateDict = OrderedDict()


class MoonClient(ClientState):
    """MOON on the client: its previous local model from the node's stored records (or the
    server's copy, when it sends one; an empty one: none), the objective's ``previous``; after
    training, the trained model is stored for the next round."""

    @classmethod
    def applies(cls, received: Mapping[str, StateDict]) -> bool:
        return True

    def __init__(self, received, stored, sent) -> None:
        super().__init__(received, stored, sent)
        self.previous = received[PREVIOUS] if PREVIOUS in received else stored.get(PREVIOUS)

    def objective_inputs(self) -> dict[str, Any]:
        return {"previous": self.previous or None}

    def after_train(self, trained: StateDict, stats: TrainStats, lr: float) -> dict[str, StateDict]:
        self.stored[PREVIOUS] = trained
        return {}


class Moon(FedAvg):
    name = "moon"
    options_from = (moon_objective,)
    client_state = MoonClient

    @classmethod
    def problem(cls, context: StrategyContext) -> str | None:
        if classifier(context.model) is None:
            return (
                "moon reads the representation a model's last linear layer classifies; it has none"
            )
        if context.plan.align != "none" or context.own_init:
            return (
                "moon contrasts a client's models in one neuron order: use aggregation.align: none"
            )
        return None

    def __init__(self, context: StrategyContext, **objective: Any) -> None:
        """``objective``: ``mu`` and ``temperature``, which only the clients use (their bounds
        are checked at load, from the objective's annotations)."""
        super().__init__(context)
        self.previous = ClientCopies("moon/previous")

    def extra_records(self, rnd: Round, partitions: list[int]) -> dict[int, dict[str, StateDict]]:
        restored = self.previous.to_send(partitions, NO_PREVIOUS)
        return {p: {PREVIOUS: model} for p, model in restored.items()}

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        trained = {u.partition_id: u.state_dict for u in updates}  # before the pipeline sees them
        fused = super().aggregate(rnd, updates)
        self.previous.accept(trained)
        return fused

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), **self.previous.tensors()}

    def state(self) -> dict[str, Any]:
        return {"moon_restore": sorted(self.previous.restore)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.previous.restore = {int(p) for p in state.get("moon_restore", [])}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self.previous.load(tensors, list(self.model.state_dict()))
