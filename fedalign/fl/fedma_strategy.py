"""FedMA as a Flower strategy: layer-wise matched averaging with retraining (Wang et al. 2020).

One strategy round is one FedMA round ("FedMA with communication"):

1. ``train``: every sampled client trains its whole model, from its own init in round 1 and from
   its own slice of the global model afterwards (cut back through its assignments);
2. for each layer, bottom-up (``layer:<group>``): the server matches the clients' units with
   BBP-MAP, sends every client its own model with that layer replaced by the global one and the
   next layer's inputs scattered into the global order, and the clients retrain the layers above
   with the matched ones frozen;
3. the classifier is averaged with the clients' class shares.

Models: mlp, lenet, vgg9 and char_lstm (embedding dimensions, then LSTM hidden units matched on
their gate rows, ``weight_hh`` permuted on both axes and averaged; see ``fusion.fedma``).

Each phase is one exchange of messages, so a round costs 1 + (number of hidden layers)
communication rounds; bytes and seconds are recorded per phase. Messages differ per client (each
gets its own model), which the Message API allows directly. The assignments are the strategy's
state and go into checkpoints.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedalign.align import permutation_spec
from fedalign.components import run_federation, run_model
from fedalign.fl.records import config_record, to_arrays, to_state_dict
from fedalign.fl.strategy import FedAvg, RoundFailedError, RoundLog, error_summary
from fedalign.fusion.fedma import (
    class_weighted_classifier,
    classifier_keys,
    global_layer,
    hybrid_state,
    match_layer,
    matched_layers,
    slice_to_client,
)
from fedalign.validation import update_problem

State = dict[str, torch.Tensor]


class FedMA(FedAvg):
    name = "fedma"

    def __init__(self, cfg, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.assignments: dict[int, dict[str, torch.Tensor]] = {}
        model = run_model(cfg, run_federation(cfg))
        self.spec = permutation_spec(model)
        self.layers = matched_layers(self.spec, model)

    # ---- checkpointed state ------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"assignments": {str(p): {g: a.tolist() for g, a in groups.items()}
                                for p, groups in self.assignments.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.assignments = {int(p): {g: torch.tensor(a, dtype=torch.long) for g, a in groups.items()}
                            for p, groups in state.get("assignments", {}).items()}

    # ---- one FedMA round ---------------------------------------------------------------------

    def local_phase(
        self, grid: Grid, rlog: RoundLog, server_round: int, sent: dict[int, State], phase: str,
        frozen: list[str], local_init: set[int] = frozenset(),
    ) -> tuple[dict[int, State], dict[int, dict]]:
        """Send each client its own model, let it train the unfrozen layers, validate replies."""
        base = {**self.train_config(server_round), "frozen": ",".join(frozen)}
        messages = []
        for pid, state in sent.items():
            extra = {"client-init": "local"} if pid in local_init else {}
            record = RecordDict({"arrays": to_arrays(state),
                                 "config": config_record(self.run_config_json, **base, **extra)})
            messages.append(Message(record, dst_node_id=self.node_of_partition[pid],
                                    message_type=MessageType.TRAIN))
        states, metrics = {}, {}
        replies = self.exchange(grid, messages, rlog, phase)
        answered = {self.partition_of_node.get(r.metadata.src_node_id) for r in replies}
        for pid in sent.keys() - answered:
            rlog.fail(pid, self.node_of_partition[pid], f"{phase}: no reply within strategy.timeout")
        for reply in replies:
            node = reply.metadata.src_node_id
            pid = self.partition_of_node.get(node)
            if pid not in sent:
                rlog.fail(pid, node, f"{phase}: reply from a client that was not asked")
                continue
            if reply.has_error():
                rlog.fail(pid, node, f"{phase}: client error: {error_summary(reply.error.reason)}")
                continue
            state = to_state_dict(reply.content["arrays"])
            problem = update_problem(sent[pid], state, self.cfg.strategy.max_update_norm) \
                if pid not in local_init else update_problem(self._reference, state)
            counts = reply.content["metrics"].get("class-counts")
            if problem is None and (not isinstance(counts, list) or any(c < 0 for c in counts)):
                problem = "malformed class-counts"
            if problem is not None:
                rlog.fail(pid, node, f"{phase}: {problem}")
                continue
            states[pid], metrics[pid] = state, dict(reply.content["metrics"])
        if len(states) < self.cfg.strategy.min_train_clients:
            raise RoundFailedError(f"round {server_round}, phase {phase}: only {len(states)} valid "
                                   f"replies (min_train_clients={self.cfg.strategy.min_train_clients})")
        return dict(sorted(states.items())), metrics

    def run_round(self, server_round: int, grid: Grid, arrays, rlog: RoundLog):
        s, m = self.cfg.strategy, self.cfg.strategy.matching
        self._reference = to_state_dict(arrays)
        partitions = self.sample(server_round, s.fraction_train, s.min_train_clients)
        rlog.clients_sampled = len(partitions)
        fresh = {p for p in partitions if p not in self.assignments}
        sent = {p: (self._reference if p in fresh else
                    slice_to_client(self._reference, self.spec, self.assignments[p])) for p in partitions}
        states, metrics = self.local_phase(grid, rlog, server_round, sent, "train", [], fresh)
        frozen: list[str] = []
        assignments: dict[int, dict[str, torch.Tensor]] = {p: {} for p in states}
        options = {"sigma": m.sigma, "sigma0": m.sigma0, "gamma": 7.0 if m.gamma is None else m.gamma,
                   "iterations": m.iterations, "seed": self.cfg.resolved_seeds.sampling + server_round,
                   "solver": m.solver, "max_width": m.max_width}
        widths: dict[str, int] = {}
        matched: dict[str, torch.Tensor] = {}   # the server's own global layers, not a client's copy
        for layer in self.layers:
            t0 = time.perf_counter()
            order = list(states)
            result = match_layer([states[p] for p in order], layer, **options)
            glob = global_layer([states[p] for p in order], layer, result)
            hybrids = {p: hybrid_state(states[p], layer, glob, i) for i, p in enumerate(order)}
            for i, p in enumerate(order):
                assignments[p][layer.group] = result.assignments[i]
            widths[layer.group] = glob.width
            matched.update(glob.entries)
            rlog.seconds["match"] = rlog.seconds.get("match", 0.0) + time.perf_counter() - t0
            frozen += layer.keys
            states, metrics = self.local_phase(grid, rlog, server_round, hybrids, f"layer:{layer.group}", frozen)
        keys = classifier_keys(self.layers, next(iter(states.values())))
        survivors = list(states)
        fused = {**states[survivors[0]], **matched}
        fused.update(class_weighted_classifier([states[p] for p in survivors], keys,
                                               [metrics[p]["class-counts"] for p in survivors]))
        self.assignments.update({p: assignments[p] for p in survivors})
        rlog.clients_ok = len(survivors)
        sizes = np.array([metrics[p]["num-examples"] for p in survivors], dtype=float)
        losses = np.array([metrics[p]["train-loss"] for p in survivors], dtype=float)
        rlog.train_loss = float((sizes * losses).sum() / sizes.sum())
        rlog.extra["fedma"] = {"widths": widths, "phases": 1 + len(self.layers)}
        return to_arrays(OrderedDict(fused))
