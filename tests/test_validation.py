"""Client updates and statistics are checked before fusion: keys, shapes, dtypes, finiteness, norm;
Grams symmetric and PSD, squares non-negative, counts consistent, no client far above the rest."""

from collections import OrderedDict

import pytest
import torch

import fedalign.algorithms.pipeline  # noqa: F401 - registers every built-in statistic
from fedalign.algorithms.checks import (
    change_norms,
    cross_problem,
    gram_problem,
    moments_problem,
    scale_outliers,
    statistics_problem,
    update_checks,
    update_problem,
    update_problems,
)
from fedalign.algorithms.stats import (
    STATISTICS,
    StatContext,
    client_statistics,
    cross_sums,
    gram_matrices,
    received_statistics,
)

REF = OrderedDict(w=torch.zeros(3, 2), b=torch.zeros(3), n=torch.tensor(0))


def _update(**changes):
    update = OrderedDict((k, v.clone()) for k, v in REF.items())
    update.update(changes)
    return update


def test_a_sound_update_passes():
    assert update_problem(REF, _update(w=torch.ones(3, 2))) is None


def test_each_defect_is_named():
    assert "missing keys ['b']" in update_problem(REF, OrderedDict(w=REF["w"], n=REF["n"]))
    assert "unexpected keys ['x']" in update_problem(REF, _update(x=torch.zeros(1)))
    assert "w: shape (2, 3), expected (3, 2)" in update_problem(REF, _update(w=torch.zeros(2, 3)))
    assert "w: dtype torch.float64" in update_problem(
        REF, _update(w=torch.zeros(3, 2, dtype=torch.float64))
    )
    nan = torch.zeros(3)
    nan[1] = float("nan")
    assert "b: contains NaN or Inf" in update_problem(REF, _update(b=nan))
    assert "contains NaN or Inf" in update_problem(REF, _update(b=torch.full((3,), float("inf"))))


def test_norm_bound():
    update = _update(w=torch.full((3, 2), 2.0))  # ||delta|| = sqrt(6 * 4) ~ 4.9
    assert update_problem(REF, update, max_norm=5.0) is None
    assert "exceeds max_update_norm=4" in update_problem(REF, update, max_norm=4.0)


def test_a_batch_of_updates_gets_each_its_own_answer():
    """The batched checks (one norm call for all tensors) blame the right update and key."""
    nan = torch.zeros(3)
    nan[0] = float("nan")
    big = OrderedDict(w=torch.full((3, 2), 1e200, dtype=torch.float64), b=torch.zeros(3))
    reordered = OrderedDict(b=torch.ones(3), n=REF["n"], w=torch.ones(3, 2))  # key order aside
    updates = [
        _update(w=torch.ones(3, 2)),
        _update(b=nan),
        _update(w=torch.zeros(2, 3)),
        _update(w=torch.full((3, 2), 2.0)),  # change norm ~4.9
        reordered,  # change norm sqrt(9) = 3
        big,  # finite, but its squares overflow float64: checked entry by entry
    ]
    references = [REF] * 5 + [OrderedDict(w=torch.zeros(3, 2, dtype=torch.float64), b=REF["b"])]
    problems = update_problems(references, updates, [None, None, None, 4.0, 4.0, None])
    assert problems[0] is None and problems[4] is None and problems[5] is None
    assert problems[1] == "b: contains NaN or Inf"
    assert problems[2] == "w: shape (2, 3), expected (3, 2)"
    assert problems[3] == "update norm 4.899 exceeds max_update_norm=4"
    assert update_problems([], [], []) == []


def test_the_checks_measure_the_change_norms_asked_for_once():
    """``update_checks`` returns the change norms of the bounded and the measured updates (what
    the round's outlier comparison reads), equal to ``change_norms``', and none for the others:
    an unsound or non-finite update, or one neither bounded nor measured."""
    nan = torch.zeros(3)
    nan[0] = float("nan")
    updates = [
        _update(w=torch.full((3, 2), 2.0)),
        _update(w=torch.full((3, 2), 3.0)),
        _update(b=nan),
        _update(w=torch.zeros(2, 3)),
        _update(w=torch.full((3, 2), 5.0)),
    ]
    problems, norms = update_checks(
        [REF] * 5, updates, [None, 100.0, None, None, None], [True, False, True, True, False]
    )
    assert problems[:2] == [None, None] and problems[4] is None
    assert norms[2:] == [None, None, None]
    assert norms[:2] == pytest.approx(change_norms([REF, REF], updates[:2]))
    assert update_checks([REF], updates[:1], [None])[1] == [None]


# ---- client statistics ---------------------------------------------------------------------------


def _conv_bn_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 3),
    )


