"""Poisoned client statistics and self-reported counts, through the real engine on mock replies.

One client of four sends statistics or counts crafted to take over the fused model; the server must
drop it from the round with its reason (as it drops a bad update) and fuse the honest clients
exactly as ``pipeline.aggregate`` does on their replies alone. A fusion whose result is unusable
falls back to the weighted mean of the validated updates, with the reason recorded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.fusion import FUSE_RULES
from fedalign.algorithms.pipeline import aggregate
from fedalign.algorithms.stats import received_statistics
from fedalign.core.types import StateDict
from tests.fl.mock_grid import NUM_CLASSES, TrainReply, mock_clients, task_identity
from tests.fl.test_strategies import SIZES, Run, assert_same_state, make_config, mean_of, run

pytestmark = pytest.mark.usefixtures("one_thread")

POISONER = 1


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


def honest_fusion(r: Run, replies: Sequence[TrainReply]) -> OrderedDict[str, torch.Tensor]:
    """What the run's pipeline makes of ``replies`` alone (train-phase statistics only)."""
    plan = r.strategy.plan
    return aggregate(
        plan,
        permutation_spec(r.model),
        [t.state for t in replies],
        [float(t.num_examples) for t in replies],
        [received_statistics(t.statistics or {}, t.state) for t in replies],
        lambda ref, others: {},
        lambda fused, targets: [],
        seed=r.strategy.context.seed + 1,
    ).state


def largest_weight(state: StateDict) -> float:
    return max(float(v.abs().max()) for v in state.values())


@pytest.mark.parametrize(
    ("fuse", "poison", "reason"),
    [
        ("regmean", "negative-gram", "grams: layers.0: not positive semi-definite"),
        ("regmean", "nan-gram", "grams: layers.0: contains NaN or Inf"),
        ("regmean", "wrong-shape-gram", "grams: layers.0: shape (10, 10), expected"),
        ("regmean", "odd-length-gram", "grams: layers.0: (7,) values are no square's upper"),
        ("regmean", "huge-factor-gram", "grams: layers.0: shape (1000000, 1000000), expected"),
        ("regmean", "unpacked-gram", "grams: layers.0: expected a triangle, or a factor"),
        ("fisher", "nan-fisher", "fisher: layers.0.weight: contains NaN or Inf"),
        ("fisher", "scaled-fisher", "fisher/total: "),
    ],
)
def test_a_poisoned_statistic_drops_its_client_and_the_others_fuse_as_without_it(
    fuse: str, poison: str, reason: str
) -> None:
    cfg = make_config(4, aggregation={"fuse": fuse})
    r = run(cfg, mock_clients(SIZES, misbehave={POISONER: poison}))
    (failure,) = r.row["failures"]
    assert failure["partition"] == POISONER
    assert failure["reason"].startswith(reason)
    assert (r.row["clients_ok"], r.row["clients_failed"]) == (3, 1)
    honest = r.replies([p for p in range(4) if p != POISONER])
    assert_same_state(r.final, honest_fusion(r, honest))
    assert largest_weight(r.final) <= max(largest_weight(t.state) for t in honest)
    assert "fusion_fallback" not in r.row


def test_an_inflated_example_count_is_clipped_to_what_the_partition_holds() -> None:
    r = run(make_config(4), mock_clients(SIZES, misbehave={POISONER: "inflated-counts"}))
    replies = r.replies()
    assert replies[POISONER].num_examples == SIZES[POISONER]  # the honest count it trained on
    assert_same_state(r.final, mean_of(replies))  # weighted by what each partition holds
    assert r.row["examples_clipped"] == {str(POISONER): 1000 * SIZES[POISONER]}
    assert r.row["failures"] == []


def test_inflated_class_counts_drop_their_client_from_pfnm() -> None:
    cfg = make_config(4, strategy={"name": "pfnm", "sigma": 0.2})
    r = run(cfg, mock_clients(SIZES, misbehave={POISONER: "inflated-class-counts"}))
    (failure,) = r.row["failures"]
    held = SIZES[POISONER]
    assert failure == {
        "partition": POISONER,
        "node": r.clients[POISONER].node_id,
        "reason": f"class-counts sum to {1000 * held}, more than its {held} examples",
    }
    assert np.bincount(r.clients[0].data.y_train, minlength=NUM_CLASSES).sum() == SIZES[0]


def _exploding(
    states: Sequence[StateDict], weights: Sequence[float], stats: Any
) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v * 1e6 if v.is_floating_point() else v) for k, v in states[0].items())


def _failing(
    states: Sequence[StateDict], weights: Sequence[float], stats: Any
) -> OrderedDict[str, torch.Tensor]:
    raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (_exploding, "fused model norm"),
        (_failing, "fusion failed: linalg.cholesky"),
    ],
)
def test_an_unusable_fusion_falls_back_to_the_weighted_mean(rule: Any, reason: str) -> None:
    FUSE_RULES.register("toy-broken", rule)
    try:
        r = run(make_config(3, aggregation={"fuse": "toy-broken"}), mock_clients(SIZES[:3]))
    finally:
        FUSE_RULES.unregister("toy-broken")
    assert r.row["fusion_fallback"].startswith(reason)
    assert_same_state(r.final, mean_of(r.replies()))
