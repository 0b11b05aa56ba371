"""Statistics a client computes on its own data, for fusion rules and repair that need data.

The server never sees data: it asks the clients for sums over their examples and adds them up.
Everything here is therefore a *sum* (or carries its count), so the statistics of the union of
the clients' data are the sum of the clients' statistics:

- ``activation_moments``: per output channel of every layer REPAIR can correct
  (``hidden_layers``: pre-activations of biased Linear/Conv2d layers, outputs of per-channel affine
  norms), the count, sum and sum of squares (REPAIR's targets and the fused model's statistics);
- ``batchnorm_input_moments``: the same at the input of every BatchNorm, with the BatchNorm layers
  normalising by batch statistics as in training (what a reset of their running statistics needs);
- ``gram_matrices``: ``sum x x^T`` of each Linear layer's inputs and each Conv2d's unfolded patches,
  with a constant-1 column last, whose diagonal entry is the count (RegMean);
- ``diagonal_fisher``: the mean squared per-example gradient of ``log p(y|x)`` (Fisher averaging;
  pool means by weighting with the clients' example counts);
- ``align.activation_matching.cross_moments`` (registered there): per permutation group, sums
  relating a broadcast reference's activations to the client model's (activation matching);
  ``preactivation_cross_moments`` the same per layer (the matched-unit correlations of
  closed-form REPAIR).

Every function runs the model in eval mode (BatchNorm with its running statistics, no dropout) and
restores the mode it found; no function changes the model's parameters or buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from fedalign.core.registry import Registry

Moments = dict[str, torch.Tensor]  # {"count": scalar, "sum": (C,), "sumsq": (C,)}
CrossMoments = dict[str, torch.Tensor]  # {"count", "sum_ref", "sum", "sq_ref", "sq", "cross"}
Data = torch.Tensor | Iterable


@contextlib.contextmanager
def evaluation(model: nn.Module, batchnorm_train: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode (optionally with BatchNorm normalising by batch statistics), its
    modes, BatchNorm buffers and momenta restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [
        (m, m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in norms
    ]
    model.eval()
    if batchnorm_train:
        for m in norms:
            m.train()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, momentum, buffers in saved:
            m.momentum = momentum
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
        for m, mode in modes.items():
            m.training = mode


def batches(data: Data, batch_size: int) -> Iterator[torch.Tensor]:
    """Input batches of ``data``: a tensor cut into ``batch_size`` rows, or an iterable of tensors
    or of ``(X, y)`` pairs (a DataLoader) taken as it comes."""
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size]
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and (ungrouped) Conv2d modules by name, in registration order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    }


def _is_channel_affine(m: nn.Module) -> bool:
    """Whether ``m``'s output channels carry their own scale and shift (a weight row and a bias
    entry, or a norm's affine), so a per-channel affine map after it folds into its parameters."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        return m.bias is not None and (isinstance(m, nn.Linear) or m.groups == 1)
    return isinstance(m, (_BatchNorm, nn.GroupNorm)) and m.weight is not None


def hidden_layers(model: nn.Module) -> list[str]:
    """The layers REPAIR tracks, derived from the model: every module whose output channels have
    their own scale and shift (biased Linear/Conv2d: the pre-activations; BatchNorm/GroupNorm with
    affine: the normalised outputs, which is where bias-free convolutions are corrected) except the
    final Linear/Conv2d (the logits are not rescaled). In a residual network this tracks the last
    foldable output of each branch, not the sum after the skip connection: an identity shortcut has
    no parameters a correction of the sum could be folded into."""
    last = list(linear_layers(model))[-1:]
    return [n for n, m in model.named_modules() if _is_channel_affine(m) and n not in last]


