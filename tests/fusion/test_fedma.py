"""FedMA's server steps over permutation specs: layer-wise matching, scattering, slicing."""

import pytest
import torch

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.fusion.bbp_map import BBPResult
from fedalign.algorithms.fusion.layer_matching import (
    class_weighted_classifier,
    classifier_keys,
    global_layer,
    hybrid_state,
    match_layer,
    matched_layers,
    neuron_rows,
    slice_to_client,
)
from fedalign.models import build_model, fit_to_state
from tests.helpers import permuted_copies, seeded_model


def _fedma_without_retraining(name, kwargs, J=3):
    base = seeded_model(name, **kwargs)
    spec = permutation_spec(base)
    states = permuted_copies(spec, base.state_dict(), J, torch.Generator().manual_seed(1))
    assignments = [{} for _ in range(J)]
    layers = matched_layers(spec, base)
    for layer in layers:
        result = match_layer(states, layer, sigma=0.1, sigma0=1e8, gamma=1.0)
        for j in range(J):
            assignments[j][layer.group] = result.assignments[j]
        glob = global_layer(states, layer, result)
        states = [hybrid_state(sd, layer, glob, j) for j, sd in enumerate(states)]
    keys = classifier_keys(layers, states[0])
    classes = states[0][keys[-1]].shape[0]
    counts = [[(5 * k + 3 * j) % 7 for k in range(classes)] for j in range(J)]
    fused = {**states[0], **class_weighted_classifier(states, keys, counts)}
    return base, spec, fused, assignments, states


@pytest.mark.parametrize(
    "name, kwargs, x",
    [
        ("mlp", {"hidden": [16, 12]}, torch.rand(8, 1, 28, 28)),
        ("lenet", {}, torch.rand(8, 1, 28, 28)),
        ("vgg9", {"widths": (8, 8, 16, 16, 16, 16), "hidden": 24}, torch.rand(4, 1, 28, 28)),
        (
            "char_lstm",
            {"vocab_size": 20, "embed_dim": 6, "hidden": 12},
            torch.randint(0, 20, (4, 9)),
        ),
    ],
)
def test_permuted_copies_come_back_as_the_model(name, kwargs, x):
    base, _, fused, _, _ = _fedma_without_retraining(name, kwargs)
    model = fit_to_state(build_model(name, **kwargs), fused)
    assert {k: v.shape for k, v in fused.items()} == {
        k: v.shape for k, v in base.state_dict().items()
    }
    torch.testing.assert_close(model(x), base(x), atol=1e-4, rtol=0)


def test_every_intermediate_state_builds_a_model():
    """Clients rebuild their architecture from each hybrid state they receive."""
    kwargs = {"widths": (8, 8, 16, 16, 16, 16), "hidden": 24}
    base = seeded_model("vgg9", **kwargs)
    spec = permutation_spec(base)
    other = build_model("vgg9", **kwargs).state_dict()
    states = [base.state_dict(), other]
    for layer in matched_layers(spec, base):
        result = match_layer(states, layer, gamma=50.0)  # unrelated models: widths grow
        glob = global_layer(states, layer, result)
        states = [hybrid_state(sd, layer, glob, j) for j, sd in enumerate(states)]
        for sd in states:
            model = fit_to_state(build_model("vgg9"), sd)
            assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lenet", {}),
        ("char_lstm", {"vocab_size": 20, "embed_dim": 6, "hidden": 12}),
    ],
)
def test_slicing_the_global_model_returns_each_client_model(name, kwargs):
    base, spec, fused, assignments, _ = _fedma_without_retraining(name, kwargs)
    classifier = classifier_keys(matched_layers(spec, base), fused)
    originals = permuted_copies(spec, base.state_dict(), 3, torch.Generator().manual_seed(1))
    for j, original in enumerate(originals):
        sliced = slice_to_client(fused, spec, assignments[j])
        for k in original:
            if k not in classifier:  # the classifier is the class-weighted mean
                torch.testing.assert_close(sliced[k], original[k], atol=1e-4, rtol=0)


def test_scatter_puts_flatten_blocks_in_place():
    model = build_model("lenet")
    layer = next(l for l in matched_layers(permutation_spec(model), model) if l.group == "conv2")
    (consumer,) = layer.consumers
    assert consumer.key == "fc1.weight" and consumer.block == 16
    from fedalign.algorithms.fusion.layer_matching import scatter_axis

    value = torch.arange(2 * 3 * 16, dtype=torch.float32).reshape(2, 48)  # 3 channels x 16
    out = scatter_axis(value, torch.tensor([4, 0, 2]), consumer, width=5)
    assert out.shape == (2, 80)
    assert torch.equal(out[:, 64:80], value[:, 0:16]) and torch.equal(out[:, 0:16], value[:, 16:32])
    assert torch.equal(out[:, 16:32], torch.zeros(2, 16))


def test_batchnorm_models_are_refused():
    model = build_model("resnet20")
    with pytest.raises(ValueError, match="without BatchNorm"):
        matched_layers(permutation_spec(model), model)


def test_lstm_layers_match_gate_rows_and_embedding_columns():
    model = build_model("char_lstm", vocab_size=20, embed_dim=6, hidden=12)
    embedding, lstm = matched_layers(permutation_spec(model), model)
    assert [r.key for r in embedding.producers] == ["embedding.weight"]
    assert [r.key for r in embedding.consumers] == ["lstm.weight_ih_l0"]
    assert sorted(r.key for r in lstm.producers) == [
        "lstm.bias_hh_l0",
        "lstm.bias_ih_l0",
        "lstm.weight_ih_l0",
    ]
    assert {r.key for r in lstm.recurrent} == {"lstm.weight_hh_l0"} and len(lstm.recurrent) == 2
    assert [r.key for r in lstm.consumers] == ["fc.weight"]
    sd = model.state_dict()
    assert neuron_rows(sd, embedding).shape == (6, 20)  # one column of the embedding
    assert neuron_rows(sd, lstm).shape == (12, 4 * 6 + 4 + 4)  # 4 gate rows and both biases
    assert torch.equal(
        neuron_rows(sd, lstm)[3, 6:12], sd["lstm.weight_ih_l0"][12 + 3]
    )  # gate 2 of unit 3


def test_recurrent_weights_are_averaged_over_the_clients_holding_both_units():
    """Two clients with 2 hidden units each; client 0's units go to global 0, 1 and client 1's to
    global 1, 2: global unit 1 is shared, so weight_hh[.., 1, 1] is the mean of both clients'."""
    model = build_model("char_lstm", vocab_size=5, embed_dim=3, hidden=2)
    _, lstm = matched_layers(permutation_spec(model), model)
    states = [
        {k: torch.full_like(v, float(j + 1)) for k, v in model.state_dict().items()}
        for j in range(2)
    ]
    mean = torch.zeros(3, neuron_rows(states[0], lstm).shape[1], dtype=torch.float64)
    matched = BBPResult(
        mean=mean,
        precision=torch.ones_like(mean),
        assignments=[torch.tensor([0, 1]), torch.tensor([1, 2])],
        popularity=torch.tensor([1, 2, 1]),
        objective=0.0,  # global_layer reads the assignment only
    )
    hh = global_layer(states, lstm, matched).entries["lstm.weight_hh_l0"].reshape(4, 3, 3)
    expected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.5, 2.0], [0.0, 2.0, 2.0]])
    for gate in range(4):
        torch.testing.assert_close(hh[gate], expected)
