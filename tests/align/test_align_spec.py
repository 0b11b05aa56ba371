"""Permutation specs derived by tracing: function-preserving on every zoo model, equal to
hand-written specs, and clear about what they cannot handle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedalign.algorithms.align import (
    AxisRef,
    PermutationSpec,
    UnsupportedModuleError,
    apply_permutation,
    compose,
    identity_permutation,
    invert_permutation,
    permutation_spec,
    random_permutation,
)
from fedalign.models import build_model
from tests.align.zoo_specs import HAND_WRITTEN

CASES = [
    ("mlp", {"hidden": [32, 16]}, lambda: torch.rand(4, 1, 28, 28)),
    ("lenet", {}, lambda: torch.rand(4, 1, 28, 28)),
    ("lenet", {"in_channels": 3, "image_size": 32}, lambda: torch.rand(4, 3, 32, 32)),
    ("vgg9", {}, lambda: torch.rand(2, 1, 28, 28)),
    (
        "vgg9",
        {"in_channels": 3, "image_size": 32, "widths": (8, 8, 16, 16, 16, 16), "hidden": 32},
        lambda: torch.rand(2, 3, 32, 32),
    ),
    ("resnet20", {}, lambda: torch.rand(2, 1, 28, 28)),
    ("resnet20", {"norm": "layer", "width": 2}, lambda: torch.rand(2, 1, 28, 28)),
    ("char_lstm", {"hidden": 32}, lambda: torch.randint(0, 98, (3, 12))),
]


@pytest.mark.parametrize("name, kwargs, batch", CASES)
def test_random_permutation_preserves_the_function(name, kwargs, batch):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    x = batch()
    example = x[:1] if name != "char_lstm" else None
    spec = permutation_spec(model, example)
    if name == "resnet20" and kwargs.get("norm", "batch") == "batch":
        for m in model.modules():  # non-trivial running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perms = random_permutation(spec, torch.Generator().manual_seed(1))
    permuted = apply_permutation(spec, perms, state)
    assert any(not torch.equal(permuted[k], state[k]) for k in spec.keys)
    model.load_state_dict(permuted)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    # and back again with the inverse
    restored = apply_permutation(spec, invert_permutation(perms), permuted)
    assert all(torch.equal(restored[k], state[k]) for k in state)


def test_classifier_output_is_never_permuted():
    for name in ("mlp", "lenet", "vgg9", "resnet20", "char_lstm"):
        model = build_model(name)
        spec = permutation_spec(model)
        last = [k for k in model.state_dict() if k.endswith("weight")][-1]
        assert 0 not in spec.axes_of(last), name
        assert 1 in spec.axes_of(last), name


HAND_CASES = [
    ("mlp", {"hidden": [20, 30, 10]}, None),
    ("lenet", {}, None),
    ("lenet", {"in_channels": 3, "image_size": 32, "widths": (4, 8, 20, 10)}, (1, 3, 32, 32)),
    ("vgg9", {}, None),
    ("vgg9", {"in_channels": 3, "image_size": 32}, (1, 3, 32, 32)),
    ("resnet20", {}, None),
    ("resnet20", {"norm": "layer", "width": 2}, None),
    ("char_lstm", {"hidden": 16}, None),
]


@pytest.mark.parametrize("name, kwargs, example", HAND_CASES)
def test_derived_spec_equals_the_hand_written_one(name, kwargs, example):
    model = build_model(name, **kwargs)
    derived = permutation_spec(model, torch.zeros(example) if example else None)
    hand = HAND_WRITTEN[name](model)
    assert list(derived.groups) == list(hand.groups)  # same names, same forward order
    assert {g: set(r) for g, r in derived.groups.items()} == {
        g: set(r) for g, r in hand.groups.items()
    }
    assert dict(derived.sizes) == dict(hand.sizes)
    assert derived.buffers == hand.buffers
    assert dict(derived.shapes) == dict(hand.shapes)


def test_hand_written_specs_spell_out_flatten_blocks_gates_and_streams():
    lenet = HAND_WRITTEN["lenet"](build_model("lenet"))
    assert (
        AxisRef("fc1.weight", 1, block=16) in lenet.groups["conv2"]
    )  # 16 channels x 4x4 positions
    lstm = HAND_WRITTEN["char_lstm"](build_model("char_lstm", hidden=16)).groups["lstm"]
    assert (
        AxisRef("lstm.weight_hh_l0", 0, repeat=4) in lstm
        and AxisRef("lstm.weight_hh_l0", 1) in lstm
    )
    resnet = HAND_WRITTEN["resnet20"](build_model("resnet20"))
    assert list(resnet.groups)[:6] == [
        "conv1",
        "blocks.0.conv1",
        "blocks.1.conv1",
        "blocks.2.conv1",
        "blocks.3.conv1",
        "blocks.3.conv2",
    ]


def test_parameters_view_lists_the_group_of_every_axis():
    spec = permutation_spec(build_model("lenet"))
    assert spec.parameters["conv2.weight"] == ("conv2", "conv1", None, None)
    assert spec.parameters["fc1.weight"] == ("fc1", "conv2")
    assert spec.parameters["fc3.weight"] == (None, "fc2")
    assert spec.parameters["fc3.bias"] == (None,)
    lstm = permutation_spec(build_model("char_lstm", hidden=16))
    assert lstm.parameters["lstm.weight_hh_l0"] == ("lstm", "lstm")
    assert lstm.parameters["lstm.weight_ih_l0"] == ("lstm", "embedding")
    assert lstm.parameters["embedding.weight"] == (None, "embedding")


def test_spec_construction_checks_axes():
    shapes = {"a.weight": (4, 3), "b.weight": (2, 4)}
    ok = PermutationSpec({"a": (AxisRef("a.weight", 0), AxisRef("b.weight", 1))}, {"a": 4}, shapes)
    assert ok.parameters == {"a.weight": ("a", None), "b.weight": (None, "a")}
    with pytest.raises(ValueError, match="does not fit axis 1 of 'b.weight'"):
        PermutationSpec(
            {"a": (AxisRef("a.weight", 0), AxisRef("b.weight", 1, block=2))}, {"a": 4}, shapes
        )
    with pytest.raises(ValueError, match="claimed by groups 'a' and 'b'"):
        PermutationSpec(
            {"a": (AxisRef("a.weight", 0),), "b": (AxisRef("a.weight", 0),)},
            {"a": 4, "b": 4},
            shapes,
        )
    with pytest.raises(ValueError, match="not in shapes"):
        PermutationSpec({"a": (AxisRef("c.weight", 0),)}, {"a": 4}, shapes)


def test_resnet_streams_share_one_group_and_bn_stats_are_buffers():
    spec = permutation_spec(build_model("resnet20"))
    # 3 stream groups + 9 block-internal groups
    assert len(spec.groups) == 12
    stream1 = next(g for g, refs in spec.groups.items() if AxisRef("conv1.weight", 0) in refs)
    keys = {r.key for r in spec.groups[stream1]}
    assert {
        "bn1.weight",
        "blocks.0.bn2.weight",
        "blocks.2.bn2.weight",
        "blocks.3.conv1.weight",
        "blocks.3.shortcut.0.weight",
    } <= keys
    assert "bn1.running_mean" in spec.buffers and "bn1.weight" not in spec.buffers


def test_compose_and_identity():
    spec = permutation_spec(build_model("mlp", hidden=[8]))
    g = torch.Generator().manual_seed(0)
    a, b = random_permutation(spec, g), random_permutation(spec, g)
    sd = build_model("mlp", hidden=[8]).state_dict()
    twice = apply_permutation(spec, b, apply_permutation(spec, a, sd))
    once = apply_permutation(spec, compose(a, b), sd)
    assert all(torch.equal(twice[k], once[k]) for k in sd)
    same = apply_permutation(spec, identity_permutation(spec), sd)
    assert all(torch.equal(same[k], sd[k]) for k in sd)


class _FunctionalCNN(nn.Module):
    """Functional and method forms the tracer must follow: scalar arithmetic, gating by a product,
    view(size(0), -1), mean over space, GroupNorm(1, C), BatchNorm1d, LayerNorm, a residual MLP."""

    def __init__(self):
        super().__init__()
        self.conv1, self.gn = nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(1, 6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.bn = nn.Linear(5 * 4, 12), nn.BatchNorm1d(12)
        self.fc2, self.ln = nn.Linear(12, 12), nn.LayerNorm(12)
        self.conv3, self.fc_side = nn.Conv2d(6, 7, 1), nn.Linear(7, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = F.silu(self.gn(self.conv1(x * 2.0)))
        h = h * torch.sigmoid(h)  # a product of two tensors of one group
        side = self.conv3(h).mean((2, 3))  # global average pooling as a method
        z = self.pool(torch.relu(self.conv2(h)))
        z = z.view(z.size(0), -1)  # flatten through view and size
        z = F.relu(self.bn(self.fc1(z)))
        z = z + self.ln(self.fc2(z)) / 2 + self.fc_side(side)  # residual MLP: one shared group
        return self.head(z)


class _TwoOutputsLSTM(nn.Module):
    """An LSTM read through its final state ``h[-1]``; the model returns logits and features."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(11, 4)
        self.lstm = nn.LSTM(4, 9)
        self.fc = nn.Linear(9, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        _, (h, _) = self.lstm(self.embedding(x).transpose(0, 1).contiguous())
        features = torch.tanh(self.fc(h[-1]))
        return self.head(features), features


def test_functional_forms_are_traced_and_preserve_the_function():
    torch.manual_seed(0)
    model = _FunctionalCNN().eval()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 2, 8, 8)
    spec = permutation_spec(model, x)
    assert AxisRef("fc1.weight", 1, block=4) in spec.groups["conv2"]
    residual = spec.groups["fc1"]
    assert {
        AxisRef("fc2.weight", 0),
        AxisRef("ln.weight", 0),
        AxisRef("fc_side.weight", 0),
        AxisRef("head.weight", 1),
    } <= set(residual)
    assert "conv3" in spec.groups and "gn" not in spec.groups
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(
        apply_permutation(spec, random_permutation(spec, torch.Generator().manual_seed(3)), state)
    )
    assert not torch.equal(model.state_dict()["fc1.weight"], state["fc1.weight"])
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


