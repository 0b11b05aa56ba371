"""The permutation spec: which permutation group acts on which axis of which state-dict entry.

Every alignment method (weight matching, activation matching, Sinkhorn re-basin) and every matched
fusion rule works through this one structure, so supporting a new architecture means deriving its
spec (``fedalign.algorithms.align.trace``) or writing it by hand (as ``tests/align/zoo_specs.py``
does), nothing else.

A group of ``n`` units acts on an axis of length ``repeat * n * block``: the axis holds ``repeat``
consecutive copies (the four gate blocks of an LSTM), each made of ``n`` runs of ``block``
consecutive entries (the ``H*W`` columns a conv channel becomes after a flatten). Permuting the
group moves the runs, identically inside every copy. Viewing the axis as ``(repeat, n, block)``
and moving ``n`` to the front gives the ``(n, rest)`` matrix every matching cost is built from.

Two views of the same information::

    spec.groups["fc1"]          # (AxisRef("fc1.weight", 0), AxisRef("fc1.bias", 0),
                                #  AxisRef("fc2.weight", 1))
    spec.parameters["fc2.weight"]   # ("fc2", "fc1"): the group on each axis, None where unpermuted
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch

Perms = dict[str, torch.Tensor]
"""Group name -> LongTensor ``p`` of length ``n``: unit ``p[i]`` of the input lands at position
``i``."""


@dataclass(frozen=True)
class AxisRef:
    """Group action on axis ``axis`` of state-dict entry ``key`` (``repeat`` copies of ``n`` runs
    of ``block`` entries)."""

    key: str
    axis: int
    block: int = 1
    repeat: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Which group acts on which axis.

    - ``groups``: group name -> the axes it acts on, in forward order of the groups (a group is
      named after the first layer that produces it; a residual stream after its first producer).
    - ``sizes``: group name -> number of units ``n``.
    - ``shapes``: every state-dict entry of the model -> its shape (checked against the groups).
    - ``buffers``: entries that are permuted but kept out of matching objectives (BN running
      statistics).
    - ``activations``: group name -> the traced node whose output carries the group's units
      (the input of the group's first consumer), where activation statistics are taken.

    Construction checks that every axis a group acts on has length ``repeat * n * block`` and that
    no axis is claimed by two groups.
    """

    groups: Mapping[str, tuple[AxisRef, ...]]
    sizes: Mapping[str, int]
    shapes: Mapping[str, tuple[int, ...]]
    buffers: frozenset[str] = frozenset()
    activations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.groups) != set(self.sizes):
            raise ValueError(f"groups {sorted(self.groups)} and sizes {sorted(self.sizes)} differ")
        claimed: dict[tuple[str, int], str] = {}
        for group, refs in self.groups.items():
            for ref in refs:
                if ref.key not in self.shapes:
                    raise ValueError(f"group {group!r} acts on {ref.key!r}, which is not in shapes")
                shape = self.shapes[ref.key]
                expected = ref.repeat * self.sizes[group] * ref.block
                if not 0 <= ref.axis < len(shape) or shape[ref.axis] != expected:
                    raise ValueError(
                        f"group {group!r} ({self.sizes[group]} units) does not fit axis "
                        f"{ref.axis} of {ref.key!r} {tuple(shape)} with block {ref.block} "
                        f"and repeat {ref.repeat}"
                    )
                slot = (ref.key, ref.axis)
                if claimed.setdefault(slot, group) != group:
                    raise ValueError(
                        f"axis {slot[1]} of {ref.key!r} is claimed by groups "
                        f"{claimed[slot]!r} and {group!r}"
                    )
        unknown = self.buffers - set(self.shapes)
        if unknown:
            raise ValueError(f"buffers {sorted(unknown)} are not entries of the model")

    @cached_property
    def parameters(self) -> dict[str, tuple[str | None, ...]]:
        """Entry -> the group acting on each of its axes (None where unpermuted)."""
        out = {key: [None] * len(shape) for key, shape in self.shapes.items()}
        for group, refs in self.groups.items():
            for ref in refs:
                out[ref.key][ref.axis] = group
        return {key: tuple(axes) for key, axes in out.items()}

    @cached_property
    def _axes(self) -> dict[str, dict[int, tuple[str, AxisRef]]]:
        out: dict[str, dict[int, tuple[str, AxisRef]]] = {}
        for group, refs in self.groups.items():
            for ref in refs:
                out.setdefault(ref.key, {})[ref.axis] = (group, ref)
        return out

    def axes_of(self, key: str) -> dict[int, tuple[str, AxisRef]]:
        """Permuted axes of one entry: axis -> (group, reference); empty if none."""
        return self._axes.get(key, {})

    @property
    def keys(self) -> set[str]:
        """Entries with at least one permuted axis (parameters and buffers)."""
        return set(self._axes)

    def objective_refs(self, group: str) -> Iterator[AxisRef]:
        """The axes of ``group`` that count in matching objectives (parameters, not buffers)."""
        return (ref for ref in self.groups[group] if ref.key not in self.buffers)


