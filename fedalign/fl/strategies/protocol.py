"""How long and at what rate each training phase runs under ``strategy.fedma.protocol``.

``fedalign`` sends nothing: every phase trains as ``train`` says. ``reference`` follows IBM/FedMA's
comparison (``main.py``: ``local_train``, ``BBP_MAP``/``local_retrain``, ``fedma_comm``,
``fedavg_comm``): round 1 is the clients' local training from their own inits (``train`` as it
is); every later training runs ``retrain_epochs`` at ``retrain_lr``. FedMA's phase that retrains
only the output layer (after its last layer is matched) runs three times as long at a tenth of
the rate with weight decay 1e-4; the baselines' rounds use weight decay 1e-4. The server sends
these as entries of the train message (``epochs``, ``lr``, ``weight-decay``, ``proximal-mu``;
``components.phase_training`` reads them on the client), and the round's record keeps what
each phase ran with.
"""

from __future__ import annotations

from typing import Any

from fedalign.config.schema import RunConfig

OUTPUT_LAYER_EPOCHS = 3  # x retrain_epochs
OUTPUT_LAYER_LR = 0.1  # x retrain_lr
REFERENCE_WEIGHT_DECAY = 1e-4  # the output-layer phase and the baselines' rounds


def is_reference(cfg: RunConfig) -> bool:
    return cfg.strategy.fedma.protocol == "reference"


def _retraining(cfg: RunConfig) -> tuple[int, float]:
    f, t = cfg.strategy.fedma, cfg.train
    return (
        t.local_epochs if f.retrain_epochs is None else f.retrain_epochs,
        t.lr if f.retrain_lr is None else f.retrain_lr,
    )


def fedma_phase(cfg: RunConfig, round_number: int, phase: str) -> dict[str, Any]:
    """The train message entries of FedMA's ``phase``: ``train`` (the full model), ``layer``
    (the layers above a matched one) or ``output`` (only the output layer, after the last
    matched layer); empty under the fedalign protocol and for round 1's ``train``."""
    if not is_reference(cfg) or (phase == "train" and round_number == 1):
        return {}
    epochs, lr = _retraining(cfg)
    if phase == "output":
        return {
            "epochs": OUTPUT_LAYER_EPOCHS * epochs,
            "lr": OUTPUT_LAYER_LR * lr,
            "weight-decay": REFERENCE_WEIGHT_DECAY,
        }
    return {"epochs": epochs, "lr": lr}


def baseline_round(cfg: RunConfig, round_number: int) -> dict[str, Any]:
    """The train message entries of a FedAvg/FedProx round: round 1 trains from the clients' own
    inits as ``train`` says but without FedProx's proximal term (the reference's ``local_train``
    is plain SGD, the same training FedMA's round 1 runs); later rounds retrain as its
    ``fedavg_comm`` / ``fedprox_comm``."""
    if not is_reference(cfg):
        return {}
    if round_number == 1:
        return {"proximal-mu": 0.0}
    epochs, lr = _retraining(cfg)
    return {"epochs": epochs, "lr": lr, "weight-decay": REFERENCE_WEIGHT_DECAY}


def effective(cfg: RunConfig, entries: dict[str, Any]) -> dict[str, float]:
    """What a phase trains with: ``entries`` over ``train``'s own values (for the round's
    record)."""
    t = cfg.train
    return {
        "epochs": entries.get("epochs", t.local_epochs),
        "lr": entries.get("lr", t.lr),
        "weight_decay": entries.get("weight-decay", t.weight_decay),
    }
