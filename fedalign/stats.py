"""Statistics a client computes on its own data, for fusion rules and repair that need data.

The server never sees data: it asks the clients for sums over their examples and adds them up.
Everything here is therefore a *sum* (or carries its count), so the statistics of the union of
the clients' data are the sum of the clients' statistics:

- ``activation_moments``: per output channel of every Linear/Conv2d (pre-activations), the
  count, sum and sum of squares (REPAIR's targets and the fused model's statistics);
- ``batchnorm_input_moments``: the same at the input of every BatchNorm, with the BatchNorm layers
  normalising by batch statistics as in training (what a reset of their running statistics needs);
- ``gram_matrices``: ``sum x x^T`` of each Linear layer's inputs and each Conv2d's unfolded patches,
  with a constant-1 column for the bias (RegMean);
- ``diagonal_fisher``: the mean squared per-example gradient of ``log p(y|x)`` (Fisher averaging),
  with the example count so means can be pooled.

Every function runs the model in eval mode (BatchNorm with its running statistics, no dropout) and
restores the mode it found; no function changes the model's parameters or buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

Moments = dict[str, torch.Tensor]  # {"count": scalar, "sum": (C,), "sumsq": (C,)}


@contextlib.contextmanager
def evaluation(model: nn.Module, batchnorm_train: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode (optionally with BatchNorm normalising by batch statistics), its
    modes, BatchNorm buffers and momenta restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m, m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in norms]
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


def _batches(X: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(X), batch_size):
        yield X[i:i + batch_size]


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and (ungrouped) Conv2d modules by name, in registration order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}


def hidden_layers(model: nn.Module) -> list[str]:
    """The Linear/Conv2d layers REPAIR corrects: all but the last (the logits are not rescaled)."""
    return list(linear_layers(model))[:-1]


def channel_samples(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(samples, C): every position other than the channel is a sample (conv: N*H*W rows)."""
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


def _moments(t: torch.Tensor) -> Moments:
    t = t.double()
    return {"count": torch.tensor(float(len(t)), dtype=torch.float64), "sum": t.sum(0), "sumsq": (t * t).sum(0)}


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
    model: nn.Module, X: torch.Tensor, batch_size: int, modules: Mapping[str, nn.Module],
    observe: Callable[[str, nn.Module, tuple, torch.Tensor], torch.Tensor | None], batchnorm_train: bool = False,
) -> None:
    """Run ``model`` over ``X`` with ``observe(name, module, inputs, output)`` hooked on ``modules``;
    a hook that returns a tensor replaces the module's output."""
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: observe(name, mod, inp, out))
               for name, m in modules.items()]
    try:
        with evaluation(model, batchnorm_train):
            for xb in _batches(X, batch_size):
                model(xb)
    finally:
        for h in handles:
            h.remove()


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def activation_moments(
    model: nn.Module, X: torch.Tensor, layers: list[str] | None = None, batch_size: int = 500,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Moments]:
    """Per output channel of each Linear/Conv2d in ``layers`` (default: all), float64 count, sum
    and sum of squares of its pre-activations over ``X``.

    With ``targets`` (layer -> (mean, std)), each of those layers' outputs is normalised by its
    batch statistics and rescaled to the target before it flows on, as REPAIR's reset layers do:
    the moments then describe the fused model with every layer above already repaired, so one pass
    gives what a sequential, layer-by-layer repair would measure.
    """
    modules = linear_layers(model)
    if layers is not None:
        unknown = sorted(set(layers) - set(modules))
        if unknown:
            raise ValueError(f"no Linear/Conv2d layers named {unknown}; the model has {sorted(modules)}")
        modules = {k: modules[k] for k in layers}
    stats: dict[str, Moments] = {}

    def observe(name: str, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        dim = _channel_dim(module)
        part = _moments(channel_samples(out, dim))
        stats[name] = part if name not in stats else {k: stats[name][k] + v for k, v in part.items()}
        if targets is None or name not in targets:
            return None
        goal_mean, goal_std = (t.to(out.dtype) for t in targets[name])
        batch = channel_samples(out, dim)
        mean, std = batch.mean(0), batch.std(0, unbiased=False)
        shape = [1] * out.dim()
        shape[dim] = -1
        return (out - mean.reshape(shape)) / (std.reshape(shape) + 1e-5) * goal_std.reshape(shape) \
            + goal_mean.reshape(shape)

    _collect(model, X, batch_size, modules, observe)
    return stats


def batchnorm_input_moments(model: nn.Module, X: torch.Tensor, batch_size: int = 500) -> dict[str, Moments]:
    """Per channel of each BatchNorm's input, count/sum/sum of squares over ``X``, with every
    BatchNorm normalising by its batch's statistics (as a reset of running statistics does), so
    the layers below see the activations they will see once the statistics are reset."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    stats: dict[str, Moments] = {}

    def observe(name: str, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        part = _moments(channel_samples(inputs[0], 1))
        stats[name] = part if name not in stats else {k: stats[name][k] + v for k, v in part.items()}

    _collect(model, X, batch_size, norms, observe, batchnorm_train=True)
    return stats


def _layer_inputs(module: nn.Module, x: torch.Tensor, conv: str) -> torch.Tensor:
    """(rows, D): a Linear's inputs, or a Conv2d's unfolded patches (``conv="full"``) or its
    input channels at every position (``conv="channel"``)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if conv == "channel":
        return channel_samples(x, 1)
    patches = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])        # (N*L, C*kh*kw)


