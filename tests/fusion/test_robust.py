"""The robust fuse rules against implementations written here from each paper's definition.

The references below are plain Python over lists of floats, one loop per client or coordinate, and
share no code with ``fedalign.algorithms.fusion.robust``: the coordinate-wise median and the
beta-trimmed mean (Yin et al. 2018), Krum and Multi-Krum (Blanchard et al. 2017), Bulyan
(El Mhamdi et al. 2018: Krum recursively on the clients not yet selected, then per coordinate the
mean of the ``theta - 2f`` selected values closest to their median). Two conventions are written
into them where the papers leave a choice, the ones fedalign documents: Multi-Krum's mean weighted
by the clients' example counts (Flower's; equal counts give the paper's plain mean, checked too),
and a Krum score over at least one neighbour when ``n - f - 2 < 1`` (only the last steps of
Bulyan's recursive selection reach it). Each rule must agree with its reference to float64
precision on random inputs: many seeds, varied ``n`` and ``f``, some clients far off.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch

from fedalign.algorithms.fusion import FUSE_RULES
from fedalign.core.types import StateDict

Vector = list[float]
SEEDS = range(40)
SHAPES = {"w": (3, 4), "b": (4,)}


# ---- references, from the papers' definitions ---------------------------------------------------


def median_of(values: Vector) -> float:
    """The median; for an even count the mean of the two middle values."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def reference_median(clients: list[Vector]) -> Vector:
    """Yin et al. 2018: per coordinate, the median of the clients' values."""
    return [median_of([x[j] for x in clients]) for j in range(len(clients[0]))]


def reference_trimmed_mean(clients: list[Vector], beta: float) -> Vector:
    """Yin et al. 2018: per coordinate, remove the largest and smallest ``beta`` fraction
    (``int(beta * n)`` values each side) and average the rest."""
    n = len(clients)
    cut = int(beta * n)
    fused = []
    for j in range(len(clients[0])):
        kept = sorted(x[j] for x in clients)[cut : n - cut]
        fused.append(sum(kept) / len(kept))
    return fused


def squared_distance(a: Vector, b: Vector) -> float:
    return sum((p - q) ** 2 for p, q in zip(a, b, strict=True))


def reference_krum_scores(clients: list[Vector], f: int) -> list[float]:
    """Blanchard et al. 2017: client i's score is the sum of its squared distances to its
    ``n - f - 2`` closest other clients (at least one)."""
    n = len(clients)
    scores = []
    for i in range(n):
        others = sorted(squared_distance(clients[i], clients[j]) for j in range(n) if j != i)
        scores.append(sum(others[: max(1, n - f - 2)]))
    return scores


def lowest(scores: list[float], count: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: scores[i])[:count]


def reference_krum(clients: list[Vector], f: int) -> Vector:
    """Blanchard et al. 2017: the client with the lowest score."""
    return clients[lowest(reference_krum_scores(clients, f), 1)[0]]


def reference_multi_krum(clients: list[Vector], weights: list[float], f: int, m: int) -> Vector:
    """Blanchard et al. 2017: the mean of the ``m`` clients with the lowest scores, weighted by
    ``weights`` (all equal: the paper's plain mean)."""
    chosen = lowest(reference_krum_scores(clients, f), m)
    total = sum(weights[i] for i in chosen)
    return [sum(weights[i] * clients[i][j] for i in chosen) / total for j in range(len(clients[0]))]


def bulyan_selection(clients: list[Vector], f: int, recursive: bool) -> list[int]:
    """El Mhamdi et al. 2018: theta = n - 2f clients. Recursive (the paper): Krum picks one client
    of the remaining set, which moves to the selection set; repeat on the clients left. One shot
    (Flower's ``Bulyan``): the theta lowest Krum scores of all clients."""
    theta = len(clients) - 2 * f
    if not recursive:
        return lowest(reference_krum_scores(clients, f), theta)
    remaining, selected = list(range(len(clients))), []
    while len(selected) < theta:
        scores = reference_krum_scores([clients[i] for i in remaining], f)
        selected.append(remaining.pop(lowest(scores, 1)[0]))
    return selected


def reference_bulyan(clients: list[Vector], f: int, recursive: bool = True) -> Vector:
    """El Mhamdi et al. 2018: per coordinate, the mean of the beta = theta - 2f selected values
    closest to the selected values' median."""
    selected = [clients[i] for i in bulyan_selection(clients, f, recursive)]
    beta = len(selected) - 2 * f
    fused = []
    for j in range(len(clients[0])):
        values = [x[j] for x in selected]
        middle = median_of(values)
        closest = sorted(values, key=lambda v: abs(v - middle))[:beta]
        fused.append(sum(closest) / beta)
    return fused


# ---- random inputs ------------------------------------------------------------------------------


