"""The server's align -> fuse -> repair pipeline as pure functions over the registries.

A ``Plan`` names one aligner (``align.ALIGNERS``), one fuse rule (``fusion.FUSE_RULES``) and one
repair rule (``repair.REPAIR_RULES``) with their options; which statistics the clients compute,
and in which phase, follows from what those entries declare:

- phase ``train`` (the clients' own trained models): e.g. ``grams`` for RegMean, ``fisher`` for
  Fisher averaging, ``moments`` as REPAIR's targets;
- phase ``align`` (a reference model broadcast with each client's own model): ``cross``
  (activation matching), ``preact-cross`` (closed-form REPAIR);
- phase ``repair`` (the fused candidate broadcast): ``bn`` or ``moments`` through reset layers.

Statistics arrive in each client's own basis; each statistic's registered ``permute`` moves it into
the aligned basis with the same permutations as the weights. ``aggregate`` reaches the clients only
through two query callables: Flower messages in a federation, direct calls in a study or an
offline merge of saved models (``aggregate_local``, behind ``fedalign merge``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedalign.algorithms.align import (
    ALIGNERS,
    Perms,
    PermutationSpec,
    apply_permutation,
    medoid,
    permutation_spec,
)
from fedalign.algorithms.checks import statistics_problem
from fedalign.algorithms.fusion import FUSE_RULES
from fedalign.algorithms.repair import REPAIR_RULES, FusedQuery, RepairInputs, Targets
from fedalign.algorithms.stats import (
    STATISTICS,
    StatContext,
    client_statistics,
    received_statistics,
)
from fedalign.core.registry import Context, Entry
from fedalign.core.types import ClientStats, StateDict, Stats
from fedalign.models import fit_to_state

PHASES = ("train", "align", "repair")


@dataclass(frozen=True)
class Plan:
    """The steps of one pipeline by registered name, with the options given for them (each step
    takes its own from ``options`` and defaults the rest, see ``Plan.options_of``). ``heads``:
    how the spec expresses attention heads (``permutation_spec``'s ``heads``; None: as the
    aligner takes them, see ``Plan.attention_heads``)."""

    align: str = "none"
    solver: str = "hungarian"
    fuse: str = "mean"
    repair: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)
    workers: int = 1
    device: str = "cpu"
    heads: str | None = None

    def steps(self) -> tuple[Entry, Entry, Entry]:
        """The aligner, fuse rule and repair rule (an unknown name raises ``RegistryError``)."""
        return ALIGNERS.get(self.align), FUSE_RULES.get(self.fuse), REPAIR_RULES.get(self.repair)

    @property
    def active(self) -> bool:
        """Whether the pipeline does more than FedAvg's weighted mean."""
        return (self.align, self.fuse, self.repair) != ("none", "mean", "none")

    @property
    def fuses_in_alignment(self) -> bool:
        """The aligner fuses by itself (PFNM): no fuse or repair step runs."""
        return bool(ALIGNERS.get(self.align).meta.get("fuses"))

    def statistics(self, phase: str) -> tuple[str, ...]:
        """What the clients compute in ``phase`` (empty: the phase does not run)."""
        kinds: dict[str, None] = {}
        for entry in self.steps():
            kinds.update(dict.fromkeys(entry.needs.get(phase, ())))
        return tuple(kinds)

    def train_statistics(self) -> tuple[str, ...]:
        return self.statistics("train")

    def align_statistics(self) -> tuple[str, ...]:
        return self.statistics("align")

    def repair_statistics(self) -> tuple[str, ...]:
        return self.statistics("repair")

    def for_round(self, number: int) -> Plan:
        """The plan round ``number`` runs: with ``stats_every: k`` (an option of the fuse rules
        that need statistics), the fuse rule's statistics are asked for and used in rounds 1,
        1 + k, ... only; the rounds between fuse the aligned models by their weighted mean.
        Likewise ``repair_every: k`` (REPAIR's option) runs the repair step in those rounds only.
        Why: RegMean's Grams cost several models' bytes and REPAIR's phase half a round, and what
        they fix (models from independent inits, or far apart) is largest in the first rounds;
        the weight matching itself needs no statistics."""
        plan = self
        every = int(self.options_of(FUSE_RULES.get(self.fuse)).get("stats_every", 1))
        if (number - 1) % every:
            plan = replace(plan, fuse="mean")
        every = int(self.options_of(REPAIR_RULES.get(self.repair)).get("repair_every", 1))
        if (number - 1) % every:
            plan = replace(plan, repair="none")
        return plan

    def attention_heads(self) -> str:
        """How the spec expresses attention heads (``permutation_spec``'s ``heads``): the plan's
        ``heads`` when given, else the aligner's ``meta["heads"]``, else ``both`` (heads move
        whole and their dimensions inside them)."""
        return self.heads or ALIGNERS.get(self.align).meta.get("heads", "both")

    def spec(self, model: nn.Module, example_input: torch.Tensor | None = None) -> PermutationSpec:
        """The permutation spec this plan aligns ``model`` in, traced on ``example_input`` (a
        batch of the clients' own input: token ids for a language model; default: guessed from
        the first layer), with attention heads as the aligner takes them."""
        return permutation_spec(model, example_input, heads=self.attention_heads())

    def align_target(self) -> str | None:
        """What the aligner aligns the clients to (its ``align_target`` option; None for an
        aligner without one): ``auto`` is ``robust`` when the fuse rule declares ``robust``, so
        that a minority the rule outvotes cannot choose the basis it compares in either, else
        ``weighted``."""
        target = self.options_of(ALIGNERS.get(self.align)).get("align_target")
        if target == "auto":
            return "robust" if FUSE_RULES.get(self.fuse).meta.get("robust") else "weighted"
        return target

    def options_of(self, entry: Entry) -> dict[str, Any]:
        return entry.resolve(self.options)

    def resolved_options(self) -> dict[str, Any]:
        """Every option the steps and their statistics take, with the value this plan uses."""
        entries = [*self.steps(), *(STATISTICS.get(k) for p in PHASES for k in self.statistics(p))]
        resolved: dict[str, Any] = {}
        for entry in entries:
            resolved.update(self.options_of(entry))
        return resolved

    def problems(self, context: Context) -> list[tuple[str, str]]:
        """``(step, reason)`` for every step that cannot run in ``context`` or with the others."""
        align, fuse, repair = self.steps()
        found = [
            (step, f"{entry.name}: {why}")
            for step, entry in zip(("align", "fuse", "repair"), self.steps())
            if (why := entry.problem(context))
        ]
        for step, entry in zip(("align", "fuse", "repair"), self.steps()):
            check = entry.meta.get("check")
            if check is not None and (why := check(self.options_of(entry), context)):
                found.append((step, f"{entry.name}: {why}"))
        for kind in dict.fromkeys(k for phase in PHASES for k in self.statistics(phase)):
            entry = STATISTICS.get(kind)
            check = entry.meta.get("options_problem")
            if check is not None and (why := check(self.options_of(entry))):
                found.append(("options", f"statistic {kind}: {why}"))
        if self.fuses_in_alignment and (fuse.name, repair.name) != ("mean", "none"):
            found.append(
                (
                    "align",
                    (
                        f"{align.name} fuses by itself and changes the widths: use fuse: mean, "
                        "repair: none"
                    ),
                )
            )
        if repair.meta.get("needs_alignment") and align.name == "none":
            found.append(("repair", f"{repair.name} corrects aligned fusions: set align"))
        return found


