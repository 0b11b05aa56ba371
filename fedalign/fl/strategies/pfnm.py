"""PFNM as a strategy: one round of local training from each client's own init, then Bayesian
nonparametric matching on the server (``fedalign.algorithms.fusion.neural_matching``).

Round 1 asks the clients to train from their own initialisations and report their class counts
with their weights; the server fuses the MLPs into one whose hidden widths follow the matching.
With ``strategy.matching.grid``, every candidate of the reference's (sigma, sigma0, gamma) grid is
sent back to the clients, which score it on their own training data (a ``score`` phase); the
server keeps the smallest model whose pooled score is within ``strategy.matching.grid_tolerance``
of the best (0: the best, the reference's rule). Later rounds, if any, fine-tune the fused model
with FedAvg (clients build the grown architecture from the weights they receive).
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedalign.algorithms.fusion.neural_matching import pfnm, pfnm_grid_search
from fedalign.config.components import server_device
from fedalign.config.schema import RunConfig
from fedalign.core.registry import Context
from fedalign.core.tensors import weighted_average
from fedalign.core.types import StateDict
from fedalign.fl.engine import ClientUpdate, Round, Strategy
from fedalign.models import MLP, fit_to_state


def matching_options(cfg: RunConfig, seed: int, algorithm: Callable[..., Any]) -> dict[str, Any]:
    """BBP-MAP's options from ``strategy.matching`` for ``algorithm`` (``pfnm`` or FedMA's
    ``match_layer``); gamma, when unset, is the algorithm's own default (PFNM 1, FedMA 7). The
    matching runs on ``simulation.server_device``."""
    m = cfg.strategy.matching
    gamma = inspect.signature(algorithm).parameters["gamma"].default if m.gamma is None else m.gamma
    return {
        "sigma": m.sigma,
        "sigma0": m.sigma0,
        "gamma": gamma,
        "iterations": m.iterations,
        "seed": seed,
        "solver": m.solver,
        "max_width": m.max_width,
        "device": str(server_device(cfg)),
    }


def class_counts_problem(update: ClientUpdate, reference: StateDict) -> str | None:
    """Why the update's class counts are unusable: they must be one non-negative number per class
    of the model (its last layer's outputs), together no more than its (bounded) example count."""
    classes = reference[[k for k in reference if k.endswith(".weight")][-1]].shape[0]
    counts = update.metrics.get("class-counts")
    if not isinstance(counts, list) or len(counts) != classes or any(c < 0 for c in counts):
        return "malformed class-counts"
    if sum(counts) > update.num_examples:
        return f"class-counts sum to {sum(counts)}, more than its {update.num_examples} examples"
    return None


def pfnm_fuse(
    cfg: RunConfig,
    template: nn.Module,
    rnd: Round,
    updates: list[ClientUpdate],
    solver: str | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """PFNM over the updates (their class counts checked on arrival), by the config's matching
    options or, with ``strategy.matching.grid``, by the clients' scores of the grid."""
    models = [fit_to_state(copy.deepcopy(template), u.state_dict) for u in updates]
    counts = [[float(c) for c in u.metrics["class-counts"]] for u in updates]
    m = cfg.strategy.matching
    options = {
        **matching_options(cfg, cfg.resolved_seeds.sampling, pfnm),
        "popularity": m.popularity,
    }
    if solver is not None:
        options["solver"] = solver
    if not m.grid:
        fused, assignment = pfnm(models, counts, **options)
        rnd.log.extra["pfnm"] = {
            "sigma": m.sigma,
            "sigma0": m.sigma0,
            "gamma": options["gamma"],
            "widths": assignment.widths,
        }
        return OrderedDict(fused.state_dict())
    partitions = [u.partition_id for u in updates]
    options = {k: v for k, v in options.items() if k not in ("sigma", "sigma0", "gamma")}
    fused, _, chosen = pfnm_grid_search(
        models,
        counts,
        lambda model: rnd.score("score", model.state_dict(), partitions),
        tolerance=m.grid_tolerance,
        **options,
    )
    rnd.log.extra["pfnm"] = {
        **{k: v for k, v in chosen.items() if k != "score"},
        "client_train_accuracy": chosen["score"],
    }
    return OrderedDict(fused.state_dict())


class PFNM(Strategy):
    name = "pfnm"

    @staticmethod
    def supports(context: Context) -> str | None:
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
        return pfnm_fuse(self.cfg, self.model, rnd, updates)
