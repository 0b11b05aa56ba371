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

A ref may cover part of an axis, from ``offset`` on: ``nn.MultiheadAttention`` packs the query,
key and value rows into one ``in_proj_weight``, and the query/key group acts on its first two
thirds while the value group acts on the last. The refs on one axis must tile it exactly.

Attention heads: a multi-head attention's query/key dimensions form one group and its
value/output dimensions another, ``heads`` runs of ``d_head`` consecutive units each. Only
permutations that keep every run together preserve the function: a :class:`HeadSet` names the
groups that obey this, how many runs they have, and whether the runs (heads) may move (then all the
set's groups move their runs alike: a head's queries, keys, values and output columns travel
together) or stay in place (only the dimensions inside each head are permuted). A permutation of
such a group is still one index over its units (the head move and the within-head moves composed),
so applying, inverting and composing permutations need nothing special; drawing and solving do
(``random_permutation``, ``solvers.solve_heads``). With heads matched as blocks only, a head is an
ordinary unit of ``block = d_head`` and needs no HeadSet.

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
    of ``block`` entries, starting at entry ``offset`` of the axis)."""

    key: str
    axis: int
    block: int = 1
    repeat: int = 1
    offset: int = 0

    def extent(self, units: int) -> int:
        """How many entries of the axis the group covers with ``units`` units."""
        return self.repeat * units * self.block


@dataclass(frozen=True)
class Site:
    """Where activation matching reads a group's units: the output of the traced node ``node``.
    ``heads`` is ``(head axis, dimension axis)`` (from the end) when that output is split into
    attention heads (a query or key of ``scaled_dot_product_attention``, ``(n, heads, T, d_head)``):
    its units are then the heads' dimensions in order, head by head. ``later``: not the input of
    the group's first consumer but of a later one (a residual stream is read by every block:
    activation matching pools these only with ``activation_sites='all'``)."""

    node: str
    heads: tuple[int, int] | None = None
    later: bool = False


@dataclass(frozen=True)
class HeadSet:
    """Groups of attention dimensions that come in ``count`` runs (heads) of consecutive units:
    their permutations keep each run together; with ``move`` the runs may move, alike in every
    group of the set, else each run stays where it is."""

    groups: tuple[str, ...]
    count: int
    move: bool = True

    def runs(self, units: int) -> int:
        """Units per head of a group of ``units`` units."""
        return units // self.count


@dataclass(frozen=True)
class PermutationSpec:
    """Which group acts on which axis.

    - ``groups``: group name -> the axes it acts on, in forward order of the groups (a group is
      named after the first layer that produces it; a residual stream after its first producer).
    - ``sizes``: group name -> number of units ``n``.
    - ``shapes``: every state-dict entry of the model -> its shape (checked against the groups).
    - ``buffers``: entries that are permuted but kept out of matching objectives (BN running
      statistics).
    - ``activations``: group name -> the traced nodes (``Site``) whose outputs carry the group's
      units, where activation statistics are taken: the input of the group's first consumer; for
      an attention's query/key group, its queries and its keys (both sites' samples count).
    - ``heads``: the groups whose permutations must keep attention heads together.

    Construction checks that the refs on every permuted axis tile it (each covers
    ``repeat * n * block`` entries from its offset, none overlap, none is left over), so no entry
    is claimed by two groups, and that head sets name groups that split into their heads.
    """

    groups: Mapping[str, tuple[AxisRef, ...]]
    sizes: Mapping[str, int]
    shapes: Mapping[str, tuple[int, ...]]
    buffers: frozenset[str] = frozenset()
    activations: Mapping[str, tuple[Site, ...]] = field(default_factory=dict)
    heads: tuple[HeadSet, ...] = ()

    def __post_init__(self) -> None:
        if set(self.groups) != set(self.sizes):
            raise ValueError(f"groups {sorted(self.groups)} and sizes {sorted(self.sizes)} differ")
        slots: dict[tuple[str, int], list[tuple[str, AxisRef]]] = {}
        for group, refs in self.groups.items():
            for ref in refs:
                if ref.key not in self.shapes:
                    raise ValueError(f"group {group!r} acts on {ref.key!r}, which is not in shapes")
                if not 0 <= ref.axis < len(self.shapes[ref.key]):
                    raise ValueError(self._misfit(group, ref))
                slots.setdefault((ref.key, ref.axis), []).append((group, ref))
        for (key, axis), claims in slots.items():
            self._check_tiling(key, axis, claims)
        unknown = self.buffers - set(self.shapes)
        if unknown:
            raise ValueError(f"buffers {sorted(unknown)} are not entries of the model")
        in_sets = [g for head_set in self.heads for g in head_set.groups]
        for head_set in self.heads:
            for g in head_set.groups:
                if g not in self.sizes:
                    raise ValueError(f"head set names group {g!r}, which the spec does not have")
                if head_set.count < 1 or self.sizes[g] % head_set.count:
                    raise ValueError(
                        f"group {g!r} ({self.sizes[g]} units) does not split into "
                        f"{head_set.count} heads"
                    )
                if in_sets.count(g) > 1:
                    raise ValueError(f"group {g!r} is in two head sets")

    def _misfit(self, group: str, ref: AxisRef) -> str:
        shape = tuple(self.shapes[ref.key])
        where = f" from offset {ref.offset}" if ref.offset else ""
        return (
            f"group {group!r} ({self.sizes[group]} units) does not fit axis {ref.axis} of "
            f"{ref.key!r} {shape} with block {ref.block} and repeat {ref.repeat}{where}"
        )

    def _check_tiling(self, key: str, axis: int, claims: list[tuple[str, AxisRef]]) -> None:
        """The refs on one axis cover it exactly once, in consecutive ranges."""
        end, last = 0, claims[0]
        for group, ref in sorted(claims, key=lambda c: c[1].offset):
            if ref.offset < end:
                raise ValueError(
                    f"axis {axis} of {key!r} is claimed by groups {last[0]!r} and {group!r}"
                )
            if ref.offset > end:
                raise ValueError(self._misfit(group, ref))
            end, last = ref.offset + ref.extent(self.sizes[group]), (group, ref)
        if end != self.shapes[key][axis]:
            raise ValueError(self._misfit(*last))

    @cached_property
    def parameters(self) -> dict[str, tuple[str | None, ...]]:
        """Entry -> the group acting on each of its axes (None where unpermuted; groups sharing a
        packed axis joined by ``+`` in the order of their offsets)."""
        out = {key: [None] * len(shape) for key, shape in self.shapes.items()}
        for key, refs in self._refs.items():
            for axis in sorted({ref.axis for _, ref in refs}):
                out[key][axis] = "+".join(g for g, ref in refs if ref.axis == axis)
        return {key: tuple(axes) for key, axes in out.items()}

    @cached_property
    def _refs(self) -> dict[str, tuple[tuple[str, AxisRef], ...]]:
        out: dict[str, list[tuple[str, AxisRef]]] = {}
        for group, refs in self.groups.items():
            for ref in refs:
                out.setdefault(ref.key, []).append((group, ref))
        return {
            key: tuple(sorted(refs, key=lambda r: (r[1].axis, r[1].offset)))
            for key, refs in out.items()
        }

    def refs_of(self, key: str) -> tuple[tuple[str, AxisRef], ...]:
        """Every group action on one entry, ``(group, reference)``, by axis and offset (an axis
        packing several groups, as ``in_proj_weight``, appears once per group); empty if none."""
        return self._refs.get(key, ())

    def axes_of(self, key: str) -> dict[int, tuple[str, AxisRef]]:
        """Permuted axes of one entry: axis -> (group, reference); empty if none. For methods
        that take one group per axis: a packed axis (``refs_of``) is refused with one line."""
        out: dict[int, tuple[str, AxisRef]] = {}
        for group, ref in self.refs_of(key):
            if ref.axis in out:
                raise ValueError(
                    f"axis {ref.axis} of {key!r} packs groups {out[ref.axis][0]!r} and "
                    f"{group!r} (query/key/value in one matrix): this method takes one group "
                    "per axis"
                )
            out[ref.axis] = (group, ref)
        return out

    @property
    def keys(self) -> set[str]:
        """Entries with at least one permuted axis (parameters and buffers)."""
        return set(self._refs)

    @cached_property
    def head_sets(self) -> dict[str, HeadSet]:
        """Group -> the head set it belongs to (groups free of head constraints are absent)."""
        return {g: head_set for head_set in self.heads for g in head_set.groups}

    def require_free_groups(self, method: str) -> None:
        """Refuse, in one line, a spec with head constraints for a method that would permute
        every group's units freely (and break the attention heads apart)."""
        if self.heads:
            raise ValueError(
                f"{method} permutes every unit of a group freely, which would split attention "
                f"heads ({', '.join(self.head_sets)}); derive the spec with "
                "permutation_spec(..., heads='blocks') or align by weight matching"
            )

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


