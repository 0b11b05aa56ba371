"""Build a run's pieces (federated data, model) from its config.

The ClientApp, the ServerApp and the simulation scripts all go through these, so every part of a
run sees the same partition and the same architecture.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fedalign.algorithms.pipeline import Plan
from fedalign.client.training import OBJECTIVES, TrainStats, train_local
from fedalign.config.schema import (
    AdaptersConfig,
    DataConfig,
    RunConfig,
    TrainConfig,
    clients_per_round,
)
from fedalign.core.errors import ConfigError
from fedalign.data import Federation, federation, federation_key
from fedalign.data.shared import open_copy
from fedalign.models import build_for_state, build_model, fit_to_state, model_options


def partition_options(data: DataConfig) -> dict[str, object]:
    """The options of ``data.partition`` that the chosen scheme uses."""
    if data.partition == "dirichlet":
        return {"alpha": data.alpha, "min_partition_size": data.min_partition_size}
    if data.partition in ("shards", "pathological"):
        return {"classes_per_client": data.classes_per_client}
    return {}


def _federation_settings(cfg: RunConfig) -> tuple[tuple, dict[str, Any]]:
    d = cfg.data
    return (d.dataset, d.num_clients, d.partition), {
        "seed": cfg.resolved_seeds.partition,
        "val_fraction": d.val_fraction,
        "data_dir": d.data_dir,
        "dataset_options": d.options,
        **partition_options(d),
    }


def run_federation(cfg: RunConfig, data_copy: object | None = None) -> Federation:
    """The run's federated dataset: mapped from the run's shared copy in the folder
    ``data_copy`` when one is named and was written for these settings (one copy of the data
    for the driver and every worker, ``fedalign.data.shared``), else loaded and partitioned in
    this process (cached per process by ``fedalign.data.federation``)."""
    if data_copy is not None:
        mapped = open_copy(str(data_copy), run_federation_key(cfg))
        if mapped is not None:
            return mapped
    args, kwargs = _federation_settings(cfg)
    return federation(*args, **kwargs)


def run_federation_key(cfg: RunConfig) -> tuple:
    """What determines the run's federation (``fedalign.data.federation_key``): a shared copy
    of the data is used only by a run whose key it was written for."""
    args, kwargs = _federation_settings(cfg)
    return federation_key(*args, **kwargs)


def shape_options(
    model_name: str, input_shape: tuple[int, ...], num_classes: int
) -> dict[str, int]:
    """Model options implied by the data: input size, channels, image side, classes.

    Only options the model takes are returned, so ``mlp`` on 8x8 digits gets ``in_features=64``,
    ``lenet`` on Fashion-MNIST gets ``in_channels=1, image_size=28`` and ``char_transformer`` on
    fortunes' 80-character windows ``context=80``.
    """
    implied = {"num_classes": num_classes, "vocab_size": num_classes}
    if len(input_shape) == 3:
        implied.update(in_channels=input_shape[0], image_size=input_shape[-1])
    if len(input_shape) == 1:  # a text window: a transformer needs as many learned positions
        implied["context"] = input_shape[0]
    if len(input_shape) >= 1:
        implied["in_features"] = int(np.prod(input_shape))
    accepted = model_options(model_name)
    return {k: v for k, v in implied.items() if k in accepted}


def model_builder(cfg: RunConfig, fed: Federation) -> Callable[[], nn.Module]:
    """What builds the run's architecture sized for its data (weights as its constructor draws
    them). Options written in the config win over those implied by the data."""
    options = {
        **shape_options(cfg.model.name, fed.input_shape, fed.num_classes),
        **cfg.model.options,
    }
    return functools.partial(build_model, cfg.model.name, **options)


def run_model(
    cfg: RunConfig, fed: Federation, init_seed: int | None = None, state: dict | None = None
) -> nn.Module:
    """The run's architecture sized for its data (``model_builder``), with weights drawn from
    ``init_seed``.

    With ``state``, layers whose widths matching changed are resized to it
    (``fedalign.models.fit_to_state``) and the weights are loaded; without ``init_seed`` too,
    nothing is initialised or drawn from torch's global RNG (``fedalign.models.build_for_state``).
    """
    build = model_builder(cfg, fed)
    if state is not None and init_seed is None:
        return build_for_state(build, state)
    if init_seed is not None:
        torch.manual_seed(init_seed)
    model = build()
    if state is None and cfg.model.init is not None:
        state = fitting_state(model, initial_state(cfg.model.init), f"model.init {cfg.model.init}")
    return model if state is None else fit_to_state(model, state)


@functools.lru_cache(maxsize=2)
def _read_init(path: str, mtime: float) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"model.init: {path} is not a safetensors file ({exc})") from None


def initial_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The pre-trained weights ``model.init`` names: a safetensors file, or a run folder's
    final model (its ``model.safetensors``). Read once per process (every client message builds
    its model from them); ConfigError in one line when there are none."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise ConfigError(
                f"model.init: {path} has no model.safetensors (a finished run's final model)"
            )
        path = path / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"model.init: {path} does not exist")
    return {k: v.clone() for k, v in _read_init(str(path), path.stat().st_mtime).items()}


def fitting_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """``state`` if it holds exactly ``model``'s tensors at their shapes (the model as the config
    and the data size it); else ConfigError in one line naming the first misfit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        why = (
            f"lacks {missing[0]!r}"
            if missing
            else f"has {extra[0]!r}, which the model has not"
            if extra
            else f"{wrong[0]!r} is {tuple(state[wrong[0]].shape)}, the model's "
            f"{tuple(own[wrong[0]].shape)}"
        )
        raise ConfigError(f"{what} does not fit the model {type(model).__name__}: {why}")
    return dict(state)


