"""A user's own strategy with an option, written as a user would in their own file: a subclass of
``fedalign.Strategy`` whose option is a keyword-only parameter of its constructor, registered by
name. ``test_user_strategy`` runs it with ``fedalign run --plugin`` and ``--set strategy.boost``."""

from __future__ import annotations

from collections import OrderedDict

import torch

import fedalign


class BoostAvg(fedalign.Strategy):
    """FedAvg's weighted mean, with the step from the global model towards it scaled by
    ``boost`` (a server learning rate)."""

    def __init__(self, *args, boost: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.boost = boost

    def aggregate(self, rnd, updates) -> OrderedDict[str, torch.Tensor]:
        total = sum(u.num_examples for u in updates)
        fused = OrderedDict()
        for key, start in rnd.reference.items():
            mean = sum(u.state_dict[key].double() * u.num_examples for u in updates) / total
            fused[key] = (start + self.boost * (mean - start)).to(start.dtype)
        rnd.log.extra["boost"] = self.boost  # the option the strategy was built with, per round
        return fused


fedalign.register_strategy("boost-avg", BoostAvg)