def random_clients(rng: random.Random, n: int) -> list[StateDict]:
    """``n`` float64 states around a common centre, each client at its own spread; about one in
    five far off (spread up to 50x and shifted), as Byzantine clients would be."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    centre = {
        k: torch.randn(shape, dtype=torch.float64, generator=g) for k, shape in SHAPES.items()
    }
    clients = []
    for _ in range(n):
        far = rng.random() < 0.2
        spread = rng.uniform(5, 50) if far else rng.uniform(0.1, 1)
        shift = rng.gauss(0, 10) if far else 0.0
        noise = {
            k: torch.randn(c.shape, dtype=torch.float64, generator=g) for k, c in centre.items()
        }
        clients.append(OrderedDict((k, c + shift + spread * noise[k]) for k, c in centre.items()))
    return clients


def flat(state: StateDict) -> Vector:
    return [x for v in state.values() for x in v.reshape(-1).tolist()]


def case(seed: int, minimum: Callable[[int], int]) -> tuple[list[StateDict], list[float], int]:
    """Clients, example counts and f for one seed: f in 0..2, n from the rule's minimum to 4
    more."""
    rng = random.Random(seed)
    f = rng.randrange(3)
    n = minimum(f) + rng.randrange(5)
    return random_clients(rng, n), [float(rng.randint(5, 200)) for _ in range(n)], f


def fuse(name: str, states: list[StateDict], weights: list[float], **options: object) -> Vector:
    fused = FUSE_RULES.get(name).obj(states, weights, [{}] * len(states), **options)
    assert list(fused) == list(SHAPES)
    assert all(fused[k].shape == SHAPES[k] and fused[k].dtype == torch.float64 for k in fused)
    return flat(fused)


def assert_agree(ours: Vector, theirs: Vector) -> None:
    torch.testing.assert_close(
        torch.tensor(ours, dtype=torch.float64),
        torch.tensor(theirs, dtype=torch.float64),
        rtol=1e-12,
        atol=1e-12,
    )


# ---- the rules against the references -----------------------------------------------------------


def krum_minimum(f: int) -> int:
    return 2 * f + 3


def bulyan_minimum(f: int) -> int:
    return 4 * f + 3


@pytest.mark.parametrize("seed", SEEDS)
def test_coordinatewise_rules_equal_yin_et_al(seed: int) -> None:
    states, weights, _ = case(seed, lambda f: 2 + f)  # n from 2 to 8, even and odd
    clients = [flat(s) for s in states]
    assert_agree(fuse("median", states, weights), reference_median(clients))
    beta = random.Random(-seed).choice([0.0, 0.1, 0.2, 0.25, 0.3, 0.45])
    assert_agree(
        fuse("trimmed-mean", states, weights, beta=beta), reference_trimmed_mean(clients, beta)
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_krum_and_multi_krum_equal_blanchard_et_al(seed: int) -> None:
    states, weights, f = case(seed, krum_minimum)
    clients, n = [flat(s) for s in states], len(states)
    assert_agree(fuse("krum", states, weights, num_byzantine=f), reference_krum(clients, f))
    m = random.Random(-seed).randint(1, n)
    for given, count in ((m, m), (0, n - f)):  # num_selected 0: n - f
        assert_agree(
            fuse("multi-krum", states, weights, num_byzantine=f, num_selected=given),
            reference_multi_krum(clients, weights, f, count),
        )
    equal = [1.0] * n  # the paper's plain mean
    assert_agree(
        fuse("multi-krum", states, equal, num_byzantine=f, num_selected=m),
        reference_multi_krum(clients, equal, f, m),
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_bulyan_equals_el_mhamdi_et_al_and_one_shot_flowers_selection(seed: int) -> None:
    states, weights, f = case(seed, bulyan_minimum)
    clients = [flat(s) for s in states]
    paper = reference_bulyan(clients, f, recursive=True)
    assert_agree(fuse("bulyan", states, weights, num_byzantine=f), paper)  # the default
    assert_agree(
        fuse("bulyan", states, weights, num_byzantine=f, selection="one-shot"),
        reference_bulyan(clients, f, recursive=False),
    )


def test_recursive_and_one_shot_bulyan_differ_on_some_inputs() -> None:
    """Not a distinction without a difference: on random inputs with f >= 1 the two selections
    often pick different clients, and the fused models differ."""
    differ = tried = 0
    for seed in range(60):
        states, weights, f = case(seed, bulyan_minimum)
        if f == 0:  # theta = n: both select every client
            continue
        tried += 1
        recursive = torch.tensor(fuse("bulyan", states, weights, num_byzantine=f))
        one_shot = torch.tensor(
            fuse("bulyan", states, weights, num_byzantine=f, selection="one-shot")
        )
        differ += not torch.allclose(recursive, one_shot, rtol=1e-9, atol=1e-9)
    assert differ > 0, (differ, tried)


def test_bulyan_refuses_an_unknown_selection() -> None:
    states, weights, _ = case(0, bulyan_minimum)
    with pytest.raises(ValueError, match="selection must be recursive or one-shot, got 'greedy'"):
        fuse("bulyan", states, weights, selection="greedy")
