"""The permutation spec: which permutation group acts on which axis of which parameter.

Every alignment method (weight matching, activation matching, Sinkhorn re-basin) and every
matched fusion rule works through this one structure, so supporting a new architecture means
deriving its spec (``fedalign.align.trace``), nothing else.

A group of ``n`` units acts on an axis of length ``repeat * n * block``: the axis holds ``repeat``
consecutive copies (the four gate blocks of an LSTM), each made of ``n`` runs of ``block``
consecutive entries (the ``H*W`` columns a conv channel becomes after flatten). Permuting the
group moves the runs, identically inside every copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

Perms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AxisRef:
    """Group action on axis ``axis`` of entry ``key``."""

    key: str
    axis: int
    block: int = 1
    repeat: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """``groups``: group name -> the axes it acts on; ``sizes``: group name -> number of units;
    ``buffers``: keys that are permuted but kept out of matching objectives (BN running stats);
    ``activations``: group name -> the traced node whose output carries the group's units
    (for activation statistics)."""

    groups: Mapping[str, tuple[AxisRef, ...]]
    sizes: Mapping[str, int]
    buffers: frozenset[str] = frozenset()
    activations: Mapping[str, str] = field(default_factory=dict)

    def axes_of(self, key: str) -> dict[int, tuple[str, AxisRef]]:
        """Permuted axes of one entry: axis -> (group, reference)."""
        return {ref.axis: (g, ref) for g, refs in self.groups.items() for ref in refs if ref.key == key}

    @property
    def keys(self) -> set[str]:
        return {ref.key for refs in self.groups.values() for ref in refs}

    def objective_refs(self, group: str) -> Iterator[AxisRef]:
        """The axes of ``group`` that count in matching objectives (parameters, not buffers)."""
        return (ref for ref in self.groups[group] if ref.key not in self.buffers)


def expand_index(perm: torch.Tensor, ref: AxisRef) -> torch.Tensor:
    """Index along the full axis that applies unit permutation ``perm`` (length n)."""
    n = len(perm)
    perm = perm.to(torch.long)
    idx = (
        torch.arange(ref.repeat, device=perm.device)[:, None, None] * n * ref.block
        + perm[None, :, None] * ref.block
        + torch.arange(ref.block, device=perm.device)[None, None, :]
    )
    return idx.reshape(-1)


def permute_axis(tensor: torch.Tensor, perm: torch.Tensor, ref: AxisRef) -> torch.Tensor:
    return torch.index_select(tensor, ref.axis, expand_index(perm, ref).to(tensor.device))


def permuted_entry(
    spec: PermutationSpec, perms: Perms, key: str, value: torch.Tensor, except_axis: int | None = None
) -> torch.Tensor:
    """``value`` with every permuted axis but ``except_axis`` permuted by ``perms``."""
    for axis, (group, ref) in spec.axes_of(key).items():
        if axis != except_axis and group in perms:
            value = permute_axis(value, perms[group], ref)
    return value


def apply_permutation(
    spec: PermutationSpec, perms: Perms, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict with units permuted; the model computes the same function.

    ``perms[g][i]`` is the old index of the unit that lands at position ``i``.
    """
    out = type(state_dict)() if isinstance(state_dict, dict) else {}
    for key, value in state_dict.items():
        out[key] = permuted_entry(spec, perms, key, value)
    return out


def identity_permutation(spec: PermutationSpec) -> Perms:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> Perms:
    return {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}


def invert_permutation(perms: Perms) -> Perms:
    return {g: torch.argsort(p) for g, p in perms.items()}


def compose(first: Perms, then: Perms) -> Perms:
    """Perms equal to applying ``first`` and then ``then``."""
    return {g: first[g][then[g]] for g in first}
