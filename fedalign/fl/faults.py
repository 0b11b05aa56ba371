"""Injected client faults (config ``faults:``), to test that a federation survives them.

They act on a client's reply after honest training, as a broken or malicious client would:
the server must reject the update, count it with its reason, and finish the round with the others.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import torch

from fedalign.config.schema import FaultConfig, RunConfig


class InjectedFault(RuntimeError):
    """Raised by a client told to fail."""


def fault_for(cfg: RunConfig, server_round: int, partition_id: int) -> FaultConfig | None:
    for fault in cfg.faults:
        if fault.round == server_round and fault.client == partition_id:
            return fault
    return None


def apply_fault(
    fault: FaultConfig, state: OrderedDict[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """The corrupted reply ``fault`` describes (or an exception / process exit)."""
    if fault.kind == "raise":
        raise InjectedFault(f"injected failure in round {fault.round}")
    if fault.kind == "crash":
        os._exit(17)  # the worker process dies, as on an OOM kill
    if fault.kind == "slow":
        time.sleep(fault.seconds)  # an honest reply, too late (past strategy.timeout)
        return state
    state = OrderedDict((k, v.clone()) for k, v in state.items())
    first = next(k for k, v in state.items() if v.is_floating_point())
    if fault.kind == "nan":
        state[first].view(-1)[0] = float("nan")
    elif fault.kind == "wrong-shape":
        state[first] = torch.zeros(*state[first].shape[:-1], state[first].shape[-1] + 1)
    elif fault.kind == "missing-key":
        del state[first]
    elif fault.kind == "scale":
        state = OrderedDict(
            (k, v * fault.factor if v.is_floating_point() else v) for k, v in state.items()
        )
    return state
