"""Local training and evaluation loops (plain PyTorch, no Flower).

Clients, the server's centralised evaluation and the simulation scripts all call these, so a
"plain PyTorch loop" baseline and a federated client train identically.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedalign.client.optim import SGD, Adam, LocalOptimizer
from fedalign.core.options import Range
from fedalign.core.registry import Registry
from fedalign.core.types import StateDict
from fedalign.models.features import forward_with_representation


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the last epoch
    num_examples: int
    steps: int


def batches(
    X: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield mini-batches, shuffled by ``generator`` when one is given.

    Indexes tensors directly instead of going through a DataLoader: client datasets are small
    in-memory arrays and a DataLoader's per-batch overhead dominates at this scale.
    """
    X = torch.as_tensor(X)
    y = torch.as_tensor(y)
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield X[idx], y[idx]


OPTIMIZERS = Registry("optimizer")
"""Name -> ``make(params, lr, momentum, weight_decay)``: an optimizer with ``zero_grad`` and
``step`` (``optim.LocalOptimizer``; any ``torch.optim.Optimizer`` is one)."""
OPTIMIZERS.register(
    "sgd",
    lambda params, lr, momentum, weight_decay: SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay
    ),
    options={},
)
OPTIMIZERS.register(
    "adam",
    lambda params, lr, momentum, weight_decay: Adam(params, lr=lr, weight_decay=weight_decay),
    options={},
)


def make_optimizer(
    params, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> LocalOptimizer:
    return OPTIMIZERS.get(name).obj(list(params), lr, momentum, weight_decay)


Penalty = Callable[[nn.Module], "torch.Tensor | None"]
BatchPenalty = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]
"""A penalty that depends on the batch (an objective registered with ``batch=True``): it runs the
forward pass itself and returns the logits with its term, so a term on the model's representation
reads the same forward pass as the cross-entropy (MOON's)."""

OBJECTIVES = Registry("client objective")
"""What a client adds to its cross-entropy, orthogonal to the server's rule: name ->
``make(model, **options) -> penalty(model)`` (``penalty(model, x) -> (logits, term)`` for an entry
registered with ``batch=True``), built on the weights the client received. An objective made for
one strategy (``strategy=``) takes its options from that strategy's section, where the strategy
lists it in ``options_from``."""


@OBJECTIVES.register("plain")
def plain_objective(model: nn.Module) -> Penalty:
    """Cross-entropy alone (FedAvg's clients)."""
    return lambda m: None


@OBJECTIVES.register("proximal")
def proximal_objective(model: nn.Module, *, proximal_mu: float = 0.0) -> Penalty:
    """FedProx (Li et al. 2020): ``mu/2 ||w - w_received||^2`` anchors the client to the weights it
    received."""
    if proximal_mu <= 0:
        return lambda m: None
    anchor = [p.detach().clone() for p in model.parameters()]

    def penalty(m: nn.Module) -> torch.Tensor:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))
        return 0.5 * proximal_mu * prox

    return penalty


@OBJECTIVES.register("scaffold", strategy="scaffold")
def scaffold_objective(
    model: nn.Module, correction: Mapping[str, torch.Tensor] | None = None
) -> Penalty:
    """SCAFFOLD (Karimireddy et al. 2020): every local step follows the gradient plus the
    correction ``c - c_i`` (server minus client control variate, ``fedalign.algorithms.drift``), as
    the gradient of the penalty ``<c - c_i, w>``. ``correction`` comes with the server's message
    (``train_local``'s ``objective_inputs``), not from the config; without one (no control variates
    yet) it is plain cross-entropy."""
    if not correction:
        return lambda m: None
    # on the device the model trains on (train_local moves it there before building the penalty)
    terms = {
        name: correction[name].detach().to(p.device)
        for name, p in model.named_parameters()
        if name in correction
    }

    def penalty(m: nn.Module) -> torch.Tensor:
        return sum((p * terms[name]).sum() for name, p in m.named_parameters() if name in terms)

    return penalty


@OBJECTIVES.register("feddyn", strategy="feddyn")
def feddyn_objective(
    model: nn.Module,
    drift: Mapping[str, torch.Tensor] | None = None,
    *,
    alpha: Annotated[float, Range(low=0, open_low=True)] = 0.01,
) -> Penalty:
    """FedDyn (Acar et al. 2021, Algorithm 1): the client minimises
    ``L_k(w) - <g_k, w> + alpha/2 ||w - w_received||^2``, where ``g_k``, the client's
    ``grad L_k(w_k^{t-1})``, is kept as ``g_k = -alpha D_k`` with ``D_k`` the sum of the
    client's past updates ``w_k - w_received`` (``drift``, from the strategy's client state: the
    paper's recursion ``g_k <- g_k - alpha (w_k - w_received)`` from ``g_k = 0``, kept without
    ``alpha`` so that the state does not depend on an option). The linear term is then
    ``+alpha <D_k, w>``; without ``drift`` (the client's first round) only the quadratic term is
    added. ``alpha`` 0.01: the paper searches {0.1, 0.01, 0.001}."""
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    linear = {
        name: drift[name].detach().to(p.device)
        for name, p in model.named_parameters()
        if drift and name in drift
    }

    def penalty(m: nn.Module) -> torch.Tensor:
        total = sum(((p - anchor[name]) ** 2).sum() for name, p in m.named_parameters())
        dot = sum((p * linear[name]).sum() for name, p in m.named_parameters() if name in linear)
        return alpha * (0.5 * total + dot)

    return penalty


