"""LoRA adapters on any model, through ``peft`` (the ``hf`` extra): injection, and the adapters
as plain tensors, the form in which they travel and are aggregated.

``peft.inject_adapter_in_model`` wraps every targeted ``Linear`` (or GPT-2's ``Conv1D``) of a
plain ``nn.Module`` in place, freezes the model's own weights and leaves only the adapters
trainable: ``W x + (alpha / r) B A x`` with ``A: r x in`` (random) and ``B: out x r`` (zero). The
adapters are named here ``{layer}.lora_A.weight`` and ``{layer}.lora_B.weight``, ``layer`` the
wrapped module's path in the plain model, whose own weight stays ``{layer}.weight`` there: the
names of ``peft.get_peft_model_state_dict`` without the adapter's name.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

ADAPTER = "default"
"""The one adapter each wrapped module holds (peft's default name)."""
PARTS = ("lora_A", "lora_B")


def peft_module() -> ModuleType:
    """``peft``, or ImportError in one line naming the extra that installs it."""
    try:
        return importlib.import_module("peft")
    except ImportError:
        raise ImportError("LoRA adapters need peft: pip install 'fedalign[hf]'") from None


@dataclass(frozen=True)
class AdaptedLayer:
    """One wrapped module: the key of its weight in the plain model, and whether that weight is
    stored ``in x out`` (GPT-2's ``Conv1D``: its change is ``(B A)^T``)."""

    weight: str
    fan_in_fan_out: bool


def inject_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = ("all-linear",),
    seed: int = 0,
) -> nn.Module:
    """``model`` with LoRA adapters of rank ``rank`` on the modules ``targets`` names (peft's
    ``target_modules``: names or suffixes; ``all-linear``: every linear layer), its own weights
    frozen. The adapters' initialisation is drawn from ``seed`` (without touching the global
    random state), so the server and every client draw the same fresh adapters. A ``targets``
    that matches no module is one ValueError line."""
    peft = peft_module()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft.inject_adapter_in_model(config, model)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"adapters.targets {list(targets)}: {first}") from None
    return model


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """The modules of an injected ``model`` that hold adapters, by path."""
    tuners = peft_module().tuners.lora
    return {
        name: AdaptedLayer(f"{name}.weight", bool(getattr(module, "fan_in_fan_out", False)))
        for name, module in model.named_modules()
        if isinstance(module, tuners.LoraLayer)
    }


def _wire_name(name: str) -> str | None:
    """``blocks.0.q.lora_A.default.weight`` -> ``blocks.0.q.lora_A.weight`` (None: no adapter
    tensor)."""
    for part in PARTS:
        marker = f".{part}.{ADAPTER}."
        if marker in name:
            return name.replace(marker, f".{part}.")
    return None


def adapter_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The adapters of an injected ``model`` (detached copies on the CPU), by wire name."""
    return OrderedDict(
        (wire, p.detach().cpu().clone())
        for name, p in model.named_parameters()
        if (wire := _wire_name(name)) is not None
    )


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (wire names; any subset of the adapters) into an injected ``model``; a
    name that is no adapter of it is a ValueError."""
    params = {
        wire: p for name, p in model.named_parameters() if (wire := _wire_name(name)) is not None
    }
    unknown = sorted(set(state) - params.keys())
    if unknown:
        raise ValueError(f"not adapters of this model: {unknown[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


def freeze(model: nn.Module, part: str) -> list[str]:
    """Freeze the ``part`` (``lora_A`` or ``lora_B``) of every adapter of an injected ``model``
    (FFA-LoRA trains B only); returns the wire names frozen."""
    frozen = []
    for name, p in model.named_parameters():
        wire = _wire_name(name)
        if wire is not None and f".{part}." in wire:
            p.requires_grad_(False)
            frozen.append(wire)
    return frozen


def layer_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A, B)}`` of adapters by wire name (``fedalign.lora_update``'s input)."""
    layers = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    return {
        layer: (state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"])
        for layer in layers
    }


def wire_state(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> OrderedDict[str, torch.Tensor]:
    """The inverse of :func:`layer_pairs`."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for layer, (a, b) in pairs.items():
        state[f"{layer}.lora_A.weight"] = a
        state[f"{layer}.lora_B.weight"] = b
    return state
