"""RegMean, dataless knowledge fusion (Jin et al. 2023), for Linear and Conv2d layers.

For a layer with inputs ``X_i`` on client ``i``, the fused weight minimises
``sum_i ||X_i W - X_i W_i||^2``, so ``W^T = (sum_i G_i)^-1 sum_i G_i W_i^T`` with
``G_i = X_i^T X_i`` (``fedalign.algorithms.stats.gram_matrices``): the clients send Gram matrices,
never data. Each ``G_i``'s off-diagonal entries are scaled by ``alpha`` (``alpha = 1``: exact least
squares; smaller values pull towards a per-input-weighted mean, which the paper found more robust
across non-IID clients). The system is solved by Cholesky with a ridge relative to the mean diagonal
(dead inputs make the sum singular), never by an explicit inverse. Grams carry a constant-1 input
column last (its diagonal entry is the count): for a layer with a bias it is the bias's input, so
weight and bias are solved together; for a layer without one it is dropped. Every entry without a
Gram (norms, buffers, the biases of layers without one) is averaged with ``weights``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Annotated

import torch
from torch import nn

from fedalign.algorithms.align.spec import AxisRef, Perms, PermutationSpec, expand_index
from fedalign.algorithms.align.trace import permutation_spec
from fedalign.algorithms.checks import gram_problem
from fedalign.algorithms.stats import (
    STATISTICS,
    StatContext,
    gram_count,
    gram_matrices,
    linear_layers,
)
from fedalign.core.options import Range
from fedalign.core.tensors import weighted_average
from fedalign.core.types import ClientStats, StateDict

from .gram_transport import pack, unpack
from .rules import FUSE_RULES, no_recurrent_layers

ALPHA = 0.9
"""Off-diagonal scaling of the Grams (the paper's recommended range; 1 is exact least squares)."""
RIDGE = 1e-2
"""Ridge relative to the mean diagonal. Over rounds, what diverged (docs/benchmarks.md at 1e-4, and
at any ridge on skewed clients, docs/fidelity.md) was the output layer: see ``regmean_output``."""
GRAM_BUDGET = 0.5
"""Values a client sends for a layer's Gram per value of the layer's weight (``gram_transport``):
the 785 x 785 input Gram of an MLP 784-100-10 goes as a rank-48 factor and its diagonal, and a
round with Grams costs at most 1.25x FedAvg's bytes (1.75x with REPAIR's phase) instead of 4.9x."""
STATS_EVERY = 5
"""Rounds between two rounds with Grams: a 785 x 785 input Gram in float32 is 7.8 MLP-784-100-10
models, so every round would cost 5-10x FedAvg's bytes; one in five keeps RegMean's accuracy on
skewed clients at under 2x (docs/fidelity.md)."""


def _augmented(state: StateDict, name: str, with_bias: bool) -> torch.Tensor:
    """(out, D [+1]): the layer's weight flattened per output unit, its bias as the last column."""
    w = state[f"{name}.weight"].double()
    w = w.reshape(w.shape[0], -1)
    return torch.cat([w, state[f"{name}.bias"].double()[:, None]], dim=1) if with_bias else w


def expand_channel_gram(gram: torch.Tensor, kernel_positions: int) -> torch.Tensor:
    """The full patch Gram approximated from a channel Gram: ``G_c (x) I_k`` over the
    ``C*kh*kw`` patch entries, and the constant column's sums repeated over the kernel positions."""
    c = gram.shape[0] - 1
    full = torch.kron(gram[:c, :c], torch.eye(kernel_positions, dtype=gram.dtype))
    border = gram[:c, c].repeat_interleave(kernel_positions)
    top = torch.cat([full, border[:, None]], dim=1)
    return torch.cat([top, torch.cat([border, gram[c:, c]])[None, :]], dim=0)


def _scaled(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    diagonal = torch.diag_embed(torch.diagonal(gram))
    return alpha * gram + (1.0 - alpha) * diagonal


def _solve(G: torch.Tensor, B: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_T  tr(T^T G T) - 2 tr(T^T B) + r ||T - prior||^2`` with
    ``r = ridge * mean(diag G)``: ``(G + r I)^-1 (B + r prior)``. The ridge pulls directions no
    client's data reaches (dead inputs, whose Gram rows are zero) to the weighted mean instead of
    to zero. Solved by Cholesky; if the factorisation fails (ridge 0 and a singular sum), by SVD
    least squares: LAPACK's default QR-based ``gelsy`` returned a wrong solution for such a
    singular Gram system."""
    reg = ridge * torch.diagonal(G).mean().clamp_min(1e-12)
    A = G + reg * torch.eye(len(G), dtype=G.dtype)
    rhs = B + reg * prior
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, L)
    return torch.linalg.lstsq(A, rhs, driver="gelsd").solution


def regmean(
    state_dicts: Sequence[StateDict],
    grams: Sequence[Mapping[str, torch.Tensor]],
    alpha: float = ALPHA,
    weights: Sequence[float] | None = None,
    ridge: float = RIDGE,
) -> OrderedDict[str, torch.Tensor]:
    """RegMean over the layers every client has a Gram for; the rest is the weighted mean.

    ``grams[j]`` maps a Linear/Conv2d module name to client ``j``'s input Gram as
    ``stats.gram_matrices`` computes it (full, or a channel Gram for a conv, recognised by its
    size; the constant column last). The state dicts must be aligned already.
    """
    if len(state_dicts) != len(grams):
        raise ValueError(f"got {len(grams)} sets of Grams for {len(state_dicts)} state dicts")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    fused = weighted_average(state_dicts, weights)
    layers = set(grams[0])
    for j, g in enumerate(grams):
        if set(g) != layers:
            raise ValueError(
                f"client {j} sent Grams for {sorted(g)}, client 0 for {sorted(layers)}"
            )
    for name in sorted(layers):
        if f"{name}.weight" not in fused:
            raise ValueError(f"Gram for {name!r}, but the model has no entry {name}.weight")
        weight = state_dicts[0][f"{name}.weight"]
        with_bias = f"{name}.bias" in fused
        positions = int(torch.tensor(weight.shape[2:]).prod()) if weight.dim() > 2 else 1
        size = weight[0].numel() + 1  # the inputs and the constant column
        dim = size - 1 + int(with_bias)  # the unknowns per output unit
        lhs = torch.zeros(dim, dim, dtype=torch.float64)
        rhs = torch.zeros(dim, weight.shape[0], dtype=torch.float64)
        for sd, g in zip(state_dicts, grams):
            G = g[name].double()
            if len(G) != size and positions > 1:
                G = expand_channel_gram(G, positions)
            if G.shape != (size, size):
                raise ValueError(
                    f"Gram of {name!r} is {tuple(G.shape)}, the layer needs ({size}, {size})"
                )
            G = _scaled(G[:dim, :dim], alpha)
            lhs += G
            rhs += G @ _augmented(sd, name, with_bias).T
        theta = _solve(lhs, rhs, _augmented(fused, name, with_bias).T, ridge).T  # (out, D [+1])
        if with_bias:
            fused[f"{name}.bias"] = theta[:, -1].to(weight.dtype)
            theta = theta[:, :-1]
        fused[f"{name}.weight"] = theta.reshape(weight.shape).to(weight.dtype)
    return fused


def input_index(
    spec: PermutationSpec,
    perms: Perms,
    name: str,
    weight_shape: tuple[int, ...],
    channel_gram: bool = False,
) -> torch.Tensor | None:
    """The permutation of a layer's Gram rows/columns that ``apply_permutation(spec, perms, .)``
    applies to its inputs (None when its input axis is not permuted): the input group's
    permutation expanded over the kernel positions of a conv's patches (blocks of ``kh*kw``), the
    spatial positions of a flattened conv output (the spec's block), and the constant column
    kept last."""
    axes = spec.axes_of(f"{name}.weight")
    if 1 not in axes or axes[1][0] not in perms:
        return None
    group, ref = axes[1]
    positions = (
        1
        if channel_gram
        else int(torch.tensor(weight_shape[2:]).prod())
        if len(weight_shape) > 2
        else 1
    )
    flat = AxisRef(ref.key, 1, block=ref.block * positions, repeat=ref.repeat)
    index = expand_index(perms[group], flat)
    return torch.cat([index, torch.tensor([len(index)])])


def permute_grams(
    spec: PermutationSpec, perms: Perms, grams: Mapping[str, torch.Tensor], state: StateDict
) -> dict[str, torch.Tensor]:
    """A client's Grams moved into the aligned basis: rows and columns permuted as its layers'
    inputs are (clients send Grams in their own basis; the server aligns them with the weights)."""
    out = {}
    for name, G in grams.items():
        if f"{name}.weight" not in state:
            raise ValueError(f"Gram for {name!r}, but the model has no entry {name}.weight")
        shape = tuple(state[f"{name}.weight"].shape)
        full = state[f"{name}.weight"][0].numel() + 1
        index = input_index(spec, perms, name, shape, channel_gram=len(G) != full)
        out[name] = G if index is None else G[index][:, index]
    return out


_OUTPUT_LAYERS: dict[tuple, frozenset[str]] = {}


def output_layers(model: nn.Module) -> frozenset[str]:
    """The Linear/Conv2d modules whose outputs no permutation acts on: the model's outputs
    (from its traced permutation spec, remembered per architecture: a client computes Grams
    every round and tracing costs more than a small model's Grams)."""
    layers = linear_layers(model)
    key = (type(model).__qualname__, *((n, tuple(m.weight.shape)) for n, m in layers.items()))
    if key not in _OUTPUT_LAYERS:
        spec = permutation_spec(model)
        _OUTPUT_LAYERS[key] = frozenset(
            name for name in layers if 0 not in spec.axes_of(f"{name}.weight")
        )
    return _OUTPUT_LAYERS[key]


def grams_options_problem(options: Mapping[str, object]) -> str | None:
    """Why the Grams' options are unusable (None: usable): checked when a config is loaded, so a
    bad value stops the run before round 1 instead of failing every client in it."""
    if options["gram_conv"] not in ("full", "channel"):
        return f"gram_conv must be 'full' or 'channel', got {options['gram_conv']!r}"
    if options["regmean_output"] not in ("mean", "regmean"):
        return f"regmean_output must be 'mean' or 'regmean', got {options['regmean_output']!r}"
    budget = options["gram_budget"]
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0
    ):
        return f"gram_budget must be a number > 0 or null, got {budget!r}"
    return None


def _grams(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    context: StatContext,
    *,
    gram_conv: str = "full",
    regmean_output: str = "mean",
    gram_budget: float | None = GRAM_BUDGET,
) -> dict[str, dict[str, torch.Tensor]]:
    """Layer-input Grams, accumulated in float64 and sent in float32 (half the bytes; the solve
    runs in float64 with a ridge far above float32's rounding), each packed by
    ``gram_transport.pack``: its upper triangle, or a low-rank factor and its diagonal when the
    triangle holds more than ``gram_budget`` values per value of the layer's weight (None: always
    the triangle). ``gram_conv="channel"`` keeps only channel-by-channel blocks of large convs
    (``G_c (x) I_k``).

    ``regmean_output="mean"`` (the default) sends none for the output layer, which the server then
    averages. Why: on label-skewed clients the output layer's least-squares fit to the clients'
    own logits has large weights along the directions that separate the clients' hidden features
    (the clients disagree most there), and training from it every round compounds that: the test
    loss of weight matching + RegMean grew threefold in 10 rounds on digits, and 10-100x on
    Fashion-MNIST at ridge 1e-4 and 1e-2 alike, while with the output layer averaged it kept
    falling (docs/fidelity.md). ``"regmean"`` solves it too (the one-shot studies' setting, where
    it carries most of RegMean's gain from independent inits)."""
    options = {"gram_conv": gram_conv, "regmean_output": regmean_output, "gram_budget": gram_budget}
    if (problem := grams_options_problem(options)) is not None:
        raise ValueError(problem)
    grams = gram_matrices(model, X, conv=gram_conv)
    skip = output_layers(model) if regmean_output == "mean" else set()
    layers = linear_layers(model)
    return {
        name: pack(G, layers[name].weight.numel(), gram_budget)
        for name, G in grams.items()
        if name not in skip
    }


def gram_sizes(state: StateDict, name: str) -> tuple[int, ...]:
    """The sizes a Gram of layer ``name`` may have: full (its inputs plus the constant column),
    and for a conv the channel Gram's. Raises ValueError when the model has no such layer."""
    if f"{name}.weight" not in state:
        raise ValueError(f"{name}: the model has no entry {name}.weight")
    weight = state[f"{name}.weight"]
    return (weight[0].numel() + 1, *((weight.shape[1] + 1,) if weight.dim() > 2 else ()))


def unpack_grams(packed: Mapping[str, object], state: StateDict) -> dict[str, torch.Tensor]:
    """The Grams a client sent (``_grams``), unpacked for a model shaped like ``state``; every size
    checked against the layer before anything is built (``gram_transport.unpack``)."""
    if not isinstance(packed, Mapping):
        raise TypeError(f"expected Grams per layer, got {type(packed).__name__}")
    return {name: unpack(name, value, gram_sizes(state, name)) for name, value in packed.items()}


def check_grams(grams: Mapping[str, torch.Tensor], state: StateDict, examples: int) -> str | None:
    """Each Gram (unpacked) is one of a layer of the model, of the full or (conv) channel size,
    and a Gram (``algorithms.checks.gram_problem``): a negative-definite or NaN one would wreck the
    solve."""
    for name, gram in grams.items():
        try:
            sizes = gram_sizes(state, name)
        except ValueError as exc:
            return str(exc)
        if (problem := gram_problem(name, gram, sizes, examples)) is not None:
            return problem
    return None


def gram_scale(grams: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, the mean squared input norm (plus 1, the constant column): the trace per row."""
    return {name: float(torch.diagonal(G).sum() / G[-1, -1]) for name, G in grams.items()}


def gram_counts(grams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, the rows the Gram sums (its constant column's diagonal entry): the server
    checks it is exactly the rows the model gives per example times the client's examples."""
    return {name: gram_count(G) for name, G in grams.items()}


STATISTICS.register(
    "grams",
    _grams,
    decode=unpack_grams,
    options_problem=grams_options_problem,
    permute=permute_grams,
    check=check_grams,
    scale=gram_scale,
    count=gram_counts,
)


@FUSE_RULES.register("regmean", needs={"train": ("grams",)}, supports=no_recurrent_layers)
def regmean_rule(
    states: Sequence[StateDict],
    weights: Sequence[float],
    stats: Sequence[ClientStats],
    *,
    regmean_alpha: Annotated[float, Range(0, 1)] = ALPHA,
    ridge: Annotated[float, Range(low=0)] = RIDGE,
    stats_every: Annotated[int, Range(low=1)] = STATS_EVERY,
) -> OrderedDict[str, torch.Tensor]:
    """RegMean on the clients' Grams (``regmean_alpha``: off-diagonal scaling, ``ridge``: relative
    ridge; ``stats_every``: the rounds that ask for Grams, see ``pipeline.Plan.for_round``)."""
    return regmean(
        states, [s["grams"] for s in stats], alpha=regmean_alpha, weights=weights, ridge=ridge
    )
