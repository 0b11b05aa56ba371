"""PFNM as a Flower strategy: one round of local training from each client's own init, then
Bayesian nonparametric matching on the server (``fedalign.fusion.pfnm``).

Round 1 asks the clients to train from their own initialisations (``client-init=local``) and to
report their class counts with their weights; the server fuses the MLPs into one whose hidden
widths follow the matching. With ``strategy.matching.grid``, every candidate of the reference's
(sigma, sigma0, gamma) grid is sent back to the clients, which score it on their own training data
(a "score" phase, counted in bytes and seconds); the server keeps the smallest model whose pooled
score is within ``strategy.matching.grid_tolerance`` of the best (0: the best, the reference's rule). Later rounds, if any,
fine-tune the fused model with FedAvg (clients then build the grown architecture from the weights
they receive).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedalign.fl.records import config_record, to_arrays
from fedalign.fl.strategy import ClientUpdate, FedAvg, RoundLog
from fedalign.fusion.pfnm import mlp_from_state, pfnm, pfnm_grid_search


class PFNM(FedAvg):
    name = "pfnm"

    def train_config(self, server_round: int) -> dict[str, Any]:
        extra = {"client-init": "local"} if server_round == 1 else {}
        return {**super().train_config(server_round), **extra}

    def run_round(self, server_round: int, grid: Grid, arrays, rlog: RoundLog):
        self._grid = grid
        return super().run_round(server_round, grid, arrays, rlog)

    def class_counts(self, update: ClientUpdate) -> list[float] | None:
        counts = update.metrics.get("class-counts")
        k = self._classes
        if not isinstance(counts, list) or len(counts) != k or any(c < 0 for c in counts):
            return None
        return [float(c) for c in counts]

    def fuse(self, server_round: int, reference: OrderedDict[str, torch.Tensor],
             updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        if server_round > 1:
            return super().fuse(server_round, reference, updates)
        self._classes = reference[[k for k in reference if k.endswith(".weight")][-1]].shape[0]
        rlog = self._round_log
        usable = []
        for u in updates:
            counts = self.class_counts(u)
            if counts is None:
                rlog.fail(u.partition_id, u.node_id, "malformed class-counts")
                rlog.clients_ok -= 1
            else:
                usable.append((u, counts))
        models = [mlp_from_state(u.state_dict) for u, _ in usable]
        counts = [c for _, c in usable]
        p = self.cfg.strategy.matching
        options = {"iterations": p.iterations, "seed": self.cfg.resolved_seeds.sampling,
                   "solver": p.solver, "max_width": p.max_width, "popularity": p.popularity}
        if not p.grid:
            gamma = 1.0 if p.gamma is None else p.gamma
            fused, assignment = pfnm(models, counts, sigma=p.sigma, sigma0=p.sigma0, gamma=gamma, **options)
            rlog.extra["pfnm"] = {"sigma": p.sigma, "sigma0": p.sigma0, "gamma": gamma, "widths": assignment.widths}
            return OrderedDict(fused.state_dict())
        clients = [u for u, _ in usable]
        fused, _, chosen = pfnm_grid_search(models, counts, lambda m: self.client_score(m, clients, rlog),
                                            tolerance=p.grid_tolerance, **options)
        rlog.extra["pfnm"] = {**{k: v for k, v in chosen.items() if k != "score"},
                              "client_train_accuracy": chosen["score"]}
        return OrderedDict(fused.state_dict())

    def client_score(self, model, updates: list[ClientUpdate], rlog: RoundLog) -> float:
        """The clients' accuracy of ``model`` on their own training data (pooled)."""
        record = RecordDict({"arrays": to_arrays(model.state_dict()),
                             "config": config_record(self.run_config_json, split="train")})
        messages = [Message(record, dst_node_id=u.node_id, message_type=MessageType.EVALUATE)
                    for u in updates]
        correct, total = 0.0, 0
        for reply in self.exchange(self._grid, messages, rlog, "score"):
            if reply.has_error():
                continue
            m = reply.content["metrics"]
            correct += float(m["val-accuracy"]) * int(m["num-examples"])
            total += int(m["num-examples"])
        return correct / total if total else 0.0
