"""The alignment step of the server's pipeline, one registered function per method.

Every aligner has one signature: ``(spec, states, weights, *, reference, cross, solver, seed,
workers) -> one Perms per state`` putting every client's units in one basis (the reference
client's, or for weight matching the MergeMany consensus). ``cross`` holds, per client, the pooled
cross-moments against the reference when the aligner declares ``needs={"align": ("cross",)}``.
An aligner with ``meta["fuses"]`` (PFNM) aligns and fuses in one step and is not called here.
``meta["heads"]`` says how the spec it gets expresses attention (``permutation_spec``'s
``heads``; default ``both``): Sinkhorn re-basin permutes every unit of a group freely, so it gets
heads as blocks (whole heads move, the dimensions inside them stay).

``align_target`` (weight, sinkhorn-rebasin, activation) says what a client is aligned to:
``weighted`` is each method's own target (MergeMany's example-weighted mean of the others; the
client with the most examples), which a client with a large scale or a large claimed count
steers; ``robust`` aligns to the medoid client under a permutation-invariant distance, then runs
MergeMany's sweeps with the coordinate-wise median of the other clients as each one's target
(``robust.align_to_median``; activation matching, whose cross-moments are measured against one
reference, stops at the medoid). ``auto``, the default, is resolved by the pipeline: ``robust``
when the fuse rule declares ``robust``, else ``weighted`` (an aligner called directly with
``auto`` takes ``weighted``). The pipeline passes the medoid as ``reference`` when the target is
robust.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from fedalign.core.options import Range
from fedalign.core.registry import Registry
from fedalign.core.types import StateDict, Stats

from .activation_matching import permutations_from_statistics
from .parallel import match_all
from .robust import align_to_median
from .sinkhorn_rebasin import sinkhorn_rebasin
from .spec import Perms, PermutationSpec, identity_permutation
from .weight_matching import merge_many, weight_matching_result

AlignTarget = Literal["auto", "weighted", "robust"]
RobustSweeps = Annotated[int, Range(low=0)]

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
    align_target: AlignTarget = "auto",
    robust_sweeps: RobustSweeps = 20,
) -> list[Perms]:
    """MergeMany weight matching (Git Re-Basin) to the consensus of all clients; with
    ``align_target: robust``, weight matching to the reference, then up to ``robust_sweeps``
    MergeMany sweeps matching each client to the coordinate-wise median of the others."""
    if align_target != "robust":
        return merge_many(spec, states, weights, solver=solver, seed=seed)[1]

    def match(target: StateDict, j: int, current: Perms | None) -> Perms:
        return weight_matching_result(
            spec, target, states[j], solver, seed=seed, init=current
        ).perms

    return align_to_median(spec, states, reference, match, robust_sweeps, seed)


@ALIGNERS.register("sinkhorn-rebasin", heads="blocks")
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
    align_target: AlignTarget = "auto",
    robust_sweeps: RobustSweeps = 3,
) -> list[Perms]:
    """Sinkhorn re-basin of every client to the reference (independent: a worker pool when
    asked; attention heads matched as blocks); with ``align_target: robust``, then up to
    ``robust_sweeps`` sweeps re-basing each client on the coordinate-wise median of the others
    (one after the other: each target holds the others' latest alignment)."""
    if align_target == "robust":
        return align_to_median(
            spec,
            states,
            reference,
            lambda target, j, _: sinkhorn_rebasin(
                spec, target, states[j], seed=seed, solver=solver
            ),
            robust_sweeps,
            seed,
        )
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
    align_target: AlignTarget = "auto",
) -> list[Perms]:
    """Activation matching of every client to the reference from its cross-moments (the
    pipeline reads ``align_target`` to choose that reference before it asks for them); an
    attention's heads are matched whole with the dimensions inside them (the spec's head sets).
    The clients measure the groups of the spec traced with heads as ``both``: a spec with other
    groups (heads as blocks) is refused in one line."""
    for j, c in enumerate(cross):
        if j != reference and set(c["cross"]) != set(spec.sizes):
            raise ValueError(
                f"activation matching: client {j}'s cross-moments cover groups "
                f"{sorted(set(c['cross']) ^ set(spec.sizes))[:3]} the spec does not (or the "
                "other way round); the clients measure the spec with heads='both'"
            )
    return [
        identity_permutation(spec)
        if j == reference
        else permutations_from_statistics(cross[j]["cross"], solver=solver, spec=spec)
        for j in range(len(states))
    ]
