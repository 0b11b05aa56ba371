"""Assignment solvers and weight matching: planted permutations recovered, objective monotone."""

import importlib

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fedalign.algorithms.align import (
    SOLVERS,
    apply_permutation,
    permutation_spec,
    random_permutation,
    solver_names,
)
from fedalign.algorithms.align.solvers import sinkhorn_plan, solve_assignment
from fedalign.algorithms.align.weight_matching import (
    match_to_reference,
    merge_many,
    objective,
    weight_matching,
    weight_matching_result,
)
from fedalign.models import build_model
from tests.helpers import permuted_copies, seeded_model

wm = importlib.import_module(
    "fedalign.algorithms.align.weight_matching"
)  # the module, not the function


@pytest.mark.parametrize("n, m", [(5, 5), (32, 32), (64, 64), (100, 100), (128, 128), (20, 35)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solvers_reach_the_hungarian_optimum(n, m, seed):
    scores = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, m)))
    rows, cols = linear_sum_assignment(scores.numpy(), maximize=True)
    best = scores.numpy()[rows, cols].sum()
    for solver, options in (("hungarian", {}), ("sinkhorn", {"reg": 1e-4})):
        assignment = solve_assignment(scores, solver, **options)
        assert assignment.dtype == torch.long and len(set(assignment.tolist())) == n
        assert scores[torch.arange(n), assignment].sum().item() == pytest.approx(best, rel=1e-12)


def test_sinkhorn_accepts_numpy_and_float32_scores():
    scores = np.random.default_rng(4).normal(size=(16, 16)).astype(np.float32)
    expected = solve_assignment(scores)
    assert torch.equal(solve_assignment(scores, "sinkhorn"), expected)
    assert solve_assignment(np.zeros((0, 3))).shape == (0,)


def test_sinkhorn_plan_is_doubly_stochastic_and_scale_free():
    scores = torch.randn(30, 30, generator=torch.Generator().manual_seed(0))
    plan = sinkhorn_plan(scores, reg=0.05, tol=1e-8)
    torch.testing.assert_close(plan.sum(1), torch.ones(30, dtype=plan.dtype), atol=1e-7, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.ones(30, dtype=plan.dtype), atol=1e-7, rtol=0)
    torch.testing.assert_close(sinkhorn_plan(1000 * scores + 3, reg=0.05, tol=1e-8), plan)
    wide = sinkhorn_plan(
        torch.randn(10, 25, generator=torch.Generator().manual_seed(1)), reg=0.05, tol=1e-8
    )
    torch.testing.assert_close(wide.sum(1), torch.ones(10, dtype=wide.dtype), atol=1e-7, rtol=0)
    assert (wide.sum(0) <= 1 + 1e-7).all() and wide.sum().item() == pytest.approx(10)