def gram_matrices(
    model: nn.Module, X: torch.Tensor, batch_size: int = 500, conv: str = "full"
) -> dict[str, torch.Tensor]:
    """``sum x x^T`` (float64) of the inputs of every Linear and Conv2d over ``X``.

    A layer with a bias gets a constant-1 input column last, so RegMean solves for weight and bias
    together (the least-squares problem with an intercept) and the last diagonal entry is the
    number of rows. Conv2d inputs are unfolded patches, ``(C*kh*kw + 1)`` square; ``conv="channel"``
    keeps only the ``(C + 1)`` square Gram of the input channels over all positions, the
    approximation ``fusion.regmean`` expands as ``G_c (x) I_{kh*kw}`` for large convolutions.
    """
    if conv not in ("full", "channel"):
        raise ValueError(f"conv must be 'full' or 'channel', got {conv!r}")
    modules = linear_layers(model)
    grams: dict[str, torch.Tensor] = {}

    def observe(name: str, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        rows = _layer_inputs(module, inputs[0], conv).double()
        if module.bias is not None:
            rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], dim=1)
        g = rows.T @ rows
        grams[name] = g if name not in grams else grams[name] + g

    _collect(model, X, batch_size, modules, observe)
    return grams


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return nn.functional.one_hot(labels.long(), classes).float()


