"""FedMA's server steps over permutation specs: layer-wise matching, scattering, slicing."""

import pytest
import torch

from fedalign.align import apply_permutation, permutation_spec, random_permutation
from fedalign.fusion.fedma import (
    class_weighted_classifier,
    classifier_keys,
    hybrid_state,
    match_layer,
    matched_layers,
    slice_to_client,
)
from fedalign.models import build_model, state_widths


def _fedma_without_retraining(name, kwargs, J=3):
    torch.manual_seed(0)
    base = build_model(name, **kwargs)
    spec = permutation_spec(base)
    g = torch.Generator().manual_seed(1)
    states = [apply_permutation(spec, random_permutation(spec, g), base.state_dict()) for _ in range(J)]
    assignments = [{} for _ in range(J)]
    for layer in matched_layers(spec):
        result = match_layer(states, layer, sigma=0.1, sigma0=1e8, gamma=1.0)
        for j in range(J):
            assignments[j][layer.group] = result.assignments[j]
        states = [hybrid_state(sd, layer, result, j) for j, sd in enumerate(states)]
    keys = classifier_keys(spec, states[0])
    counts = [[5, 1, 3, 2, 2, 4, 1, 1, 0, 7]] * J
    fused = {**states[0], **class_weighted_classifier(states, keys, counts)}
    return base, spec, fused, assignments, states


@pytest.mark.parametrize("name, kwargs, x", [
    ("mlp", {"hidden": [16, 12]}, torch.rand(8, 1, 28, 28)),
    ("lenet", {}, torch.rand(8, 1, 28, 28)),
    ("vgg9", {"widths": (8, 8, 16, 16, 16, 16), "hidden": 24}, torch.rand(4, 1, 28, 28)),
])
def test_permuted_copies_come_back_as_the_model(name, kwargs, x):
    base, _, fused, _, _ = _fedma_without_retraining(name, kwargs)
    model = build_model(name, **{**kwargs, **state_widths(name, fused)})
    model.load_state_dict(fused)
    assert state_widths(name, fused) == state_widths(name, base.state_dict())
    torch.testing.assert_close(model(x), base(x), atol=1e-4, rtol=0)


def test_every_intermediate_state_builds_a_model():
    """Clients rebuild their architecture from each hybrid state they receive."""
    torch.manual_seed(0)
    kwargs = {"widths": (8, 8, 16, 16, 16, 16), "hidden": 24}
    base = build_model("vgg9", **kwargs)
    spec = permutation_spec(base)
    other = build_model("vgg9", **kwargs).state_dict()
    states = [base.state_dict(), other]
    for layer in matched_layers(spec):
        result = match_layer(states, layer, gamma=50.0)        # unrelated models: widths grow
        states = [hybrid_state(sd, layer, result, j) for j, sd in enumerate(states)]
        for sd in states:
            model = build_model("vgg9", **state_widths("vgg9", sd))
            model.load_state_dict(sd)
            assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_slicing_the_global_model_returns_each_client_model():
    base, spec, fused, assignments, _ = _fedma_without_retraining("lenet", {})
    g = torch.Generator().manual_seed(1)
    originals = [apply_permutation(spec, random_permutation(spec, g), base.state_dict()) for _ in range(3)]
    for j, original in enumerate(originals):
        sliced = slice_to_client(fused, spec, assignments[j])
        for k in original:
            if k not in ("fc3.weight", "fc3.bias"):       # the classifier is the class-weighted mean
                torch.testing.assert_close(sliced[k], original[k], atol=1e-4, rtol=0)


def test_scatter_puts_flatten_blocks_in_place():
    spec = permutation_spec(build_model("lenet"))
    layer = next(l for l in matched_layers(spec) if l.group == "conv2")
    (consumer,) = layer.consumers
    assert consumer.key == "fc1.weight" and consumer.block == 16
    from fedalign.fusion.fedma import scatter_axis
    value = torch.arange(2 * 3 * 16, dtype=torch.float32).reshape(2, 48)    # 3 channels x 16
    out = scatter_axis(value, torch.tensor([4, 0, 2]), consumer, width=5)
    assert out.shape == (2, 80)
    assert torch.equal(out[:, 64:80], value[:, 0:16]) and torch.equal(out[:, 0:16], value[:, 16:32])
    assert torch.equal(out[:, 16:32], torch.zeros(2, 16))


def test_recurrent_and_batchnorm_models_are_refused():
    with pytest.raises(ValueError, match="no recurrent gates, no BatchNorm"):
        matched_layers(permutation_spec(build_model("resnet20")))
