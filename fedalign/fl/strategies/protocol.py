"""How long and at what rate each training phase runs under a strategy's ``protocol`` option.

``fedalign`` sends nothing: every phase trains as ``train`` says. ``reference`` follows IBM/FedMA's
comparison (``main.py``: ``local_train``, ``BBP_MAP``/``local_retrain``, ``fedma_comm``,
``fedavg_comm``): round 1 is the clients' local training from their own inits (``train`` as it
is); every later training runs ``retrain_epochs`` at ``retrain_lr``. FedMA's phase that retrains
only the output layer (after its last layer is matched) runs three times as long at a tenth of
the rate with weight decay 1e-4; the baselines' rounds use weight decay 1e-4. The server sends
these as entries of the train message (``epochs``, ``lr``, ``weight-decay``, ``proximal-mu``;
``config.components.phase_training`` reads them on the client), and the round's record keeps
what each phase ran with. ``fedma``, ``fedavg`` and ``fedprox`` take these options
(``reference_schedule``'s keyword-only parameters, their one home).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedalign.config.schema import TrainConfig

PROTOCOLS = ("fedalign", "reference")
OUTPUT_LAYER_EPOCHS = 3  # x retrain_epochs
OUTPUT_LAYER_LR = 0.1  # x retrain_lr
REFERENCE_WEIGHT_DECAY = 1e-4  # the output-layer phase and the baselines' rounds


@dataclass(frozen=True)
class Schedule:
    """A strategy's training schedule: the protocol and the clients' configured training."""

    train: TrainConfig
    protocol: str = "fedalign"
    retrain_epochs: int | None = None
    retrain_lr: float | None = None

    @property
    def is_reference(self) -> bool:
        return self.protocol == "reference"

    def _retraining(self) -> tuple[int, float]:
        t = self.train
        return (
            t.local_epochs if self.retrain_epochs is None else self.retrain_epochs,
            t.lr if self.retrain_lr is None else self.retrain_lr,
        )

    def fedma_phase(self, round_number: int, phase: str) -> dict[str, Any]:
        """The train message entries of FedMA's ``phase``: ``train`` (the full model), ``layer``
        (the layers above a matched one) or ``output`` (only the output layer, after the last
        matched layer); empty under the fedalign protocol and for round 1's ``train``."""
        if not self.is_reference or (phase == "train" and round_number == 1):
            return {}
        epochs, lr = self._retraining()
        if phase == "output":
            return {
                "epochs": OUTPUT_LAYER_EPOCHS * epochs,
                "lr": OUTPUT_LAYER_LR * lr,
                "weight-decay": REFERENCE_WEIGHT_DECAY,
            }
        return {"epochs": epochs, "lr": lr}

    def baseline_round(self, round_number: int) -> dict[str, Any]:
        """The train message entries of a FedAvg/FedProx round: round 1 trains from the clients'
        own inits as ``train`` says but without FedProx's proximal term (the reference's
        ``local_train`` is plain SGD, the same training FedMA's round 1 runs); later rounds
        retrain as its ``fedavg_comm`` / ``fedprox_comm``."""
        if not self.is_reference:
            return {}
        if round_number == 1:
            return {"proximal-mu": 0.0}
        epochs, lr = self._retraining()
        return {"epochs": epochs, "lr": lr, "weight-decay": REFERENCE_WEIGHT_DECAY}

    def effective(self, entries: dict[str, Any]) -> dict[str, float]:
        """What a phase trains with: ``entries`` over ``train``'s own values (for the round's
        record)."""
        t = self.train
        return {
            "epochs": entries.get("epochs", t.local_epochs),
            "lr": entries.get("lr", t.lr),
            "weight_decay": entries.get("weight-decay", t.weight_decay),
        }


def reference_schedule(
    train: TrainConfig,
    *,
    protocol: str = "fedalign",
    retrain_epochs: int | None = None,
    retrain_lr: float | None = None,
) -> Schedule:
    """The schedule of these options (``protocol: reference``: IBM/FedMA's comparison, for
    fedma and its baselines fedavg and fedprox; ``retrain_epochs`` / ``retrain_lr``: epochs and
    learning rate of each training after round 1's, by default ``train``'s)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if retrain_epochs is not None and retrain_epochs < 1:
        raise ValueError(f"retrain_epochs must be >= 1, got {retrain_epochs}")
    if retrain_lr is not None and not retrain_lr > 0:
        raise ValueError(f"retrain_lr must be > 0, got {retrain_lr}")
    return Schedule(train, protocol, retrain_epochs, retrain_lr)
