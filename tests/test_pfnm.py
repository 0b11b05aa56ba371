"""BBP-MAP matching and PFNM fusion."""

import math

import pytest
import torch

from fedalign.align import apply_permutation, permutation_spec, random_permutation
from fedalign.fusion import assignment_cost, bbp_map, pfnm
from fedalign.models import build_model


def _copies(hidden, J=4, noise=0.0, seed=0):
    torch.manual_seed(seed)
    base = build_model("mlp", in_features=20, hidden=hidden, num_classes=4)
    spec = permutation_spec(base)
    g = torch.Generator().manual_seed(seed + 1)
    models = []
    for _ in range(J):
        m = build_model("mlp", in_features=20, hidden=hidden, num_classes=4)
        state = apply_permutation(spec, random_permutation(spec, g), base.state_dict())
        m.load_state_dict({k: v + noise * torch.randn(v.shape, generator=g) for k, v in state.items()})
        models.append(m)
    return base, models


COUNTS = [[10, 3, 10, 10], [1, 10, 10, 10], [10, 10, 0, 10], [5, 5, 5, 5]]


@pytest.mark.parametrize("hidden", [[16], [16, 12], [10, 8, 6]])
def test_permuted_copies_fuse_back_to_the_model(hidden):
    base, models = _copies(hidden)
    fused, assignment = pfnm(models, COUNTS, sigma=0.1, sigma0=1e8)
    assert assignment.widths == hidden
    X = torch.randn(64, 20)
    torch.testing.assert_close(fused(X), base(X), atol=1e-5, rtol=0)


def test_a_client_far_from_the_others_opens_new_neurons():
    rows = [torch.randn(6, 5) for _ in range(3)]
    same = [rows[0] + 0.01 * torch.randn(6, 5) for _ in range(3)]
    far = 50 + torch.randn(4, 5)
    result = bbp_map(same + [far], [10.0] * 4, gamma=1.0)
    assert len(result.mean) == 6 + 4
    assert result.assignments[3].min() >= 6                      # all its neurons are new
    assert sorted(result.popularity.tolist()) == [1] * 4 + [3] * 6


def test_vectorised_cost_equals_a_direct_per_row_computation():
    g = torch.Generator().manual_seed(0)
    L, W, D, J, new = 5, 7, 9, 4, 5
    w = torch.randn(L, D, generator=g, dtype=torch.float64)
    s = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    sums = torch.randn(W, D, generator=g, dtype=torch.float64)
    precisions = torch.rand(W, D, generator=g, dtype=torch.float64) + 1.0
    pop = torch.tensor([1, 2, 3, 1, 2, 3, 1], dtype=torch.float64)
    prior_sum = torch.randn(D, generator=g, dtype=torch.float64)
    s0 = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    gamma = 3.0
    cost = assignment_cost(w, s, sums, precisions, pop, prior_sum, s0, gamma, J, new)
    for l in range(L):
        for i in range(W):
            direct = sum(float((w[l, d] + sums[i, d]) ** 2 / (s[d] + precisions[i, d])
                               - sums[i, d] ** 2 / precisions[i, d]) for d in range(D))
            direct += 2 * math.log(pop[i] / (J - pop[i]))
            assert cost[l, i].item() == pytest.approx(direct, rel=1e-10)
        for t in range(1, new + 1):
            direct = sum(float((w[l, d] + prior_sum[d]) ** 2 / (s[d] + s0[d]) - prior_sum[d] ** 2 / s0[d])
                         for d in range(D))
            direct += -2 * math.log(t) + 2 * math.log(gamma / J)
            assert cost[l, W + t - 1].item() == pytest.approx(direct, rel=1e-10)
    reference = assignment_cost(w, s, sums, precisions, pop, prior_sum, s0, gamma, J, new, popularity_weight=1.0)
    assert not torch.allclose(reference, cost)


def test_fusion_does_not_depend_on_client_order():
    _, models = _copies([16, 12], J=4, noise=0.02)
    X = torch.randn(64, 20)
    fused, _ = pfnm(models, COUNTS, sigma=0.1, iterations=3)
    reordered, _ = pfnm(models[::-1], COUNTS[::-1], sigma=0.1, iterations=3, seed=5)
    torch.testing.assert_close(reordered(X), fused(X), atol=1e-4, rtol=0)


def test_width_cap_and_sinkhorn_solver():
    rows = [torch.randn(6, 5) * 10 for _ in range(4)]          # unrelated neurons: width grows
    free = bbp_map(rows, [1.0] * 4, gamma=5.0)
    capped = bbp_map(rows, [1.0] * 4, gamma=5.0, max_width=8)
    assert len(free.mean) > 8 and len(capped.mean) == 8
    assert all(a.max() < 8 for a in capped.assignments)
    base, models = _copies([12])
    fused, assignment = pfnm(models, COUNTS, sigma=0.1, sigma0=1e8, solver="sinkhorn")
    X = torch.randn(32, 20)
    assert assignment.widths == [12]
    torch.testing.assert_close(fused(X), base(X), atol=1e-4, rtol=0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="popularity"):
        bbp_map([torch.zeros(2, 3)], [1.0], popularity="both")
    with pytest.raises(ValueError, match="class_counts must be 2 x 4"):
        pfnm(_copies([8], J=2)[1], [[1, 2, 3, 4]])


def test_models_rebuild_from_state_at_their_widths():
    from fedalign.fusion import mlp_from_state
    from fedalign.models import state_widths

    state = build_model("mlp", in_features=20, hidden=[7, 5], num_classes=4).state_dict()
    assert state_widths("mlp", state) == {"hidden": [7, 5]}
    rebuilt = mlp_from_state(state)
    assert all(rebuilt.state_dict()[k].equal(v) for k, v in state.items())
    assert state_widths("lenet", build_model("lenet").state_dict()) == {"widths": (6, 16, 120, 84)}
    wide = build_model("vgg9", widths=(8, 8, 16, 16, 32, 32), hidden=40)
    assert build_model("vgg9", **state_widths("vgg9", wide.state_dict())).load_state_dict(wide.state_dict())
    assert state_widths("resnet20", build_model("resnet20").state_dict()) == {}
