"""BBP-MAP: Beta-Bernoulli-process matching of one layer's neurons across clients (PFNM).

Yurochkin et al. (2019) model each client's neurons as noisy draws of global neurons, with a
Beta-Bernoulli process prior over which global neurons a client uses. The MAP assignment of one
client's neurons, given the others, is a linear assignment over ``[existing | new]`` global
neurons; sweeping over clients until it settles gives the global layer (posterior means), each
client's assignment and each global neuron's popularity. The global layer may grow.

Everything is kept precision-weighted: a global neuron stores ``sum_j s_j * w_j + s0 * mu0`` and
``sum_j s_j + s0`` (per dimension), so adding or removing a client is one addition. The cost
matrix is built with matrix products (the reference code loops over rows in Python). Each
match's (W, D)-sized work, the cross-term product and the global neurons' squared norms, runs in
float32: half the time of float64 at hidden 100. Its rounding (at most 1.1e-4 against entries up
to 402 in a (100, 150) cross term of random rows at D = 795) can only flip near-ties between
scores: PFNM's fused layers over the reference's grid came
out bit for bit those of float64 (72 fusions, docs/fidelity.md); FedMA's matching takes the same
path. The running sums and precisions stay float64, and on CUDA the product is float32 only while
TF32 matrix products stay off (torch's default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from fedalign.algorithms.align.solvers import SOLVERS, hungarian_columns, solve_assignment


@dataclass
class BBPResult:
    mean: torch.Tensor  # (W, D) posterior mean of each global neuron
    precision: torch.Tensor  # (W, D) its posterior precision
    assignments: list[torch.Tensor]  # per client: (L_j,) global index of each of its neurons
    popularity: torch.Tensor  # (W,) number of clients using each global neuron
    objective: float  # the log posterior of the assignment (see ``log_posterior``)


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


@dataclass(frozen=True)
class _Blocks:
    """Dimensions grouped by precision: within a block every client's precision and the prior's
    are one number, so every global neuron's precision is too (a sum of them).

    PFNM's rows have a handful of such blocks (the incoming weights and bias at 1/sigma, the
    outgoing weights at 1/sigma or one block per class share), so the cost needs one matrix
    product in all instead of two over all dimensions plus elementwise work on the whole (W, D)
    precision matrix. The cross term is one product with each neuron's per-block scale spread
    over its dimensions: with one block per class share (B ~ 11) a loop of small products, one
    per block, cost more in per-call overhead than in arithmetic at hidden 100. Per-block norms
    are sums over each block's dimensions: a range for a block of consecutive dimensions (PFNM's
    incoming weights), one gather for all one-dimension blocks (its class shares); a product with
    a (D, B) 0/1 indicator, which gave the same sums, is a skinny product that took 13x longer at
    hidden 100, once per match.
    """

    position_block: torch.Tensor  # (D,) the block of each dimension
    client: torch.Tensor  # (J, B) each client's precision per block
    prior: torch.Tensor  # (B,) the prior's precision per block
    spread: torch.Tensor  # (B, D) 1 where a dimension is in a block
    spread32: torch.Tensor  # the same in float32
    wide: tuple[tuple[int, slice | torch.Tensor], ...]  # each block of several dims: its dims
    single_blocks: torch.Tensor  # blocks of one dimension
    single_dims: torch.Tensor  # ... and that dimension

    @classmethod
    def of(cls, client: Sequence[torch.Tensor], prior: torch.Tensor) -> _Blocks:
        keys, block = _unique_columns(torch.stack([*client, prior]))
        spread = torch.nn.functional.one_hot(block, keys.shape[1]).to(keys.dtype).T.contiguous()
        wide, single_blocks, single_dims = [], [], []
        for b, dims in enumerate(torch.nonzero(spread).split(spread.sum(1).long().tolist())):
            dims = dims[:, 1]
            if len(dims) == 1:
                single_blocks.append(b)
                single_dims.append(int(dims[0]))
            elif int(dims[-1] - dims[0]) == len(dims) - 1:  # consecutive
                wide.append((b, slice(int(dims[0]), int(dims[-1]) + 1)))
            else:
                wide.append((b, dims))
        index = partial(torch.tensor, dtype=torch.long, device=block.device)
        return cls(
            block,
            keys[:-1],
            keys[-1],
            spread,
            spread.float(),
            tuple(wide),
            index(single_blocks),
            index(single_dims),
        )

    def norms(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, B): squared norm of each row's part in each block."""
        squares = rows.square()
        norms = squares.new_empty(len(rows), len(self.spread))
        for b, dims in self.wide:
            norms[:, b] = squares[:, dims].sum(1)
        norms[:, self.single_blocks] = squares[:, self.single_dims]
        return norms

    def cross(self, rows: torch.Tensor, sums: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(L, W): ``sum_b scale[i, b] * <rows_lb, sums_ib>``, in float64, the products in
        ``rows``' precision."""
        # scale @ spread spreads (W, B) over (W, D), exactly (x * 1 + 0s), and on the CPU
        # in a sixth of the time of indexing columns with position_block; multiplied in place
        # (the same products): a (W, D) temporary less, and ``sums`` (a strided view of the
        # layer's buffer) as the second operand is several times faster on the CPU
        spread = self.spread32 if rows.dtype == torch.float32 else self.spread
        return (rows @ (scale.to(rows.dtype) @ spread).mul_(sums).T).double()


def _unique_columns(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(matrix, dim=1, return_inverse=True)``: the distinct columns in ascending
    lexicographic order and each column's index among them. Each column is compared as one
    string of bytes in NumPy (equal bytes, equal values: ``+ 0.0`` makes -0.0 the bytes of 0.0;
    the callers' precisions are never NaN), then the few distinct ones are put in torch's order:
    torch's unique over columns loops over them, 1.6 ms against 0.16 ms for PFNM's (11, 795) at
    J=10, once per layer."""
    values = np.ascontiguousarray(matrix.cpu().numpy().T) + 0.0
    as_bytes = values.view(np.dtype((np.void, values.shape[1] * values.itemsize))).ravel()
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    keys = values[first]
    order = np.lexsort(keys.T[::-1])  # the first row most significant, as torch sorts
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return (
        torch.from_numpy(np.ascontiguousarray(keys[order].T)).to(matrix.device),
        torch.from_numpy(rank[inverse.reshape(-1)]).to(matrix.device),
    )


class _GlobalLayer:
    """The running global layer: precision-weighted sums (W, D), precisions per block (W, B) and
    popularity (W,), side by side in one (W, D + B + 1) buffer that grows by doubling (a neuron
    opens in most matches of the first pass) and compacts only when a removal empties a neuron.
    A client's rows come packed the same way (:meth:`pack`, once per client), so adding or
    removing them is one indexed update instead of three: at hidden 100 each fusion makes ~60 of
    each, and the per-call overhead, not the arithmetic, was what they cost.

    ``targets`` are one client's assignment, so its indices are distinct and each entry gets one
    addition: ``index_put_(accumulate=True)`` (a serial kernel on the CPU, 2.5x faster than
    ``x[t] += rows``' gather-add-scatter). (``index_add`` would do the same, but on CPU it opens a
    parallel region per call even for a handful of rows; on a busy machine each such region can
    stall for a scheduler tick, which made a small fusion 100x slower.)
    """

    def __init__(self, prior_sum: torch.Tensor, blocks: _Blocks) -> None:
        self.blocks = blocks
        self.width = 0
        self._dim = len(prior_sum)
        self._fresh = torch.cat([prior_sum, blocks.prior, prior_sum.new_zeros(1)])
        self._data = prior_sum.new_zeros(0, len(self._fresh))

    def pack(
        self, neurons: torch.Tensor, precision: torch.Tensor, block_precision: torch.Tensor
    ) -> torch.Tensor:
        """(L, D + B + 1): a client's rows scaled by its precision (D,), ``s_j * w`` in float64,
        its precision per block and a 1. The rows are scaled straight into the packed buffer,
        whose first D columns then serve as the scaled rows: fresh buffers of this size cost
        page faults on every first touch, more than the arithmetic at hidden 100."""
        packed = precision.new_empty(len(neurons), self._data.shape[1])
        torch.mul(neurons.to(precision.device), precision, out=packed[:, : self._dim])
        packed[:, self._dim : -1] = block_precision
        packed[:, -1] = 1.0
        return packed

    @property
    def prior_sum(self) -> torch.Tensor:
        return self._fresh[: self._dim]

    @property
    def sums(self) -> torch.Tensor:
        return self._data[: self.width, : self._dim]

    @property
    def precisions(self) -> torch.Tensor:
        return self._data[: self.width, self._dim : -1]

    @property
    def popularity(self) -> torch.Tensor:
        return self._data[: self.width, -1]

    def add(self, rows: torch.Tensor, targets: torch.Tensor, width: int) -> None:
        """Add packed rows to global neurons ``targets``; the layer is then ``width`` wide
        (indices >= the old width open new neurons, in order; the caller knows how many, which
        spares reading the largest target back from the tensor)."""
        if width > len(self._data):
            grow = max(width, 2 * len(self._data)) - len(self._data)
            self._data = torch.cat([self._data, self._data.new_zeros(grow, self._data.shape[1])])
        if width > self.width:
            self._data[self.width : width] = self._fresh
            self.width = width
        self._data.index_put_((targets,), rows, accumulate=True)

    def keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Drop the neurons not in ``keep`` with everything assigned to them. Returns old index
        -> new index, -1 for a dropped neuron."""
        remap = torch.where(keep, torch.cumsum(keep.long(), 0) - 1, -1)
        kept = int(keep.sum())
        self._data[:kept] = self._data[: self.width][keep]
        self.width = kept
        return remap

    def state(self) -> tuple[torch.Tensor, int]:
        """A copy of the layer, for :meth:`restore` (the restarts start from one first pass)."""
        return self._data[: self.width].clone(), self.width

    def restore(self, state: tuple[torch.Tensor, int]) -> None:
        self._data, self.width = state[0].clone(), state[1]

    def remove(self, negated: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Take rows out, given packed and negated (once per client: a negation per removal cost
        as much as the update); drop neurons nobody uses any more. Returns old index -> new
        index, or None when no neuron was dropped."""
        self._data.index_put_((targets,), negated, accumulate=True)
        # (one reduction and read-back where a mask and its all() were two ops and a read-back)
        if not self.width or float(self.popularity.min()) > 0.5:
            return None
        return self.keep(self.popularity > 0.5)


POPULARITY = ("consistent", "reference", "auto")
"""The popularity term ``c log(m / (J - m))``: consistent with the derivation (c = 2), the
reference code's (c = 1), or ``auto``: the reference's when ``max_width`` is set, consistent
otherwise. Under a width cap the later clients' rows are forced into existing neurons, which
inflates their counts and, with c = 2, turns the most popular ones into traps the sweeps pour
every client into; the reference runs its always-on cap with c = 1 and the count capped at 10
(``popularity_cap``), and capped fedalign is closer to it with both (docs/fidelity.md, issue
27)."""


def popularity_weight(popularity: str, max_width: int | None) -> float:
    """c of the popularity term ``c log(m / (J - m))`` (see ``POPULARITY``)."""
    if popularity == "auto":
        popularity = "consistent" if max_width is None else "reference"
    return 2.0 if popularity == "consistent" else 1.0


def matching_problem(
    *,
    sigma: float,
    sigma0: float,
    gamma: float,
    iterations: int,
    max_width: int | None,
    popularity: str,
    popularity_cap: int | None = None,
    solver: str = "hungarian",
    restarts: int = 1,
) -> str | None:
    """Why BBP-MAP's options are invalid (None: they are valid): PFNM and FedMA check theirs
    with this when a config is loaded, before any client trains."""
    for name, value in (("sigma", sigma), ("sigma0", sigma0), ("gamma", gamma)):
        if not value > 0:
            return f"{name} must be > 0, got {value}"
    if iterations < 0:
        return f"iterations must be >= 0, got {iterations}"
    if max_width is not None and max_width < 1:
        return f"max_width must be >= 1, got {max_width}"
    if popularity not in POPULARITY:
        return f"popularity must be one of {', '.join(POPULARITY)}, got {popularity!r}"
    if popularity_cap is not None and popularity_cap < 1:
        return f"popularity_cap must be >= 1 (or None), got {popularity_cap}"
    if solver not in SOLVERS:
        return f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}"
    if restarts < 1:
        return f"restarts must be >= 1, got {restarts}"
    return None


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
    popularity_cap: int | None = None,
    device: str | torch.device | None = None,
    restarts: int = 1,
) -> BBPResult:
    """Match J clients' neurons (``neurons[j]``: (L_j, D) rows) into one global layer.

    ``precisions[j]``: client j's noise precision 1/sigma, a scalar or per dimension (D,);
    ``prior_mean`` / ``prior_precision`` (1/sigma0): the prior of a global neuron; ``gamma``: the
    Beta-Bernoulli mass (larger opens more neurons); ``iterations``: sweeps re-matching every
    client after the first pass; ``max_width``: at most this width, binding while matching as in
    the reference code (which always caps at 700): a match opens at most ``max_width - width``
    new neurons and at least one, as the reference does, and a last sweep (which opens none past
    the cap) re-matches every client without the least popular neurons beyond the cap, so the
    layer ends within it (none by default); ``popularity``:
    ``"consistent"`` (2 log), ``"reference"`` (1 log, as the reference code) or ``"auto"`` (the
    reference's with ``max_width``, else consistent; see ``POPULARITY``);
    ``popularity_cap``: count at most this many clients in the popularity term (the reference
    codes of PFNM and FedMA count at most 10: ``log(min(m, 10) / (J - min(m, 10)))``); ``device``:
    where the cost matrices are built (default: the first client's; the server's GPU when it has
    one), the result comes back on the CPU; ``restarts``: sweep the clients in this many random
    orders (drawn one after another from ``seed``; the first is the one ``restarts=1`` uses),
    each from the same first pass, and keep the assignment of the highest log posterior
    (``log_posterior``). The sweeps are coordinate ascent from a random client order, and under
    a width cap where they end depends on it by several points of accuracy (docs/fidelity.md,
    issue 27): restarts are the textbook remedy, each one a full set of sweeps.
    """
    if popularity not in POPULARITY:
        raise ValueError(f"popularity must be one of {', '.join(POPULARITY)}, got {popularity!r}")
    if popularity_cap is not None and popularity_cap < 1:
        raise ValueError(f"popularity_cap must be >= 1 (or None), got {popularity_cap}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
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
    blocks = _Blocks.of(s, s0)
    prior_sum = _vector(prior_mean, dim, device) * s0
    layer = _GlobalLayer(prior_sum, blocks)
    packed = [layer.pack(n, sj, c) for n, sj, c in zip(neurons, s, blocks.client)]
    scaled = [p[:, :dim] for p in packed]
    norms = [blocks.norms(w) for w in scaled]
    new_scores = [
        _new_columns(_open_cost(w, n, c, blocks, prior_sum), gamma, J)
        for w, n, c in zip(scaled, norms, blocks.client)
    ]
    scaled = [w.float() for w in scaled]  # each match's products in float32 (module docstring)
    popularity_scores = _popularity_scores(
        J, popularity_weight(popularity, max_width), popularity_cap, device
    )
    prior_scores = _prior_scores(popularity_scores, gamma, J)
    unpacked = [-p for p in packed]  # what removing a client adds (a + (-b) is a - b exactly)
    assignments: list[torch.Tensor | None] = [None] * J
    opened = [len(n) for n in neurons]  # new neurons each client opened in its last match

    # The cap binds while matching, as in the reference code: a client's match may open at most
    # ``cap - width`` new neurons (its cost matrix has only that many new columns), and at least
    # one, in the first pass and the sweeps, as the reference does (``max(700 - L, 1)``): with
    # none, a full layer's later rows are forced into the neurons the first clients opened and
    # stay there, and the matching leaves the reference's (docs/fidelity.md, issue 27). A last
    # sweep, opening none past the cap, then brings the layer back within it: its least popular
    # neurons beyond the cap are barred, so every client re-matches without them and they empty.
    cap = max_width
    slack = 0 if cap is None else 1  # new neurons a match may open past the cap
    barred: np.ndarray | None = None  # (width,) neurons no row may join (the last sweep)

    def match(j: int, past_cap: int) -> None:
        L = len(scaled[j])
        cost = _block_cost(scaled[j], norms[j], blocks.client[j], layer, popularity_scores)
        kept = None if barred is None else np.flatnonzero(~barred)
        if kept is not None:
            cost = cost[:, torch.from_numpy(kept).to(cost.device)]
        room = L if cap is None else min(L, max(cap - cost.shape[1], past_cap))
        columns = _solve(cost, new_scores[j][:, :room], opened[j], solver)
        # new-neuron columns are interchangeable: open them in order of first use (in NumPy:
        # a handful of integers, where each torch op cost more than the work)
        is_new = columns >= cost.shape[1]
        opened[j] = int(is_new.sum())
        if kept is not None:
            columns[~is_new] = kept[columns[~is_new]]
        columns[is_new] = np.arange(layer.width, layer.width + opened[j])
        assignments[j] = torch.from_numpy(columns).to(device)
        layer.add(packed[j], assignments[j], layer.width + opened[j])

    def sweep(generator: torch.Generator, past_cap: int) -> None:
        nonlocal barred
        for j in torch.randperm(J, generator=generator).tolist():
            remap = layer.remove(unpacked[j], assignments[j])
            if remap is not None:
                _renumber(assignments, remap, skip=j)
                if barred is not None:
                    barred = barred[remap.cpu().numpy() >= 0]
            match(j, past_cap)
            if barred is not None:
                barred = np.concatenate([barred, np.zeros(layer.width - len(barred), bool)])

    if max_width is not None and max(len(n) for n in neurons) > max_width:
        raise ValueError(
            f"max_width={max_width} is smaller than a client's {max(len(n) for n in neurons)} "
            "neurons"
        )
    order = sorted(range(J), key=lambda j: -len(neurons[j]))
    for j in order:
        match(j, slack)
    generator = torch.Generator().manual_seed(seed)
    first_pass = (layer.state(), list(assignments), list(opened)) if restarts > 1 else None
    best: tuple[float, tuple | None, list] | None = None
    for restart in range(restarts):
        if restart:
            layer.restore(first_pass[0])
            assignments[:], opened[:] = first_pass[1], first_pass[2]
        barred = None
        for _ in range(iterations):
            sweep(generator, slack)
        if cap is not None and layer.width > cap:
            # the most popular neurons stay (ties: the older), the rest are barred
            rank = np.argsort(-layer.popularity.cpu().numpy(), kind="stable")
            barred = np.zeros(layer.width, bool)
            barred[rank[cap:]] = True
            sweep(generator, past_cap=0)
        objective = log_posterior(layer, assignments, prior_scores)
        if best is None or objective > best[0]:
            kept = layer.state() if restart + 1 < restarts else None
            best = (objective, kept, list(assignments))
    objective, kept, assignments = best
    if kept is not None:
        layer.restore(kept)
    precision = layer.precisions[:, blocks.position_block]
    return BBPResult(
        mean=(layer.sums / precision).float().cpu(),
        precision=precision.float().cpu(),
        assignments=[a.cpu() for a in assignments],
        popularity=layer.popularity.round().long().cpu(),
        objective=objective,
    )


def log_posterior(
    layer: _GlobalLayer, assignments: Sequence[torch.Tensor], prior_scores: torch.Tensor
) -> float:
    """The log posterior (up to a constant) of an assignment, the objective whose conditional
    for one client, the others fixed, is the cost matrix each match maximises (``bbp_map``'s
    sweeps are coordinate ascent on it): the data term, per global neuron ``sum_d G_d^2 / S_d -
    p_d^2 / s0_d`` (``G``, ``S``: its precision-weighted sum and precision, the prior's
    included; an empty neuron scores 0), plus the Beta-Bernoulli process prior, per neuron the
    running sum of the popularity term up to its count (``prior_scores``) and
    ``-2 log K_h!`` for the ``K_h`` neurons of each set of clients ``h`` (the ``-2 log t`` of the
    t-th new neuron a client opens). With ``c = 2`` and no count cap the prior is twice the
    Indian-buffet log probability, as the matching's new-neuron term is; with the reference's
    ``c = 1`` or a count cap, the prior those costs are the conditionals of."""
    blocks, width = layer.blocks, layer.width
    prior = blocks.norms(layer.prior_sum[None, :])[0] / blocks.prior
    data = (blocks.norms(layer.sums) / layer.precisions).sum() - width * prior.sum()
    popularity = prior_scores[layer.popularity.round().long()].sum()
    # each neuron's set of clients as a packed bit row; in NumPy: torch's unique over rows cost
    # four times as much, more than the rest of this function
    members = np.zeros((width, len(assignments)), bool)
    for j, a in enumerate(assignments):
        members[a.cpu().numpy(), j] = True
    _, counts = np.unique(np.packbits(members, axis=1), axis=0, return_counts=True)
    repeats = sum(math.lgamma(k + 1) for k in counts.tolist())
    return float(data + popularity) - 2 * repeats


def _solve(existing: torch.Tensor, new: torch.Tensor, opened: int, solver: str) -> np.ndarray:
    """The best assignment of rows to ``[existing | new]`` columns (scores of joining each
    existing neuron, of opening the t-th new one), as a NumPy array of each row's column.

    With the exact solver, first only the first ``2 * opened + 8`` new columns: a new column's
    score falls with its index in every row, so when the best assignment over fewer columns
    leaves the last of them unused, the columns after it cannot improve it (a free column's dual
    is 0 and every later column scores less in each row) and it is the best over all of them.
    Otherwise (or with another solver) the whole matrix is solved. At J=10 hidden 100 a client
    opens a handful of neurons per match, so the solver sees ~110 columns instead of ~200.
    """
    rows, width = existing.shape
    if solver != "hungarian":
        return solve_assignment(torch.cat([existing, new], 1), solver).cpu().numpy()
    limit = max(2 * opened + 8, rows - width)
    if limit < new.shape[1]:
        found = _hungarian(torch.cat([existing, new[:, :limit]], 1))
        if not (found == width + limit - 1).any():
            return found
    return _hungarian(torch.cat([existing, new], 1))


def _hungarian(scores: torch.Tensor) -> np.ndarray:
    """``solve_assignment(scores, "hungarian")`` in NumPy, with the same check of the scores:
    without the tensor round trips (the scores' shape is right by construction)."""
    scores = scores.cpu().numpy()
    if not np.isfinite(scores.sum()) and not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    return hungarian_columns(scores)


def _renumber(assignments: list, remap: torch.Tensor, skip: int) -> None:
    """Every client's but ``skip``'s assignment through ``remap`` (only ``skip``, just removed,
    held the neurons it drops)."""
    for k, a in enumerate(assignments):
        if k != skip:
            assignments[k] = remap[a]


def _open_cost(
    weights: torch.Tensor,
    norms: torch.Tensor,
    precision: torch.Tensor,
    blocks: _Blocks,
    prior_sum: torch.Tensor,
) -> torch.Tensor:
    """(L,): the data part of opening a new neuron for each row, ``sum_b ||w_b + p_b||^2 /
    (s_b + s0_b) - ||p_b||^2 / s0_b`` (``p``: the prior's precision-weighted mean)."""
    inv = 1.0 / (precision + blocks.prior)
    cross = blocks.cross(weights, prior_sum[None, :], inv[None, :])[:, 0]
    prior_norms = blocks.norms(prior_sum[None, :])[0]
    return norms @ inv + 2 * cross + (prior_norms * (inv - 1.0 / blocks.prior)).sum()


def _block_cost(
    weights: torch.Tensor,  # (L, D) client rows, precision-scaled
    norms: torch.Tensor,  # (L, B) their squared norms per block
    precision: torch.Tensor,  # (B,) the client's precision per block
    layer: _GlobalLayer,
    popularity_scores: torch.Tensor,  # (J + 1,) see _popularity_scores
) -> torch.Tensor:
    """``assignment_cost`` with precisions constant within blocks (tested equal to it): per
    existing neuron ``sum_b (||w_b||^2 + 2 <w_b, g_ib> + ||g_ib||^2) / (s_b + S_ib) -
    ||g_ib||^2 / S_ib``."""
    sums, S = layer.sums.to(weights.dtype), layer.precisions  # the products' precision
    inv = 1.0 / (precision[None, :] + S)  # (W, B)
    global_norms = layer.blocks.norms(sums).double()  # (W, B)
    existing = norms @ inv.T + layer.blocks.cross(weights, sums, 2 * inv)  # 2x: exact either way
    existing += (global_norms * (inv - 1.0 / S)).sum(1)[None, :]
    existing += popularity_scores[layer.popularity.long()]
    return existing


def _popularity_scores(
    num_clients: int, weight: float, cap: float | None, device: torch.device
) -> torch.Tensor:
    """(J + 1,): the popularity term ``weight * log(m / (J - m))`` of a neuron m clients use (m
    capped at ``cap``). Popularities are whole numbers, so each match looks the term up instead of
    computing it over the layer: two ops instead of six, and the same elementwise ops give the
    same values."""
    m = torch.arange(num_clients + 1, dtype=torch.float64, device=device)
    if cap is not None:
        m = m.clamp(max=cap)
    return weight * torch.log(m / (num_clients - m).clamp_min(1e-12))


def _prior_scores(popularity_scores: torch.Tensor, gamma: float, num_clients: int) -> torch.Tensor:
    """(J + 1,): a neuron's part of the log prior at each count m >= 1, ``2 log(gamma / J)`` (the
    score of opening it) plus the popularity terms of the 1, ..., m - 1 clients that joined it
    after (``popularity_scores``); so one client joining a neuron of m others changes it by that
    client's popularity term, as in the cost."""
    joined = torch.cumsum(popularity_scores[1:num_clients], 0)
    return 2 * math.log(gamma / num_clients) + torch.cat([joined.new_zeros(2), joined])


def _new_columns(open_base: torch.Tensor, gamma: float, num_clients: int) -> torch.Tensor:
    """(L, L): the score of row l opening the t-th new neuron, ``open_base[l] - 2 log t +
    2 log(gamma / J)``; fixed per client, so built once and sliced to the room each match."""
    t = torch.arange(1, len(open_base) + 1, dtype=torch.float64, device=open_base.device)
    return open_base[:, None] - 2 * torch.log(t)[None, :] + 2 * math.log(gamma / num_clients)
