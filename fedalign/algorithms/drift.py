"""Corrections of client drift: SCAFFOLD's control variates and FedNova's normalised averaging.

With heterogeneous clients and several local steps, each client drifts towards its own optimum and
FedAvg's fixed point is not the federation's optimum.

- SCAFFOLD (Karimireddy et al. 2020) corrects every local step by ``c - c_i``: the server's control
  variate ``c`` estimates the federation's gradient, the client's own ``c_i`` its local gradient
  (the client objective ``scaffold`` in ``fedalign.client.training`` adds the correction). After
  ``K`` local steps of rate ``lr``, option II of the paper sets
  ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (``client_control``). The server keeps ``c`` the
  weighted mean of all ``N`` clients' ``c_i`` with the weights the model is averaged with
  (``server_control``): uniform weights give the paper's Algorithm 1,
  ``c + (|S|/N) mean_S(c_i+ - c_i)``; example counts give its example-weighted analogue. Weighting
  ``c`` and the model alike is what makes the fixed point the optimum of one objective.
- FedNova (Wang et al. 2020) divides each client's update by its number of effective local steps
  ``a_i`` (``effective_steps``: the steps themselves for plain SGD, more with momentum) and
  rescales by their weighted mean ``tau_eff``: ``x - tau_eff sum_i p_i (x - y_i) / a_i``. Written
  as states, ``y_i' = x - (tau_eff / a_i)(x - y_i)`` (``normalised_states``), any fuse rule can
  combine them; their weighted mean is FedNova's update. Equal step counts leave the states as
  they are, so FedNova is FedAvg exactly there.

Everything a client reports is untrusted: ``steps_problem`` bounds a step count by what the
config allows for the client's data, ``control_problem`` checks a control-variate change against
the one the server recomputes from the client's own update.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedalign.core.tensors import normalised_weights
from fedalign.core.types import StateDict


def zero_controls(model_state: StateDict, keys: Sequence[str]) -> OrderedDict[str, torch.Tensor]:
    """A control variate of zeros for the trained parameters ``keys`` (the start of every one)."""
    return OrderedDict((k, torch.zeros_like(model_state[k])) for k in keys)


def client_control(
    own: StateDict, server: StateDict, sent: StateDict, trained: StateDict, steps: int, lr: float
) -> OrderedDict[str, torch.Tensor]:
    """SCAFFOLD option II: ``c_i+ = c_i - c + (x - y_i) / (K lr)``. The client and the server
    (which checks the client with it and keeps a copy for checkpoints) call this same function, so
    their copies agree bit for bit."""
    scale = 1.0 / (steps * lr)
    return OrderedDict((k, own[k] - server[k] + (sent[k] - trained[k]) * scale) for k in server)


def server_control(
    server: StateDict, changes: Sequence[StateDict], total: float, previous_total: float
) -> OrderedDict[str, torch.Tensor]:
    """SCAFFOLD's server step for ``c``, keeping ``c = sum_i w_i c_i / W`` over all ``N`` clients:
    ``c+ = (W_prev c + sum_S (w_i+ c_i+ - w_i c_i)) / W`` with ``changes`` the participants'
    ``w_i+ c_i+ - w_i c_i`` (``weighted_control_change``), ``total`` the clients' weight ``W`` after
    the round and ``previous_total`` before it.

    With weight 1 a client (``W = N``) this is the paper's ``c + sum_S (c_i+ - c_i) / N``
    bit for bit. With example counts, ``W`` is the clients' total count, known once every client
    has been seen and estimated until then (``control_total``): rescaling ``c`` when it changes
    keeps the invariant, so the fixed point (``c = 0``, ``c_i`` the clients' gradients) is the
    optimum of the example-weighted objective also when clients are sampled. (Multiplying the
    sampled clients' weighted mean by ``|S|/N`` instead keeps it only with full participation.)"""
    keep = previous_total / total
    return OrderedDict(
        (k, server[k] * keep + torch.stack([d[k] for d in changes]).sum(0) / total) for k in server
    )


def weighted_control_change(
    new: StateDict, new_weight: float, old: StateDict, old_weight: float
) -> OrderedDict[str, torch.Tensor]:
    """One client's term of ``server_control``: ``w_i+ c_i+ - w_i c_i`` (``c_i+ - c_i`` for weight
    1; the weight a client's stored ``c_i`` carries changes only if its reported count does)."""
    return OrderedDict((k, new[k] * new_weight - old[k] * old_weight) for k in new)


def control_total(weights: Sequence[float], num_clients: int) -> float:
    """``W``, the weight of all ``num_clients`` clients, from the ``weights`` of those seen so far:
    their mean times ``N`` (``N`` for weight 1 each; the total example count once every client
    has been seen)."""
    return num_clients * math.fsum(weights) / len(weights)


def control_problem(
    reported: Mapping[str, torch.Tensor] | None,
    expected: StateDict,
    rtol: float = 1e-3,
    atol: float = 1e-5,
) -> str | None:
    """Why a client's reported control-variate change is unusable: missing, other keys, shapes
    or dtypes than the parameters, NaN/Inf, or not the change its own update implies (the server's
    ``expected``, within float tolerance of another device's arithmetic)."""
    if reported is None:
        return "control-delta missing"
    if list(reported) != list(expected):
        return "control-delta: keys differ from the model's parameters"
    for key, value in reported.items():
        want = expected[key]
        if value.shape != want.shape or value.dtype != want.dtype:
            return (
                f"control-delta: {key} is {value.dtype} {tuple(value.shape)}, "
                f"expected {want.dtype} {tuple(want.shape)}"
            )
        if not torch.isfinite(value).all():
            return f"control-delta: {key} contains NaN or Inf"
        if not torch.allclose(value, want, rtol=rtol, atol=atol):
            gap = float((value - want).abs().max())
            return f"control-delta: {key} is not the change its update implies (off by {gap:.3g})"
    return None


def steps_problem(steps: Any, num_examples: int, epochs: int, batch_size: int) -> str | None:
    """Why a reported number of local steps is unusable: it must be an integer between 1 and
    what ``epochs`` epochs of ``num_examples`` in batches of ``batch_size`` take."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        return f"local-steps missing or not an integer: {steps!r}"
    most = epochs * math.ceil(num_examples / batch_size)
    if not 1 <= steps <= most:
        return f"local-steps {steps} outside [1, {most}] for {num_examples} examples"
    return None


def effective_steps(steps: int, momentum: float = 0.0) -> float:
    """FedNova's ``a_i = ||a||_1`` for ``steps`` SGD steps with heavy-ball ``momentum`` rho:
    ``steps`` without momentum, ``(steps - rho (1 - rho^steps) / (1 - rho)) / (1 - rho)``
    with it."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def normalised_states(
    reference: StateDict,
    states: Sequence[StateDict],
    weights: Sequence[float],
    steps: Sequence[int],
    momentum: float = 0.0,
) -> tuple[list[StateDict], float]:
    """FedNova's states ``x - (tau_eff / a_i)(x - y_i)`` and ``tau_eff`` (the clients' states
    unchanged when their effective steps are all equal)."""
    a = [effective_steps(s, momentum) for s in steps]
    p = normalised_weights(weights, len(states)).tolist()
    tau = sum(pi * ai for pi, ai in zip(p, a))
    if len(set(a)) == 1:
        return list(states), tau
    out: list[StateDict] = []
    for state, ai in zip(states, a):
        scale = tau / ai
        out.append(
            OrderedDict(
                (k, reference[k] - scale * (reference[k] - v) if v.is_floating_point() else v)
                for k, v in state.items()
            )
        )
    return out, tau