def units_first(tensor: torch.Tensor, ref: AxisRef, units: int | None = None) -> torch.Tensor:
    """(n, rest): the group's units as rows, their blocks and repeats folded into the columns
    (the matrix every matching cost is built from). ``units`` (the group's size) is needed when
    ``ref`` covers only part of its axis (a packed ``in_proj_weight``)."""
    t = tensor.movedim(ref.axis, 0)
    if units is not None:
        t = t[ref.offset : ref.offset + ref.extent(units)]
    elif ref.offset:
        raise ValueError(f"{ref.key!r}: a ref from offset {ref.offset} needs its group's size")
    t = t.reshape(ref.repeat, -1, ref.block, *t.shape[1:]).movedim(1, 0)
    return t.reshape(t.shape[0], -1)


def units_restore(rows: torch.Tensor, ref: AxisRef, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`units_first`: rows ``(n, rest)`` back into an entry of ``shape`` (whose
    axis ``ref.axis`` has length ``repeat * n * block``)."""
    moved = [shape[ref.axis], *shape[: ref.axis], *shape[ref.axis + 1 :]]
    t = rows.reshape(rows.shape[0], ref.repeat, ref.block, *moved[1:]).movedim(0, 1)
    return t.reshape(moved).movedim(0, ref.axis)


def permute_axis(tensor: torch.Tensor, perm: torch.Tensor, ref: AxisRef) -> torch.Tensor:
    """``tensor`` with the part of axis ``ref.axis`` that ``ref`` covers permuted by ``perm``."""
    index = expand_index(perm, ref).to(tensor.device)
    length = tensor.shape[ref.axis]
    if len(index) != length:  # a packed axis: the rest stays where it is
        full = torch.arange(length, device=tensor.device)
        full[ref.offset : ref.offset + len(index)] = index + ref.offset
        index = full
    return torch.index_select(tensor, ref.axis, index)


def permuted_entry(
    spec: PermutationSpec,
    perms: Perms,
    key: str,
    value: torch.Tensor,
    except_axis: int | None = None,
) -> torch.Tensor:
    """``value`` with every permuted axis but ``except_axis`` permuted by ``perms`` (groups
    missing from ``perms`` are left alone)."""
    for group, ref in spec.refs_of(key):
        if ref.axis != except_axis and group in perms:
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
    """A uniformly random permutation of every group, among those the spec allows: a head
    set's groups move their heads by one shared random order (when the set moves heads) and
    permute the units inside each head at random."""
    perms = {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}
    for head_set in spec.heads:
        count = head_set.count
        order = torch.randperm(count, generator=generator) if head_set.move else torch.arange(count)
        for g in head_set.groups:
            d = head_set.runs(spec.sizes[g])
            perms[g] = torch.cat(
                [int(h) * d + torch.randperm(d, generator=generator) for h in order]
            )
    return perms


def invert_permutation(perms: Perms) -> Perms:
    """Perms that undo ``perms``: ``apply(invert(p), apply(p, sd)) == sd``."""
    return {g: torch.argsort(p) for g, p in perms.items()}


def compose(first: Perms, then: Perms) -> Perms:
    """Perms equal to applying ``first`` and then ``then``."""
    return {g: first[g][then[g]] for g in first}
