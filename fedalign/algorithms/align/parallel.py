"""Aligning many clients to one reference in parallel.

Matching client ``j`` to a reference does not depend on any other client, so with J clients the
server's alignment is J independent problems: ``map_clients`` runs them in a pool of worker
processes (fork, one torch thread each, so the workers do not fight over cores) and returns exactly
what the sequential loop returns, in order. Worth it when one matching costs much more than
shipping two state dicts to a worker (tens of milliseconds): wide layers, many restarts, Sinkhorn
re-basin's gradient steps.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import torch

from fedalign.core.types import StateDict

from .sinkhorn_rebasin import sinkhorn_rebasin
from .spec import Perms, PermutationSpec
from .weight_matching import weight_matching

Matcher = Callable[[PermutationSpec, StateDict, StateDict], Perms]


def _one_thread() -> None:
    torch.set_num_threads(1)


def map_clients(
    matcher: Matcher,
    spec: PermutationSpec,
    reference: StateDict,
    state_dicts: Sequence[StateDict],
    workers: int = 1,
) -> list[Perms]:
    """``[matcher(spec, reference, sd) for sd in state_dicts]``, on ``workers`` processes when
    ``workers > 1`` (``matcher`` must be picklable: a module-level function or a partial of one)."""
    if workers <= 1 or len(state_dicts) < 2:
        return [matcher(spec, reference, sd) for sd in state_dicts]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        min(workers, len(state_dicts)), mp_context=context, initializer=_one_thread
    ) as pool:
        return list(pool.map(partial(matcher, spec, reference), state_dicts))


def match_all(
    spec: PermutationSpec,
    reference: StateDict,
    state_dicts: Sequence[StateDict],
    method: str = "weight",
    workers: int = 1,
    **options: Any,
) -> list[Perms]:
    """Each state dict aligned to ``reference`` by weight matching (``method="weight"``) or
    Sinkhorn re-basin (``"sinkhorn-rebasin"``); ``options`` go to that function."""
    functions = {"weight": weight_matching, "sinkhorn-rebasin": sinkhorn_rebasin}
    if method not in functions:
        raise ValueError(f"method must be one of {sorted(functions)}, got {method!r}")
    return map_clients(
        partial(_call, functions[method], options), spec, reference, state_dicts, workers
    )


def _call(
    function: Callable,
    options: Mapping[str, Any],
    spec: PermutationSpec,
    reference: StateDict,
    other: StateDict,
) -> Perms:
    return function(spec, reference, other, **options)
