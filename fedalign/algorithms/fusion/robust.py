"""Byzantine-robust fuse rules: coordinate-wise median and trimmed mean (Yin et al. 2018), Krum and
Multi-Krum (Blanchard et al. 2017), Bulyan (El Mhamdi et al. 2018).

Each computes its paper's definition (``tests/fusion/test_robust.py`` checks every rule against
an implementation written from the paper, on random inputs) and what Flower's ``FedMedian``,
``FedTrimmedAvg``, ``Krum``, ``MultiKrum`` and ``Bulyan`` compute
(``tests/fl/test_flower_strategies.py`` runs both on the same replies). Where the two differ,
fedalign says which it follows (``docs/aggregation.md``, "Where fedalign follows Flower"):
the coordinate-wise rules are unweighted, as robust statistics are (a client's example count is
its own claim); Multi-Krum averages the clients it selects weighted by example counts (Flower; the
paper's mean is unweighted, which equal counts give); Bulyan selects its ``n - 2f`` clients
recursively, Krum re-run on the clients not yet selected (the paper, ``selection: recursive``, the
default), or in one shot, the ``n - 2f`` lowest Multi-Krum scores (Flower's ``Bulyan``,
``selection: one-shot``), then averages per coordinate the ``n - 4f`` selected values closest to
their median.

As fuse rules they run after alignment: a coordinate-wise median of clients whose hidden units are
in different orders mixes unrelated neurons, aligned first it compares like with like.

Integer buffers (BatchNorm's ``num_batches_tracked``) are counters: the fused model takes their
maximum, as the weighted mean does.
"""

from __future__ import annotations

import typing
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from fedalign.core.errors import RoundFailedError
from fedalign.core.registry import Context
from fedalign.core.tensors import coordinate_median, weighted_average
from fedalign.core.types import ClientStats, StateDict

from .rules import FUSE_RULES

Coordinatewise = Callable[[torch.Tensor], torch.Tensor]
"""``(clients, *shape) -> shape``: one rule applied to every entry's stacked client values."""


def _coordinatewise(states: Sequence[StateDict], rule: Coordinatewise) -> OrderedDict:
    fused: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, first in states[0].items():
        stacked = torch.stack([sd[key] for sd in states])
        fused[key] = rule(stacked) if first.is_floating_point() else stacked.max(0).values
    return fused


def _needs(count: int, rule: str, n: int) -> None:
    """A round fusing fewer clients than the rule needs stops the run with one line (the config
    checks the number a round samples; failed clients can leave fewer)."""
    if n < count:
        raise RoundFailedError(f"{rule} needs at least {count} clients, got {n}")


@FUSE_RULES.register("median", robust=True)
def median_rule(
    states: Sequence[StateDict], weights: Sequence[float], stats: Sequence[ClientStats]
) -> OrderedDict[str, torch.Tensor]:
    """The coordinate-wise median of the clients' states (Flower's ``FedMedian``)."""
    return _coordinatewise(states, coordinate_median)


def _trim_check(options: Mapping[str, Any], context: Context) -> str | None:
    beta = options["beta"]
    if not isinstance(beta, (int, float)) or not 0 <= beta < 0.5:
        return f"beta (the fraction cut at each end) must be in [0, 0.5), got {beta!r}"
    return None


@FUSE_RULES.register("trimmed-mean", check=_trim_check, robust=True)
def trimmed_mean_rule(
    states: Sequence[StateDict],
    weights: Sequence[float],
    stats: Sequence[ClientStats],
    *,
    beta: float = 0.2,
) -> OrderedDict[str, torch.Tensor]:
    """Per coordinate, the mean of the clients' values without the ``int(beta * n)`` smallest and
    largest (Flower's ``FedTrimmedAvg``, SciPy's ``trim_mean``)."""
    n = len(states)
    cut = int(beta * n)

    def trimmed(stacked: torch.Tensor) -> torch.Tensor:
        return stacked.sort(0).values[cut : n - cut].mean(0)

    return _coordinatewise(states, trimmed)


def _squared_distances(states: Sequence[StateDict]) -> torch.Tensor:
    """``(n, n)``: the squared L2 distance between every two clients' states (all entries), in
    float64."""
    flat = torch.stack(
        [torch.cat([v.reshape(-1).to(torch.float64) for v in sd.values()]) for sd in states]
    )
    return torch.cdist(flat, flat).square()