def expand_index(perm: torch.Tensor, ref: AxisRef, units: int | None = None) -> torch.Tensor:
    """Index along the full axis that applies unit index ``perm`` to every copy and every run.

    ``units`` is the number of units on the axis being indexed (default ``len(perm)``, a
    permutation); it differs when ``perm`` picks a subset of a wider axis or places units into one
    (FedMA's slicing and scattering), and sets the stride between the ``repeat`` copies."""
    n = len(perm) if units is None else units
    perm = perm.to(torch.long)
    idx = (
        torch.arange(ref.repeat, device=perm.device)[:, None, None] * n * ref.block
        + perm[None, :, None] * ref.block
        + torch.arange(ref.block, device=perm.device)[None, None, :]
    )
    return idx.reshape(-1)


def units_first(tensor: torch.Tensor, ref: AxisRef) -> torch.Tensor:
    """(n, rest): the group's units as rows, their blocks and repeats folded into the columns
    (the matrix every matching cost is built from)."""
    t = tensor.movedim(ref.axis, 0)
    t = t.reshape(ref.repeat, -1, ref.block, *t.shape[1:]).movedim(1, 0)
    return t.reshape(t.shape[0], -1)


def units_restore(rows: torch.Tensor, ref: AxisRef, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`units_first`: rows ``(n, rest)`` back into an entry of ``shape`` (whose
    axis ``ref.axis`` has length ``repeat * n * block``)."""
    moved = [shape[ref.axis], *shape[: ref.axis], *shape[ref.axis + 1 :]]
    t = rows.reshape(rows.shape[0], ref.repeat, ref.block, *moved[1:]).movedim(0, 1)
    return t.reshape(moved).movedim(0, ref.axis)


def permute_axis(tensor: torch.Tensor, perm: torch.Tensor, ref: AxisRef) -> torch.Tensor:
    return torch.index_select(tensor, ref.axis, expand_index(perm, ref).to(tensor.device))


def permuted_entry(
    spec: PermutationSpec,
    perms: Perms,
    key: str,
    value: torch.Tensor,
    except_axis: int | None = None,
) -> torch.Tensor:
    """``value`` with every permuted axis but ``except_axis`` permuted by ``perms`` (groups
    missing from ``perms`` are left alone)."""
    for axis, (group, ref) in spec.axes_of(key).items():
        if axis != except_axis and group in perms:
            value = permute_axis(value, perms[group], ref)
    return value


def apply_permutation(
    spec: PermutationSpec, perms: Perms, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict with units permuted; the model computes the same function.

    ``perms[g][i]`` is the old index of the unit that lands at position ``i``; entries the spec
    does not permute are passed through (not copied).
    """
    return {key: permuted_entry(spec, perms, key, value) for key, value in state_dict.items()}


def identity_permutation(spec: PermutationSpec) -> Perms:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> Perms:
    """A uniformly random permutation of every group."""
    return {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}


def invert_permutation(perms: Perms) -> Perms:
    """Perms that undo ``perms``: ``apply(invert(p), apply(p, sd)) == sd``."""
    return {g: torch.argsort(p) for g, p in perms.items()}


def compose(first: Perms, then: Perms) -> Perms:
    """Perms equal to applying ``first`` and then ``then``."""
    return {g: first[g][then[g]] for g in first}