def test_every_model_output_is_fixed_and_lstm_state_is_followed():
    torch.manual_seed(0)
    model = _TwoOutputsLSTM()
    x = torch.randint(0, 11, (5, 7))
    spec = permutation_spec(model, x)
    assert set(spec.groups) == {"embedding", "lstm"}  # fc's axis reaches the output
    assert AxisRef("fc.weight", 1) in spec.groups["lstm"]
    before = model(x)
    model.load_state_dict(
        apply_permutation(
            spec, random_permutation(spec, torch.Generator().manual_seed(1)), model.state_dict()
        )
    )
    for got, want in zip(model(x), before):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tracing_restores_every_module_mode():
    model = build_model("resnet20").train()
    model.blocks[0].eval()
    permutation_spec(model)
    assert model.training and model.bn1.training and not model.blocks[0].bn1.training


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.attn(self.fc(x), x, x)[0]


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class _SkipFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x) + x)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x


def test_unsupported_modules_and_functions_are_named():
    with pytest.raises(UnsupportedModuleError, match="module 'attn' \\(MultiheadAttention\\)"):
        permutation_spec(_Attention(), torch.zeros(3, 2, 8))
    with pytest.raises(UnsupportedModuleError, match="function 'cat'"):
        permutation_spec(_Concat(), torch.zeros(2, 4))
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.raises(UnsupportedModuleError, match="grouped/depthwise Conv2d"):
        permutation_spec(depthwise, torch.zeros(1, 4, 6, 6))
    over_space = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm(6), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(
        UnsupportedModuleError,
        match="module '1' \\(LayerNorm\\): LayerNorm over anything but the last",
    ):
        permutation_spec(over_space, torch.zeros(1, 1, 8, 8))
    with pytest.raises(
        UnsupportedModuleError, match="combines a permuted tensor with a tensor no group"
    ):
        permutation_spec(_SkipFromInput(), torch.zeros(2, 4))
    with pytest.raises(UnsupportedModuleError, match="torch.fx cannot trace _DataDependent"):
        permutation_spec(_DataDependent(), torch.zeros(2, 4))
    multi = nn.Sequential(nn.Embedding(5, 4), nn.LSTM(4, 6, num_layers=2))
    with pytest.raises(UnsupportedModuleError, match="module '1' \\(LSTM\\): only single-layer"):
        permutation_spec(multi, torch.zeros(2, 3, dtype=torch.long))


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def test_a_module_called_twice_is_refused():
    with pytest.raises(UnsupportedModuleError, match="'fc2' \\(Linear\\) is called more than once"):
        permutation_spec(_Shared(), torch.zeros(2, 4))


class _LinearOnNCHW(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(28, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x))).mean((1, 2))


class _MeanOverWidthOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(28, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(-1)).mean(1)


@pytest.mark.parametrize(
    "model, message",
    [(_LinearOnNCHW(), "Linear on an NCHW tensor"), (_MeanOverWidthOnly(), "a mean that leaves")],
)
def test_label_axis_mismatches_are_refused_not_guessed(model, message):
    """A Linear on NCHW acts on W, not on the conv's channels; a mean over W alone leaves the
    channels off the feature axis: both would give a spec that silently breaks the function."""
    with pytest.raises(UnsupportedModuleError, match=message):
        permutation_spec(model, torch.rand(2, 1, 28, 28))
