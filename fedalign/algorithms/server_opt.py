"""Server optimizers: the step the server takes from the current global model towards the fused one.

After fusion (a mean, RegMean, Fisher, PFNM, a robust rule, after repair), ``fused - global`` is a
pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization"): the server treats it as the
negative of a gradient and steps on it with an optimizer of its own. SGD with ``lr = 1`` takes the
fused model as it is (FedAvg; the fused state is returned untouched, bit for bit); ``momentum`` is
FedAvgM (Hsu et al. 2019), ``adam``, ``yogi`` and ``adagrad`` are FedAdam, FedYogi and FedAdagrad.

Every rule is a pure function ``(reference, fused, state, **options) -> (new global, new state)``
registered in ``SERVER_OPTIMIZERS``; its keyword-only parameters are its options and their
defaults (those of Flower's ``flwr.serverapp.strategy`` classes, so a config naming only the rule
gets what Flower's strategy of that name does; ``tests/fl/test_flower_strategies.py`` checks each
default against Flower's). The state is a flat ``name -> tensor`` dict (the moments per parameter,
the step count), so a checkpoint stores it as it stores the model and a resumed run continues bit
for bit. Where Flower's strategies and the papers differ, fedalign follows Flower
(``docs/aggregation.md``, "Where fedalign follows Flower", lists each place): FedAvgM's momentum
buffer starts at the first pseudo-gradient (PyTorch's SGD; Hsu et al.'s zero buffer gives the same
first step); FedAdam's step size is bias-corrected with ``t + 1`` at step ``t``
(``bias_correction: false`` gives Reddi et al.'s Algorithm 2, without the correction); the second
moments start at zero (Reddi et al.: at least ``tau^2``); FedAdagrad has no first moment
(``m = delta``; the paper's Algorithm 2 decays it with ``beta1`` as FedAdam's).

Floating-point entries are stepped; integer buffers (BatchNorm's ``num_batches_tracked``) are the
fused model's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedalign.core.registry import Registry
from fedalign.core.types import StateDict

OptimizerState = dict[str, torch.Tensor]
"""``"m/<key>"``, ``"v/<key>"`` (first and second moments per model entry), ``"step"``."""

SERVER_OPTIMIZERS = Registry("server optimizer")
"""Name -> ``(reference, fused, state, **options) -> (state dict, optimizer state)``;
``meta["check"]`` tells why given options are invalid."""

Step = Callable[..., tuple["OrderedDict[str, torch.Tensor]", OptimizerState]]


def options_problem(options: Mapping[str, Any]) -> str | None:
    """Why the options of a server optimizer are invalid (None: they are valid)."""
    lr = options.get("lr", 1.0)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        return f"lr must be a number > 0, got {lr!r}"
    momentum = options.get("momentum", 0.0)
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        return f"momentum must be in [0, 1), got {momentum!r}"
    betas = options.get("betas", (0.0, 0.0))
    if (
        not isinstance(betas, (list, tuple))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        return f"betas must be two numbers in [0, 1), got {betas!r}"
    tau = options.get("tau", 1.0)
    if not isinstance(tau, (int, float)) or not tau > 0:
        return f"tau must be a number > 0, got {tau!r}"
    if not isinstance(options.get("bias_correction", True), bool):
        return f"bias_correction must be true or false, got {options['bias_correction']!r}"
    return None


def is_identity(name: str, options: Mapping[str, Any]) -> bool:
    """Whether the step returns the fused model as it is (SGD with learning rate 1)."""
    return name == "sgd" and float(options.get("lr", 1.0)) == 1.0


def _floats(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def _moment(state: OptimizerState, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
    found = state.get(f"{name}/{key}")
    return torch.zeros_like(like) if found is None else found


def _apply(
    reference: StateDict, fused: StateDict, change: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """``reference + change`` on the stepped entries, the fused model's own elsewhere."""
    return OrderedDict(
        (k, reference[k] + change[k] if k in change else v.clone()) for k, v in fused.items()
    )


def _steps(state: OptimizerState) -> int:
    return int(state["step"]) + 1 if "step" in state else 1


@SERVER_OPTIMIZERS.register("sgd", check=options_problem)
def sgd(
    reference: StateDict, fused: StateDict, state: OptimizerState, *, lr: float = 1.0
) -> tuple[OrderedDict[str, torch.Tensor], OptimizerState]:
    """``global + lr * (fused - global)``; with ``lr = 1`` the fused model itself (FedAvg)."""
    if lr == 1.0:
        return OrderedDict(fused), {}
    change = {k: lr * (fused[k] - reference[k]) for k in _floats(fused)}
    return _apply(reference, fused, change), {}


