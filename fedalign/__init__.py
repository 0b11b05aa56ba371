"""fedalign: federated learning simulations with neuron alignment.

The public API: run a config, load one, derive a permutation spec, aggregate models with the
align -> fuse -> repair pipeline, and register your own models, datasets and algorithms so that a
config can name them::

    import fedalign

    fedalign.register_model("tiny", TinyNet)                 # any nn.Module builder
    fedalign.register_fuse_rule("geomedian", geomedian)      # (states, weights, stats) -> state
    cfg = fedalign.load_config("my.yaml", ["model.name=tiny", "aggregation.fuse=geomedian"])
    outcome = fedalign.run(cfg)                              # a Flower simulation on Ray
    merged = fedalign.aggregate_local(fedalign.Plan(align="weight"), model, states, weights,
                                      samples)                # the server's pipeline, offline

A config file names only registered things, never import paths, so running someone's shared config
runs no code of theirs; registering is code the user runs (or a file given to ``--plugin``).
Layers (see docs/architecture.md): the algorithm packages (:mod:`fedalign.align`,
:mod:`fedalign.fusion`, :mod:`fedalign.repair`, :mod:`fedalign.stats`, :mod:`fedalign.analysis`)
are pure functions over tensors and state dicts and import neither Flower nor the config;
:mod:`fedalign.fl` is the thin Flower layer over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedalign.align import ALIGNERS, SOLVERS, PermutationSpec, permutation_spec
from fedalign.config import RunConfig, from_dict, load_config
from fedalign.data import DATASETS, Arrays
from fedalign.errors import ConfigError, RoundFailedError
from fedalign.fusion import FUSE_RULES
from fedalign.models import MODELS
from fedalign.pipeline import Outcome, Plan, aggregate, aggregate_local
from fedalign.plugins import load_plugin
from fedalign.registry import STRATEGIES, Context, Registry, RegistryError, Supports
from fedalign.repair import REPAIR_RULES, RepairInputs
from fedalign.server_opt import SERVER_OPTIMIZERS, options_problem
from fedalign.stats import STATISTICS, StatContext
from fedalign.training import OBJECTIVES, OPTIMIZERS

if TYPE_CHECKING:
    from fedalign.runner import RunOutcome

__version__ = "0.1.0"


def register_model(
    name: str, builder: Callable[..., Any], *, replace: bool = False
) -> Callable[..., Any]:
    """A model a config can name (``model: {name: NAME, ...options}``): ``builder(**options)``
    returns an ``nn.Module``; the options a dataset implies (``in_features``, ``in_channels``,
    ``image_size``, ``num_classes``, ``vocab_size``) are passed when it takes them."""
    return MODELS.register(name, builder, options={}, replace=replace)


def register_dataset(
    name: str, loader: Callable[..., Arrays], *, replace: bool = False
) -> Callable[..., Arrays]:
    """A dataset a config can name (``data.dataset``): ``loader(split, data_dir, **options)``
    returns :class:`fedalign.data.Arrays` for ``split`` ``"train"`` or ``"test"``."""
    return DATASETS.register(name, loader, options={}, replace=replace)


def register_fuse_rule(
    name: str,
    rule: Callable[..., Any],
    *,
    needs: tuple[str, ...] = (),
    supports: Supports | None = None,
    replace: bool = False,
) -> Callable[..., Any]:
    """A fuse rule (``aggregation.fuse``): ``rule(states, weights, stats, **options)`` returns the
    fused state dict; ``needs`` names the client statistics it reads from ``stats[j]``; its
    keyword-only parameters are its options (``aggregation.options``)."""
    return FUSE_RULES.register(
        name, rule, needs={"train": needs}, supports=supports, replace=replace
    )


def register_aligner(
    name: str,
    aligner: Callable[..., Any],
    *,
    needs: Mapping[str, tuple[str, ...]] | None = None,
    supports: Supports | None = None,
    replace: bool = False,
) -> Callable[..., Any]:
    """An alignment step (``aggregation.align``), with the signature of
    ``fedalign.align.aligners``."""
    return ALIGNERS.register(name, aligner, needs=needs, supports=supports, replace=replace)


def register_repair_rule(
    name: str,
    rule: Callable[..., Any],
    *,
    needs: Mapping[str, tuple[str, ...]] | None = None,
    supports: Supports | None = None,
    replace: bool = False,
    needs_alignment: bool = False,
) -> Callable[..., Any]:
    """A repair step (``aggregation.repair``): ``rule(fused, inputs: RepairInputs, **options)``
    returns ``(state, info)``."""
    return REPAIR_RULES.register(
        name, rule, needs=needs, supports=supports, replace=replace, needs_alignment=needs_alignment
    )


def register_server_optimizer(
    name: str,
    step: Callable[..., Any],
    *,
    check: Callable[[Mapping[str, Any]], str | None] | None = None,
    replace: bool = False,
) -> Callable[..., Any]:
    """A server optimizer (``server_optimizer.name``): ``step(reference, fused, state,
    **options)`` returns ``(new global state dict, optimizer state)``, the state a flat dict of
    tensors (checkpointed); ``check(options)`` says why option values are invalid (default: the
    built-ins' check of ``lr``, ``momentum``, ``betas``, ``tau``)."""
    return SERVER_OPTIMIZERS.register(name, step, check=check or options_problem, replace=replace)


def register_statistic(
    name: str,
    compute: Callable[..., Any],
    *,
    permute: Callable[..., Any] | None = None,
    replace: bool = False,
) -> Callable[..., Any]:
    """A client statistic: ``compute(model, X, y, context: StatContext, **options)``; ``permute``
    moves it into the aligned basis (None: it is never moved)."""
    return STATISTICS.register(name, compute, permute=permute, replace=replace)


def register_strategy(
    name: str,
    strategy: type,
    *,
    objective: str = "plain",
    pipeline: bool = False,
    supports: Supports | None = None,
    replace: bool = False,
) -> type:
    """A strategy (``strategy.name``): a ``fedalign.fl.engine.Strategy`` subclass, the client
    ``objective`` it trains with, and whether it takes the align/fuse/repair pipeline."""
    return STRATEGIES.register(
        name,
        strategy,
        options={},
        objective=objective,
        pipeline=pipeline,
        supports=supports,
        replace=replace,
    )


def run(
    config: RunConfig | str | Path, overrides: list[str] | None = None, **options: Any
) -> RunOutcome:
    """Simulate a run (a ``RunConfig``, or a YAML path with ``overrides``) on Flower and Ray;
    ``options`` go to :func:`fedalign.runner.run` (``output_dir``, ``verbose``, ``progress``,
    ``resume_dir``). Returns the run folder and its summary."""
    from fedalign import runner  # Flower and Ray load only when a simulation runs

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return runner.run(cfg, **options)


__all__ = [
    "ALIGNERS",
    "DATASETS",
    "FUSE_RULES",
    "MODELS",
    "OBJECTIVES",
    "OPTIMIZERS",
    "REPAIR_RULES",
    "SERVER_OPTIMIZERS",
    "SOLVERS",
    "STATISTICS",
    "STRATEGIES",
    "Arrays",
    "ConfigError",
    "Context",
    "Outcome",
    "PermutationSpec",
    "Plan",
    "Registry",
    "RegistryError",
    "RepairInputs",
    "RoundFailedError",
    "RunConfig",
    "StatContext",
    "aggregate",
    "aggregate_local",
    "from_dict",
    "load_config",
    "load_plugin",
    "permutation_spec",
    "register_aligner",
    "register_dataset",
    "register_fuse_rule",
    "register_model",
    "register_repair_rule",
    "register_server_optimizer",
    "register_statistic",
    "register_strategy",
    "run",
]
