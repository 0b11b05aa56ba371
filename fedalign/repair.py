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
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedalign.fusion.mean import normalised_weights
from fedalign.stats import Moments, activation_moments, hidden_layers, mean_std

StateDict = Mapping[str, torch.Tensor]
Targets = dict[str, tuple[torch.Tensor, torch.Tensor]]


def repair_targets(endpoint_moments: Sequence[Mapping[str, Moments]], weights: Sequence[float] | None = None) -> Targets:
    """Per layer, ``(sum_k w_k mu_k, sum_k w_k sigma_k)`` over the endpoints' channel statistics
    (each endpoint's moments in the aligned basis)."""
    w = normalised_weights(weights, len(endpoint_moments))
    targets: Targets = {}
    for name in endpoint_moments[0]:
        pairs = [mean_std(m[name]) for m in endpoint_moments]
        targets[name] = (sum(wk * mu for wk, (mu, _) in zip(w, pairs)),
                         sum(wk * sd for wk, (_, sd) in zip(w, pairs)))
    return targets


def fold_affine(state: StateDict, name: str, scale: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entries of layer ``name`` computing ``scale * (W x + b) + shift`` per output channel (for a
    norm, ``W x`` is its per-channel affine of the normalised input)."""
    weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
    if weight is None or bias is None:
        raise ValueError(f"layer {name!r} has no weight and bias to fold a per-channel affine into")
    s = scale.to(torch.float64)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return {f"{name}.weight": (weight.double() * s.reshape(shape)).to(weight.dtype),
            f"{name}.bias": (bias.double() * s + shift.double()).to(bias.dtype)}


def repair(state: StateDict, targets: Targets, fused_moments: Mapping[str, Moments], eps: float = 1e-5) -> OrderedDict:
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
        mu = torch.stack([m for m, _ in stats]).double()          # (J, C)
        sd = torch.stack([s for _, s in stats]).double()
        rho = correlations[name].double()
        if rho.dim() == 1:
            if len(stats) != 2:
                raise ValueError(f"layer {name!r}: a (C,) correlation needs exactly 2 endpoints")
            rho = torch.stack([torch.stack([torch.ones_like(rho), rho]), torch.stack([rho, torch.ones_like(rho)])])
        if rho.shape != (len(stats), len(stats), mu.shape[1]):
            raise ValueError(f"layer {name!r}: correlations are {tuple(rho.shape)}, "
                             f"expected ({len(stats)}, {len(stats)}, {mu.shape[1]})")
        ws = w[:, None] * sd                                         # (J, C)
        expected_std = torch.einsum("kc,klc,lc->c", ws, rho, ws).clamp_min(0).sqrt()
        goal_mean, goal_std = (w[:, None] * mu).sum(0), ws.sum(0)
        scale = goal_std / (expected_std + eps)
        out.update(fold_affine(out, name, scale, goal_mean - goal_mean * scale))
    return out


def bn_reset_from_stats(model_or_state: nn.Module | StateDict, bn_moments: Mapping[str, Moments]) -> OrderedDict:
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
            raise ValueError(f"statistics for {name!r}, which has no running statistics in the model")
        n = m["count"].clamp_min(2.0)
        mean = m["sum"] / n
        var = (m["sumsq"] - n * mean**2).clamp_min(0.0) / (n - 1)
        like = out[f"{name}.running_mean"]
        out[f"{name}.running_mean"] = mean.to(like.dtype)
        out[f"{name}.running_var"] = var.to(like.dtype)
    return out


bn_reset = bn_reset_from_stats  # the name fusion.pipeline and the studies call


def repair_with_data(
    fused: nn.Module, endpoints: Sequence[nn.Module], X: torch.Tensor, weights: Sequence[float] | None = None,
) -> OrderedDict:
    """REPAIR outside a federation: endpoint and fused statistics measured on the same ``X``
    (``endpoints`` aligned to ``fused``); returns the repaired state of ``fused``."""
    layers = hidden_layers(fused)
    endpoint_moments = [activation_moments(m, X, layers) for m in endpoints]
    targets = repair_targets(endpoint_moments, weights)
    return repair(fused.state_dict(), targets, activation_moments(fused, X, layers, targets=targets))


__all__ = ["bn_reset", "bn_reset_from_stats", "fold_affine", "hidden_layers", "repair", "repair_closed_form",
           "repair_targets", "repair_with_data"]
