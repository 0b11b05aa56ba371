"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020): one server rule, the align -> fuse ->
repair pipeline of ``fedalign.algorithms.pipeline`` (by default a weighted mean by number of
examples), with the clients' objective (plain or proximal) chosen by the config, not by the server
rule.

A round has up to three phases, each one exchange through the engine:

1. ``train``: the sampled clients train and return their weights plus the statistics of their
   trained models the pipeline declares (Grams, Fishers, channel moments);
2. ``align`` (activation matching, closed-form REPAIR): every other client gets the reference
   model (the client with the most data) with its own model and returns cross-moments of the two;
3. ``repair`` (BN reset, REPAIR): the clients measure the fused candidate (with REPAIR's targets).

A client that fails or does not answer a later phase is dropped from that phase (and, in the align
phase, from the fusion). The server never sees data, only sums over it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from fedalign.algorithms.align import ALIGNERS
from fedalign.algorithms.pipeline import aggregate
from fedalign.algorithms.stats import flatten
from fedalign.core.tensors import weighted_average
from fedalign.core.types import ClientStats
from fedalign.fl.round import ClientUpdate, Round
from fedalign.fl.strategy import Strategy, StrategyContext

from .matched import class_counts_problem, pfnm_fusion
from .protocol import reference_schedule


class FedAvg(Strategy):
    """The pipeline's rule over the clients' updates (a weighted mean by default); its options
    are the training schedule's (``protocol``, ``retrain_epochs``, ``retrain_lr``)."""

    name = "fedavg"
    options_from = (reference_schedule,)

    def __init__(self, context: StrategyContext, **schedule: Any) -> None:
        super().__init__(context)
        self.schedule = reference_schedule(context.train, **schedule)
        self.plan = context.plan
        permutes = self.plan.active and not self.plan.fuses_in_alignment
        # traced on the clients' own input, heads as the aligner takes them
        self.spec = self.plan.spec(context.model, context.example_input) if permutes else None

    def train_config(self, rnd: Round) -> dict[str, Any]:
        """The pipeline's statistics and, under ``protocol: reference``, the round's epochs and
        learning rate (``protocol.Schedule.baseline_round``)."""
        kinds = self.plan.for_round(rnd.number).train_statistics()
        training = self.schedule.baseline_round(rnd.number)
        if self.schedule.is_reference:
            rnd.log.extra["training"] = {"train": self.schedule.effective(training)}
        return {**training, **({"statistics": ",".join(kinds)} if kinds else {})}

    def local_init(self, rnd: Round, partitions: list[int]) -> list[int]:
        """Round 1 from the clients' own inits with ``aggregation.own_init`` or the reference
        schedule (whose baselines start from the average of the locally trained models)."""
        own = self.context.own_init or self.schedule.is_reference
        return partitions if own and rnd.number == 1 else []

    def check(self, rnd: Round, update: ClientUpdate) -> str | None:
        """The pipeline's train-phase statistics are there (PFNM as the align step: class
        counts)."""
        if self.plan.fuses_in_alignment:
            return class_counts_problem(update, rnd.reference)
        missing = set(self.plan.for_round(rnd.number).train_statistics()) - set(
            update.statistics or {}
        )
        return f"train: statistics {sorted(missing)} missing" if missing else None

    def fusion_weights(self, updates: list[ClientUpdate]) -> list[float]:
        """The clients' weights in the fuse rule: their example counts (SCAFFOLD may declare
        uniform ones)."""
        return [float(u.num_examples) for u in updates]

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        if not self.plan.active:
            return weighted_average([u.state_dict for u in updates], self.fusion_weights(updates))
        if self.plan.fuses_in_alignment:
            return self._pfnm(rnd, updates)
        return self._pipeline(rnd, updates)

    def _pfnm(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        """PFNM as the align step: it fuses by itself, with the ``pfnm`` aligner's options."""
        fused, record = pfnm_fusion(
            self.model,
            updates,
            self.context.seed,
            self.context.device,
            solver=self.plan.solver,
            **self.plan.options_of(ALIGNERS.get("pfnm")),
        )
        rnd.log.extra["aggregation"] = {"align": self.plan.align, **record}
        return fused

    def _pipeline(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        plan = self.plan.for_round(rnd.number)
        kept = {u.partition_id for u in updates}  # the clients still in the fusion

        def ask_cross(ref: int, others: list[int]) -> dict[int, ClientStats]:
            records = {
                updates[j].partition_id: {
                    "arrays": updates[j].state_dict,
                    "reference": updates[ref].state_dict,
                }
                for j in others
            }
            answers = rnd.query("align", plan.align_statistics(), records)
            kept.difference_update(records.keys() - answers.keys())
            return {
                j: answers[updates[j].partition_id]
                for j in others
                if updates[j].partition_id in answers
            }

        def ask_fused(fused: OrderedDict, targets: dict | None) -> list[ClientStats]:
            records: dict[str, Any] = {"arrays": fused}
            if targets is not None:
                records["targets"] = flatten(
                    {k: {"mean": m, "std": s} for k, (m, s) in targets.items()}
                )
            return list(
                rnd.query(
                    "repair", plan.repair_statistics(), dict.fromkeys(sorted(kept), records)
                ).values()
            )

        outcome = aggregate(
            plan,
            self.spec,
            [u.state_dict for u in updates],
            self.fusion_weights(updates),
            [u.statistics or {} for u in updates],
            ask_cross,
            ask_fused,
            seed=self.context.seed + rnd.number,
        )
        rnd.log.clients_ok -= len(updates) - len(outcome.kept)
        if "repair_skipped" in outcome.info:
            rnd.log.extra["repair_skipped"] = outcome.info.pop("repair_skipped")
        reference = updates[outcome.info.pop("reference")].partition_id
        rnd.log.extra["aggregation"] = {**outcome.info, "reference_partition": reference}
        return outcome.state