def diagonal_fisher(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor | None = None, labels: str = "sample",
    batch_size: int = 256, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: per parameter, the mean over ``X`` of squared per-example gradients of
    ``log p(y|x)``, with ``y`` sampled from the model (``labels="sample"``, seeded), summed over
    classes weighted by ``p(y|x)`` (``"exact"``), or the true labels (``"empirical"``).

    Per-example gradients come from ``torch.func`` (vmap of grad), not a loop over examples.
    """
    if labels not in ("sample", "exact", "empirical"):
        raise ValueError(f"labels must be 'sample', 'exact' or 'empirical', got {labels!r}")
    if labels == "empirical" and y is None:
        raise ValueError("labels='empirical' needs the true labels y")
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    generator = torch.Generator().manual_seed(seed)

    def log_prob(p: dict, x: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return (torch.log_softmax(logits, dim=-1)[0] * one_hot).sum()

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    with evaluation(model), torch.enable_grad():
        for start in range(0, len(X), batch_size):
            xb = X[start:start + batch_size]
            with torch.no_grad():
                probs = torch.softmax(model(xb), dim=-1).double()
            if labels == "exact":
                for c in range(probs.shape[1]):
                    g = per_example(params, xb, _one_hot(torch.full((len(xb),), c), probs.shape[1]))
                    for k in total:
                        w = probs[:, c].reshape(-1, *([1] * params[k].dim()))
                        total[k] += (w * g[k].double() ** 2).sum(0)
                continue
            if labels == "sample":
                yb = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                yb = y[start:start + batch_size].long()
            g = per_example(params, xb, yb)
            for k in total:
                total[k] += (g[k].double() ** 2).sum(0)
    return {k: (v / max(len(X), 1)).to(params[k].dtype) for k, v in total.items()}


def cross_moments(
    reference: nn.Module, model: nn.Module, X: torch.Tensor, layers: list[str] | None = None, batch_size: int = 500,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per Linear/Conv2d layer, sums over ``X`` relating the pre-activations of ``reference`` and
    ``model`` unit by unit, in ``align.activation_matching``'s format (``count``, ``sum_ref``,
    ``sum``, ``sq_ref``, ``sq``, ``cross = sum z_ref z_model^T``), so ``correlation`` applies."""
    names = list(linear_layers(reference)) if layers is None else layers
    captured: dict[str, list[torch.Tensor]] = {}

    def keep(tag: str) -> Callable:
        def observe(name: str, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            captured[f"{tag}:{name}"] = channel_samples(out, _channel_dim(module)).double()
        return observe

    out: dict[str, dict[str, torch.Tensor]] = {}
    for start in range(0, len(X), batch_size):
        xb = X[start:start + batch_size]
        _collect(reference, xb, len(xb), {n: linear_layers(reference)[n] for n in names}, keep("ref"))
        _collect(model, xb, len(xb), {n: linear_layers(model)[n] for n in names}, keep("model"))
        for name in names:
            a, b = captured[f"ref:{name}"], captured[f"model:{name}"]
            part = {"count": torch.tensor(float(len(a)), dtype=torch.float64), "sum_ref": a.sum(0), "sum": b.sum(0),
                    "sq_ref": (a * a).sum(0), "sq": (b * b).sum(0), "cross": a.T @ b}
            out[name] = part if name not in out else {k: out[name][k] + v for k, v in part.items()}
    return out


STATISTICS = ("grams", "fisher", "moments", "bn", "cross", "preact-cross")


def client_statistics(
    kinds: Sequence[str], model: nn.Module, X: torch.Tensor, y: torch.Tensor, *,
    reference: nn.Module | None = None, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    gram_conv: str = "full", fisher_labels: str = "sample", seed: int = 0,
) -> dict[str, dict]:
    """The statistics named in ``kinds`` of ``model`` on one client's ``(X, y)``: what a client
    answers when the server's pipeline asks (see ``fusion.pipeline``). ``cross`` and
    ``preact-cross`` relate ``model`` to ``reference``; ``moments`` run through reset layers set to
    ``targets`` when given (REPAIR's measurement of the fused model)."""
    from fedalign.align import activation_statistics, permutation_spec

    unknown = sorted(set(kinds) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; known: {', '.join(STATISTICS)}")
    if reference is None and {"cross", "preact-cross"} & set(kinds):
        raise ValueError("cross-moments need a reference model")
    out: dict[str, dict] = {}
    for kind in kinds:
        if kind == "grams":
            out[kind] = gram_matrices(model, X, conv=gram_conv)
        elif kind == "fisher":
            out[kind] = diagonal_fisher(model, X, y, labels=fisher_labels, seed=seed)
        elif kind == "moments":
            out[kind] = activation_moments(model, X, hidden_layers(model), targets=targets)
        elif kind == "bn":
            out[kind] = batchnorm_input_moments(model, X)
        elif kind == "cross":
            out[kind] = activation_statistics(permutation_spec(reference), reference, model, X)
        else:
            out[kind] = cross_moments(reference, model, X, hidden_layers(model))
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
