"""Alignment a minority of clients cannot steer, for the robust fuse rules.

A robust fuse rule (median, trimmed mean, Krum, ...) compares the clients coordinate by
coordinate, so it is only as robust as the basis it compares in. MergeMany matches each client to
the weighted mean of the others, and one client at 20x scale dominates that mean: it then chooses
every honest client's permutation, and the median of misaligned honest clients is far from all of
them. Aligning to the client with the most examples is no better: the count is the client's own
claim. Here the basis is chosen the robust way instead:

1. the reference is the medoid of the clients under a permutation-invariant distance
   (``invariant_distances``), so a minority can neither be it nor move it;
2. every client is matched to the reference, then MergeMany's sweeps run with the coordinate-wise
   median of the other aligned clients as each client's target in place of their weighted mean,
   until a sweep changes no permutation. Matched to the median of the others, an honest client
   is matched to what the honest majority agrees on. (The median of all clients, the client
   itself included, as a common target was tried first: on clients trained from their own inits
   it gave a poorer consensus than MergeMany even with no attacker.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedalign.core.tensors import coordinate_median
from fedalign.core.types import StateDict

from .spec import Perms, PermutationSpec, apply_permutation, identity_permutation

Match = Callable[[StateDict, int, Perms | None], Perms]
"""``(target, client index, its current perms or None) -> perms`` aligning that client to
``target`` (weight matching starts from the current perms; Sinkhorn re-basin ignores them)."""


def _invariants(spec: PermutationSpec, state: StateDict) -> list[torch.Tensor]:
    """What no permutation of the spec changes, entry by entry: an entry with a permuted axis is
    read as the matrix ``(axis 0, the other axes flattened)``, whose rows a permutation of axis 0
    and whose columns a permutation of any other axis permute, so its singular values are kept
    (sorted values for a vector); an unpermuted entry is kept as it is. BN running statistics and
    integer buffers are left out, as the matching objectives leave them out."""
    out = []
    for key in sorted(state):
        value = state[key]
        if key in spec.buffers or not value.is_floating_point():
            continue
        value = value.detach().double()
        if not spec.axes_of(key):
            out.append(value.reshape(-1))
        elif value.dim() == 1:
            out.append(value.sort().values)
        else:
            out.append(torch.linalg.svdvals(value.reshape(value.shape[0], -1)))
    return out


def invariant_distances(spec: PermutationSpec, states: Sequence[StateDict]) -> torch.Tensor:
    """(n, n) float64 distances between the clients that no permutation of the spec changes:
    the Euclidean distance of their singular values (sorted values for vectors) entry by entry.
    By Mirsky's inequality (and the rearrangement inequality for vectors) it is at most the
    distance after the best alignment, ``min_P ||A - P(B)||``, so clients that align closely are
    close here; a client scaled or drawn at random is far from the honest ones."""
    flat = torch.stack([torch.cat(_invariants(spec, sd)) for sd in states])
    return torch.cdist(flat, flat)


def medoid(spec: PermutationSpec, states: Sequence[StateDict]) -> int:
    """The client with the least summed invariant distance to the others (the first on a tie).
    A minority moves each honest client's sum by at most its own distances, and its own sums
    include its distances to every honest client, so it is not chosen while the honest clients
    are closer to each other than to it."""
    return int(invariant_distances(spec, states).sum(1).argmin())


def align_to_median(
    spec: PermutationSpec,
    states: Sequence[StateDict],
    reference: int,
    match: Match,
    sweeps: int,
    seed: int = 0,
) -> list[Perms]:
    """Every client matched to ``states[reference]`` (the medoid, chosen by the caller), then up
    to ``sweeps`` sweeps in random order (``seed``) matching each client to the coordinate-wise
    median of the other aligned clients, stopping when a sweep changes no permutation.
    ``sweeps = 0`` aligns to the reference only."""
    if sweeps < 0:
        raise ValueError(f"robust_sweeps must be >= 0, got {sweeps}")
    keys = sorted(spec.keys - spec.buffers)  # what the matching objectives read
    target = {k: states[reference][k] for k in keys}
    perms = [
        identity_permutation(spec) if j == reference else match(target, j, None)
        for j in range(len(states))
    ]
    aligned = [
        apply_permutation(spec, p, {k: sd[k].double() for k in keys})
        for p, sd in zip(perms, states)
    ]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(sweeps if len(states) > 1 else 0):
        changed = False
        for j in torch.randperm(len(states), generator=generator).tolist():
            others = [a for i, a in enumerate(aligned) if i != j]
            target = {k: coordinate_median(torch.stack([a[k] for a in others])) for k in keys}
            new = match(target, j, perms[j])
            if any(not torch.equal(new[g], perms[j][g]) for g in spec.sizes):
                changed = True
                perms[j] = new
                aligned[j] = apply_permutation(spec, new, {k: states[j][k].double() for k in keys})
        if not changed:
            break
    return perms
