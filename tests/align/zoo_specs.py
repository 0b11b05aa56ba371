"""Hand-written permutation specs of the zoo models: an independent check on ``permutation_spec``.

Written from the architectures' definitions alone (no tracing), in the tracer's conventions: a
group is named after the first layer producing it, groups are listed in forward order, residual
streams are one group each (named after the first block's ``conv2`` for stages that open with a
projection shortcut), and the flatten block of LeNet/VGG-9 is read off the first linear layer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedalign.algorithms.align.spec import AxisRef, PermutationSpec
from fedalign.models import MLP, VGG9, CharLSTM, LeNet, ResNet20


def _spec(model: nn.Module, groups: dict[str, list[AxisRef]]) -> PermutationSpec:
    """The spec of ``groups`` on ``model``'s state dict (BN running statistics become buffers)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    present = {g: tuple(r for r in refs if r.key in shapes) for g, refs in groups.items()}
    sizes = {
        g: shapes[refs[0].key][refs[0].axis] // (refs[0].block * refs[0].repeat)
        for g, refs in present.items()
    }
    buffers = frozenset(
        r.key
        for refs in present.values()
        for r in refs
        if r.key.endswith(("running_mean", "running_var"))
    )
    return PermutationSpec(present, sizes, shapes, buffers)


def _produced(name: str, norm: str | None = None) -> list[AxisRef]:
    """Output axis of layer ``name`` (weight, bias) and of the norm layer after it (absent
    entries are dropped by ``_spec``)."""
    keys = [f"{name}.weight", f"{name}.bias"]
    if norm is not None:
        keys += [f"{norm}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    return [AxisRef(k, 0) for k in keys]


def _consumed(*names: str, block: int = 1) -> list[AxisRef]:
    return [AxisRef(f"{name}.weight", 1, block) for name in names]


def mlp_spec(model: MLP) -> PermutationSpec:
    layers = len(model.layers)
    return _spec(
        model,
        {
            f"layers.{i}": _produced(f"layers.{i}") + _consumed(f"layers.{i + 1}")
            for i in range(layers - 1)
        },
    )


def _conv_stack_spec(
    model: nn.Module, convs: list[str], linears: list[str], channels: int
) -> PermutationSpec:
    """Plain conv stack -> flatten -> linear stack: each layer's own group; the last conv's
    ``channels`` reach the first linear layer as blocks of ``H*W`` columns."""
    block = model.get_submodule(linears[0]).in_features // channels
    layers = convs + linears
    groups = {}
    for i, name in enumerate(layers[:-1]):
        groups[name] = _produced(name) + _consumed(
            layers[i + 1], block=block if name == convs[-1] else 1
        )
    return _spec(model, groups)


def lenet_spec(model: LeNet) -> PermutationSpec:
    return _conv_stack_spec(
        model, ["conv1", "conv2"], ["fc1", "fc2", "fc3"], model.conv2.out_channels
    )


def vgg9_spec(model: VGG9) -> PermutationSpec:
    convs = [f"convs.{i}" for i in range(len(model.convs))]
    return _conv_stack_spec(model, convs, ["fc1", "fc2", "fc3"], model.convs[-1].out_channels)


def resnet20_spec(model: ResNet20) -> PermutationSpec:
    """Three residual streams (stem + every block's ``conv2``/``bn2`` + projection shortcut of a
    stage), one block-internal group per block (``conv1``/``bn1`` -> ``conv2``)."""
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    has_shortcut = [len(b.shortcut) > 0 for b in model.blocks]
    groups: dict[str, list[AxisRef]] = {"conv1": _produced("conv1", "bn1")}
    stream = "conv1"
    for b, shortcut in zip(blocks, has_shortcut):
        groups[f"{b}.conv1"] = _produced(f"{b}.conv1", f"{b}.bn1") + _consumed(f"{b}.conv2")
        groups[stream] += _consumed(f"{b}.conv1")
        if shortcut:
            groups[stream] += _consumed(f"{b}.shortcut.0")
            stream = f"{b}.conv2"
            groups[stream] = _produced(f"{b}.shortcut.0", f"{b}.shortcut.1")
        groups[stream] += _produced(f"{b}.conv2", f"{b}.bn2")
    groups[stream] += _consumed("fc")
    return _spec(model, groups)


def char_lstm_spec(model: CharLSTM) -> PermutationSpec:
    """Embedding dimensions -> LSTM input columns; hidden units -> rows of each of the 4 gate
    blocks of both weights and biases, ``weight_hh``'s columns and the classifier's columns."""
    gates = [
        AxisRef(f"lstm.{p}", 0, repeat=4)
        for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    ]
    return _spec(
        model,
        {
            "embedding": [AxisRef("embedding.weight", 1), AxisRef("lstm.weight_ih_l0", 1)],
            "lstm": gates + [AxisRef("lstm.weight_hh_l0", 1), AxisRef("fc.weight", 1)],
        },
    )


HAND_WRITTEN: dict[str, Callable[[nn.Module], PermutationSpec]] = {
    "mlp": mlp_spec,
    "lenet": lenet_spec,
    "vgg9": vgg9_spec,
    "resnet20": resnet20_spec,
    "char_lstm": char_lstm_spec,
}