def server_device(cfg: RunConfig) -> torch.device:
    """Where the server aligns and evaluates: ``simulation.server_device`` (``auto``: the GPU when
    there is one)."""
    wanted = cfg.simulation.server_device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def local_init_seed(cfg: RunConfig, partition_id: int) -> int:
    """Each client's own initialisation (PFNM and FedMA clients start from different inits)."""
    return int(np.random.SeedSequence([cfg.resolved_seeds.init, partition_id]).generate_state(1)[0])


def shuffle_seed(cfg: RunConfig, server_round: int, partition_id: int) -> int:
    """A data-shuffling seed per (run, round, client): reruns repeat, clients differ."""
    words = np.random.SeedSequence([cfg.resolved_seeds.shuffle, server_round, partition_id])
    return int(words.generate_state(1)[0])


PHASE_ENTRIES = {
    "epochs": ("local_epochs", int),
    "lr": ("lr", float),
    "weight-decay": ("weight_decay", float),
    "proximal-mu": ("proximal_mu", float),
}
"""Train message entries that override ``train`` for one exchange, and the keys they replace."""


def phase_training(config: Mapping[str, Any]) -> dict[str, Any]:
    """A train message's overrides of ``train`` (a phase of a schedule such as
    ``strategy.protocol: reference``), keyed as ``TrainConfig``'s fields."""
    return {
        key: kind(config[entry]) for entry, (key, kind) in PHASE_ENTRIES.items() if entry in config
    }


def train_client(
    cfg: RunConfig,
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    server_round: int,
    partition_id: int,
    frozen: Collection[str] = (),
    device: str | torch.device = "cpu",
    objective_inputs: Mapping[str, Any] | None = None,
    phase: Mapping[str, Any] | None = None,
) -> TrainStats:
    """One client's local training as the run's config says (optimizer, client objective, seeded
    shuffling; ``objective_inputs``: what the server sent for the objective; ``phase``: the
    server's overrides of ``train`` for this exchange, ``phase_training``): the
    ClientApp, the mock clients of the strategy tests and the plain-loop benchmark all train
    through this, so they train identically. The objective's options come from ``train``
    (``proximal_mu``) and, for an objective made for one strategy, from the strategy's section
    (FedDyn's ``alpha``, MOON's ``mu``: the strategy lists the objective in ``options_from``)."""
    t = dataclasses.replace(cfg.train, **(phase or {}))
    return train_local(
        model,
        X,
        y,
        epochs=t.local_epochs,
        batch_size=t.batch_size,
        optimizer=t.optimizer,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        objective=cfg.objective,
        objective_options=OBJECTIVES.get(cfg.objective).resolve(
            {**vars(t), **cfg.strategy.options}
        ),
        objective_inputs=objective_inputs,
        seed=shuffle_seed(cfg, server_round, partition_id),
        device=device,
        frozen=frozen,
    )


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy is built with besides its options: never the whole run config.

    ``model``: the run's architecture at its initial widths (strategies derive permutation specs
    from it and never load data, so they are testable on mock replies); ``num_clients`` and
    ``clients_per_round``: the federation; ``seed``: the run's sampling seed, from which a
    strategy derives its own (matching, tie-breaks); ``train``: how the clients train (SCAFFOLD
    and FedNova derive gradients from it, schedules scale it); ``device``: where the server
    aligns and matches; ``server_optimizer``: the step towards the fused model (name, options);
    ``plan``: the align -> fuse -> repair pipeline, for strategies that take it, and
    ``own_init``: whether round 1 trains from the clients' own inits; ``adapters``: the LoRA
    adapters the clients train (``kind: none``: the whole model); ``init_seed``: the run's init
    seed, from which the clients draw what they initialise themselves (fresh adapters);
    ``example_input``: two rows of the clients' training input (token ids for a language model),
    which permutation specs are traced on (None: guessed from the model's first layer, as when a
    config is checked without its data)."""

    model: nn.Module
    num_clients: int = 2
    clients_per_round: int = 2
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    server_optimizer: tuple[str, Mapping[str, Any]] = ("sgd", {"lr": 1.0})
    plan: Plan = field(default_factory=Plan)
    own_init: bool = False
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    init_seed: int = 0
    example_input: torch.Tensor | None = None


def strategy_context(
    cfg: RunConfig, model: nn.Module, example_input: torch.Tensor | None = None
) -> StrategyContext:
    """What the run ``cfg`` gives a strategy besides its options (``example_input``: a batch
    of the run's training input, see ``StrategyContext``)."""
    device = str(server_device(cfg))
    o = cfg.server_optimizer
    return StrategyContext(
        model=model,
        num_clients=cfg.data.num_clients,
        clients_per_round=clients_per_round(cfg),
        seed=cfg.resolved_seeds.sampling,
        train=cfg.train,
        device=device,
        server_optimizer=(o.name, dict(o.options)),
        plan=cfg.to_plan(device=device),
        own_init=cfg.aggregation.own_init,
        adapters=cfg.adapters,
        init_seed=cfg.resolved_seeds.init,
        example_input=example_input,
    )
