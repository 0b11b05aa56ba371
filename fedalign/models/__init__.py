"""The model zoo, buildable by name from a config.

Every model takes float inputs of shape ``(n, C, H, W)`` (or int64 token ids of shape ``(n, T)`` for
``char_lstm``) and returns class logits ``(n, num_classes)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from .cnn import VGG9, LeNet
from .lstm import CharLSTM
from .mlp import MLP
from .resnet import ResNet20

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "vgg9": VGG9,
    "resnet20": ResNet20,
    "char_lstm": CharLSTM,
}


def model_options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments model ``name`` accepts (used to validate configs)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return dict(inspect.signature(MODELS[name]).parameters)


def state_widths(name: str, state: dict) -> dict:
    """Model options that make ``name`` fit ``state`` when matching changed its widths
    (PFNM and FedMA grow hidden layers); empty for architectures whose widths are fixed."""
    if name == "mlp":
        count = sum(1 for k in state if k.startswith("layers.") and k.endswith(".weight"))
        return {"hidden": [int(state[f"layers.{i}.weight"].shape[0]) for i in range(count - 1)]}
    if name == "lenet":
        return {"widths": tuple(int(state[f"{k}.weight"].shape[0]) for k in ("conv1", "conv2", "fc1", "fc2"))}
    if name == "vgg9":
        return {"widths": tuple(int(state[f"convs.{i}.weight"].shape[0]) for i in range(6)),
                "hidden": (int(state["fc1.weight"].shape[0]), int(state["fc2.weight"].shape[0]))}
    if name == "char_lstm":
        return {"embed_dim": int(state["embedding.weight"].shape[1]), "hidden": int(state["lstm.weight_hh_l0"].shape[1])}
    return {}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build zoo model ``name``; defaults fit Fashion-MNIST (1x28x28 inputs, 10 classes)."""
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"model {name!r} does not take {unknown}; it takes {sorted(options)}")
    return MODELS[name](**kwargs)


__all__ = ["MLP", "MODELS", "VGG9", "CharLSTM", "LeNet", "ResNet20", "build_model", "model_options", "state_widths"]