def model_contrastive_loss(
    z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MOON's ``l_con`` averaged over the batch: ``-log(e^{s(z, z_glob)/t} / (e^{s(z, z_glob)/t} +
    e^{s(z, z_prev)/t}))`` with ``s`` the cosine similarity, the cross-entropy of the two scaled
    similarities with the global model's as the positive (Li et al. 2021, Eq. 1)."""
    positive = F.cosine_similarity(z, z_global, dim=-1)
    negative = F.cosine_similarity(z, z_previous, dim=-1)
    logits = torch.stack([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


def _frozen(model: nn.Module, state: StateDict | None = None) -> nn.Module:
    """A copy of ``model`` (holding ``state`` when given) in eval mode, without gradients: MOON's
    global and previous models only give representations."""
    copy = deepcopy(model)
    if state is not None:
        copy.load_state_dict(state)
    return copy.eval().requires_grad_(False)


@OBJECTIVES.register("moon", strategy="moon", batch=True)
def moon_objective(
    model: nn.Module,
    previous: StateDict | None = None,
    *,
    mu: Annotated[float, Range(low=0)] = 1.0,
    temperature: Annotated[float, Range(low=0, open_low=True)] = 0.5,
) -> BatchPenalty:
    """MOON (Li, He, Song 2021): cross-entropy plus ``mu`` times the model-contrastive loss
    (``model_contrastive_loss``) of the representation the trained model gives each batch
    (``fedalign.models.features``: the input of its classifier) against the one the received
    global model gives it (positive) and the one the client's previous local model gives it
    (negative; ``previous``, from the strategy's client state). Without a previous model (the
    client's first round) there is no negative and the term is ``-log 1 = 0``, as in the authors'
    code's first round. ``mu`` 1: the authors' value for CIFAR-100 (5 for CIFAR-10);
    ``temperature`` 0.5, theirs for all datasets."""
    if not previous or mu == 0:
        return lambda m, x: (m(x), None)
    global_model, previous_model = _frozen(model), _frozen(model, previous)

    def penalty(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, z = forward_with_representation(m, x)
        with torch.no_grad():
            z_global = forward_with_representation(global_model, x)[1]
            z_previous = forward_with_representation(previous_model, x)[1]
        return logits, mu * model_contrastive_loss(z, z_global, z_previous, temperature)

    return penalty


def train_local(
    model: nn.Module,
    X: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    objective: str = "plain",
    objective_options: Mapping[str, Any] | None = None,
    objective_inputs: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    frozen: Collection[str] = (),
) -> TrainStats:
    """Train ``model`` in place with cross-entropy plus the penalty of the client ``objective``
    (``OBJECTIVES``, built on ``model``'s weights on entry, the ones it received, and on
    ``objective_inputs``, what the server sent for it: SCAFFOLD's correction). Parameters named in
    ``frozen`` are not trained (FedMA freezes the layers already matched).
    """
    if len(y) == 0:
        raise ValueError("cannot train on an empty dataset")
    unknown = set(frozen) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"cannot freeze unknown parameters {sorted(unknown)}")
    model.to(device).train()
    trainable = [p for name, p in model.named_parameters() if name not in frozen]
    opt = make_optimizer(trainable, optimizer, lr, momentum, weight_decay)
    entry = OBJECTIVES.get(objective)
    penalty = entry.obj(model, **entry.resolve(objective_options or {}), **(objective_inputs or {}))
    per_batch = bool(entry.meta.get("batch"))
    generator = torch.Generator().manual_seed(int(seed))
    steps, last_epoch_loss = 0, 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in batches(X, y, batch_size, generator):
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            logits, extra = penalty(model, xb) if per_batch else (model(xb), penalty(model))
            loss = F.cross_entropy(logits, yb)
            (loss if extra is None else loss + extra).backward()
            opt.step()
            total += loss.item() * len(yb)
            count += len(yb)
            steps += 1
        last_epoch_loss = total / count
    return TrainStats(loss=last_epoch_loss, num_examples=len(y), steps=steps)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    X: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    model.to(device).eval()
    X = torch.as_tensor(X)
    outs = [
        model(X[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(X), batch_size)
    ]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    X: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(X, y)``."""
    y = torch.as_tensor(y)
    if len(y) == 0:
        return float("nan"), float("nan")
    logits = predict_logits(model, X, batch_size, device)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy
