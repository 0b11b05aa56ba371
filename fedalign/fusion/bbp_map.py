"""BBP-MAP: Beta-Bernoulli-process matching of one layer's neurons across clients (PFNM).

Yurochkin et al. (2019) model each client's neurons as noisy draws of global neurons, with a
Beta-Bernoulli process prior over which global neurons a client uses. The MAP assignment of one
client's neurons, given the others, is a linear assignment over ``[existing | new]`` global
neurons; sweeping over clients until it settles gives the global layer (posterior means), each
client's assignment and each global neuron's popularity. The global layer may grow.

Everything is kept precision-weighted: a global neuron stores ``sum_j s_j * w_j + s0 * mu0`` and
``sum_j s_j + s0`` (per dimension), so adding or removing a client is one addition. The cost
matrix is built with matrix products (the reference code loops over rows in Python).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedalign.align.solvers import solve_assignment


@dataclass
class BBPResult:
    mean: torch.Tensor  # (W, D) posterior mean of each global neuron
    precision: torch.Tensor  # (W, D) its posterior precision
    assignments: list[torch.Tensor]  # per client: (L_j,) global index of each of its neurons
    popularity: torch.Tensor  # (W,) number of clients using each global neuron


def _vector(value: float | torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=torch.float64, device=device)
    return v.expand(dim).clone() if v.dim() == 0 else v.double().to(device)


def assignment_cost(
    weights: torch.Tensor,  # (L, D) client rows, precision-scaled (s_j * w)
    precision: torch.Tensor,  # (D,) client precision s_j
    sums: torch.Tensor,  # (W, D) global precision-weighted sums
    precisions: torch.Tensor,  # (W, D) global precisions
    popularity: torch.Tensor,  # (W,)
    prior_sum: torch.Tensor,  # (D,) s0 * mu0
    prior_precision: torch.Tensor,  # (D,) s0
    gamma: float,
    num_clients: int,
    new_columns: int,
    popularity_weight: float = 2.0,
    popularity_cap: float | None = None,
) -> torch.Tensor:
    """Score (to maximise) of giving each client row each existing global neuron or a new one.

    ``(L, W + new_columns)``: existing i: ``sum_d (w + g_i)^2 / (s + S_i) - g_i^2 / S_i +
    c log(m_i / (J - m_i))``; new neuron t: ``sum_d (w + p)^2 / (s + s0) - p^2 / s0 - 2 log t +
    2 log(gamma / J)`` (``c`` = 2 consistent, 1 as in the reference code).
    """
    inv = 1.0 / (precision[None, :] + precisions)  # (W, D)
    existing = (weights**2) @ inv.T + 2 * weights @ (sums * inv).T + (sums**2 * inv).sum(1)[None, :]
    existing = existing - (sums**2 / precisions).sum(1)[None, :]
    m = popularity.double()
    if popularity_cap is not None:
        m = m.clamp(max=popularity_cap)
    existing = existing + popularity_weight * torch.log(m / (num_clients - m).clamp_min(1e-12))
    inv0 = 1.0 / (precision + prior_precision)
    base = ((weights + prior_sum) ** 2 * inv0).sum(1) - (prior_sum**2 / prior_precision).sum()
    t = torch.arange(1, new_columns + 1, dtype=torch.float64, device=weights.device)
    new = base[:, None] - 2 * torch.log(t)[None, :] + 2 * math.log(gamma / num_clients)
    return torch.cat([existing, new], dim=1)


class _GlobalLayer:
    """The running global layer: precision-weighted sums, precisions, popularity.

    ``targets`` are one client's assignment, so its indices are distinct and plain indexed updates
    suffice. (``index_add`` would do the same, but on CPU it opens a parallel region per call even
    for a handful of rows; on a busy machine each such region can stall for a scheduler tick, which
    made a small fusion 100x slower.)
    """

    def __init__(self, prior_sum: torch.Tensor, prior_precision: torch.Tensor) -> None:
        self.prior_sum, self.prior_precision = prior_sum, prior_precision
        dim, device = len(prior_sum), prior_sum.device
        self.sums = torch.zeros(0, dim, dtype=torch.float64, device=device)
        self.precisions = torch.zeros(0, dim, dtype=torch.float64, device=device)
        self.popularity = torch.zeros(0, dtype=torch.float64, device=device)

    @property
    def width(self) -> int:
        return len(self.popularity)

    def add(self, weights: torch.Tensor, precision: torch.Tensor, targets: torch.Tensor) -> None:
        """Add rows to global neurons ``targets`` (indices >= width open new neurons, in order)."""
        opened = int((targets >= self.width).sum())
        if opened:
            self.sums = torch.cat([self.sums, self.prior_sum.expand(opened, -1)])
            self.precisions = torch.cat([self.precisions, self.prior_precision.expand(opened, -1)])
            self.popularity = torch.cat([self.popularity, self.popularity.new_zeros(opened)])
        self.sums[targets] += weights
        self.precisions[targets] += precision
        self.popularity[targets] += 1

    def remove(
        self, weights: torch.Tensor, precision: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Take rows out; drop neurons nobody uses any more. Returns old index -> new index."""
        self.sums[targets] -= weights
        self.precisions[targets] -= precision
        self.popularity[targets] -= 1
        keep = self.popularity > 0.5
        remap = torch.cumsum(keep.long(), 0) - 1
        self.sums, self.precisions, self.popularity = (
            self.sums[keep],
            self.precisions[keep],
            self.popularity[keep],
        )
        return remap


