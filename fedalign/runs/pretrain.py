"""Central pre-training of a zoo model (``fedalign pretrain CONFIG``): the base a federation
fine-tunes (``model.init``), trained on part of the config's data without any download.

The model is the config's, sized for its data and drawn from its init seed; it is trained by the
clients' own loop (``fedalign.client.training.train_local``, with the config's ``train`` section)
on a seeded fraction of the training split, and evaluated on the test split after every epoch.
``outside_federation`` keeps only the windows no client of the config's federation holds (a
``natural`` partition with fewer clients than groups: the other groups), so the federation
fine-tunes on data the base never saw: the shift federated fine-tuning is about.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedalign.client.training import evaluate, train_local
from fedalign.config.bundled import resolve_config
from fedalign.config.components import run_federation, run_model, server_device
from fedalign.config.load import apply_overrides, from_dict, read_yaml
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from fedalign.data import Federation
from fedalign.runs.merge import write_state


@dataclass(frozen=True)
class PretrainResult:
    """What pre-training did: the examples it trained on, its last epoch's mean training loss,
    and the base's loss and accuracy on the test split."""

    examples: int
    train_loss: float
    test_loss: float
    test_accuracy: float


def pretrain_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, str]:
    """The config at ``path`` with its ``model.init`` dropped (the base is what pre-training
    makes: the file need not exist yet), and that ``model.init`` ("" when it has none), the
    default output: pre-training a config writes the base it fine-tunes from."""
    path = resolve_config(path)
    values = apply_overrides(read_yaml(path, "config file"), overrides or [])
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections")
    model = values.get("model")
    init = model.get("init") if isinstance(model, dict) else None
    return from_dict(apply_overrides(values, ["model.init=null"])), str(init or "")


def pretrain_rows(
    fed: Federation, fraction: float, seed: int, outside_federation: bool = False
) -> np.ndarray:
    """The training-split rows pre-training uses: a seeded ``fraction`` of all of them, or of
    those no client holds (``outside_federation``). Sorted; ValueError in one line when none."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    rows = np.arange(len(fed.train.y))
    if outside_federation:
        held = np.concatenate([np.asarray(p) for p in fed.parts])
        rows = np.setdiff1d(rows, held)
        if len(rows) == 0:
            raise ValueError(
                "--outside-federation: the federation's clients hold every training example "
                "(use a natural partition with fewer clients than groups)"
            )
    count = max(1, round(fraction * len(rows)))
    return np.sort(np.random.default_rng(seed).choice(rows, size=count, replace=False))


def pretrain(
    cfg: RunConfig,
    out: str | Path,
    *,
    fraction: float = 1.0,
    epochs: int = 1,
    outside_federation: bool = False,
) -> PretrainResult:
    """Train the config's model centrally on ``pretrain_rows`` for ``epochs`` (one optimizer
    throughout, the data reshuffled every epoch from the config's shuffle seed), evaluate it on
    the test split and write its state dict to ``out`` (safetensors), the file a config's
    ``model.init`` names."""
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    fed = run_federation(cfg)
    rows = pretrain_rows(fed, fraction, cfg.resolved_seeds.partition, outside_federation)
    device = server_device(cfg)
    try:  # options that do not fit the data: one line (without the runner's Flower imports)
        model = run_model(cfg, fed, init_seed=cfg.resolved_seeds.init)
        with torch.no_grad():
            model(torch.as_tensor(fed.train.X[rows[:1]]))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model: {str(exc).strip().splitlines()[0]}") from None
    t = cfg.train
    stats = train_local(
        model,
        fed.train.X[rows],
        fed.train.y[rows],
        epochs=epochs,
        batch_size=t.batch_size,
        optimizer=t.optimizer,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        seed=cfg.resolved_seeds.shuffle,
        device=device,
    )
    loss, accuracy = evaluate(model, *fed.test, device=device)
    write_state(model.state_dict(), out)
    return PretrainResult(len(rows), stats.loss, loss, accuracy)