def test_solver_errors_are_clear():
    with pytest.raises(
        ValueError, match="unknown solver 'auction'; choose one of hungarian, sinkhorn"
    ):
        solve_assignment(torch.zeros(2, 2), "auction")
    assert solver_names() == tuple(SOLVERS) == ("hungarian", "sinkhorn")
    with pytest.raises(ValueError, match="solver 'hungarian' does not take \\['reg'\\]"):
        solve_assignment(torch.zeros(2, 2), "hungarian", reg=0.1)
    with pytest.raises(ValueError, match="scaling"):
        solve_assignment(torch.zeros(2, 2), "sinkhorn", scaling=1.0)
    with pytest.raises(ValueError, match="n x m with n <= m"):
        solve_assignment(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        solve_assignment(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


@pytest.mark.parametrize(
    "name, kwargs, restarts",
    [
        ("mlp", {"hidden": [64, 32]}, 1),
        ("lenet", {}, 1),
        ("vgg9", {"widths": (16, 16, 32, 32, 32, 32), "hidden": 64}, 1),
        ("char_lstm", {"hidden": 48}, 1),
        ("resnet20", {}, 10),
    ],
)
def test_planted_permutations_are_recovered(name, kwargs, restarts):
    state = seeded_model(name, **kwargs).state_dict()
    spec = permutation_spec(build_model(name, **kwargs))
    planted = random_permutation(spec, torch.Generator().manual_seed(7))
    shuffled = apply_permutation(spec, planted, state)
    result = weight_matching_result(spec, state, shuffled, restarts=restarts, seed=3)
    recovered = apply_permutation(spec, result.perms, shuffled)
    assert all(torch.equal(recovered[k], state[k]) for k in state)
    assert all(b >= a for a, b in zip(result.trace, result.trace[1:]))


def test_objective_never_decreases_between_independent_models():
    for name, kwargs in [
        ("mlp", {"hidden": [64, 64]}),
        ("char_lstm", {"hidden": 32}),
        ("resnet20", {}),
    ]:
        torch.manual_seed(1)
        a = build_model(name, **kwargs).state_dict()
        b = build_model(name, **kwargs).state_dict()
        spec = permutation_spec(build_model(name, **kwargs))
        result = weight_matching_result(spec, a, b, restarts=3)
        assert len(result.trace) >= 2 and result.trace[-1] > result.trace[0]
        assert all(y >= x for x, y in zip(result.trace, result.trace[1:])), name
        assert objective(spec, a, b, result.perms) == pytest.approx(result.objective)


def test_a_single_group_is_solved_once(monkeypatch):
    """The sweep that confirms convergence does not solve an unchanged score matrix again."""
    calls = []

    def counting(scores, solver, **options):
        calls.append(solver)
        return solve_assignment(scores, solver, **options)

    monkeypatch.setattr(wm, "solve_assignment", counting)
    torch.manual_seed(0)
    a, b = (build_model("mlp", hidden=[64]).state_dict() for _ in range(2))
    spec = permutation_spec(build_model("mlp", hidden=[64]))
    result = weight_matching_result(spec, a, b)
    assert len(calls) == 1 and result.trace[-1] > result.trace[0]


def test_score_dependencies_skip_nothing_that_matters(monkeypatch):
    """Results equal those of solving every group again whenever any group moved: the skipped
    solves would have returned the same assignment."""
    lstm = wm.score_dependencies(permutation_spec(build_model("char_lstm", hidden=8)))
    assert any(g in deps for g, deps in lstm.items())  # hidden units act on both axes of weight_hh
    for name, kwargs in [
        ("mlp", {"hidden": [32, 24, 16]}),
        ("char_lstm", {"hidden": 24}),
        ("vgg9", {"widths": (8, 8, 16, 16, 16, 16), "hidden": 32}),
    ]:
        torch.manual_seed(2)
        a = build_model(name, **kwargs).state_dict()
        b = build_model(name, **kwargs).state_dict()
        spec = permutation_spec(build_model(name, **kwargs))
        narrow = weight_matching_result(spec, a, b, restarts=2, seed=1)
        with monkeypatch.context() as m:
            m.setattr(wm, "score_dependencies", lambda s: {g: frozenset(s.sizes) for g in s.sizes})
            everything = weight_matching_result(spec, a, b, restarts=2, seed=1)
        assert narrow.trace == everything.trace, name
        assert all(torch.equal(narrow.perms[g], everything.perms[g]) for g in spec.sizes), name


def test_sinkhorn_solver_drives_weight_matching_too():
    state = seeded_model("mlp", hidden=[40]).state_dict()
    spec = permutation_spec(build_model("mlp", hidden=[40]))
    shuffled = apply_permutation(
        spec, random_permutation(spec, torch.Generator().manual_seed(2)), state
    )
    perms = weight_matching(spec, state, shuffled, solver="sinkhorn")
    back = apply_permutation(spec, perms, shuffled)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_merge_many_and_match_to_reference_undo_planted_permutations():
    base = seeded_model("mlp", hidden=[24, 24]).state_dict()
    spec = permutation_spec(build_model("mlp", hidden=[24, 24]))
    g = torch.Generator().manual_seed(5)
    copies = permuted_copies(spec, base, 4, g)
    # small independent noise: the copies are close but not equal
    noisy = [{k: v + 1e-3 * torch.randn_like(v) for k, v in c.items()} for c in copies]
    merged, perms = merge_many(spec, noisy)
    assert len(perms) == 4
    reference_aligned = apply_permutation(spec, perms[0], noisy[0])
    assert all(torch.allclose(merged[k], reference_aligned[k], atol=5e-3) for k in base)
    for p, c in zip(match_to_reference(spec, base, copies), copies):
        back = apply_permutation(spec, p, c)
        assert all(torch.equal(back[k], base[k]) for k in base)


def test_merge_many_of_permuted_copies_is_the_same_network_with_bn_buffers():
    model = seeded_model("resnet20", width=1).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    spec = permutation_spec(model)
    g = torch.Generator().manual_seed(9)
    copies = permuted_copies(spec, base, 3, g)
    for i, c in enumerate(copies):
        c["bn1.num_batches_tracked"] = torch.tensor(10 * (i + 1))
    merged, perms = merge_many(spec, copies, weights=[1.0, 2.0, 3.0])
    assert (
        merged["bn1.num_batches_tracked"].item() == 30
        and merged["bn1.num_batches_tracked"].dtype == torch.long
    )
    aligned = [apply_permutation(spec, p, c) for p, c in zip(perms, copies)]
    for k, v in base.items():
        if v.is_floating_point():
            assert all(torch.allclose(a[k], aligned[0][k], atol=1e-6) for a in aligned[1:]), k
    x = torch.rand(4, 1, 28, 28)
    before = model(x)
    model.load_state_dict(merged)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="weights"):
        merge_many(spec, copies, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="at least two"):
        merge_many(spec, copies[:1])


def test_activation_statistics_leave_batchnorm_statistics_alone():
    """A train-mode pass would update BatchNorm running statistics: the models run in eval mode."""
    import torch

    from fedalign.algorithms.align import activation_statistics, permutation_spec
    from fedalign.models import build_model

    torch.manual_seed(0)
    a, b = (
        build_model("resnet20", in_channels=1, width=1),
        build_model("resnet20", in_channels=1, width=1),
    )
    a.train()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    activation_statistics(permutation_spec(a), a, b, torch.rand(8, 1, 28, 28))
    assert a.training and all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
