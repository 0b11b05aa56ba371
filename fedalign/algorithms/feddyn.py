"""FedDyn (Acar et al. 2021, Algorithm 1): the server's state ``h`` and model, and the clients'
linear terms, as pure functions over state dicts.

Each client ``k`` minimises ``L_k(w) - <g_k, w> + alpha/2 ||w - w^{t-1}||^2`` (the client
objective ``feddyn`` in ``fedalign.client.training``) and then moves its ``g_k`` by
``-alpha (w_k^t - w^{t-1})``. From ``g_k = 0`` that is ``g_k = -alpha D_k``, ``D_k`` the sum of
the client's updates (``accumulate_drift``): the client keeps ``D_k``, which does not depend on
``alpha``. The server moves ``h`` by ``-alpha/m`` times the sum of this round's updates over all
``m`` clients (``server_state``) and takes the plain mean of the participants' models minus
``h / alpha`` (``feddyn_model``); the paper's mean is uniform over the participants, not
weighted by their examples.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from fedalign.core.tensors import weighted_average
from fedalign.core.types import StateDict


def accumulate_drift(
    drift: StateDict | None, sent: StateDict, trained: StateDict
) -> OrderedDict[str, torch.Tensor]:
    """``D_k + (w_k - w_sent)`` over the floating-point entries of the model (``D_k`` absent: the
    client's first update). A state dict does not say which entries are parameters, so float
    buffers (BatchNorm's statistics) are summed too and the objective reads the parameters' among
    them. The client and the server (which keeps a copy for checkpoints) call this same function on
    the same tensors, so their copies agree bit for bit."""
    return OrderedDict(
        (k, trained[k] - v if drift is None else drift[k] + (trained[k] - v))
        for k, v in sent.items()
        if v.is_floating_point()
    )


def zero_drift(state: StateDict) -> OrderedDict[str, torch.Tensor]:
    """A ``D_k`` of zeros: what a client that has no update the server accepted starts from."""
    return OrderedDict((k, torch.zeros_like(v)) for k, v in state.items() if v.is_floating_point())


def server_state(
    h: StateDict, sent: StateDict, trained: Sequence[StateDict], alpha: float, num_clients: int
) -> OrderedDict[str, torch.Tensor]:
    """``h - alpha/m sum_k (w_k - w_sent)`` over this round's participants ``trained``, for the
    parameters ``h`` holds (``m``: every client of the federation, not the round's)."""
    return OrderedDict(
        (k, v - alpha / num_clients * torch.stack([w[k] - sent[k] for w in trained]).sum(0))
        for k, v in h.items()
    )


def feddyn_model(
    trained: Sequence[StateDict], h: StateDict, alpha: float
) -> OrderedDict[str, torch.Tensor]:
    """``mean_k w_k - h / alpha`` (the uniform mean over the participants; buffers averaged, integer
    counters their maximum, as ``weighted_average`` does)."""
    fused = weighted_average(trained)
    for k, v in h.items():
        fused[k] = fused[k] - v / alpha
    return fused