def bbp_map(
    neurons: Sequence[torch.Tensor],
    precisions: Sequence[float | torch.Tensor],
    prior_mean: float | torch.Tensor = 0.0,
    prior_precision: float | torch.Tensor = 1.0,
    gamma: float = 1.0,
    iterations: int = 5,
    seed: int = 0,
    solver: str = "hungarian",
    max_width: int | None = None,
    popularity: str = "consistent",
    popularity_cap: float | None = None,
    device: str | torch.device | None = None,
) -> BBPResult:
    """Match J clients' neurons (``neurons[j]``: (L_j, D) rows) into one global layer.

    ``precisions[j]``: client j's noise precision 1/sigma, a scalar or per dimension (D,);
    ``prior_mean`` / ``prior_precision`` (1/sigma0): the prior of a global neuron; ``gamma``: the
    Beta-Bernoulli mass (larger opens more neurons); ``iterations``: sweeps re-matching every
    client after the first pass; ``max_width``: never open neurons beyond this width (none by
    default: PFNM's reference silently caps at 700); ``popularity``: ``"consistent"`` (2 log) or
    ``"reference"`` (1 log, as the reference code); ``device``: where the cost matrices are built
    (default: the first client's; the server's GPU when it has one), the result comes back on the
    CPU.
    """
    if popularity not in ("consistent", "reference"):
        raise ValueError(f"popularity must be 'consistent' or 'reference', got {popularity!r}")
    J = len(neurons)
    if J == 0:
        raise ValueError("bbp_map needs at least one client")
    dim = neurons[0].shape[1]
    if any(n.dim() != 2 or n.shape[1] != dim for n in neurons):
        raise ValueError(
            f"every client's neurons must be (L_j, {dim}), got {[tuple(n.shape) for n in neurons]}"
        )
    device = neurons[0].device if device is None else torch.device(device)
    s = [_vector(p, dim, device) for p in precisions]
    s0 = _vector(prior_precision, dim, device)
    prior_sum = _vector(prior_mean, dim, device) * s0
    scaled = [n.to(device, torch.float64) * sj for n, sj in zip(neurons, s)]
    weight = 2.0 if popularity == "consistent" else 1.0
    layer = _GlobalLayer(prior_sum, s0)
    assignments: list[torch.Tensor | None] = [None] * J

    def match(j: int) -> None:
        L = len(scaled[j])
        room = L if max_width is None else max(0, min(L, max_width - layer.width))
        if layer.width + room < L:
            raise ValueError(f"max_width={max_width} is smaller than client {j}'s {L} neurons")
        cost = assignment_cost(
            scaled[j],
            s[j],
            layer.sums,
            layer.precisions,
            layer.popularity,
            prior_sum,
            s0,
            gamma,
            J,
            room,
            weight,
            popularity_cap,
        )
        columns = solve_assignment(cost, solver)
        # new-neuron columns are interchangeable: open them in order of first use
        is_new = columns >= layer.width
        targets = columns.clone()
        targets[is_new] = layer.width + torch.arange(int(is_new.sum()), device=device)
        layer.add(scaled[j], s[j], targets)
        assignments[j] = targets

    order = sorted(range(J), key=lambda j: -len(neurons[j]))
    for j in order:
        match(j)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        for j in torch.randperm(J, generator=generator).tolist():
            remap = layer.remove(scaled[j], s[j], assignments[j])
            for k in range(J):
                if k != j:
                    assignments[k] = remap[assignments[k]]
            match(j)
    return BBPResult(
        mean=(layer.sums / layer.precisions).float().cpu(),
        precision=layer.precisions.float().cpu(),
        assignments=[a.cpu() for a in assignments],
        popularity=layer.popularity.round().long().cpu(),
    )
