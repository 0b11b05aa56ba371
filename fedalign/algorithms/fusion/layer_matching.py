"""FedMA's server steps (Wang et al. 2020), general over any model with a permutation spec.

FedMA matches one layer at a time, bottom-up: the clients' units of layer n (conv filters
flattened, linear rows, embedding columns, or an LSTM's four gate rows of the input weights, each
with its biases; their inputs already in the global order of layer n-1) are matched with BBP-MAP;
layer n becomes the posterior means; each client's next layer gets its input axis scattered into
the global order of layer n (a conv channel moves a block of ``H*W`` columns of the first linear
layer: the spec's ``block``), and the clients retrain the layers above with the matched ones
frozen. The classifier is averaged with each client's class shares.

A recurrent entry, on which the group acts on both axes (an LSTM's ``weight_hh``), is not part of
the units' vectors: matching it jointly would be a quadratic assignment problem. As in the
reference, it is permuted on both axes by the assignment found from the input weights and averaged;
here each entry is divided by the number of clients that hold both of its units (the reference
divides by J). The spec says which entries produce each group and where its units are consumed,
and the model says which axis of a weight holds its outputs (axis 1 of an embedding), so no
architecture is hard-coded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedalign.algorithms.align.spec import (
    AxisRef,
    PermutationSpec,
    expand_index,
    units_first,
    units_restore,
)
from fedalign.core.types import StateDict

from .bbp_map import BBPResult, bbp_map


@dataclass(frozen=True)
class MatchedLayer:
    """A group of the spec seen as one layer: the entries whose output axis carries its units
    (``producers``), entries carrying them on both axes (``recurrent``), and the entries that take
    them as inputs (``consumers``)."""

    group: str
    producers: tuple[AxisRef, ...]
    consumers: tuple[AxisRef, ...]
    recurrent: tuple[AxisRef, ...] = ()

    @property
    def keys(self) -> list[str]:
        """The layer's own entries, which the clients freeze once it is matched."""
        return list(dict.fromkeys(r.key for r in self.producers + self.recurrent))


def output_axis(model: nn.Module, key: str) -> int:
    """The axis of entry ``key`` that indexes its module's outputs: 1 for an embedding's weight
    (one column per output dimension), else 0 (rows of linear/conv/recurrent weights, biases)."""
    module_name = key.rpartition(".")[0]
    return 1 if isinstance(model.get_submodule(module_name), nn.Embedding) else 0


def matched_layers(spec: PermutationSpec, model: nn.Module) -> list[MatchedLayer]:
    """The spec's groups in forward order, as layers FedMA can match one after another."""
    spec.require_free_groups("FedMA's layer matching")
    layers = []
    for group, refs in spec.groups.items():
        if any(r.key in spec.buffers for r in refs):
            raise ValueError(
                f"group {group!r} carries running statistics ({min(spec.buffers)!r}, ...): "
                "FedMA here covers networks without BatchNorm, as the reference does"
            )
        keys = [r.key for r in refs]
        recurrent = tuple(r for r in refs if keys.count(r.key) > 1)
        producers = tuple(
            r for r in refs if r not in recurrent and r.axis == output_axis(model, r.key)
        )
        consumers = tuple(r for r in refs if r not in recurrent and r not in producers)
        if not producers:
            raise ValueError(
                f"group {group!r}: no entry produces its units, so there is nothing to match"
            )
        layers.append(MatchedLayer(group, producers, consumers, recurrent))
    return layers


def classifier_keys(layers: Sequence[MatchedLayer], state: StateDict) -> list[str]:
    """Entries no layer owns: the output layer's weight and bias."""
    owned = {key for layer in layers for key in layer.keys}
    return [k for k in state if k not in owned]


def neuron_rows(state: StateDict, layer: MatchedLayer) -> torch.Tensor:
    """(units, D): each unit's incoming weights (flattened, every gate) and biases."""
    return torch.cat([units_first(state[r.key], r) for r in layer.producers], dim=1)


def match_layer(
    states: Sequence[StateDict],
    layer: MatchedLayer,
    seed: int = 0,
    device: str = "cpu",
    *,
    sigma: float = 1.0,
    sigma0: float = 1.0,
    gamma: float = 7.0,
    iterations: int = 5,
    solver: str = "hungarian",
    max_width: int | None = None,
    popularity: str = "consistent",
    popularity_cap: int | None = None,
) -> BBPResult:
    """BBP-MAP over the clients' units of ``layer``, its cost matrices on ``device``. The
    keyword-only parameters are BBP-MAP's options with FedMA's defaults (sigma = sigma0 = 1,
    gamma 7), the one place they live: the ``fedma`` strategy reads them from here. IBM/FedMA's
    own term is ``popularity="reference"`` with ``popularity_cap=10``."""
    rows = [neuron_rows(sd, layer).double() for sd in states]
    return bbp_map(
        rows,
        [1.0 / sigma] * len(rows),
        0.0,
        1.0 / sigma0,
        gamma,
        iterations,
        seed,
        solver,
        max_width,
        popularity,
        popularity_cap,
        device=device,
    )


