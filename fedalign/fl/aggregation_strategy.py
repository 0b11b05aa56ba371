"""The align -> fuse -> repair pipeline as a Flower strategy (``aggregation:`` in the run config).

A round has up to three phases, each one exchange of messages (bytes and seconds per phase):

1. ``train``: the sampled clients train (FedAvg, or FedProx's proximal term) and return their
   weights plus the statistics of their trained models the pipeline declares
   (``Plan.train_statistics``: Grams, Fishers, channel moments);
2. ``align`` (activation matching, closed-form REPAIR): the server sends every other client the
   reference model (the client with the most data) with the client's own model; the client returns
   cross-moments of the two on its data; the server aligns, moves the statistics into the aligned
   basis and fuses;
3. ``repair`` (BN reset, REPAIR): the server broadcasts the fused candidate (with REPAIR's targets);
   the clients return its statistics on their data; the server pools them and corrects the model.

A client that fails or does not answer a later phase is dropped from that phase (and, in the
align phase, from the fusion). The server never sees data, only sums over it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields
from typing import Any

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedalign.align import permutation_spec
from fedalign.components import run_federation, run_model
from fedalign.fl.records import config_record, to_arrays, to_state_dict
from fedalign.fl.server_app import server_device
from fedalign.fl.strategy import ClientUpdate, FedAvg, RoundLog, error_summary
from fedalign.fusion.pfnm import mlp_from_state, pfnm
from fedalign.fusion.pipeline import Plan, aggregate
from fedalign.stats import flatten, unflatten


class AlignFuseRepair(FedAvg):
    name = "align-fuse-repair"

    def __init__(self, cfg, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        a = cfg.aggregation
        options = {f.name: getattr(a, f.name) for f in fields(Plan) if f.name != "device"}
        self.plan = Plan(**options, device=str(server_device(cfg)))
        self.spec = permutation_spec(run_model(cfg, run_federation(cfg))) if a.align != "pfnm" else None
        self._grid: Grid | None = None

    def train_config(self, server_round: int) -> dict[str, Any]:
        config = super().train_config(server_round)
        if self.cfg.strategy.name == "fedprox":
            config["proximal-mu"] = self.cfg.train.proximal_mu
        if self.cfg.aggregation.own_init and server_round == 1:
            config["client-init"] = "local"
        if self.plan.train_statistics():
            config["statistics"] = ",".join(self.plan.train_statistics())
        return config

    def run_round(self, server_round: int, grid: Grid, arrays, rlog: RoundLog):
        self._grid = grid
        return super().run_round(server_round, grid, arrays, rlog)

    # ---- phases ------------------------------------------------------------------------------

    def query(self, phase: str, kinds: tuple[str, ...], targets: dict[int, dict[str, Any]]) -> dict[int, dict]:
        """Send each node its records with a statistics request; return the parsed statistics of
        the nodes that answered (failures are logged and dropped)."""
        rlog = self._round_log
        messages = []
        for node, records in targets.items():
            content = RecordDict({"config": config_record(self.run_config_json, statistics=",".join(kinds))})
            for key, state in records.items():
                content[key] = to_arrays(state)
            messages.append(Message(content, dst_node_id=node, message_type=f"{MessageType.QUERY}.statistics"))
        answers = {}
        for reply in self.exchange(self._grid, messages, rlog, phase):
            node = reply.metadata.src_node_id
            if reply.has_error():
                rlog.fail(self.partition_of_node.get(node), node, f"{phase}: {error_summary(reply.error.reason)}")
                continue
            try:
                answers[node] = unflatten(to_state_dict(reply.content["statistics"]))
            except (KeyError, TypeError, ValueError) as exc:
                rlog.fail(self.partition_of_node.get(node), node, f"{phase}: malformed statistics: {exc!r}")
        for node in targets.keys() - answers.keys():
            if not any(f["node"] == node for f in rlog.failures):
                rlog.fail(self.partition_of_node.get(node), node, f"{phase}: no reply within strategy.timeout")
        return answers

    def fuse(self, server_round: int, reference: OrderedDict[str, torch.Tensor],
             updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        plan, rlog = self.plan, self._round_log
        if plan.align == "pfnm":
            return self._pfnm(updates)
        usable, stats = [], []
        for u in updates:
            s = unflatten(u.statistics) if u.statistics is not None else {}
            if set(plan.train_statistics()) <= set(s):
                usable.append(u)
                stats.append(s)
            else:
                rlog.fail(u.partition_id, u.node_id, f"train: statistics {plan.train_statistics()} missing")

        def ask_cross(ref: int, others: list[int]) -> dict[int, dict]:
            nodes = {usable[j].node_id: {"arrays": usable[j].state_dict, "reference": usable[ref].state_dict}
                     for j in others}
            answers = self.query("align", plan.align_statistics(), nodes)
            return {j: answers[usable[j].node_id] for j in others if usable[j].node_id in answers}

        def ask_fused(fused: OrderedDict, targets: dict | None) -> list[dict]:
            records: dict[str, Any] = {"arrays": fused}
            if targets is not None:
                records["targets"] = flatten({k: {"mean": m, "std": s} for k, (m, s) in targets.items()})
            return list(self.query("repair", plan.repair_statistics(), {u.node_id: records for u in usable}).values())

        outcome = aggregate(plan, self.spec, [u.state_dict for u in usable], [float(u.num_examples) for u in usable],
                            stats, ask_cross, ask_fused, seed=self.cfg.resolved_seeds.sampling + server_round)
        rlog.clients_ok -= len(updates) - len(outcome.kept)
        if "repair_skipped" in outcome.info:
            rlog.extra["repair_skipped"] = outcome.info.pop("repair_skipped")
        reference = usable[outcome.info.pop("reference")].partition_id
        rlog.extra["aggregation"] = {**outcome.info, "reference_partition": reference}
        return outcome.state

    def _pfnm(self, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        """PFNM as the align+fuse step (the grown model replaces the global one)."""
        m = self.cfg.strategy.matching
        models = [mlp_from_state(u.state_dict) for u in updates]
        counts = [u.metrics["class-counts"] for u in updates]
        fused, assignment = pfnm(models, counts, sigma=m.sigma, sigma0=m.sigma0, gamma=1.0 if m.gamma is None else m.gamma,
                                 iterations=m.iterations, seed=self.cfg.resolved_seeds.sampling, solver=self.plan.solver,
                                 max_width=m.max_width, popularity=m.popularity)
        self._round_log.extra["aggregation"] = {"align": "pfnm", "widths": assignment.widths}
        return OrderedDict(fused.state_dict())
