"""PFNM fusion of MLPs (top-down layer matching, class-share weighted classifier) and its grid
search."""

import pytest
import torch

from fedalign.algorithms.align import apply_permutation, permutation_spec, random_permutation
from fedalign.algorithms.fusion import REFERENCE_GRID, pfnm, pfnm_grid_search, select_candidate
from fedalign.models import build_model, fit_to_state
from tests.helpers import seeded_model


def _copies(hidden, J=4, noise=0.0, seed=0):
    base = seeded_model("mlp", seed, in_features=20, hidden=hidden, num_classes=4)
    spec = permutation_spec(base)
    g = torch.Generator().manual_seed(seed + 1)
    models = []
    for _ in range(J):
        m = build_model("mlp", in_features=20, hidden=hidden, num_classes=4)
        state = apply_permutation(spec, random_permutation(spec, g), base.state_dict())
        m.load_state_dict(
            {k: v + noise * torch.randn(v.shape, generator=g) for k, v in state.items()}
        )
        models.append(m)
    return base, models


def _hidden_widths(model) -> list[int]:
    return [layer.out_features for layer in model.layers[:-1]]


COUNTS = [[10, 3, 10, 10], [1, 10, 10, 10], [10, 10, 0, 10], [5, 5, 5, 5]]


@pytest.mark.parametrize("hidden", [[16], [16, 12], [10, 8, 6]])
def test_permuted_copies_fuse_back_to_the_model(hidden):
    """sigma0 large: a flat prior, so the posterior mean of identical rows is that row."""
    base, models = _copies(hidden)
    fused, assignment = pfnm(models, COUNTS, sigma=0.1, sigma0=1e8)
    assert assignment.widths == hidden == _hidden_widths(fused)
    X = torch.randn(64, 20)
    torch.testing.assert_close(fused(X), base(X), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pfnm_matches_the_same_on_the_gpu():
    """The server's matching on its GPU (simulation.server_device) fuses the same model."""
    _, models = _copies([16, 12], noise=0.05)
    on_cpu, cpu_assignment = pfnm(models, COUNTS, sigma=0.1)
    on_gpu, gpu_assignment = pfnm(models, COUNTS, sigma=0.1, device="cuda")
    assert gpu_assignment.widths == cpu_assignment.widths
    for key, value in on_cpu.state_dict().items():
        torch.testing.assert_close(on_gpu.state_dict()[key], value, atol=1e-5, rtol=0)


def test_unrelated_models_of_different_widths_grow_the_global_model():
    models = []
    for j, hidden in enumerate(([12, 6], [9, 6], [7, 5])):
        models.append(seeded_model("mlp", j, in_features=20, hidden=hidden, num_classes=4))
        with torch.no_grad():
            for p in models[-1].parameters():
                p.mul_(20)  # far apart compared with sigma
    fused, assignment = pfnm(models, COUNTS[:3], sigma=0.1, gamma=5.0)
    assert _hidden_widths(fused) == assignment.widths
    assert assignment.widths[0] > 12 and assignment.widths[1] > 6
    for c, width in enumerate(assignment.widths):
        used = torch.cat(assignment.layers[c]).unique()
        assert used.tolist() == list(range(width))  # every global neuron belongs to some client
    assert fused(torch.randn(5, 20)).shape == (5, 4)
    capped, capped_assignment = pfnm(models, COUNTS[:3], sigma=0.1, gamma=5.0, max_width=13)
    assert capped_assignment.widths[0] == 13 and max(_hidden_widths(capped)) <= 13


def test_the_width_cap_binds_while_matching_in_every_layer():
    """Unrelated clients (far apart compared with sigma): uncapped, each layer grows past the cap;
    capped while matching, each layer fills to the cap and no further, every client's neurons on
    distinct global ones. A cap the uncapped matching stays under changes nothing."""
    models = []
    for j, hidden in enumerate(([9, 7], [8, 7], [9, 6], [7, 5])):
        models.append(seeded_model("mlp", 10 + j, in_features=20, hidden=hidden, num_classes=4))
        with torch.no_grad():
            for p in models[-1].parameters():
                p.mul_(20)
    options = {"sigma": 0.1, "gamma": 5.0, "iterations": 2}
    _, free = pfnm(models, COUNTS, **options)
    assert min(free.widths) > 11
    capped, assignment = pfnm(models, COUNTS, max_width=11, **options)
    assert assignment.widths == _hidden_widths(capped) == [11, 11]
    for layer in assignment.layers:
        assert all(a.max() < 11 and len(a.unique()) == len(a) for a in layer)
    _, loose = pfnm(models, COUNTS, max_width=max(free.widths), **options)
    for layer, free_layer in zip(loose.layers, free.layers):
        assert [a.tolist() for a in layer] == [a.tolist() for a in free_layer]


def test_a_client_that_never_saw_a_class_does_not_shape_its_classifier_row():
    """Class shares weight the outgoing rows: client 1 has no class-2 data, so its (garbage) class-2
    weights must not matter, and the fused class-2 logit is client 0's."""
    torch.manual_seed(0)
    good = build_model("mlp", in_features=20, hidden=[8], num_classes=4)
    other = build_model("mlp", in_features=20, hidden=[8], num_classes=4)
    other.load_state_dict(good.state_dict())
    with torch.no_grad():
        other.layers[1].weight[2] = 100.0
        other.layers[1].bias[2] = -100.0
    fused, assignment = pfnm([good, other], [[5, 5, 5, 5], [5, 5, 0, 5]], sigma=0.1, sigma0=1e8)
    assert assignment.widths == [8]
    X = torch.randn(32, 20)
    torch.testing.assert_close(fused(X), good(X), atol=1e-5, rtol=0)


def test_fusion_does_not_depend_on_client_order():
    _, models = _copies([16, 12], J=4, noise=0.02)
    X = torch.randn(64, 20)
    fused, _ = pfnm(models, COUNTS, sigma=0.1, iterations=3)
    reordered, _ = pfnm(models[::-1], COUNTS[::-1], sigma=0.1, iterations=3, seed=5)
    torch.testing.assert_close(reordered(X), fused(X), atol=1e-4, rtol=0)


def test_sinkhorn_solver_fuses_permuted_copies():
    base, models = _copies([6], J=3)
    fused, assignment = pfnm(
        models, COUNTS[:3], sigma=0.1, sigma0=1e8, iterations=1, solver="sinkhorn"
    )
    X = torch.randn(32, 20)
    assert assignment.widths == [6]
    torch.testing.assert_close(fused(X), base(X), atol=1e-4, rtol=0)


def test_select_candidate_prefers_the_smallest_model_within_the_tolerance():
    scores, sizes = [0.80, 0.83, 0.825, 0.70], [300, 1000, 400, 100]
    assert select_candidate(scores, sizes) == 1  # the reference's rule
    assert select_candidate(scores, sizes, tolerance=0.01) == 2
    assert select_candidate(scores, sizes, tolerance=0.05) == 0
    assert select_candidate([0.5, 0.5], [20, 10]) == 1  # ties: the smaller model
    with pytest.raises(ValueError, match="one size per score"):
        select_candidate([0.5], [1, 2])


def test_grid_search_sees_only_models_and_scores():
    _, models = _copies([10], J=3, noise=0.3)
    seen = []

    def score(model) -> float:  # the federation's stand-in: a number per model
        seen.append(model)
        return float(-abs(_hidden_widths(model)[0] - 14))

    fused, assignment, chosen = pfnm_grid_search(
        models, COUNTS[:3], score, sigmas=(0.05, 1.0), sigma0s=(1.0,), gammas=(1e-3, 1.0, 50.0)
    )
    assert len(seen) == len(chosen["candidates"]) == 6
    assert chosen["score"] == max(c["score"] for c in chosen["candidates"])
    assert _hidden_widths(fused) == assignment.widths == chosen["widths"]
    smallest, _, loose = pfnm_grid_search(
        models,
        COUNTS[:3],
        score,
        sigmas=(0.05, 1.0),
        sigma0s=(1.0,),
        gammas=(1e-3, 1.0, 50.0),
        tolerance=float("inf"),
    )
    assert (
        loose["widths"][0]
        == min(c["widths"][0] for c in loose["candidates"])
        == _hidden_widths(smallest)[0]
    )
    assert (
        len(REFERENCE_GRID["sigma"]) * len(REFERENCE_GRID["sigma0"]) * len(REFERENCE_GRID["gamma"])
        == 18
    )


def test_grid_search_picks_among_sweep_orders_by_the_same_score():
    """``sweep_orders``: every grid point is fused with seeds seed, seed + 1, ... (the sweeps'
    client orders; by default 4 under a width cap, 1 without, as in the test above), each fusion
    is the plain ``pfnm`` at that seed and is scored, and the pick is the best of all of them.
    Under the cap the orders here end in different models."""
    models = [seeded_model("mlp", j, in_features=20, hidden=[10], num_classes=4) for j in range(4)]
    point = {"sigma": 1.0, "sigma0": 1.0, "gamma": 1.0, "max_width": 14}

    def score(model) -> float:
        return float(model.layers[0].weight.detach().abs().sum())

    grid = {"sigmas": (1.0,), "sigma0s": (1.0,), "gammas": (1.0,), "max_width": 14}
    fused, _, chosen = pfnm_grid_search(models, COUNTS, score, seed=5, **grid)
    candidates = chosen["candidates"]
    assert [c["seed"] for c in candidates] == [5, 6, 7, 8]
    for c in candidates:
        assert score(pfnm(models, COUNTS, seed=c["seed"], **point)[0]) == c["score"]
    assert len({c["score"] for c in candidates}) > 1
    assert score(fused) == chosen["score"] == max(c["score"] for c in candidates)
    with pytest.raises(ValueError, match="sweep_orders must be >= 1"):
        pfnm_grid_search(models, COUNTS, score, sweep_orders=0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="class_counts must be 2 x 4"):
        pfnm(_copies([8], J=2)[1], [[1, 2, 3, 4]])
    with pytest.raises(TypeError, match="fedalign MLPs"):
        pfnm([build_model("lenet")], [[1] * 10])
    with pytest.raises(ValueError, match="popularity_cap must be >= 1"):  # reaches BBP-MAP
        pfnm(_copies([8], J=2)[1], [[1, 2, 3, 4]] * 2, popularity_cap=0)


def test_models_rebuild_from_state_at_their_widths():
    """Layers are resized to the state's shapes from the layer types alone (no model's keys)."""
    grown = build_model("mlp", in_features=20, hidden=[7, 5], num_classes=4)
    rebuilt = fit_to_state(
        build_model("mlp", in_features=20, hidden=[3, 3], num_classes=4), grown.state_dict()
    )
    assert all(rebuilt.state_dict()[k].equal(v) for k, v in grown.state_dict().items())
    x = torch.rand(3, 20)
    torch.testing.assert_close(rebuilt(x), grown(x))
    for name, options, x in (
        ("vgg9", {"widths": (8, 8, 16, 16, 32, 32), "hidden": 40}, torch.rand(2, 1, 28, 28)),
        ("lenet", {"widths": (3, 9, 30, 20)}, torch.rand(2, 1, 28, 28)),
        ("char_lstm", {"embed_dim": 5, "hidden": 11}, torch.randint(0, 98, (2, 7))),
    ):
        wide = build_model(name, **options)
        rebuilt = fit_to_state(build_model(name), wide.state_dict())
        torch.testing.assert_close(rebuilt(x), wide(x))
    same = build_model("resnet20")
    assert (
        fit_to_state(build_model("resnet20"), same.state_dict()).state_dict().keys()
        == same.state_dict().keys()
    )
    with pytest.raises(ValueError, match="cannot be resized"):
        fit_to_state(
            build_model("resnet20", norm="layer"),
            build_model("resnet20", norm="layer", width=2).state_dict(),
        )
