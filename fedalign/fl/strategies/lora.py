"""Federated fine-tuning with LoRA adapters (``strategy: {name: lora}`` with an ``adapters``
section): the model's weights stay frozen, the clients train adapters through ``peft``, and only
adapters travel; the server combines them by a rule of ``fedalign.algorithms.lora.LORA_RULES``
(``adapters.rule``).

What travels, per sampled client and round (``client_models``, ``extra_records``, the reply):

- down, ``arrays``: the adapter tensors the client trains and sends back, at the values it starts
  from (the global adapter, or fresh ones: round 1 and after FLoRA folds the product into the
  base); the client's reply is checked against them. Without a rule's frozen factor (FFA-LoRA's
  A: every client draws it from the run's init seed, as the server does) or its local one
  (FedSA-LoRA's B, which stays on the client);
- down, ``lora-base``: the adapted layers' base weights, once a rule has changed them
  (FedEx-LoRA's residual, FLoRA's folded product): dense, what their exactness costs;
- down, ``lora-local``: a client's own local factor, from the server's copy, when the client's
  own cannot be trusted (after a resume, whose nodes start empty, or a rejected reply), as
  SCAFFOLD restores its control variates;
- up: the trained ``arrays``, and ``lora-local`` (FedSA-LoRA's B: the server's model is the
  clients' mean, so it needs their B; the paper's clients upload A only).

Every client builds the base itself (the run's initial model: ``model.init`` or the seeded
init), as federated fine-tuning assumes the base is on the clients; it never travels. The
server keeps the base of the adapted layers, the global adapter and the clients' local factors,
all checkpointed, so a resumed run continues bit for bit. Its global model, evaluated and saved as
any run's, is the plain architecture with each adapted weight at ``base + delta`` (``delta``: the
rule's weight change, ``LayerUpdate.delta``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fedalign.algorithms.checks import fused_problem
from fedalign.algorithms.lora import (
    LORA_RULES,
    Adapter,
    LayerUpdate,
    best_adapter,
    lora_aggregate,
    mean_products,
)
from fedalign.algorithms.server_opt import is_identity
from fedalign.client.state import ClientState
from fedalign.client.training import TrainStats
from fedalign.core.types import StateDict
from fedalign.fl.round import ClientUpdate, Round
from fedalign.fl.strategy import Strategy, StrategyContext
from fedalign.models.adapters import (
    AdaptedLayer,
    adapted_layers,
    adapter_state,
    freeze,
    inject_lora,
    layer_pairs,
    load_adapter_state,
    wire_state,
)

from .client_copies import ClientCopies

log = logging.getLogger("fedalign")

BASE, LOCAL = "lora-base", "lora-local"


def _part_keys(keys: list[str], factor: str | None) -> list[str]:
    """The adapter keys of ``factor`` (``"A"``/``"B"``; None: none)."""
    return [] if factor is None else [k for k in keys if f".lora_{factor}." in k]


def aggregation_error(
    exact: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]
) -> float:
    """``||exact - update|| / ||exact||`` over all adapted layers together (Frobenius): how far
    the rule's weight change is from the weighted mean of the clients' ``(alpha / r) B_i A_i``
    (0: exact; NaN when the clients changed nothing but the rule did)."""
    gap = sum(float((exact[k].double() - update[k].double()).square().sum()) for k in exact)
    size = sum(float(exact[k].double().square().sum()) for k in exact)
    if size == 0:
        return 0.0 if gap == 0 else math.nan
    return (gap / size) ** 0.5


class LoraClient(ClientState):
    """A LoRA client: the run's own initial model with the base weights it was sent, adapters
    injected (drawn from the run's init seed, so a frozen factor is the server's) at the rank of
    the adapters it was sent (``adapters.client_ranks``: the server sends each client its own
    rank's), the adapters it was sent loaded over them and its own local factor over those."""

    @classmethod
    def applies(cls, received: Mapping[str, StateDict]) -> bool:
        return True

    def model(self, base: Callable[[], nn.Module], cfg: Any) -> nn.Module:
        a = cfg.adapters
        model = base()
        if BASE in self.received:
            model.load_state_dict(self.received[BASE], strict=False)
        rank = next((t.shape[0] for k, t in self.sent.items() if ".lora_A." in k), a.rank)
        inject_lora(
            model,
            rank=rank,
            alpha=a.alpha,
            dropout=a.dropout,
            targets=a.targets,
            seed=cfg.resolved_seeds.init,
        )
        meta = LORA_RULES.get(a.rule).meta
        if meta.get("frozen"):
            freeze(model, f"lora_{meta['frozen']}")
        load_adapter_state(model, self.sent)
        own = self.received.get(LOCAL) or self.stored.get(LOCAL)
        if own:
            load_adapter_state(model, own)
        self.local = meta.get("local")
        self.trained = model
        return model

    def reply(self, model: nn.Module) -> StateDict:
        """The adapters it was sent, trained."""
        state = adapter_state(model)
        return OrderedDict((k, state[k]) for k in self.sent)

    def after_train(self, trained: StateDict, stats: TrainStats, lr: float) -> dict[str, StateDict]:
        """Keep the local factor (FedSA-LoRA's B) for the next round, and report it."""
        state = adapter_state(self.trained)
        own = OrderedDict((k, state[k]) for k in _part_keys(list(state), self.local))
        if not own:
            return {}
        self.stored[LOCAL] = own
        return {LOCAL: own}


class LoraStrategy(Strategy):
    """The server of federated LoRA fine-tuning: the base of the adapted layers, the global
    adapter, the rule of ``adapters.rule`` over the clients' adapters."""

    name = "lora"
    client_state = LoraClient

    @classmethod
    def problem(cls, context: StrategyContext) -> str | None:
        if context.adapters.kind != "lora":
            return "needs adapters: {kind: lora, rank: ..., rule: ...} (the adapters section)"
        if not is_identity(*context.server_optimizer):
            return (
                "the global model is base plus the rule's update: server_optimizer must be sgd "
                "with lr 1"
            )
        if context.plan.active:
            return "adapters are combined by adapters.rule, not by the aggregation pipeline"
        try:
            layers = adapted_layers(cls.injected(context))
        except (ImportError, ValueError) as exc:
            return str(exc)
        return None if layers else "adapters.targets adapts no layer of the model"

    @staticmethod
    def injected(context: StrategyContext, rank: int | None = None) -> nn.Module:
        """A copy of the model with the run's fresh adapters (of rank ``rank``; None:
        ``adapters.rank``)."""
        a = context.adapters
        return inject_lora(
            copy.deepcopy(context.model),
            rank=a.rank if rank is None else rank,
            alpha=a.alpha,
            dropout=a.dropout,
            targets=a.targets,
            seed=context.init_seed,
        )

    def __init__(self, context: StrategyContext) -> None:
        super().__init__(context)
        a = context.adapters
        self.rule = a.rule
        meta = LORA_RULES.get(a.rule).meta
        self.frozen, self.local = meta.get("frozen"), meta.get("local")
        self.rank = a.rank
        self.ranks = tuple(a.client_ranks) or (a.rank,)  # client i trains ranks[i % len]
        self._layers: dict[str, AdaptedLayer] | None = None
        self._fresh: OrderedDict[str, torch.Tensor] | None = None  # fresh adapters at self.rank
        self._fresh_at: dict[int, OrderedDict[str, torch.Tensor]] = {}
        self.base: dict[str, torch.Tensor] = {}  # adapted layer -> base weight (after round 1)
        self.base_changed = False  # whether a rule changed the base: then it is sent
        # rank -> the adapters its clients continue from (empty: fresh adapters at every rank)
        self.adapters: dict[int, OrderedDict[str, torch.Tensor]] = {}
        self.copies = ClientCopies("lora/local")  # the clients' local factors (FedSA-LoRA's B)
        self._pending: dict[str, Any] | None = None

    def _setup(self) -> None:
        """The adapted layers and the fresh adapters (peft's initialisation from the init seed),
        on first use: the constructor stays cheap."""
        if self._layers is None:
            model = self.injected(self.context)
            self._layers = adapted_layers(model)
            self._fresh = self._fresh_at[self.rank] = adapter_state(model)

    @property
    def layers(self) -> dict[str, AdaptedLayer]:
        self._setup()
        assert self._layers is not None
        return self._layers

    def client_rank(self, partition: int) -> int:
        """The rank of partition ``partition``'s adapters: ``client_ranks[i % len]``, else
        ``adapters.rank``."""
        return self.ranks[partition % len(self.ranks)]

    def fresh(self, rank: int) -> OrderedDict[str, torch.Tensor]:
        """Fresh adapters of rank ``rank`` (peft's initialisation from the init seed, as the
        clients draw them)."""
        self._setup()
        if rank not in self._fresh_at:
            self._fresh_at[rank] = adapter_state(self.injected(self.context, rank))
        return self._fresh_at[rank]

    def start(self, rank: int | None = None) -> OrderedDict[str, torch.Tensor]:
        """The adapters the clients of rank ``rank`` (None: ``adapters.rank``) start from this
        round: the global ones, else fresh ones."""
        rank = self.rank if rank is None else rank
        return self.adapters.get(rank) or self.fresh(rank)

    def sent_keys(self) -> list[str]:
        """The adapter tensors that travel as ``arrays``: all but the frozen and local factor."""
        keys = list(self.start())
        kept = set(_part_keys(keys, self.frozen)) | set(_part_keys(keys, self.local))
        return [k for k in keys if k not in kept]

    def client_models(self, rnd: Round, partitions: list[int]) -> dict[int, StateDict]:
        """Each client its own rank's adapters (one shared dict per rank)."""
        keys = self.sent_keys()
        by_rank = {
            r: OrderedDict((k, self.start(r)[k]) for k in keys)
            for r in {self.client_rank(p) for p in partitions}
        }
        return {p: by_rank[self.client_rank(p)] for p in partitions}

    def extra_records(self, rnd: Round, partitions: list[int]) -> dict[int, dict[str, StateDict]]:
        base = (
            {BASE: OrderedDict((self.layers[n].weight, w) for n, w in self.base.items())}
            if self.base_changed
            else {}
        )
        start = self.start()
        fresh_local = OrderedDict((k, start[k]) for k in _part_keys(list(start), self.local))
        restore = self.copies.to_send(partitions, fresh_local) if self.local else {}
        return {p: {**base, **({LOCAL: restore[p]} if p in restore else {})} for p in partitions}

    def _weight_change(self, layer: str, change: torch.Tensor) -> torch.Tensor:
        """A rule's ``out x in`` change in the orientation the layer stores its weight."""
        return change.T if self.layers[layer].fan_in_fan_out else change

    def aggregate(self, rnd: Round, updates: list[ClientUpdate]) -> OrderedDict[str, torch.Tensor]:
        """The rule over the clients' adapters (their frozen factor the shared one); the global
        model is each adapted weight at ``base + delta``. The new base, adapter and local copies
        wait in ``_pending`` until ``checked_aggregate`` accepts the model."""
        a = self.context.adapters
        adapters = []
        for u in updates:
            full = OrderedDict(self.start(self.client_rank(u.partition_id)))
            full.update(u.records.get(LOCAL, {}))
            full.update(u.state_dict)
            adapters.append(layer_pairs(full))
        weights = [float(u.num_examples) for u in updates]
        result = lora_aggregate(self.rule, adapters, weights, alpha=a.alpha, **a.options)
        base = self.base or {n: rnd.reference[layer.weight] for n, layer in self.layers.items()}
        fused = OrderedDict(rnd.reference)
        new_base = dict(base)
        pairs: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        ranks: set[int | None] = set()
        for name, update in result.items():
            key = self.layers[name].weight
            fused[key] = base[name] + self._weight_change(name, update.delta).to(base[name])
            if update.base is not None:
                new_base[name] = base[name] + self._weight_change(name, update.base).to(base[name])
            continued = self._continued(update)
            ranks.update(continued or [None])
            for rank, adapter in (continued or {}).items():
                pairs.setdefault(rank, {})[name] = (adapter.A, adapter.B)
        # FLoRA's stacked adapter (of no client's rank), or one global adapter for clients of
        # different ranks: folded into the base, fresh adapters at every rank
        fold = None in ranks or not set(self.ranks) <= ranks
        if fold:
            new_base = {name: fused[self.layers[name].weight] for name in self.layers}
        self._pending = {
            "base": new_base,
            "base_changed": self.base_changed
            or fold
            or any(u.base is not None for u in result.values()),
            "adapters": {} if fold else {r: wire_state(pairs[r]) for r in set(self.ranks)},
            "local": {u.partition_id: u.records.get(LOCAL, {}) for u in updates},
        }
        rnd.log.extra["lora"] = {
            "rule": self.rule,
            "adapter_rank": max((r for r in ranks if r is not None), default=0),
            "folded": fold,
            "aggregation_error": aggregation_error(
                mean_products(adapters, weights, alpha=a.alpha),
                {name: u.delta for name, u in result.items()},
            ),
        }
        return fused

    def _continued(self, update: LayerUpdate) -> dict[int, Adapter] | None:
        """Rank -> the adapter clients of that rank continue from: the global one (its rank
        alone), or FlexLoRA's per-client truncations (clients of one rank get the same one; a
        client rank no sampled client had gets its truncation of the update too). None: fresh
        adapters."""
        if update.adapter is not None:
            return {update.adapter.rank: update.adapter}
        if not update.personal:
            return None
        by_rank = {p.rank: p for p in update.personal}
        alpha = self.context.adapters.alpha
        for rank in set(self.ranks) - by_rank.keys():
            by_rank[rank] = best_adapter(update.delta, rank, alpha=alpha)
        return by_rank

    def checked_aggregate(
        self, rnd: Round, updates: list[ClientUpdate]
    ) -> OrderedDict[str, torch.Tensor]:
        """``aggregate``, checked (finite, its norm bounded as every strategy's); a failure keeps
        the global model, base and adapter as they were (a mean of adapters is no fallback of
        the plain model's), recorded as ``fusion_fallback``."""
        self._pending = None
        try:
            fused = self.aggregate(rnd, updates)
            problem = fused_problem(fused, [rnd.reference], rnd.settings.max_fused_ratio)
        except (RuntimeError, ValueError, ArithmeticError) as exc:
            problem = f"fusion failed: {exc}"
        if problem is None and self._pending is not None:
            pending = self._pending
            self.base, self.base_changed = pending["base"], pending["base_changed"]
            self.adapters = pending["adapters"]
            if self.local:
                self.copies.accept(pending["local"])
            return fused
        log.warning("round %d: %s; the global model and adapters stay", rnd.number, problem)
        rnd.log.extra["fusion_fallback"] = problem
        if self.local:
            self.copies.accept({})
        return rnd.reference

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **super().tensors(),
            **{f"lora/base/{n}": w for n, w in self.base.items()},
            **{
                f"{self._adapter_head(r)}{k}": v
                for r, adapter in self.adapters.items()
                for k, v in adapter.items()
            },
            **self.copies.tensors(),
        }

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self.base = {
            k[len("lora/base/") :]: v for k, v in tensors.items() if k.startswith("lora/base/")
        }
        self._setup()
        assert self._fresh is not None
        order = list(self._fresh)
        self.adapters = {}
        for rank in set(self.ranks):
            head = self._adapter_head(rank)
            adapter = OrderedDict((k, tensors[head + k]) for k in order if head + k in tensors)
            if adapter:
                self.adapters[rank] = adapter
        self.copies.load(tensors, _part_keys(order, self.local))

    def _adapter_head(self, rank: int) -> str:
        """The checkpoint prefix of rank ``rank``'s adapters (``adapters.rank``'s: the plain
        ``lora/adapter/``)."""
        return "lora/adapter/" if rank == self.rank else f"lora/adapter@{rank}/"

    def state(self) -> dict[str, Any]:
        return {"lora_base_changed": self.base_changed, "lora_restore": sorted(self.copies.restore)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.base_changed = bool(state.get("lora_base_changed", False))
        self.copies.restore = {int(p) for p in state.get("lora_restore", [])}
