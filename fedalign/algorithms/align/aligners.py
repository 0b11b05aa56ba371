"""The alignment step of the server's pipeline, one registered function per method.

Every aligner has one signature: ``(spec, states, weights, *, reference, cross, solver, seed,
workers) -> one Perms per state`` putting every client's units in one basis (the reference
client's, or for weight matching the MergeMany consensus). ``cross`` holds, per client, the pooled
cross-moments against the reference when the aligner declares ``needs={"align": ("cross",)}``.
An aligner with ``meta["fuses"]`` (PFNM) aligns and fuses in one step and is not called here.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedalign.core.registry import Registry
from fedalign.core.types import StateDict, Stats

from .activation_matching import permutations_from_statistics
from .parallel import match_all
from .spec import Perms, PermutationSpec, identity_permutation
from .weight_matching import merge_many

ALIGNERS = Registry("aligner")


@ALIGNERS.register("none")
def no_alignment(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    weights: Sequence[float],
    *,
    reference: int,
    cross: Sequence[Stats],
    solver: str,
    seed: int,
    workers: int,
) -> list[Perms]:
    """Identity permutations: plain parameter averaging."""
    return [identity_permutation(spec) for _ in states]


@ALIGNERS.register("weight")
def weight_alignment(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    weights: Sequence[float],
    *,
    reference: int,
    cross: Sequence[Stats],
    solver: str,
    seed: int,
    workers: int,
) -> list[Perms]:
    """MergeMany weight matching (Git Re-Basin) to the consensus of all clients."""
    return merge_many(spec, states, weights, solver=solver, seed=seed)[1]


@ALIGNERS.register("sinkhorn-rebasin")
def sinkhorn_alignment(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    weights: Sequence[float],
    *,
    reference: int,
    cross: Sequence[Stats],
    solver: str,
    seed: int,
    workers: int,
) -> list[Perms]:
    """Sinkhorn re-basin of every client to the reference (independent: a worker pool when
    asked)."""
    others = [sd for j, sd in enumerate(states) if j != reference]
    perms = match_all(
        spec,
        states[reference],
        others,
        "sinkhorn-rebasin",
        workers=workers,
        seed=seed,
        solver=solver,
    )
    perms.insert(reference, identity_permutation(spec))
    return perms


@ALIGNERS.register("activation", needs={"align": ("cross",)})
def activation_alignment(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    weights: Sequence[float],
    *,
    reference: int,
    cross: Sequence[Stats],
    solver: str,
    seed: int,
    workers: int,
) -> list[Perms]:
    """Activation matching of every client to the reference from its cross-moments."""
    return [
        identity_permutation(spec)
        if j == reference
        else permutations_from_statistics(cross[j]["cross"], solver=solver)
        for j in range(len(states))
    ]