def _to(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    return {k: _to(v, device) for k, v in tree.items()}


def align(
    plan: Plan,
    spec: PermutationSpec,
    states: Sequence[StateDict],
    weights: Sequence[float],
    reference: int,
    cross: Sequence[ClientStats],
    seed: int,
) -> list[Perms]:
    """The plan's aligner, with its score matrices and solvers on ``plan.device`` (the server's
    GPU, when it has one); the permutations come back on the CPU."""
    entry = ALIGNERS.get(plan.align)
    if entry.meta.get("fuses"):
        raise ValueError(
            f"align {plan.align!r} is not a permutation alignment ({plan.align} fuses by itself)"
        )
    device = torch.device(plan.device)
    if device.type != "cpu":
        states, cross = (
            [_to(dict(sd), device) for sd in states],
            [_to(dict(c), device) for c in cross],
        )
    options = plan.options_of(entry)
    if "align_target" in options:
        options["align_target"] = plan.align_target()
    perms = entry.obj(
        spec,
        states,
        weights,
        reference=reference,
        cross=cross,
        solver=plan.solver,
        seed=seed,
        workers=plan.workers,
        **options,
    )
    return perms if device.type == "cpu" else [{g: p.cpu() for g, p in pm.items()} for pm in perms]


def permute_statistics(
    spec: PermutationSpec, perms: Perms, stats: Mapping[str, Stats], state: StateDict
) -> dict[str, Stats]:
    """A client's train-phase statistics in the aligned basis."""
    out: dict[str, Stats] = {}
    for kind, value in stats.items():
        permute = STATISTICS.get(kind).meta.get("permute")
        if permute is None:
            raise ValueError(f"no rule to align statistic {kind!r}")
        out[kind] = permute(spec, perms, value, state)
    return out


def fuse(
    plan: Plan, states: Sequence[StateDict], weights: Sequence[float], stats: Sequence[ClientStats]
) -> OrderedDict[str, torch.Tensor]:
    """The aligned states fused by the plan's rule."""
    entry = FUSE_RULES.get(plan.fuse)
    return entry.obj(states, weights, stats, **plan.options_of(entry))


CrossQuery = Callable[[int, list[int]], dict[int, ClientStats]]
"""``(reference index, other indices) -> {index: statistics}`` of the clients that answered."""


@dataclass
class Outcome:
    """The fused state, the clients kept (indices into the inputs) and a record for the logs."""

    state: OrderedDict[str, torch.Tensor]
    kept: list[int]
    info: dict


def check_inputs(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    weights: Sequence[float],
    stats: Sequence[ClientStats],
) -> None:
    """What ``aggregate`` is given, checked as the round checks a client's reply (it is public:
    a caller's states and statistics are untrusted too): one state, weight and statistics per
    client; every state holds the model's entries at their shapes, finite; weights finite and
    positive; statistics that pass their kind's check (a NaN or negative-definite Gram would
    otherwise reach a solver). ValueError names the client and the problem."""
    if not len(states) == len(weights) == len(stats) or not states:
        raise ValueError(
            f"aggregate needs one state, weight and statistics per client; got {len(states)} "
            f"states, {len(weights)} weights, {len(stats)} statistics"
        )
    for j, (state, weight, stat) in enumerate(zip(states, weights, stats)):
        if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight > 0):
            raise ValueError(f"client {j}: weight must be a finite number > 0, got {weight!r}")
        problem = _state_problem(spec, state) or statistics_problem(stat, state, None)
        if problem is not None:
            raise ValueError(f"client {j}: {problem}")


