"""Permutation specs derived by tracing: function-preserving on every zoo model, equal to
hand-written specs, and clear about what they cannot handle."""

import pytest
import torch
import torch.nn as nn

from fedalign.align import (
    AxisRef,
    UnsupportedModuleError,
    apply_permutation,
    compose,
    identity_permutation,
    invert_permutation,
    permutation_spec,
    random_permutation,
)
from fedalign.models import build_model

CASES = [
    ("mlp", {"hidden": [32, 16]}, lambda: torch.rand(4, 1, 28, 28)),
    ("lenet", {}, lambda: torch.rand(4, 1, 28, 28)),
    ("lenet", {"in_channels": 3, "image_size": 32}, lambda: torch.rand(4, 3, 32, 32)),
    ("vgg9", {}, lambda: torch.rand(2, 1, 28, 28)),
    ("vgg9", {"in_channels": 3, "image_size": 32, "widths": (8, 8, 16, 16, 16, 16), "hidden": 32},
     lambda: torch.rand(2, 3, 32, 32)),
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
        for m in model.modules():            # non-trivial running statistics
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


def test_mlp_spec_equals_hand_written():
    spec = permutation_spec(build_model("mlp", hidden=[20, 30]))
    assert dict(spec.groups) == {
        "layers.0": (AxisRef("layers.0.weight", 0), AxisRef("layers.0.bias", 0),
                     AxisRef("layers.1.weight", 1)),
        "layers.1": (AxisRef("layers.1.weight", 0), AxisRef("layers.1.bias", 0),
                     AxisRef("layers.2.weight", 1)),
    }
    assert dict(spec.sizes) == {"layers.0": 20, "layers.1": 30}


def test_lenet_spec_equals_hand_written_with_flatten_blocks():
    spec = permutation_spec(build_model("lenet"))
    hand = {
        "conv1": (AxisRef("conv1.weight", 0), AxisRef("conv1.bias", 0), AxisRef("conv2.weight", 1)),
        "conv2": (AxisRef("conv2.weight", 0), AxisRef("conv2.bias", 0),
                  AxisRef("fc1.weight", 1, block=16)),          # 16 channels x 4x4 positions
        "fc1": (AxisRef("fc1.weight", 0), AxisRef("fc1.bias", 0), AxisRef("fc2.weight", 1)),
        "fc2": (AxisRef("fc2.weight", 0), AxisRef("fc2.bias", 0), AxisRef("fc3.weight", 1)),
    }
    assert dict(spec.groups) == hand


def test_lstm_spec_equals_hand_written_with_gate_blocks():
    spec = permutation_spec(build_model("char_lstm", hidden=16))
    assert set(spec.groups["lstm"]) == {
        AxisRef("lstm.weight_ih_l0", 0, repeat=4), AxisRef("lstm.weight_hh_l0", 0, repeat=4),
        AxisRef("lstm.bias_ih_l0", 0, repeat=4), AxisRef("lstm.bias_hh_l0", 0, repeat=4),
        AxisRef("lstm.weight_hh_l0", 1), AxisRef("fc.weight", 1),
    }
    assert set(spec.groups["embedding"]) == {AxisRef("embedding.weight", 1), AxisRef("lstm.weight_ih_l0", 1)}


def test_resnet_streams_share_one_group_and_bn_stats_are_buffers():
    spec = permutation_spec(build_model("resnet20"))
    # 3 stream groups + 9 block-internal groups
    assert len(spec.groups) == 12
    stream1 = next(g for g, refs in spec.groups.items() if AxisRef("conv1.weight", 0) in refs)
    keys = {r.key for r in spec.groups[stream1]}
    assert {"bn1.weight", "blocks.0.bn2.weight", "blocks.2.bn2.weight", "blocks.3.conv1.weight",
            "blocks.3.shortcut.0.weight"} <= keys
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


def test_unsupported_modules_and_functions_are_named():
    with pytest.raises(UnsupportedModuleError, match="module 'attn' \\(MultiheadAttention\\)"):
        permutation_spec(_Attention(), torch.zeros(3, 2, 8))
    with pytest.raises(UnsupportedModuleError, match="function 'cat'"):
        permutation_spec(_Concat(), torch.zeros(2, 4))
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.raises(UnsupportedModuleError, match="grouped/depthwise Conv2d"):
        permutation_spec(depthwise, torch.zeros(1, 4, 6, 6))
