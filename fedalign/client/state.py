"""State a strategy keeps on its clients between rounds, as a hook beside the strategy.

SCAFFOLD keeps each client's control variate ``c_i`` on the client; the LoRA strategy keeps
FedSA-LoRA's B there, and its clients train adapters on a base they hold instead of the model
they are sent (``model`` and ``reply``). The generic ClientApp knows none of them: a strategy
names its hook (``Strategy.client_state``), and the ClientApp builds it from the message's extra
array records and the node's stored records, asks it for the objective's inputs before training,
and for the records to reply with (and to store) after. Everything here is tensors and state
dicts; the ClientApp converts to and from Flower's records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from torch import nn

from fedalign.client.training import TrainStats
from fedalign.core.types import StateDict


class ClientState:
    """One client's strategy state for one train message.

    ``received``: the message's array records besides the model (``arrays``), by name;
    ``stored``: this node's records kept across rounds (the ClientApp persists what the hook
    leaves there); ``sent``: the model the client received. A subclass overrides ``applies``
    (whether this message carries its records), ``objective_inputs`` and ``after_train``."""

    def __init__(
        self,
        received: Mapping[str, StateDict],
        stored: MutableMapping[str, StateDict],
        sent: StateDict,
    ) -> None:
        self.received = received
        self.stored = stored
        self.sent = sent

    @classmethod
    def applies(cls, received: Mapping[str, StateDict]) -> bool:
        """Whether a train message with these extra records runs this hook."""
        return False

    def model(self, base: Callable[[], nn.Module], cfg: Any) -> nn.Module | None:
        """The model this client trains when the message carries something other than a whole
        model to load (LoRA: adapters, trained on ``base()``, the run's own initial model, which
        the client builds itself); ``cfg``: the run config. None (the default): the model
        received."""
        return None

    def reply(self, model: nn.Module) -> StateDict:
        """What the reply carries as its model: the trained model's state dict by default (LoRA:
        the adapters alone)."""
        return model.state_dict()

    def objective_inputs(self) -> dict[str, Any]:
        """What the client objective gets from the server besides the model (none by
        default)."""
        return {}

    def after_train(self, trained: StateDict, stats: TrainStats, lr: float) -> dict[str, StateDict]:
        """The array records the reply carries besides the weights (none by default); the hook
        updates ``stored`` for the next round here."""
        return {}