@SERVER_OPTIMIZERS.register("momentum", check=options_problem)
def momentum(
    reference: StateDict,
    fused: StateDict,
    state: OptimizerState,
    *,
    lr: float = 1.0,
    momentum: float = 0.0,
) -> tuple[OrderedDict[str, torch.Tensor], OptimizerState]:
    """FedAvgM: heavy-ball momentum on the pseudo-gradient ``g = global - fused``:
    ``b = momentum * b + g`` (``b = g`` on the first step), ``global - lr * b``. The defaults are
    Flower's ``FedAvgM``'s (momentum 0: a plain server step of size ``lr``); FedAvgM proper needs
    ``momentum > 0``, which a config sets (the bench configs set 0.9)."""
    new: OptimizerState = {}
    change = {}
    for k in _floats(fused):
        grad = reference[k] - fused[k]
        buffer = grad if f"m/{k}" not in state else momentum * state[f"m/{k}"] + grad
        new[f"m/{k}"] = buffer
        change[k] = -lr * buffer
    new["step"] = torch.tensor(_steps(state))
    return _apply(reference, fused, change), new


def _adaptive(
    second_moment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    reference: StateDict,
    fused: StateDict,
    state: OptimizerState,
    lr: float,
    beta1: float,
    tau: float,
) -> tuple[OrderedDict[str, torch.Tensor], OptimizerState]:
    """The update Reddi et al.'s three adaptive rules share: ``delta = fused - global``,
    ``m = beta1 m + (1 - beta1) delta``, ``v = second_moment(v, delta)``,
    ``global + lr m / (sqrt(v) + tau)``."""
    new: OptimizerState = {"step": torch.tensor(_steps(state))}
    change = {}
    for k in _floats(fused):
        delta = fused[k] - reference[k]
        m = beta1 * _moment(state, "m", k, delta) + (1 - beta1) * delta
        v = second_moment(_moment(state, "v", k, delta), delta)
        new[f"m/{k}"], new[f"v/{k}"] = m, v
        change[k] = lr * m / (v.sqrt() + tau)
    return _apply(reference, fused, change), new


@SERVER_OPTIMIZERS.register("adam", check=options_problem)
def adam(
    reference: StateDict,
    fused: StateDict,
    state: OptimizerState,
    *,
    lr: float = 0.1,
    betas: Sequence[float] = (0.9, 0.99),
    tau: float = 1e-3,
    bias_correction: bool = True,
) -> tuple[OrderedDict[str, torch.Tensor], OptimizerState]:
    """FedAdam: ``v = beta2 v + (1 - beta2) delta^2``; the step size ``lr`` is bias-corrected as
    Flower does, ``lr sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))`` at step ``t``."""
    beta1, beta2 = betas
    t = _steps(state)
    eta = lr * math.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1)) if bias_correction else lr
    return _adaptive(
        lambda v, d: beta2 * v + (1 - beta2) * d**2, reference, fused, state, eta, beta1, tau
    )


@SERVER_OPTIMIZERS.register("yogi", check=options_problem)
def yogi(
    reference: StateDict,
    fused: StateDict,
    state: OptimizerState,
    *,
    lr: float = 0.01,
    betas: Sequence[float] = (0.9, 0.99),
    tau: float = 1e-3,
) -> tuple[OrderedDict[str, torch.Tensor], OptimizerState]:
    """FedYogi: ``v = v - (1 - beta2) delta^2 sign(v - delta^2)`` (v grows at most additively)."""
    beta1, beta2 = betas
    return _adaptive(
        lambda v, d: v - (1 - beta2) * d**2 * torch.sign(v - d**2),
        reference,
        fused,
        state,
        lr,
        beta1,
        tau,
    )


@SERVER_OPTIMIZERS.register("adagrad", check=options_problem)
def adagrad(
    reference: StateDict,
    fused: StateDict,
    state: OptimizerState,
    *,
    lr: float = 0.1,
    tau: float = 1e-3,
) -> tuple[OrderedDict[str, torch.Tensor], OptimizerState]:
    """FedAdagrad: ``v = v + delta^2``, no first-moment decay (Flower's FedAdagrad)."""
    return _adaptive(lambda v, d: v + d**2, reference, fused, state, lr, 0.0, tau)


def server_step(
    name: str,
    options: Mapping[str, Any],
    reference: StateDict,
    fused: StateDict,
    state: OptimizerState,
    keeps_basis: bool = True,
) -> tuple[OrderedDict[str, torch.Tensor], OptimizerState, str]:
    """One step of the registered optimizer ``name`` from ``reference`` (the global model) towards
    ``fused``; returns the new global model, the new optimizer state, and what happened to the
    state: ``kept``, or ``reset`` when the fused model is no step from ``reference`` (its widths
    changed, as PFNM's and FedMA's do, or ``keeps_basis`` is off: the clients trained from their
    own inits, so ``fused - reference`` compares unrelated neurons). A reset takes the fused model
    as the new global and starts the moments afresh."""
    same_shapes = list(fused) == list(reference) and all(
        fused[k].shape == reference[k].shape for k in fused
    )
    if not (same_shapes and keeps_basis):
        why = "widths changed" if not same_shapes else "clients trained from their own inits"
        return OrderedDict(fused), {}, f"reset ({why})"
    entry = SERVER_OPTIMIZERS.get(name)
    new, state = entry.obj(reference, fused, state, **entry.resolve(options))
    return new, state, "kept"