def _scores(distances: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Krum's scores from the clients' squared distances: each client's sum over its
    ``n - f - 2`` nearest others (at least one, as Flower takes it where ``n - f - 2 < 1``)."""
    nearest = max(1, distances.shape[0] - num_byzantine - 2)
    # position 0 of each sorted row is the client itself (distance 0)
    return distances.sort(1).values[:, 1 : nearest + 1].sum(1)


def krum_scores(states: Sequence[StateDict], num_byzantine: int) -> torch.Tensor:
    """Krum's score of each client: the sum of squared distances (over every entry of its state)
    to its ``n - f - 2`` nearest other clients (at least one)."""
    return _scores(_squared_distances(states), num_byzantine)


def _select(
    states: Sequence[StateDict], num_byzantine: int, count: int, recursive: bool = False
) -> list[int]:
    """``count`` clients by Krum, in the order chosen. One shot: the ``count`` lowest scores
    (Multi-Krum). Recursive (Bulyan's selection): Krum picks one client, which leaves the set,
    and Krum runs again on the clients left (scores over their own ``n' - f - 2`` nearest)."""
    distances = _squared_distances(states)
    if not recursive:
        return torch.argsort(_scores(distances, num_byzantine), stable=True)[:count].tolist()
    remaining = list(range(len(states)))
    chosen: list[int] = []
    while len(chosen) < count:
        left = torch.tensor(remaining)
        best = int(torch.argsort(_scores(distances[left][:, left], num_byzantine), stable=True)[0])
        chosen.append(remaining.pop(best))
    return chosen


def _byzantine_check(
    minimum: Callable[[int], int], rule: str
) -> Callable[[Mapping[str, Any], Context], str | None]:
    def check(options: Mapping[str, Any], context: Context) -> str | None:
        f = options["num_byzantine"]
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            return f"num_byzantine must be an integer >= 0, got {f!r}"
        selected = options.get("num_selected", 0)
        if not isinstance(selected, int) or isinstance(selected, bool) or selected < 0:
            return f"num_selected must be an integer >= 0 (0: n - num_byzantine), got {selected!r}"
        need = max(minimum(f), selected)
        if context.clients_per_round < need:
            return (
                f"{rule} with num_byzantine={f} needs at least {need} clients a round, "
                f"a round samples {context.clients_per_round}"
            )
        return None

    return check


def _multi_krum_check(options: Mapping[str, Any], context: Context) -> str | None:
    """Krum's conditions, and a selection that leaves someone out: keeping every client is the
    plain mean under a robust rule's name."""
    if (problem := _byzantine_check(krum_minimum, "multi-krum")(options, context)) is not None:
        return problem
    f, selected, n = (
        options["num_byzantine"],
        options.get("num_selected", 0),
        context.clients_per_round,
    )
    if (selected or n - f) >= n:
        return (
            f"multi-krum with num_byzantine={f} and num_selected={selected} keeps all {n} clients "
            "a round: the plain mean, no protection; set num_byzantine (the attackers to "
            "withstand) or a smaller num_selected"
        )
    return None


def krum_minimum(f: int) -> int:
    """Krum's condition on the number of clients: ``n > 2f + 2`` (Blanchard et al.)."""
    return 2 * f + 3


@FUSE_RULES.register("krum", check=_byzantine_check(krum_minimum, "krum"), robust=True)
def krum_rule(
    states: Sequence[StateDict],
    weights: Sequence[float],
    stats: Sequence[ClientStats],
    *,
    num_byzantine: int = 0,
) -> OrderedDict[str, torch.Tensor]:
    """The one client with the lowest Krum score, tolerating ``num_byzantine`` (f) Byzantine
    clients (Flower's ``Krum``)."""
    _needs(krum_minimum(num_byzantine), "krum", len(states))
    best = _select(states, num_byzantine, 1)[0]
    return OrderedDict((k, v.clone()) for k, v in states[best].items())


@FUSE_RULES.register("multi-krum", check=_multi_krum_check, robust=True)
def multi_krum_rule(
    states: Sequence[StateDict],
    weights: Sequence[float],
    stats: Sequence[ClientStats],
    *,
    num_byzantine: int = 0,
    num_selected: int = 0,
) -> OrderedDict[str, torch.Tensor]:
    """The weighted mean of the ``num_selected`` (m; 0: ``n - f``) clients with the lowest Krum
    scores (Flower's ``MultiKrum``)."""
    n = len(states)
    count = num_selected or n - num_byzantine
    _needs(max(krum_minimum(num_byzantine), count), "multi-krum", n)
    chosen = _select(states, num_byzantine, count)
    return weighted_average([states[i] for i in chosen], [weights[i] for i in chosen])


BulyanSelection = Literal["recursive", "one-shot"]
"""How Bulyan selects its ``n - 2f`` clients: ``recursive`` (El Mhamdi et al. 2018: Krum, again and
again on the clients left) or ``one-shot`` (Flower's ``Bulyan``: the lowest Multi-Krum scores)."""


def bulyan_minimum(f: int) -> int:
    """Bulyan's condition on the number of clients: ``n >= 4f + 3`` (El Mhamdi et al.)."""
    return 4 * f + 3


@FUSE_RULES.register("bulyan", check=_byzantine_check(bulyan_minimum, "bulyan"), robust=True)
def bulyan_rule(
    states: Sequence[StateDict],
    weights: Sequence[float],
    stats: Sequence[ClientStats],
    *,
    num_byzantine: int = 0,
    selection: BulyanSelection = "recursive",
) -> OrderedDict[str, torch.Tensor]:
    """Bulyan (El Mhamdi et al. 2018): select ``theta = n - 2f`` clients by Krum (``selection``:
    ``recursive``, the paper's, or ``one-shot``, Flower's); per coordinate, the mean of the
    ``beta = theta - 2f`` selected values closest to the selected clients' median. Needs
    ``n >= 4f + 3``."""
    if selection not in typing.get_args(BulyanSelection):
        raise ValueError(f"bulyan: selection must be recursive or one-shot, got {selection!r}")
    n, f = len(states), num_byzantine
    _needs(bulyan_minimum(f), "bulyan", n)
    theta = n - 2 * f
    recursive = selection == "recursive"
    chosen = [states[i] for i in _select(states, f, theta, recursive)]
    keep = theta - 2 * f

    def closest_to_median(stacked: torch.Tensor) -> torch.Tensor:
        distance = (stacked - coordinate_median(stacked)).abs()
        nearest = distance.topk(keep, dim=0, largest=False).indices
        return stacked.gather(0, nearest).mean(0)

    return _coordinatewise(chosen, closest_to_median)
