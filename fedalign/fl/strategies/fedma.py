"""FedMA as a strategy: layer-wise matched averaging with retraining (Wang et al. 2020).

One strategy round is one FedMA round ("FedMA with communication"), each phase one ``train``
exchange through the engine:

1. ``train``: every sampled client trains its whole model, from its own init in round 1 and from
   its own slice of the global model afterwards (cut back through its assignments);
2. for each layer, bottom-up (``layer:<group>``): the server matches the clients' units with
   BBP-MAP, sends every client its own model with that layer replaced by the global one and the
   next layer's inputs scattered into the global order, and the clients retrain the layers above
   with the matched ones frozen;
3. the classifier is averaged with the clients' class shares.

Layers come from the model's permutation spec (``algorithms.fusion.layer_matching.matched_layers``):
MLPs, CNNs without normalisation and the char-LSTM (embedding dimensions, then LSTM hidden units
matched on their gate rows). A round costs 1 + (number of hidden layers) communication rounds. The
assignments are the strategy's state and go into checkpoints.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.fusion.bbp_map import matching_problem
from fedalign.algorithms.fusion.layer_matching import (
    class_weighted_classifier,
    classifier_keys,
    global_layer,
    hybrid_state,
    match_layer,
    matched_layers,
    slice_to_client,
)
from fedalign.core.errors import RoundFailedError
from fedalign.core.registry import keyword_defaults
from fedalign.fl.round import ClientUpdate, Round, weighted_train_loss
from fedalign.fl.strategy import Strategy, StrategyContext

from .matched import class_counts_problem
from .protocol import reference_schedule

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


class FedMA(Strategy):
    """Its options: BBP-MAP's (``match_layer``'s signature, FedMA's defaults), the training
    schedule's (``protocol``, ``retrain_epochs``, ``retrain_lr``) and ``round_gamma``."""

    name = "fedma"
    options_from = (match_layer, reference_schedule)

    def __init__(self, context: StrategyContext, *, round_gamma: float = 5.0, **options: Any):
        super().__init__(context)
        if not round_gamma > 0:
            raise ValueError(f"round_gamma must be > 0, got {round_gamma}")
        schedule_keys = keyword_defaults(reference_schedule).keys()
        self.schedule = reference_schedule(
            context.train, **{k: v for k, v in options.items() if k in schedule_keys}
        )
        self.matching = {
            **keyword_defaults(match_layer),
            **{k: v for k, v in options.items() if k not in schedule_keys},
        }
        problem = matching_problem(**self.matching)
        if problem is not None:
            raise ValueError(problem)
        self.round_gamma = round_gamma
        self.assignments: dict[int, dict[str, torch.Tensor]] = {}
        self.spec = permutation_spec(context.model, context.example_input)
        self.layers = matched_layers(self.spec, context.model)

    @classmethod
    def problem(cls, context: StrategyContext) -> str | None:
        """Networks without normalisation whose groups FedMA can match one after another."""
        if any(isinstance(m, NORMS) for m in context.model.modules()):
            return "fedma covers networks without normalisation layers, as the reference does"
        try:
            matched_layers(permutation_spec(context.model, context.example_input), context.model)
        except Exception as exc:  # noqa: BLE001 - any tracing or matching limit is the reason
            return f"fedma cannot match this model's layers: {exc}"
        return None

    def state(self) -> dict[str, Any]:
        return {
            "assignments": {
                str(p): {g: a.tolist() for g, a in groups.items()}
                for p, groups in self.assignments.items()
            }
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.assignments = {
            int(p): {g: torch.tensor(a, dtype=torch.long) for g, a in groups.items()}
            for p, groups in state.get("assignments", {}).items()
        }

    def keeps_basis(self, rnd: Round) -> bool:
        """Every round matches the layers anew, into an order unrelated to the last global's."""
        return False

    def _phase(
        self,
        rnd: Round,
        phase: str,
        sent: dict[int, Any],
        frozen: list[str],
        training: dict[str, Any],
        local_init: set[int] = frozenset(),
    ) -> dict[int, ClientUpdate]:
        """One train exchange (``training``: the schedule's entries, ``protocol.fedma_phase``);
        too few valid replies end the round (no retry: the matched layers so far belong to these
        clients)."""
        rnd.log.extra.setdefault("training", {})[phase] = self.schedule.effective(training)
        updates = rnd.train(
            phase,
            sent,
            {"frozen": ",".join(frozen), **training},
            local_init=local_init,
            check=lambda update: class_counts_problem(update, rnd.reference),
        )
        if len(updates) < rnd.settings.min_train_clients:
            raise RoundFailedError(
                f"round {rnd.number}, phase {phase}: only {len(updates)} valid replies "
                f"(min_train_clients={rnd.settings.min_train_clients})"
            )
        return {u.partition_id: u for u in updates}

    def run_round(self, rnd: Round) -> OrderedDict[str, torch.Tensor]:
        partitions = rnd.sample()
        rnd.log.clients_sampled = len(partitions)
        fresh = {p for p in partitions if p not in self.assignments}
        # a client not matched before trains from its own init at the config's widths (the model
        # sent, which its reply must fit); the others from their slice of the global model
        initial = OrderedDict(self.model.state_dict())
        sent = {
            p: initial
            if p in fresh
            else slice_to_client(rnd.reference, self.spec, self.assignments[p])
            for p in partitions
        }
        updates = self._phase(
            rnd, "train", sent, [], self.schedule.fedma_phase(rnd.number, "train"), fresh
        )
        frozen: list[str] = []
        assignments: dict[int, dict[str, torch.Tensor]] = {p: {} for p in updates}
        options = {
            **self.matching,
            "seed": self.context.seed + rnd.number,
            "device": self.context.device,
        }
        if self.schedule.is_reference and rnd.number > 1:
            options["gamma"] = self.round_gamma
        widths: dict[str, int] = {}
        matched: dict[str, torch.Tensor] = {}  # the server's own global layers, not a client's copy
        for layer in self.layers:
            t0 = time.perf_counter()
            order = list(updates)
            states = [updates[p].state_dict for p in order]
            result = match_layer(states, layer, **options)
            glob = global_layer(states, layer, result)
            hybrids = {p: hybrid_state(states[i], layer, glob, i) for i, p in enumerate(order)}
            for i, p in enumerate(order):
                assignments[p][layer.group] = result.assignments[i]
            widths[layer.group] = glob.width
            matched.update(glob.entries)
            rnd.log.timed("match", t0)
            frozen += layer.keys
            # after the last matched layer only the output layer trains (the reference: longer,
            # slower, with weight decay)
            kind = "output" if layer is self.layers[-1] else "layer"
            training = self.schedule.fedma_phase(rnd.number, kind)
            updates = self._phase(rnd, f"layer:{layer.group}", hybrids, frozen, training)
        survivors = list(updates)
        keys = classifier_keys(self.layers, updates[survivors[0]].state_dict)
        fused = {**updates[survivors[0]].state_dict, **matched}
        fused.update(
            class_weighted_classifier(
                [updates[p].state_dict for p in survivors],
                keys,
                [updates[p].metrics["class-counts"] for p in survivors],
            )
        )
        self.assignments.update({p: assignments[p] for p in survivors})
        rnd.log.clients_ok = len(survivors)  # each phase counted its replies; a client counts once
        rnd.log.train_loss = weighted_train_loss(updates.values())
        rnd.log.extra["fedma"] = {
            "widths": widths,
            "phases": 1 + len(self.layers),
            "protocol": self.schedule.protocol,
            "gamma": options["gamma"],
        }
        return OrderedDict(fused)
