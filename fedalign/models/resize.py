"""Fit a model's layers to a state dict whose widths differ (PFNM and FedMA grow hidden layers).

Matching changes how many units a layer has, so the global model's state no longer fits the
architecture a config names. Rather than each model telling how its constructor options map to
its widths, every layer whose parameters changed shape is rebuilt from the state's shapes: the
layer types are few and generic, the models are many. Models whose forward reads sizes only from
their layers' parameters (the zoo does) then run at any widths.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from fedalign.core.types import StateDict


def _linear(m: nn.Linear, shape: dict[str, torch.Size]) -> nn.Module:
    out, inp = shape["weight"]
    return nn.Linear(inp, out, bias=m.bias is not None)


def _conv(m: nn.Conv2d, shape: dict[str, torch.Size]) -> nn.Module:
    out, inp = shape["weight"][:2]
    return nn.Conv2d(
        inp * m.groups,
        out,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
    )


def _batchnorm(m: nn.BatchNorm2d | nn.BatchNorm1d, shape: dict[str, torch.Size]) -> nn.Module:
    return type(m)(shape["running_mean"][0], m.eps, m.momentum, m.affine, m.track_running_stats)


def _embedding(m: nn.Embedding, shape: dict[str, torch.Size]) -> nn.Module:
    return nn.Embedding(*shape["weight"], padding_idx=m.padding_idx)


def _lstm(m: nn.LSTM, shape: dict[str, torch.Size]) -> nn.Module:
    if m.num_layers != 1 or m.bidirectional or m.proj_size:
        raise ValueError(
            "only single-layer, unidirectional LSTMs without projections can be resized"
        )
    return nn.LSTM(
        shape["weight_ih_l0"][1],
        shape["weight_hh_l0"][1],
        num_layers=1,
        bias=m.bias,
        batch_first=m.batch_first,
    )


REBUILD: dict[type, Callable[..., nn.Module]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.Embedding: _embedding,
    nn.LSTM: _lstm,
}


def resize_to_state(model: nn.Module, state: StateDict) -> nn.Module:
    """``model`` with every layer whose entries in ``state`` have other shapes rebuilt to those
    shapes (weights not loaded). A layer of a type not in ``REBUILD`` that needs resizing is an
    error naming it."""
    current = model.state_dict()
    for name, module in list(model.named_modules()):
        own = {k: v for k, v in module.state_dict().items() if "." not in k}
        prefix = f"{name}." if name else ""
        shapes = {k: state[prefix + k].shape for k in own if prefix + k in state}
        if not shapes or all(shapes[k] == current[prefix + k].shape for k in shapes):
            continue
        rebuild = REBUILD.get(type(module))
        if rebuild is None:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) has other shapes in the state "
                "and cannot be resized"
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, rebuild(module, shapes))
    return model


def fit_to_state(model: nn.Module, state: StateDict) -> nn.Module:
    """``model`` resized to ``state``'s widths (``resize_to_state``), then ``state`` loaded.

    A model on the meta device (``check_model``'s first build) holds no values: loading into it
    only checks the keys and shapes, and torch warns once per tensor that the copy is a no-op
    (38 lines for the fortunes transformer's ``model.init``, on every run); that warning is not
    shown."""
    model = resize_to_state(model, state)
    with warnings.catch_warnings():  # (torch gives it only for a meta tensor)
        warnings.filterwarnings("ignore", "for .*: copying from a non-meta parameter")
        model.load_state_dict(state)
    return model


def build_for_state(build: Callable[[], nn.Module], state: StateDict) -> nn.Module:
    """The model ``build`` makes, fitted to ``state`` and holding its values, built on the meta
    device so that no weight is initialised: nothing is drawn from torch's global RNG, and no time
    goes into values ``state`` overwrites. The server's test-set pass builds its model so on a
    thread while the next round trains (``strategy.overlap_evaluation``), where a client answered
    in this process may be seeding that RNG to draw its own init (FedMA's late joiners, LoRA's
    adapters): a draw between its seed and its init would change the run. A model ``build``
    places on a real device itself (a transformers model, loaded from disk) gets ``state`` loaded
    as it is; one with a tensor ``state`` cannot hold (a non-persistent buffer) is built and
    initialised as usual.

    The meta tensors are replaced by copies of ``state``'s tensors (at the model's dtypes, on the
    default device) rather than by ``Module.to_empty``: torch's ``empty_like`` of a meta tensor
    runs its Python reference, which imports SymPy, 0.35-0.6 s of CPU on a process's first model
    (every Ray worker's first client, the server's first test-set pass; benchmarks.md, issue
    27)."""
    device = torch.get_default_device()
    with torch.device("meta"):
        model = resize_to_state(build(), state)
    held = model.state_dict()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    if all(not t.is_meta for _, t in tensors):
        model.load_state_dict(state)
        return model
    if not all(t.is_meta for _, t in tensors) or any(n not in held for n, _ in tensors):
        return fit_to_state(build(), state)
    copies = {
        k: v.to(device=device, dtype=held[k].dtype if k in held else v.dtype, copy=True)
        for k, v in state.items()
    }
    model.load_state_dict(copies, assign=True)
    return model
