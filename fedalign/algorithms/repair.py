"""Repairing a fused model's activation statistics (no Flower).

Averaging aligned networks shrinks the variance of their hidden units ("variance collapse",
Jordan et al. 2023): the fused model's pre-activations are narrower than either endpoint's, and the
loss rises. REPAIR rescales every hidden channel of the fused model so that its mean and standard
deviation match the weighted mean of the endpoints' (``repair_targets``), and folds the per-channel
affine map into the layer's weight and bias, so the repaired model has the architecture it had.

- ``repair``: the fused model's own statistics come from a pass over data (in a federation: each
  client measures the broadcast fused model with ``stats.activation_moments(..., targets=...)``,
  which normalises every layer to its target as it goes, and the server adds the sums);
- ``repair_closed_form``: no pass over the fused model; its statistics are predicted from the
  endpoints' statistics and the correlations of matched units, as if the fused pre-activation were
  the weighted mean of the endpoints' (exact for the first layer);
- ``bn_reset_from_stats``: BatchNorm networks need only their running statistics re-estimated
  from pooled moments of the BatchNorm inputs.

The layers REPAIR tracks are derived from the model (``stats.hidden_layers``): pre-activations of
biased Linear/Conv2d layers and outputs of norms with a per-channel affine (a bias-free conv is
corrected through the norm after it), so every correction folds into one module's parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedalign.algorithms.align.activation_matching import correlation
from fedalign.algorithms.align.spec import Perms, PermutationSpec
from fedalign.algorithms.checks import cross_problem, moments_problem
from fedalign.algorithms.stats import (
    STATISTICS,
    Moments,
    StatContext,
    activation_moments,
    add_moments,
    batchnorm_input_moments,
    hidden_layers,
    mean_std,
    preactivation_cross_moments,
)
from fedalign.core.options import Range
from fedalign.core.registry import Context, Registry
from fedalign.core.tensors import normalised_weights
from fedalign.core.types import ClientStats, StateDict, Stats

Targets = dict[str, tuple[torch.Tensor, torch.Tensor]]


def repair_targets(
    endpoint_moments: Sequence[Mapping[str, Moments]], weights: Sequence[float] | None = None
) -> Targets:
    """Per layer, ``(sum_k w_k mu_k, sum_k w_k sigma_k)`` over the endpoints' channel statistics
    (each endpoint's moments in the aligned basis)."""
    w = normalised_weights(weights, len(endpoint_moments))
    targets: Targets = {}
    for name in endpoint_moments[0]:
        pairs = [mean_std(m[name]) for m in endpoint_moments]
        targets[name] = (
            sum(wk * mu for wk, (mu, _) in zip(w, pairs)),
            sum(wk * sd for wk, (_, sd) in zip(w, pairs)),
        )
    return targets


def fold_affine(
    state: StateDict, name: str, scale: torch.Tensor, shift: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Entries of layer ``name`` computing ``scale * (W x + b) + shift`` per output channel (for a
    norm, ``W x`` is its per-channel affine of the normalised input)."""
    weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
    if weight is None or bias is None:
        raise ValueError(f"layer {name!r} has no weight and bias to fold a per-channel affine into")
    s = scale.to(torch.float64)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return {
        f"{name}.weight": (weight.double() * s.reshape(shape)).to(weight.dtype),
        f"{name}.bias": (bias.double() * s + shift.double()).to(bias.dtype),
    }


def repair(
    state: StateDict, targets: Targets, fused_moments: Mapping[str, Moments], eps: float = 1e-5
) -> OrderedDict:
    """The fused ``state`` with every layer in ``targets`` rescaled so that its channel statistics
    (``fused_moments``, measured on the fused model) become the targets."""
    out = OrderedDict(state)
    for name, (goal_mean, goal_std) in targets.items():
        if name not in fused_moments:
            raise ValueError(f"no statistics of the fused model for layer {name!r}")
        mean, std = mean_std(fused_moments[name])
        scale = goal_std / (std + eps)
        out.update(fold_affine(out, name, scale, goal_mean - mean * scale))
    return out


def repair_closed_form(
    state: StateDict,
    endpoint_moments: Sequence[Mapping[str, Moments]],
    correlations: Mapping[str, torch.Tensor],
    weights: Sequence[float] | None = None,
    eps: float = 1e-5,
) -> OrderedDict:
    """REPAIR without a pass over the fused model. ``correlations[layer]`` is ``(J, J, C)``: the
    correlation of matched unit ``c`` between endpoints ``k`` and ``l`` (for two endpoints a
    ``(C,)`` tensor is accepted). The fused channel is predicted to have mean ``sum_k w_k mu_k``
    and variance ``sum_kl w_k w_l s_k s_l rho_kl``; it is rescaled to std ``sum_k w_k s_k``."""
    w = normalised_weights(weights, len(endpoint_moments)).double()
    out = OrderedDict(state)
    missing = sorted(set(endpoint_moments[0]) - set(correlations))
    if missing:
        raise ValueError(f"no matched-unit correlations for layers {missing}")
    for name in endpoint_moments[0]:
        stats = [mean_std(m[name]) for m in endpoint_moments]
        mu = torch.stack([m for m, _ in stats]).double()  # (J, C)
        sd = torch.stack([s for _, s in stats]).double()
        rho = correlations[name].double()
        if rho.dim() == 1:
            if len(stats) != 2:
                raise ValueError(f"layer {name!r}: a (C,) correlation needs exactly 2 endpoints")
            rho = torch.stack(
                [torch.stack([torch.ones_like(rho), rho]), torch.stack([rho, torch.ones_like(rho)])]
            )
        if rho.shape != (len(stats), len(stats), mu.shape[1]):
            raise ValueError(
                f"layer {name!r}: correlations are {tuple(rho.shape)}, "
                f"expected ({len(stats)}, {len(stats)}, {mu.shape[1]})"
            )
        ws = w[:, None] * sd  # (J, C)
        expected_std = torch.einsum("kc,klc,lc->c", ws, rho, ws).clamp_min(0).sqrt()
        goal_mean, goal_std = (w[:, None] * mu).sum(0), ws.sum(0)
        scale = goal_std / (expected_std + eps)
        out.update(fold_affine(out, name, scale, goal_mean - goal_mean * scale))
    return out


def bn_reset_from_stats(
    model_or_state: nn.Module | StateDict, bn_moments: Mapping[str, Moments]
) -> OrderedDict:
    """The state of a model (or a state dict) with its BatchNorm running statistics set from
    pooled moments of their inputs (``stats.batchnorm_input_moments`` summed over clients; the
    variance unbiased, as torch keeps it); ``num_batches_tracked`` is left as it is. Load the
    result into the model. The variance is the union's, spread between the clients' means
    included; ``analysis.reset_bn_statistics`` over several batches averages the batches'
    variances instead (the means agree for equal batches)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out = OrderedDict(state)
    for name, m in bn_moments.items():
        if f"{name}.running_mean" not in out:
            raise ValueError(
                f"statistics for {name!r}, which has no running statistics in the model"
            )
        n = m["count"].clamp_min(2.0)
        mean = m["sum"] / n
        var = (m["sumsq"] - n * mean**2).clamp_min(0.0) / (n - 1)
        like = out[f"{name}.running_mean"]
        out[f"{name}.running_mean"] = mean.to(like.dtype)
        out[f"{name}.running_var"] = var.to(like.dtype)
    return out


bn_reset = bn_reset_from_stats  # the name the studies call


def repair_with_data(
    fused: nn.Module,
    endpoints: Sequence[nn.Module],
    X: torch.Tensor,
    weights: Sequence[float] | None = None,
) -> OrderedDict:
    """REPAIR outside a federation: endpoint and fused statistics measured on the same ``X``
    (``endpoints`` aligned to ``fused``); returns the repaired state of ``fused``."""
    layers = hidden_layers(fused)
    endpoint_moments = [activation_moments(m, X, layers) for m in endpoints]
    targets = repair_targets(endpoint_moments, weights)
    return repair(
        fused.state_dict(), targets, activation_moments(fused, X, layers, targets=targets)
    )


# ---- the statistics repair consumes, and how they move into the aligned basis -------------------


def output_group(spec: PermutationSpec, layer: str) -> str | None:
    """The group carried by the output channels of Linear/Conv2d ``layer`` (None: unpermuted)."""
    axes = spec.axes_of(f"{layer}.weight")
    return axes[0][0] if 0 in axes else None


def permute_moments(
    spec: PermutationSpec,
    perms: Perms,
    moments: Mapping[str, Moments],
    state: StateDict | None = None,
) -> dict[str, Moments]:
    """Channel moments of each layer reordered like the layer's output units."""
    out = {}
    for layer, m in moments.items():
        group = output_group(spec, layer)
        out[layer] = (
            dict(m)
            if group is None
            else {k: v if v.dim() == 0 else v[perms[group]] for k, v in m.items()}
        )
    return out


def _moments(model: nn.Module, X: torch.Tensor, y: torch.Tensor, context: StatContext) -> Stats:
    return activation_moments(model, X, targets=context.targets)


def _bn(model: nn.Module, X: torch.Tensor, y: torch.Tensor, context: StatContext) -> Stats:
    return batchnorm_input_moments(model, X)


def _preact_cross(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, context: StatContext
) -> Stats:
    return preactivation_cross_moments(context.reference_model(), model, X)


def _channels(state: StateDict, layer: str, entry: str) -> int:
    """The channels of ``layer`` by its ``entry`` (KeyError: the model has no such layer)."""
    if f"{layer}.{entry}" not in state:
        raise KeyError(f"the model has no entry {layer}.{entry}")
    return int(state[f"{layer}.{entry}"].shape[0])


def check_moments(moments: Stats, state: StateDict, examples: int) -> str | None:
    """Per layer, moments of as many channels as the layer has outputs."""
    return next(
        (
            p
            for layer, m in moments.items()
            if (p := moments_problem(layer, m, _channels(state, layer, "weight"), examples))
        ),
        None,
    )


def check_bn(moments: Stats, state: StateDict, examples: int) -> str | None:
    """Per BatchNorm, moments of as many channels as its running statistics."""
    return next(
        (
            p
            for layer, m in moments.items()
            if (p := moments_problem(layer, m, _channels(state, layer, "running_mean"), examples))
        ),
        None,
    )


def check_preact_cross(cross: Stats, state: StateDict, examples: int) -> str | None:
    """Per layer, cross sums of the reference's and the model's outputs, unit by unit."""
    for layer, c in cross.items():
        units = _channels(state, layer, "weight")
        if (problem := cross_problem(layer, c, (units, units), examples)) is not None:
            return problem
    return None


STATISTICS.register("moments", _moments, permute=permute_moments, check=check_moments)
STATISTICS.register("bn", _bn, permute=None, check=check_bn)
STATISTICS.register("preact-cross", _preact_cross, permute=None, check=check_preact_cross)


def matched_correlations(
    preact_cross: Stats, spec: PermutationSpec, perms: Perms
) -> dict[str, torch.Tensor]:
    """Per layer, the correlation of each reference unit with the client unit aligned to it
    (``corr[i, perm[i]]``), from pre-activation cross-moments taken before alignment."""
    out = {}
    for layer, s in preact_cross.items():
        corr = correlation(s)
        group = output_group(spec, layer)
        index = torch.arange(len(corr)) if group is None else perms[group]
        out[layer] = corr[torch.arange(len(corr)), index]
    return out


# ---- repair rules: the pipeline's last step ------------------------------------------------------

FusedQuery = Callable[[OrderedDict, "Targets | None"], list[ClientStats]]
"""``(fused state, REPAIR targets or None) -> each answering client's statistics of it``."""


@dataclass(frozen=True)
class RepairInputs:
    """What a repair rule may use: the spec and the permutations that aligned each kept client,
    their weights, their train-phase statistics in the aligned basis, their align-phase answers
    (in their own basis), the reference's index, and a query for statistics of the fused model."""

    spec: PermutationSpec
    perms: Sequence[Perms]
    weights: Sequence[float]
    stats: Sequence[ClientStats]
    cross: Sequence[ClientStats]
    reference: int
    ask_fused: FusedQuery


REPAIR_RULES = Registry("repair rule")
"""Name -> ``rule(fused, inputs: RepairInputs) -> (state, info)``; ``needs`` per phase, and
``meta["needs_alignment"]`` for rules that correct aligned fusions only."""


def _has_bn(context: Context) -> bool:
    return any(isinstance(m, _BatchNorm) for m in context.model.modules())


def _needs_bn(context: Context) -> str | None:
    return (
        None
        if _has_bn(context)
        else "bn-reset re-estimates BatchNorm statistics; the model has none"
    )


def _no_bn(context: Context) -> str | None:
    return (
        "rescales layers of networks without normalisation; use bn-reset"
        if _has_bn(context)
        else None
    )


def _pairs_only(context: Context) -> str | None:
    return _no_bn(context) or (
        None
        if context.clients_per_round == 2
        else "needs the correlations of every pair of models: it runs with exactly 2 "
        f"clients a round, not {context.clients_per_round} (use repair for more)"
    )


REPAIR_EVERY = 5
"""Rounds between two rounds with REPAIR's phase (rounds 1, 6, ...): its broadcast of the fused
candidate costs half a FedAvg round of bytes, and what it fixes (the variance collapse of fusing
models from independent inits) is in the first round; on Fashion-MNIST from own inits it gave
round 1 +0.9 points and the later rounds nothing (docs/fidelity.md)."""


@REPAIR_RULES.register("none")
def no_repair(fused: OrderedDict, inputs: RepairInputs) -> tuple[OrderedDict, dict[str, Any]]:
    return fused, {}


@REPAIR_RULES.register("bn-reset", needs={"repair": ("bn",)}, supports=_needs_bn)
def bn_reset_rule(fused: OrderedDict, inputs: RepairInputs) -> tuple[OrderedDict, dict[str, Any]]:
    """BatchNorm running statistics from the clients' pooled moments of the fused model."""
    answers = inputs.ask_fused(fused, None)
    if not answers:
        return fused, {"repair_skipped": "no client answered the repair phase"}
    return bn_reset_from_stats(fused, _pool([a["bn"] for a in answers])), {}


@REPAIR_RULES.register(
    "repair",
    needs={"train": ("moments",), "repair": ("moments",)},
    supports=_no_bn,
    needs_alignment=True,
)
def repair_rule(
    fused: OrderedDict,
    inputs: RepairInputs,
    *,
    repair_every: Annotated[int, Range(low=1)] = REPAIR_EVERY,
) -> tuple[OrderedDict, dict[str, Any]]:
    """REPAIR: targets from the clients' own models, the fused model measured by the clients
    (``repair_every``: the rounds that run it, see ``pipeline.Plan.for_round``)."""
    targets = repair_targets([s["moments"] for s in inputs.stats], inputs.weights)
    answers = inputs.ask_fused(fused, targets)
    if not answers:
        return fused, {"repair_skipped": "no client answered the repair phase"}
    return repair(fused, targets, _pool([a["moments"] for a in answers])), {}


@REPAIR_RULES.register(
    "repair-closed-form",
    needs={"train": ("moments",), "align": ("preact-cross",)},
    supports=_pairs_only,
    needs_alignment=True,
)
def closed_form_rule(
    fused: OrderedDict, inputs: RepairInputs
) -> tuple[OrderedDict, dict[str, Any]]:
    """Closed-form REPAIR of two models from the correlations of their matched units."""
    other = 1 - inputs.reference
    rho = matched_correlations(
        inputs.cross[other]["preact-cross"], inputs.spec, inputs.perms[other]
    )
    return repair_closed_form(fused, [s["moments"] for s in inputs.stats], rho, inputs.weights), {}


def _pool(parts: Sequence[Mapping[str, Moments]]) -> dict[str, Moments]:
    pooled = dict(parts[0])
    for part in parts[1:]:
        pooled = add_moments(pooled, part)
    return pooled


__all__ = [
    "REPAIR_RULES",
    "RepairInputs",
    "bn_reset",
    "bn_reset_from_stats",
    "fold_affine",
    "hidden_layers",
    "matched_correlations",
    "permute_moments",
    "repair",
    "repair_closed_form",
    "repair_targets",
    "repair_with_data",
]