def _state_problem(spec: PermutationSpec, state: StateDict) -> str | None:
    """Missing, extra or misshapen entries against the model's spec, or a NaN or Inf."""
    if set(state) != set(spec.shapes):
        missing, extra = (
            sorted(set(spec.shapes) - set(state)),
            sorted(set(state) - set(spec.shapes)),
        )
        return f"missing entries {missing[:3]}" if missing else f"unexpected entries {extra[:3]}"
    for key, value in state.items():
        if tuple(value.shape) != tuple(spec.shapes[key]):
            return f"{key}: shape {tuple(value.shape)}, expected {tuple(spec.shapes[key])}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key}: contains NaN or Inf"
    return None


def aggregate(
    plan: Plan,
    spec: PermutationSpec,
    states: Sequence[StateDict],
    weights: Sequence[float],
    stats: Sequence[ClientStats],
    ask_cross: CrossQuery,
    ask_fused: FusedQuery,
    seed: int = 0,
) -> Outcome:
    """One server aggregation: align (asking the clients for cross-moments when the plan needs
    them), move the statistics into the aligned basis, fuse, repair (asking for statistics of the
    fused candidate when needed). The reference is the client with the largest weight, or when
    the alignment is robust (``Plan.align_target``) the medoid under a permutation-invariant
    distance (``align.medoid``): an example count is the client's own claim."""
    check_inputs(spec, states, weights, stats)
    kept = list(range(len(states)))
    target = plan.align_target()
    ref = medoid(spec, states) if target == "robust" else int(np.argmax(weights))
    cross: dict[int, ClientStats] = {}
    if plan.align_statistics():
        cross = ask_cross(ref, [j for j in kept if j != ref])
        kept = [j for j in kept if j == ref or j in cross]
    sub = [states[j] for j in kept]
    w = [weights[j] for j in kept]
    r = kept.index(ref)
    kept_cross = [cross.get(j, {}) for j in kept]
    perms = align(plan, spec, sub, w, r, kept_cross, seed)
    aligned = [apply_permutation(spec, p, sd) for p, sd in zip(perms, sub)]
    moved = [permute_statistics(spec, p, stats[j], sd) for p, j, sd in zip(perms, kept, sub)]
    fused = fuse(plan, aligned, w, moved)
    repair = REPAIR_RULES.get(plan.repair)
    fused, extra = repair.obj(
        fused,
        RepairInputs(spec, perms, w, moved, kept_cross, r, ask_fused),
        **plan.options_of(repair),
    )
    info: dict = {
        "align": plan.align,
        "fuse": plan.fuse,
        "repair": plan.repair,
        "reference": ref,
        **({"align_target": target} if target else {}),
        **extra,
    }
    return Outcome(fused, kept, info)


