"""Parallel alignment returns what the sequential loop returns."""

import pytest
import torch

from fedalign.algorithms.align import apply_permutation, permutation_spec, random_permutation
from fedalign.algorithms.align.parallel import match_all
from tests.helpers import seeded_model


@pytest.mark.parametrize("method, options", [("weight", {}), ("sinkhorn-rebasin", {"steps": 20})])
def test_parallel_equals_sequential(method, options):
    base = seeded_model("mlp", hidden=[32, 16], in_features=64)
    spec = permutation_spec(base)
    g = torch.Generator().manual_seed(1)
    clients = []
    for _ in range(5):
        noisy = {
            k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()
        }
        clients.append(apply_permutation(spec, random_permutation(spec, g), noisy))
    sequential = match_all(spec, base.state_dict(), clients, method, workers=1, **options)
    parallel = match_all(spec, base.state_dict(), clients, method, workers=2, **options)
    for a, b in zip(sequential, parallel):
        assert all(torch.equal(a[k], b[k]) for k in a)
    if method == "weight":  # the planted permutations are found: the clients come back to base
        for perms, sd in zip(parallel, clients):
            aligned = apply_permutation(spec, perms, sd)
            assert all(
                torch.allclose(aligned[k], v, atol=0.1) for k, v in base.state_dict().items()
            )
    with pytest.raises(ValueError, match="method must be"):
        match_all(spec, base.state_dict(), clients, "hungarian")
