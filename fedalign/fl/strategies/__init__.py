"""The built-in strategies, registered in ``fedalign.registry.STRATEGIES``.

``fedavg`` and ``fedprox`` are one server rule (the align -> fuse -> repair pipeline, a weighted
mean by default) with two client objectives; ``pfnm`` and ``fedma`` fuse by neuron matching.
"""

from __future__ import annotations

from fedalign.registry import STRATEGIES

from .fedavg import FedAvg
from .fedma import FedMA
from .pfnm import PFNM

STRATEGIES.register("fedavg", FedAvg, options={}, objective="plain", pipeline=True)
STRATEGIES.register("fedprox", FedAvg, options={}, objective="proximal", pipeline=True)
STRATEGIES.register("pfnm", PFNM, options={}, supports=PFNM.supports, objective="plain")
STRATEGIES.register("fedma", FedMA, options={}, supports=FedMA.supports, objective="plain")

__all__ = ["PFNM", "FedAvg", "FedMA"]