def scatter_axis(
    value: torch.Tensor, assignment: torch.Tensor, ref: AxisRef, width: int
) -> torch.Tensor:
    """``value`` with its units on ``ref.axis`` moved to global positions ``assignment`` of a
    ``width``-unit axis (zeros for global units this client lacks)."""
    shape = list(value.shape)
    shape[ref.axis] = ref.repeat * width * ref.block
    out = torch.zeros(shape, dtype=value.dtype)
    index = expand_index(assignment, ref, width)
    out.index_copy_(ref.axis, index, value)
    return out


def _scatter_all(
    value: torch.Tensor, refs: Sequence[AxisRef], assignment: torch.Tensor, width: int
) -> torch.Tensor:
    for ref in refs:
        value = scatter_axis(value, assignment, ref, width)
    return value


@dataclass(frozen=True)
class GlobalLayer:
    """One matched layer: its global entries, each client's assignment into it, its width."""

    entries: dict[str, torch.Tensor]
    assignments: list[torch.Tensor]
    width: int


def global_layer(
    states: Sequence[StateDict], layer: MatchedLayer, matched: BBPResult
) -> GlobalLayer:
    """The global entries of ``layer``: producers from the posterior means; recurrent entries
    scattered on both axes and averaged over the clients holding each pair of units."""
    width = len(matched.mean)
    entries, start = {}, 0
    like = states[0]
    for r in layer.producers:
        shape = list(like[r.key].shape)
        shape[r.axis] = r.repeat * width * r.block
        size = units_first(like[r.key], r).shape[1]
        rows = matched.mean[:, start : start + size]
        entries[r.key] = units_restore(rows, r, tuple(shape)).to(like[r.key].dtype)
        start += size
    for key in dict.fromkeys(r.key for r in layer.recurrent):
        refs = [r for r in layer.recurrent if r.key == key]
        total = count = 0
        for sd, a in zip(states, matched.assignments):
            total = total + _scatter_all(sd[key].double(), refs, a, width)
            count = count + _scatter_all(
                torch.ones_like(sd[key], dtype=torch.float64), refs, a, width
            )
        entries[key] = (total / count.clamp_min(1.0)).to(like[key].dtype)
    return GlobalLayer(entries, list(matched.assignments), width)


def hybrid_state(
    client: StateDict, layer: MatchedLayer, glob: GlobalLayer, client_index: int
) -> dict[str, torch.Tensor]:
    """Client ``client_index``'s model after ``layer`` was matched: the layer replaced by the global
    one, the consumers' input axis scattered into the global order."""
    state = {**client, **glob.entries}
    for ref in layer.consumers:
        state[ref.key] = scatter_axis(
            client[ref.key], glob.assignments[client_index], ref, glob.width
        )
    return state


def class_weighted_classifier(
    states: Sequence[StateDict], keys: Sequence[str], class_counts: Sequence[Sequence[float]]
) -> dict[str, torch.Tensor]:
    """The output layer's rows (one per class) averaged with weights ``n_jk / sum_j n_jk``
    (uniformly for a class no client has)."""
    counts = torch.as_tensor([list(c) for c in class_counts], dtype=torch.float64)
    totals = counts.sum(0)
    shares = torch.where(totals > 0, counts / totals.clamp_min(1e-12), 1.0 / len(counts))  # (J, K)
    out = {}
    for key in keys:
        stacked = torch.stack([sd[key].double() for sd in states])  # (J, K, ...)
        w = shares.reshape(*shares.shape, *([1] * (stacked.dim() - 2)))
        out[key] = (stacked * w).sum(0).to(states[0][key].dtype)
    return out


def slice_to_client(
    global_state: StateDict, spec: PermutationSpec, assignments: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The global model cut back to one client's size through its assignments (FedMA with
    communication: each client continues from its own slice of the global model)."""
    state = {}
    for key, value in global_state.items():
        for axis, (group, ref) in spec.axes_of(key).items():
            width = value.shape[axis] // (ref.repeat * ref.block)
            value = torch.index_select(value, axis, expand_index(assignments[group], ref, width))
        state[key] = value
    return state
