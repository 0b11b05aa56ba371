"""PFNM as a strategy: one round of local training from each client's own init, then Bayesian
nonparametric matching on the server (``fedalign.algorithms.fusion.neural_matching``).

Round 1 asks the clients to train from their own initialisations and report their class counts
with their weights; the server fuses the MLPs into one whose hidden widths follow the matching.
Its options are BBP-MAP's, read from ``pfnm``'s signature (their one home), and two of its own:
with ``grid``, every candidate of the reference's (sigma, sigma0, gamma) grid is sent back to the
clients, which score it on their own training data (a ``score`` phase); the server keeps the
smallest model whose pooled score is within ``grid_tolerance`` of the best (0: the best, the
reference's rule); ``grid_sweep_orders`` fuses each point with that many sweep seeds, every one
scored alike (``pfnm_grid_search``'s ``sweep_orders``: by default 4 under ``max_width``, else 1).
Later rounds, if any, fine-tune the fused model with FedAvg (clients build the grown architecture
from the weights they receive).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from fedalign.algorithms.fusion import pfnm, pfnm_grid_search
from fedalign.algorithms.fusion.bbp_map import matching_problem
from fedalign.core.registry import keyword_defaults
from fedalign.core.tensors import weighted_average
from fedalign.fl.round import ClientUpdate, Round
from fedalign.fl.strategy import Strategy, StrategyContext
from fedalign.models import MLP

from .matched import (
    RECORDED,
    class_counts,
    class_counts_problem,
    client_models,
    pfnm_fusion,
)


class PFNM(Strategy):
    name = "pfnm"
    options_from = (pfnm,)

    def __init__(
        self,
        context: StrategyContext,
        *,
        grid: bool = False,
        grid_tolerance: float = 0.0,
        grid_sweep_orders: int | None = None,
        **matching: Any,
    ) -> None:
        super().__init__(context)
        if not 0 <= grid_tolerance <= 1:
            raise ValueError(f"grid_tolerance must be in [0, 1], got {grid_tolerance}")
        if grid_sweep_orders is not None and grid_sweep_orders < 1:
            raise ValueError(f"grid_sweep_orders must be >= 1, got {grid_sweep_orders}")
        self.grid, self.grid_tolerance = grid, grid_tolerance
        self.grid_sweep_orders = grid_sweep_orders
        self.matching = {**keyword_defaults(pfnm), **matching}
        problem = matching_problem(**self.matching)
        if problem is not None:
            raise ValueError(problem)

    @classmethod
    def problem(cls, context: StrategyContext) -> str | None:
        return None if isinstance(context.model, MLP) else "pfnm fuses MLPs"

    def local_init(self, rnd: Round, partitions: list[int]) -> list[int]:
        return partitions if rnd.number == 1 else []

    def check(self, rnd: Round, update: ClientUpdate) -> str | None:
        return class_counts_problem(update, rnd.reference) if rnd.number == 1 else None

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        if rnd.number > 1:
            return weighted_average(
                [u.state_dict for u in updates], [u.num_examples for u in updates]
            )
        where = {"seed": self.context.seed, "device": self.context.device}
        if not self.grid:
            fused, rnd.log.extra["pfnm"] = pfnm_fusion(
                self.model, updates, **where, **self.matching
            )
            return fused
        partitions = [u.partition_id for u in updates]
        fused, _, chosen = pfnm_grid_search(
            client_models(self.model, updates),
            class_counts(updates),
            lambda model: rnd.score("score", model.state_dict(), partitions),
            tolerance=self.grid_tolerance,
            sweep_orders=self.grid_sweep_orders,
            **where,
            **{k: v for k, v in self.matching.items() if k not in RECORDED},
        )
        rnd.log.extra["pfnm"] = {
            **{k: v for k, v in chosen.items() if k != "score"},
            "client_train_accuracy": chosen["score"],
        }
        return OrderedDict(fused.state_dict())
