"""Poisoned client statistics and self-reported counts, through the real engine on mock replies.

One client of four sends statistics or counts crafted to take over the fused model; the server must
drop it from the round with its reason (as it drops a bad update) and fuse the honest clients
exactly as ``pipeline.aggregate`` does on their replies alone. A fusion whose result is unusable
falls back to the weighted mean of the validated updates (their coordinate-wise median when the
fuse rule is robust), with the reason and the fallback recorded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.fusion import FUSE_RULES, fallback_rule
from fedalign.algorithms.pipeline import aggregate
from fedalign.algorithms.stats import received_statistics
from fedalign.core.types import StateDict
from tests.fl.mock_grid import NUM_CLASSES, TrainReply, mock_clients, task_identity
from tests.fl.test_strategies import SIZES, Run, assert_same_state, make_config, mean_of, run

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
        ("regmean", "count-scaled-gram", "grams: layers.0 count "),
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


def test_a_scaled_update_is_dropped_and_recorded_under_the_default_settings() -> None:
    """A client multiplying its update by 1e6 is refused by the default update-norm screen
    (``strategy.max_update_ratio``) whatever rule fuses, and the round records why."""
    for fuse in ("mean", "median"):
        r = run(
            make_config(4, aggregation={"fuse": fuse}),
            mock_clients(SIZES, misbehave={POISONER: "scale"}),
        )
        (failure,) = r.row["failures"]
        assert failure["partition"] == POISONER and "max_update_ratio=100" in failure["reason"]
        honest = r.replies([p for p in range(4) if p != POISONER])
        assert largest_weight(r.final) <= max(largest_weight(t.state) for t in honest)


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


def median_of(replies: Sequence[TrainReply]) -> OrderedDict[str, torch.Tensor]:
    """NumPy's coordinate-wise median of the replies' states (unweighted)."""
    return OrderedDict(
        (k, torch.from_numpy(np.median(np.stack([t.state[k].numpy() for t in replies]), axis=0)))
        for k in replies[0].state
    )


@pytest.mark.parametrize(("robust", "fallback"), [(False, "mean"), (True, "median")])
@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (_exploding, "fused model norm"),
        (_failing, "fusion failed: linalg.cholesky"),
    ],
)
def test_an_unusable_fusion_falls_back_to_the_mean_or_for_a_robust_rule_the_median(
    rule: Any, reason: str, robust: bool, fallback: str
) -> None:
    """The fallback is read from the rule's registry entry (``robust=True``), not its name."""
    FUSE_RULES.register("toy-broken", rule, robust=robust)
    try:
        r = run(make_config(3, aggregation={"fuse": "toy-broken"}), mock_clients(SIZES[:3]))
    finally:
        FUSE_RULES.unregister("toy-broken")
    assert r.row["fusion_fallback"].startswith(reason)
    assert r.row["fallback_rule"] == fallback
    expected = median_of(r.replies()) if robust else mean_of(r.replies())
    assert_same_state(
        r.final, OrderedDict((k, v.to(r.final[k].dtype)) for k, v in expected.items())
    )


def test_a_robust_rules_fallback_is_not_steered_by_a_byzantine_client() -> None:
    """One client of five sends every weight scaled by 1e6 and the robust rule fails: the median
    fallback stays with the honest clients, where the weighted mean (the fallback before issue 23)
    is the attacker's."""
    FUSE_RULES.register("toy-broken", _failing, robust=True)
    try:
        cfg = make_config(  # the update-norm screen off, so the scaled update reaches the rule
            5, aggregation={"fuse": "toy-broken"}, strategy={"max_update_ratio": None}
        )
        r = run(cfg, mock_clients((*SIZES, 36), misbehave={POISONER: "scale"}))
    finally:
        FUSE_RULES.unregister("toy-broken")
    assert r.row["fallback_rule"] == "median" and r.row["failures"] == []
    honest = r.replies([p for p in range(5) if p != POISONER])
    assert largest_weight(r.final) <= max(largest_weight(t.state) for t in honest)
    assert largest_weight(mean_of(r.replies())) > 1e4 * largest_weight(r.final)


def test_every_builtin_robust_rule_falls_back_to_the_median() -> None:
    robust = {"median", "trimmed-mean", "krum", "multi-krum", "bulyan"}
    for name in FUSE_RULES:
        assert fallback_rule(name) == ("median" if name in robust else "mean"), name
