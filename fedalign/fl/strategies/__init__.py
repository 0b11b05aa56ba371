"""The built-in strategies, registered in ``fedalign.core.registry.STRATEGIES``.

``fedavg`` and ``fedprox`` are one server rule (the align -> fuse -> repair pipeline, a weighted
mean by default) with two client objectives; ``scaffold`` and ``fednova`` add a correction of
client drift to it; ``pfnm`` and ``fedma`` fuse by neuron matching. Every one of them ends with the
config's server optimizer (FedAvgM, FedAdam, FedYogi, FedAdagrad are ``server_optimizer``
settings, not strategies). ``meta["check"]`` says why a config cannot run a strategy.
"""

from __future__ import annotations

from fedalign.core.registry import STRATEGIES

from .drift import FedNova, Scaffold
from .fedavg import FedAvg
from .fedma import FedMA
from .pfnm import PFNM

STRATEGIES.register("fedavg", FedAvg, options={}, objective="plain", pipeline=True)
STRATEGIES.register("fedprox", FedAvg, options={}, objective="proximal", pipeline=True)
STRATEGIES.register(
    "scaffold",
    Scaffold,
    options={},
    objective="scaffold",
    pipeline=True,
    check=Scaffold.config_problem,
)
STRATEGIES.register(
    "fednova", FedNova, options={}, objective="plain", pipeline=True, check=FedNova.config_problem
)
STRATEGIES.register("pfnm", PFNM, options={}, supports=PFNM.supports, objective="plain")
STRATEGIES.register("fedma", FedMA, options={}, supports=FedMA.supports, objective="plain")

__all__ = ["PFNM", "FedAvg", "FedMA", "FedNova", "Scaffold"]
