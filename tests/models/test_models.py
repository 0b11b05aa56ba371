"""Every zoo model builds by name and runs a forward pass of the right shape."""

import warnings

import pytest
import torch

from fedalign.models import MODELS, build_for_state, build_model, fit_to_state


@pytest.mark.parametrize(
    "name, kwargs, batch",
    [
        ("mlp", {}, torch.rand(3, 1, 28, 28)),
        ("mlp", {"in_features": 64, "hidden": [32, 16]}, torch.rand(3, 64)),
        ("lenet", {}, torch.rand(3, 1, 28, 28)),
        ("lenet", {"in_channels": 3, "image_size": 32}, torch.rand(3, 3, 32, 32)),
        ("vgg9", {}, torch.rand(2, 1, 28, 28)),
        ("vgg9", {"in_channels": 3, "image_size": 32}, torch.rand(2, 3, 32, 32)),
        ("resnet20", {}, torch.rand(2, 1, 28, 28)),
        ("resnet20", {"width": 2, "norm": "layer", "in_channels": 3}, torch.rand(2, 3, 32, 32)),
        ("char_lstm", {}, torch.randint(0, 98, (3, 40))),
    ],
)
def test_forward_shapes(name, kwargs, batch):
    model = build_model(name, **kwargs)
    out = model(batch)
    expected = kwargs.get("vocab_size", 98) if name == "char_lstm" else 10
    assert out.shape == (len(batch), expected)
    assert torch.isfinite(out).all()


def test_mlp_flattens_images_and_vectors_alike():
    model = build_model("mlp", in_features=784, hidden=[100], num_classes=10)
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(model(x), model(x.reshape(5, 784)))


def test_lenet_matches_niid_bench_parameter_count():
    assert sum(p.numel() for p in build_model("lenet").parameters()) == 44_426


def test_vgg9_has_six_convs_and_three_linears():
    model = build_model("vgg9")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 256, 256]
    assert [l.out_features for l in linears] == [512, 512, 10]


def test_resnet20_has_nineteen_convs_plus_shortcuts_and_batchnorm():
    model = build_model("resnet20")
    convs3 = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs3) == 19
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_model_and_option_are_named():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="does not take \\['depth'\\]"):
        build_model("mlp", depth=3)
    assert set(MODELS) == {
        "mlp",
        "lenet",
        "vgg9",
        "resnet20",
        "char_lstm",
        "char_transformer",
        "vit",
        "hf",  # a transformers model saved with save_pretrained (the hf extra)
    }


class _WithMask(torch.nn.Module):
    """A layer and a non-persistent buffer: what a state dict cannot restore."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("mask", torch.ones(3), persistent=False)


@pytest.mark.parametrize(
    "name, kwargs, widen, batch",
    [
        ("mlp", {"in_features": 8, "hidden": [6, 5], "num_classes": 3}, "layers.0", (2, 8)),
        ("resnet20", {"width": 1}, None, (2, 1, 28, 28)),  # batch norm's buffers: in its state
        ("char_lstm", {"vocab_size": 20, "hidden": 8}, None, None),
    ],
)
def test_a_model_built_for_a_state_holds_it_and_draws_nothing(name, kwargs, widen, batch):
    """``build_for_state`` (how the server's evaluation builds the model it tests, on a thread
    beside in-process clients seeding torch's RNG) leaves that RNG where it was, and gives the
    model ``fit_to_state`` gives: the same layers at the state's widths, the same values."""
    state = {k: torch.rand(v.shape) for k, v in build_model(name, **kwargs).state_dict().items()}
    if widen is not None:  # matching grew a layer: its rows and the next layer's columns
        state[f"{widen}.weight"] = torch.randn(9, state[f"{widen}.weight"].shape[1])
        state[f"{widen}.bias"] = torch.randn(9)
        state["layers.1.weight"] = torch.randn(state["layers.1.weight"].shape[0], 9)
    before = torch.get_rng_state()
    model = build_for_state(lambda: build_model(name, **kwargs), state)
    assert torch.equal(torch.get_rng_state(), before)
    expected = fit_to_state(build_model(name, **kwargs), state)
    assert str(model) == str(expected)
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(not t.is_meta for t in [*model.parameters(), *model.buffers()])
    x = torch.randint(0, 20, (2, 5)) if batch is None else torch.rand(batch)
    assert torch.equal(model.eval()(x), expected.eval()(x))


def test_a_model_built_for_a_state_owns_its_tensors_at_its_dtypes():
    """The state's values are copied in at the model's dtypes (a float64 state into a float32
    model) and trainable; that SymPy stays unimported (``Module.to_empty`` imported it) is
    ``tests/test_worker_imports.py``'s."""
    state = {
        k: v.double() if v.is_floating_point() else v
        for k, v in build_model("resnet20").state_dict().items()
    }
    model = build_for_state(lambda: build_model("resnet20"), state)
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert own.keys() == state.keys()
    for key, tensor in own.items():
        assert tensor.data_ptr() != state[key].data_ptr(), key
        assert torch.equal(tensor.double(), state[key].double()), key
        expected = torch.float32 if state[key].is_floating_point() else state[key].dtype
        assert tensor.dtype == expected, key
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_with_a_buffer_its_state_lacks_is_built_as_usual():
    state = {k: torch.randn(v.shape) for k, v in _WithMask().state_dict().items()}
    model = build_for_state(_WithMask, state)
    assert torch.equal(model.mask, torch.ones(3))
    assert torch.equal(model.linear.weight, state["linear.weight"])


def test_a_state_fitted_to_a_meta_model_is_checked_without_a_warning_per_tensor() -> None:
    """``check_model`` first builds on the meta device, with ``model.init``'s state: torch warns
    that each copy into a meta tensor is a no-op (one line per tensor on every run); the keys and
    shapes are still checked."""
    state = build_model("mlp", in_features=8, hidden=[4], num_classes=3).state_dict()
    with torch.device("meta"):
        model = build_model("mlp", in_features=8, hidden=[4], num_classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = fit_to_state(model, state)
    assert [str(w.message) for w in caught] == []
    assert all(p.is_meta for p in fitted.parameters())
    with torch.device("meta"):
        model = build_model("mlp", in_features=8, hidden=[4], num_classes=3)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fit_to_state(model, {**state, "extra": torch.zeros(1)})