def channel_samples(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(samples, C): every position other than the channel is a sample (conv: N*H*W rows)."""
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


def _moments(t: torch.Tensor) -> Moments:
    t = t.double()
    return {
        "count": torch.tensor(float(len(t)), dtype=torch.float64),
        "sum": t.sum(0),
        "sumsq": (t * t).sum(0),
    }


def add_sums(total: dict[str, Any], name: str, part: Mapping[str, torch.Tensor]) -> None:
    """``total[name] += part`` entry by entry (the first part is kept as it is)."""
    total[name] = (
        dict(part) if name not in total else {k: total[name][k] + v for k, v in part.items()}
    )


def add_moments(a: Mapping[str, Moments], b: Mapping[str, Moments]) -> dict[str, Moments]:
    """Per-layer sums of two sets of statistics (the statistics of the union of the data)."""
    if a.keys() != b.keys():
        raise ValueError(f"statistics cover different layers: {sorted(set(a) ^ set(b))}")
    return {k: {s: a[k][s] + b[k][s] for s in a[k]} for k in a}


def mean_std(m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation from pooled moments."""
    n = m["count"].clamp_min(1.0)
    mean = m["sum"] / n
    return mean, (m["sumsq"] / n - mean**2).clamp_min(0.0).sqrt()


def _collect(
    model: nn.Module,
    X: Data,
    batch_size: int,
    modules: Mapping[str, nn.Module],
    observe: Callable[[str, nn.Module, tuple, torch.Tensor], torch.Tensor | None],
    batchnorm_train: bool = False,
) -> None:
    """Run ``model`` over ``X`` with ``observe(name, module, inputs, output)`` hooked on
    ``modules``; a hook that returns a tensor replaces the module's output."""
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: observe(name, mod, inp, out))
        for name, m in modules.items()
    ]
    try:
        with evaluation(model, batchnorm_train):
            for xb in batches(X, batch_size):
                model(xb)
    finally:
        for h in handles:
            h.remove()


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _select(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """The modules named ``layers``, each a Linear/Conv2d or a channel-affine norm."""
    modules = dict(model.named_modules())
    usable = {n for n, m in modules.items() if n in linear_layers(model) or _is_channel_affine(m)}
    unknown = sorted(set(layers) - usable)
    if unknown:
        raise ValueError(
            f"no Linear/Conv2d/norm layers named {unknown}; the model has {sorted(usable)}"
        )
    return {n: modules[n] for n in layers}


def activation_moments(
    model: nn.Module,
    X: Data,
    layers: Sequence[str] | None = None,
    batch_size: int = 500,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Moments]:
    """Per output channel of each layer in ``layers`` (default: ``hidden_layers(model)``), float64
    count, sum and sum of squares of its outputs over ``X`` (a conv's every position is a sample).

    With ``targets`` (layer -> (mean, std)), each of those layers' outputs is normalised by its
    batch statistics and rescaled to the target before it flows on, as REPAIR's reset layers do:
    the moments then describe the fused model with every layer above already repaired, so one pass
    gives what a sequential, layer-by-layer repair would measure.
    """
    modules = _select(model, hidden_layers(model) if layers is None else layers)
    stats: dict[str, Moments] = {}

    def observe(
        name: str, module: nn.Module, inputs: tuple, out: torch.Tensor
    ) -> torch.Tensor | None:
        dim = _channel_dim(module)
        batch = channel_samples(out, dim)
        add_sums(stats, name, _moments(batch))
        if targets is None or name not in targets:
            return None
        goal_mean, goal_std = (t.to(out.dtype) for t in targets[name])
        mean, std = batch.mean(0), batch.std(0, unbiased=False)
        shape = [1] * out.dim()
        shape[dim] = -1
        return (out - mean.reshape(shape)) / (std.reshape(shape) + 1e-5) * goal_std.reshape(
            shape
        ) + goal_mean.reshape(shape)

    _collect(model, X, batch_size, modules, observe)
    return stats


def batchnorm_input_moments(model: nn.Module, X: Data, batch_size: int = 500) -> dict[str, Moments]:
    """Per channel of each BatchNorm's input, count/sum/sum of squares over ``X``, with every
    BatchNorm normalising by its batch's statistics (as a reset of running statistics does), so
    the layers below see the activations they will see once the statistics are reset."""
    norms = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    }
    stats: dict[str, Moments] = {}

    def observe(name: str, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        add_sums(stats, name, _moments(channel_samples(inputs[0], 1)))

    _collect(model, X, batch_size, norms, observe, batchnorm_train=True)
    return stats


def _layer_inputs(module: nn.Module, x: torch.Tensor, conv: str) -> torch.Tensor:
    """(rows, D): a Linear's inputs, or a Conv2d's unfolded patches (``conv="full"``) or its
    input channels at every position (``conv="channel"``)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if conv == "channel":
        return channel_samples(x, 1)
    patches = nn.functional.unfold(
        x, module.kernel_size, module.dilation, module.padding, module.stride
    )
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N*L, C*kh*kw)


def gram_matrices(
    model: nn.Module, X: Data, batch_size: int = 500, conv: str = "full"
) -> dict[str, torch.Tensor]:
    """``sum x x^T`` (float64) of the inputs of every Linear and Conv2d over ``X``, each input
    row extended by a constant 1 as its last entry.

    The constant column is there for every layer, biased or not: ``G[-1, -1]`` is the number of
    rows (examples, times positions for a conv), which a consumer needs to pool or average Grams
    (``gram_count``), and ``G[:-1, -1]`` the input sums. For a layer with a bias it is the bias's
    input, so RegMean solves weight and bias together (least squares with an intercept, exact on
    pooled data); RegMean drops it for layers without one. Conv2d inputs are unfolded patches,
    ``(C*kh*kw + 1)`` square; ``conv="channel"`` keeps only the ``(C + 1)`` square Gram of the input
    channels over all positions, the approximation ``fusion.regmean`` expands as
    ``G_c (x) I_{kh*kw}`` for large convolutions.
    """
    if conv not in ("full", "channel"):
        raise ValueError(f"conv must be 'full' or 'channel', got {conv!r}")
    grams: dict[str, torch.Tensor] = {}

    def observe(name: str, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        rows = _layer_inputs(module, inputs[0], conv).double()
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], dim=1)
        grams[name] = rows.T @ rows if name not in grams else grams[name] + rows.T @ rows

    _collect(model, X, batch_size, linear_layers(model), observe)
    return grams


def gram_count(gram: torch.Tensor) -> torch.Tensor:
    """The number of input rows a Gram from ``gram_matrices`` sums over (its constant column's
    diagonal entry): divide by it to average, sum Grams and counts to pool."""
    return gram[-1, -1]


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return nn.functional.one_hot(labels.long(), classes).float()


FISHER_MODES = ("sample", "exact", "empirical")


def diagonal_fisher(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor | None = None,
    mode: str = "sample",
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: per parameter, the mean over ``X`` of squared per-example gradients of
    ``log p(y|x)``, with ``y`` sampled from the model (``mode="sample"``, seeded), summed over
    classes weighted by ``p(y|x)`` (``"exact"``), or the true labels (``"empirical"``).

    Per-example gradients come from ``torch.func`` (vmap of grad), not a loop over examples; the
    exact mode takes one class at a time, so memory stays one batch of per-example gradients
    (``batch_size`` times the parameter count: 64 x 2.6M floats, 0.7 GB, for VGG-9).
    Clients' Fishers pool as ``sum_j n_j F_j / sum_j n_j`` with ``n_j = len(X_j)``.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"mode must be one of {FISHER_MODES}, got {mode!r}")
    if mode == "empirical" and (y is None or len(y) != len(X)):
        raise ValueError("mode='empirical' needs the true labels y, one per example")
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    generator = torch.Generator().manual_seed(seed)

    def log_prob(p: dict, x: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return (torch.log_softmax(logits, dim=-1)[0] * one_hot).sum()

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}

    def accumulate(
        xb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, classes: int
    ) -> None:
        """``total += sum_n weight_n * g_n**2`` over the batch's per-example gradients."""
        g = per_example(params, xb, _one_hot(labels, classes))
        for k in total:
            total[k] += torch.tensordot(weight, g[k].double() ** 2, dims=1)

    # Attention through the math kernel: the fused ones (flash, memory-efficient) have no vmap
    # batching rule, so functorch would loop over the examples (7.5x slower on a
    # char_transformer); the math kernel is plain matmuls and softmax, batched.
    with evaluation(model), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for start in range(0, len(X), batch_size):
            xb = X[start : start + batch_size]
            with torch.no_grad():
                probs = torch.softmax(model(xb), dim=-1).double()
            classes = probs.shape[1]
            ones = torch.ones(len(xb), dtype=torch.float64)
            if mode == "exact":
                for c in range(classes):
                    accumulate(xb, torch.full((len(xb),), c), probs[:, c], classes)
            elif mode == "sample":
                accumulate(
                    xb, torch.multinomial(probs, 1, generator=generator).squeeze(1), ones, classes
                )
            else:
                accumulate(xb, y[start : start + batch_size], ones, classes)
    return {k: (v / max(len(X), 1)).to(params[k].dtype) for k, v in total.items()}


def cross_sums(a: torch.Tensor, b: torch.Tensor) -> CrossMoments:
    """Sums over the rows of ``a`` (samples, d_ref) and ``b`` (samples, d) that give means,
    variances and the cross-covariance: the statistics ``align.activation_matching`` consumes."""
    return {
        "count": torch.tensor(float(len(a)), dtype=torch.float64),
        "sum_ref": a.sum(0),
        "sum": b.sum(0),
        "sq_ref": (a * a).sum(0),
        "sq": (b * b).sum(0),
        "cross": a.T @ b,
    }


def preactivation_cross_moments(
    reference: nn.Module,
    model: nn.Module,
    X: Data,
    layers: Sequence[str] | None = None,
    batch_size: int = 500,
) -> dict[str, CrossMoments]:
    """Per layer in ``layers`` (default: ``hidden_layers(reference)``), the sums of
    ``cross_moments`` for the layers' outputs (pre-activations) unit by unit: closed-form REPAIR's
    matched-unit correlations. The two models must have the same layer names."""
    names = hidden_layers(reference) if layers is None else list(layers)
    modules_ref, modules = _select(reference, names), _select(model, names)
    outs: dict[str, dict[str, torch.Tensor]] = {"ref": {}, "model": {}}

    def keep(side: str) -> Callable:
        def observe(layer: str, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            outs[side][layer] = channel_samples(out, _channel_dim(module)).double()

        return observe

    stats: dict[str, CrossMoments] = {}
    for xb in batches(X, batch_size):
        _collect(reference, xb, len(xb), modules_ref, keep("ref"))
        _collect(model, xb, len(xb), modules, keep("model"))
        for name in names:
            add_sums(stats, name, cross_sums(outs["ref"][name], outs["model"][name]))
    return stats


@dataclass(frozen=True)
class StatContext:
    """What a statistic may relate the client's model to: a broadcast ``reference`` model (the
    cross-moments of alignment), REPAIR ``targets`` for reset layers, and a seed for sampling."""

    reference: nn.Module | None = None
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    seed: int = 0

    def reference_model(self) -> nn.Module:
        """The broadcast reference, which statistics relating two models cannot do without."""
        if self.reference is None:
            raise ValueError("cross-moments need a reference model")
        return self.reference


STATISTICS = Registry("statistic")
"""Statistic name -> ``compute(model, X, y, context, **options) -> values``; ``meta["permute"]``
is ``(spec, perms, values, state) -> values`` in the aligned basis (None: never moved);
``meta["decode"]`` ``(values, state) -> values`` turns the compact form a client sends (a Gram's
packed triangle or low-rank factor) into what the rules read, raising ValueError on a form that
does not fit a model shaped like ``state`` (None: sent as they are read);
``meta["options_problem"]`` ``(options) -> reason | None`` checks its options when a config loads;
``meta["check"]`` is ``(values, state, examples) -> reason | None``, why values a client sent are
unusable with a model shaped like ``state`` (``fedalign.algorithms.checks``), and ``meta["scale"]``
``values -> {part: magnitude per row}``, compared across a round's clients. Each is
registered by the algorithm that consumes it (``fusion.regmean`` the Grams, ``repair`` the
moments, ``align.activation_matching`` the cross-moments)."""


def client_statistics(
    kinds: Sequence[str],
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    context: StatContext = StatContext(),
    options: Mapping[str, Any] | None = None,
) -> dict[str, dict]:
    """The statistics named in ``kinds`` of ``model`` on one client's ``(X, y)``: what a client
    answers when the server's pipeline asks. ``options`` holds the statistics' options (those a
    statistic does not take are ignored)."""
    entries = [STATISTICS.get(kind) for kind in kinds]
    return {e.name: e.obj(model, X, y, context, **e.resolve(options or {})) for e in entries}


def received_statistics(stats: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict:
    """Statistics as the server reads them from what a client sent (``client_statistics``): each
    kind's registered ``decode`` applied (unknown kinds left to the checks). Raises ValueError
    naming the kind and the problem when a compact form does not fit the model ``state``."""
    out = {}
    for kind, values in stats.items():
        decode = STATISTICS.get(kind).meta.get("decode") if kind in STATISTICS else None
        if decode is None:
            out[kind] = values
            continue
        try:
            out[kind] = decode(values, state)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"{kind}: {exc}") from exc
    return out


def flatten(stats: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested statistics as one flat mapping ``"kind/layer/entry" -> tensor`` (for transport);
    module names use dots, never slashes."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *path, leaf = key.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
