"""The representation a model classifies: the input of its last linear layer.

MOON (Li et al. 2021) contrasts the representation a client's model gives an input with the ones
the global and the client's previous model give it. The paper reads it from a projection head it
adds to every model; fedalign adds no layer to the zoo and reads the input of the classifier, the
model's last ``nn.Linear``, which every zoo model ends in (``MLP``'s ``layers.L``, ``LeNet``'s and
``VGG9``'s ``fc3``, ``ResNet20``'s and ``CharLSTM``'s ``fc``). It is found by module type, not by
name, so a user's model ending in a linear layer has a representation without declaring one; one
that does not (its output is not that layer's) is told so in one line.
"""

from __future__ import annotations

import torch
from torch import nn


def classifier(model: nn.Module) -> nn.Linear | None:
    """The model's last registered ``nn.Linear`` (None: it has none)."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            found = module
    return found


def forward_with_representation(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` and the representation it classified, ``(n, features)``: what its classifier
    received, captured by a forward hook that lives for this one call (a model in training gets
    both from one forward pass, as MOON's loss needs: the logits' cross-entropy and the
    representation's contrastive term share it)."""
    head = classifier(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no linear layer to read a representation at")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = head.register_forward_hook(lambda _m, inputs, output: seen.append((inputs[0], output)))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(seen) != 1 or seen[0][1] is not logits:
        raise ValueError(
            f"{type(model).__name__}'s output is not its last linear layer's: it has no "
            "representation to contrast (the input of the layer that gives the logits)"
        )
    return logits, torch.flatten(seen[0][0], 1)
