"""The model zoo, buildable by name from a config (``MODELS``, a registry users extend).

Every model takes float inputs of shape ``(n, C, H, W)`` (or int64 token ids of shape ``(n, T)`` for
``char_lstm`` and ``char_transformer``) and returns class logits ``(n, num_classes)``. A model's
constructor options are its keyword arguments; those a dataset implies (``in_features``,
``in_channels``, ``image_size``, ``num_classes``, ``vocab_size``, and a text dataset's window
length as ``context``) are filled in from the data when the model takes them.
"""

from __future__ import annotations

import inspect

from torch import nn

from fedalign.core.registry import Registry

from .cnn import VGG9, LeNet
from .hf import hf_model
from .lstm import CharLSTM
from .mlp import MLP
from .resize import build_for_state, fit_to_state
from .resnet import ResNet20
from .transformer import CharTransformer, ViT

MODELS = Registry("model")
"""Model name -> a callable building an ``nn.Module`` from keyword options."""
for _name, _builder in (
    ("mlp", MLP),
    ("lenet", LeNet),
    ("vgg9", VGG9),
    ("resnet20", ResNet20),
    ("char_lstm", CharLSTM),
    ("char_transformer", CharTransformer),
    ("vit", ViT),
    ("hf", hf_model),  # a transformers model saved to disk (the hf extra; imported on build)
):
    MODELS.register(_name, _builder, options={})


def model_options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments model ``name`` accepts (used to validate configs)."""
    return dict(inspect.signature(MODELS.get(name).obj).parameters)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build model ``name``; the zoo's defaults fit Fashion-MNIST (1x28x28 inputs, 10 classes)."""
    options = model_options(name)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in options.values())
    unknown = sorted(set(kwargs) - set(options))
    if unknown and not takes_any:
        raise ValueError(f"model {name!r} does not take {unknown}; it takes {sorted(options)}")
    return MODELS.get(name).obj(**kwargs)


__all__ = [
    "MLP",
    "MODELS",
    "VGG9",
    "CharLSTM",
    "CharTransformer",
    "LeNet",
    "ResNet20",
    "ViT",
    "build_for_state",
    "build_model",
    "fit_to_state",
    "model_options",
]
