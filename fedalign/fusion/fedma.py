"""FedMA's server-side steps (Wang et al. 2020), general over any model with a permutation spec.

FedMA matches one layer at a time, bottom-up: the clients' neurons of layer n (conv filters
flattened, or linear rows, with the bias appended; their inputs already in the global order of
layer n-1) are matched with BBP-MAP; layer n becomes the posterior means; each client's next
layer gets its input axis scattered into the global order of layer n (a conv channel moves a block
of ``H*W`` columns of the first linear layer: the spec's ``block``), and the clients retrain the
layers above with the matched ones frozen. The classifier is averaged with each client's class
shares. The spec says which layer produces each group and where the group's units are consumed,
so no model is hard-coded here. Recurrent layers are not covered (their hidden group acts on two
axes of one matrix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedalign.align.spec import AxisRef, PermutationSpec, expand_index

from .bbp_map import BBPResult, bbp_map

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class MatchedLayer:
    """A group of the spec seen as one layer: the entries that produce its units (axis 0) and the
    entries that consume them (another axis)."""

    group: str
    producers: tuple[AxisRef, ...]
    consumers: tuple[AxisRef, ...]


def matched_layers(spec: PermutationSpec) -> list[MatchedLayer]:
    """The spec's groups in forward order, as layers FedMA can match one after another."""
    layers = []
    for group, refs in spec.groups.items():
        producers = tuple(r for r in refs if r.axis == 0)
        consumers = tuple(r for r in refs if r.axis != 0)
        if any(r.repeat != 1 for r in refs) or any(r.key.endswith("running_mean") for r in refs):
            raise ValueError(f"group {group!r}: FedMA here covers plain conv/linear stacks "
                             "(no recurrent gates, no BatchNorm)")
        layers.append(MatchedLayer(group, producers, consumers))
    return layers


def classifier_keys(spec: PermutationSpec, state: StateDict) -> list[str]:
    """Entries no group produces: the output layer's weight and bias."""
    produced = {r.key for refs in spec.groups.values() for r in refs if r.axis == 0}
    return [k for k in state if k not in produced]


def neuron_rows(state: StateDict, layer: MatchedLayer) -> torch.Tensor:
    """(units, D): each unit's incoming weights (flattened) and bias."""
    return torch.cat([state[r.key].reshape(state[r.key].shape[0], -1) for r in layer.producers], dim=1)


def match_layer(
    states: Sequence[StateDict], layer: MatchedLayer, sigma: float = 1.0, sigma0: float = 1.0,
    gamma: float = 7.0, iterations: int = 5, seed: int = 0, solver: str = "hungarian",
    max_width: int | None = None,
) -> BBPResult:
    """BBP-MAP over the clients' units of ``layer`` (FedMA's defaults: sigma = sigma0 = 1, gamma 7)."""
    rows = [neuron_rows(sd, layer).double() for sd in states]
    return bbp_map(rows, [1.0 / sigma] * len(rows), 0.0, 1.0 / sigma0, gamma, iterations, seed,
                   solver, max_width)


def _unflatten(rows: torch.Tensor, layer: MatchedLayer, like: StateDict) -> dict[str, torch.Tensor]:
    """Split matched rows back into the producing entries at the global width."""
    out, start = {}, 0
    for r in layer.producers:
        shape = like[r.key].shape[1:]
        size = int(torch.tensor(shape).prod()) if shape else 1
        out[r.key] = rows[:, start:start + size].reshape(len(rows), *shape).to(like[r.key].dtype)
        start += size
    return out


def scatter_axis(value: torch.Tensor, assignment: torch.Tensor, ref: AxisRef, width: int) -> torch.Tensor:
    """``value`` with its units on ``ref.axis`` moved to global positions ``assignment`` of a
    ``width``-unit axis (zeros for global units this client lacks)."""
    shape = list(value.shape)
    shape[ref.axis] = width * ref.block
    out = torch.zeros(shape, dtype=value.dtype)
    index = expand_index(assignment, ref)
    out.index_copy_(ref.axis, index, value)
    return out


def hybrid_state(
    client: StateDict, layer: MatchedLayer, matched: BBPResult, client_index: int
) -> dict[str, torch.Tensor]:
    """Client ``client_index``'s model after layer ``layer`` was matched: that layer replaced by the
    global one, the consumers' input axis scattered into the global order."""
    state = dict(client)
    width = len(matched.mean)
    state.update(_unflatten(matched.mean, layer, client))
    for ref in layer.consumers:
        state[ref.key] = scatter_axis(client[ref.key], matched.assignments[client_index], ref, width)
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
            value = torch.index_select(value, axis, expand_index(assignments[group], ref))
        state[key] = value
    return state
