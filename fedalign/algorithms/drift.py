"""Corrections of client drift: SCAFFOLD's control variates and FedNova's normalised averaging.

With heterogeneous clients and several local steps, each client drifts towards its own optimum and
FedAvg's fixed point is not the federation's optimum.

- SCAFFOLD (Karimireddy et al. 2020) corrects every local step by ``c - c_i``: the server's control
  variate ``c`` estimates the federation's gradient, the client's own ``c_i`` its local gradient
  (the client objective ``scaffold`` in ``fedalign.client.training`` adds the correction). After
  ``K`` local steps of rate ``lr``, option II of the paper sets
  ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (``client_control``) and the server adds the clients'
  changes, ``c + sum(c_i+ - c_i) / N`` (``server_control``), uniformly over the ``N`` clients as
  in the paper.
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
    server: StateDict, changes: Sequence[StateDict], num_clients: int
) -> OrderedDict[str, torch.Tensor]:
    """``c + sum_i (c_i+ - c_i) / N`` over the participating clients' changes."""
    return OrderedDict(
        (k, server[k] + torch.stack([d[k] for d in changes]).sum(0) / num_clients) for k in server
    )


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
