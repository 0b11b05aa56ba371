"""The built-in strategies, registered in ``fedalign.core.registry.STRATEGIES``.

``fedavg`` and ``fedprox`` are one server rule (the align -> fuse -> repair pipeline, a weighted
mean by default) with two client objectives; ``scaffold`` and ``fednova`` add a correction of
client drift to it, ``moon`` a model-contrastive client objective; ``feddyn`` is its paper's own
rule with a dynamic regulariser on the clients; ``pfnm`` and ``fedma`` fuse by neuron matching;
``lora`` fine-tunes LoRA adapters on a frozen base (the ``adapters`` section).
Every one of them ends with the config's server optimizer (FedAvgM, FedAdam, FedYogi, FedAdagrad
are ``server_optimizer`` settings, not strategies). Each strategy's options are its constructor's
keyword-only parameters (and those of the callables it lists in ``options_from``);
``Strategy.problem`` says why a context cannot run it. Nothing here imports Flower: looking a
strategy up does not load it.
"""

from __future__ import annotations

from fedalign.core.registry import STRATEGIES

from .fedavg import FedAvg
from .feddyn import FedDyn
from .fedma import FedMA
from .fednova import FedNova
from .lora import LoraStrategy
from .moon import Moon
from .pfnm import PFNM
from .scaffold import Scaffold

STRATEGIES.register("fedavg", FedAvg, objective="plain", pipeline=True)
STRATEGIES.register("fedprox", FedAvg, objective="proximal", pipeline=True)
STRATEGIES.register("scaffold", Scaffold, objective="scaffold", pipeline=True)
STRATEGIES.register("fednova", FedNova, objective="plain", pipeline=True)
STRATEGIES.register("feddyn", FedDyn, objective="feddyn")
STRATEGIES.register("moon", Moon, objective="moon", pipeline=True)
STRATEGIES.register("pfnm", PFNM, objective="plain")
STRATEGIES.register("fedma", FedMA, objective="plain")
STRATEGIES.register("lora", LoraStrategy, objective="plain")

__all__ = ["PFNM", "FedAvg", "FedDyn", "FedMA", "FedNova", "LoraStrategy", "Moon", "Scaffold"]