def test_honest_statistics_of_every_kind_pass_their_checks():
    model, reference = _conv_bn_net(0), _conv_bn_net(1)
    model.train()(torch.randn(16, 1, 28, 28))  # BatchNorm running statistics, not the init's
    X, y = torch.randn(12, 1, 28, 28), torch.randint(0, 3, (12,))
    sent = client_statistics(list(STATISTICS), model, X, y, StatContext(reference=reference))
    assert set(sent) == {"grams", "fisher", "moments", "bn", "cross", "preact-cross"}
    state = model.state_dict()
    stats = received_statistics(sent, state)  # the Grams unpacked as the server reads them
    assert statistics_problem(stats, state, examples=12) is None
    channel = {"grams": gram_matrices(model, X, conv="channel")}  # the conv's (C+1)^2 Gram
    assert statistics_problem(channel, state, examples=12) is None
    # the counts say 12 examples (times the positions of a conv), which no multiple of 5 makes
    assert "is not a positive multiple of its 5 examples" in statistics_problem(stats, state, 5)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    rows = torch.cat([rows.double(), torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)
    return rows.T @ rows


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda G: G + torch.triu(torch.ones_like(G), 1), "g: not symmetric"),
        (lambda G: G - 100 * torch.eye(len(G), dtype=G.dtype), "g: not positive semi-definite"),
        (lambda G: G * 2.5, "g count: count 25 is not a positive multiple of its 10 examples"),
        (lambda G: G[:-1, :-1], "g: shape (3, 3), expected a square of size (4,)"),
        (lambda G: G.float().half(), None),  # any float precision is usable
    ],
)
def test_each_gram_defect_is_named(change, reason):
    G = _gram(torch.randn(10, 3))
    assert gram_problem("g", G, (4,), 10) is None
    assert gram_problem("g", change(G), (4,), 10) == reason


def test_moments_and_cross_sums_must_be_consistent():
    a, b = torch.randn(10, 2).double(), torch.randn(10, 3).double()
    m = {"count": torch.tensor(10.0), "sum": b.sum(0), "sumsq": (b * b).sum(0)}
    assert moments_problem("l", m, 3, 10) is None
    assert moments_problem("l", {**m, "sumsq": m["sumsq"] * 0}, 3, 10) == "l: negative variance"
    assert moments_problem("l", m, 4, 10) == "l sum: shape (3,), expected (4,)"
    c = cross_sums(a, b)
    assert cross_problem("g", c, (2, 3), 10) is None
    assert cross_problem("g", {**c, "cross": c["cross"] * 1e3}, (2, 3), 10) == (
        "g: cross sums exceed what the squares allow"
    )


def test_one_client_far_above_the_others_median_is_an_outlier():
    fishers = [{"fisher": {"w": torch.full((2,), v)}} for v in (1.0, 2.0, 1.5, 1e12)]
    (reason,) = scale_outliers(fishers, 1e4).values()
    assert list(scale_outliers(fishers, 1e4)) == [3]
    assert reason.startswith("fisher/total: 2e+12 per row, more than max_stat_ratio=10000")
    assert scale_outliers(fishers[:2], 1e4) == {}  # honest clients differ by far less
    assert scale_outliers(fishers, None) == {}


def _two_clients_with_grams():
    """Two MLP clients and their received Grams, as ``fedalign.aggregate`` takes them."""
    from fedalign.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", in_features=4, hidden=[5], num_classes=3)
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    states = [OrderedDict((k, v + 0.01 * j) for k, v in model.state_dict().items()) for j in (0, 1)]
    stats = []
    for state in states:
        model.load_state_dict(state)
        sent = client_statistics(["grams"], model, X, y, options={"regmean_output": "regmean"})
        stats.append(received_statistics(sent, state))
    return model, states, stats


@pytest.mark.parametrize(
    ("poison", "message"),
    [
        (lambda G: -G, "client 1: grams: layers.0: not positive semi-definite"),
        (lambda G: torch.full_like(G, float("nan")), "client 1: grams: layers.0: contains NaN"),
    ],
)
def test_the_public_aggregate_validates_what_it_is_given(poison, message):
    from fedalign import Plan, aggregate, permutation_spec

    model, states, stats = _two_clients_with_grams()
    stats[1]["grams"] = {k: poison(G) for k, G in stats[1]["grams"].items()}
    plan = Plan(fuse="regmean", options={"regmean_output": "regmean"})
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        aggregate(plan, permutation_spec(model), states, [1.0, 1.0], stats, None, None)
    bad_state = OrderedDict(states[1], **{"layers.0.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"client 1: layers.0.weight: shape \(2, 2\)"):
        aggregate(plan, permutation_spec(model), [states[0], bad_state], [1, 1], stats, None, None)
    with pytest.raises(ValueError, match="client 0: weight must be a finite number > 0"):
        aggregate(plan, permutation_spec(model), states, [-1.0, 1.0], stats, None, None)


def test_a_count_scaled_gram_is_refused_by_its_rows_per_example():
    """Scaling a Gram and its count by 1e12 keeps the per-row scale and a whole multiple of the
    examples; against the rows the model gives per example (one, for an MLP) it is refused."""
    from fedalign.algorithms.checks import rows_per_example

    model, states, stats = _two_clients_with_grams()
    rows = rows_per_example(
        ["grams"],
        model,
        (torch.randn(1, 4), torch.zeros(1, dtype=torch.long)),
        {"regmean_output": "regmean"},
    )
    assert rows == {"grams": {"layers.0": 1.0, "layers.1": 1.0}}
    assert statistics_problem(stats[0], states[0], 12, rows) is None
    scaled = {"grams": {k: G * 1e12 for k, G in stats[0]["grams"].items()}}
    assert statistics_problem(scaled, states[0], 12) is None  # a whole multiple: passes alone
    assert "1e+12 rows per example; the model gives 1" in statistics_problem(
        scaled, states[0], 12, rows
    )