Sample = tuple[torch.Tensor, torch.Tensor]


def aggregate_local(
    plan: Plan,
    model: nn.Module,
    states: Sequence[StateDict],
    weights: Sequence[float],
    samples: Sequence[Sample],
    seed: int = 0,
) -> Outcome:
    """``aggregate`` with the clients' answers computed here: client ``j``'s statistics of its
    state on ``samples[j]`` (``(X, y)``), as a Flower client computes them on its data. For
    studies and offline merges of saved models; ``model`` gives the architecture, fitted to each
    state's widths (``models.fit_to_state``)."""
    template = copy.deepcopy(model)

    def loaded(state: StateDict) -> nn.Module:
        return fit_to_state(copy.deepcopy(template), dict(state))

    def measure(kinds: Sequence[str], state: StateDict, j: int, **context: Any) -> ClientStats:
        X, y = samples[j]
        sent = client_statistics(
            kinds, loaded(state), X, y, StatContext(seed=seed + j, **context), options=plan.options
        )
        return received_statistics(sent, state)

    def ask_cross(ref: int, others: list[int]) -> dict[int, ClientStats]:
        reference = loaded(states[ref])
        kinds = plan.align_statistics()
        return {j: measure(kinds, states[j], j, reference=reference) for j in others}

    def ask_fused(fused: OrderedDict, targets: Targets | None) -> list[ClientStats]:
        kinds = plan.repair_statistics()
        return [measure(kinds, fused, j, targets=targets) for j in range(len(states))]

    stats = [measure(plan.train_statistics(), s, j) for j, s in enumerate(states)]
    # traced on the clients' own input (token ids, images: dtype and shape as they train on)
    X = samples[0][0]
    spec = plan.spec(loaded(states[0]), X[:2] if len(X) else None)
    return aggregate(plan, spec, states, weights, stats, ask_cross, ask_fused, seed=seed)
