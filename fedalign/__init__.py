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
Layers (see docs/architecture.md): the algorithm packages (:mod:`fedalign.algorithms.align`,
:mod:`fedalign.algorithms.fusion`, :mod:`fedalign.algorithms.repair`,
:mod:`fedalign.algorithms.stats`, :mod:`fedalign.algorithms.analysis`) are pure functions over
tensors and state dicts and import neither Flower nor the config; :mod:`fedalign.fl` is the thin
Flower layer over them. Nothing here loads before a name is used: ``import fedalign`` starts no
Flower, no Ray, not even torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedalign.algorithms.align import (
        ALIGNERS,
        SOLVERS,
        PermutationSpec,
        apply_permutation,
        permutation_spec,
        weight_matching,
    )
    from fedalign.algorithms.analysis import interpolation_barrier
    from fedalign.algorithms.fusion import FUSE_RULES
    from fedalign.algorithms.lora import LORA_RULES, lora_update
    from fedalign.algorithms.pipeline import Outcome, Plan, aggregate, aggregate_local
    from fedalign.algorithms.repair import REPAIR_RULES, RepairInputs
    from fedalign.algorithms.server_opt import SERVER_OPTIMIZERS
    from fedalign.algorithms.stats import STATISTICS, StatContext
    from fedalign.client.training import OBJECTIVES, OPTIMIZERS, train_local
    from fedalign.config.load import from_dict, load_config
    from fedalign.config.schema import RunConfig
    from fedalign.core.errors import ConfigError, RoundFailedError
    from fedalign.core.plugins import load_plugin
    from fedalign.core.registry import STRATEGIES, Context, Registry, RegistryError, Supports
    from fedalign.data import DATASETS, Arrays, dataset_arrays
    from fedalign.models import MODELS, build_model
    from fedalign.runs.artifacts import evaluate, load_model
    from fedalign.runs.runner import RunOutcome

__version__ = "0.1.0"

_LAZY = {
    "ALIGNERS": "fedalign.algorithms.pipeline",
    "SOLVERS": "fedalign.algorithms.align",
    "PermutationSpec": "fedalign.algorithms.align",
    "permutation_spec": "fedalign.algorithms.align",
    "apply_permutation": "fedalign.algorithms.align",
    "weight_matching": "fedalign.algorithms.align",
    "interpolation_barrier": "fedalign.algorithms.analysis",
    "train_local": "fedalign.client.training",
    "dataset_arrays": "fedalign.data",
    "build_model": "fedalign.models",
    "FUSE_RULES": "fedalign.algorithms.pipeline",
    "LORA_RULES": "fedalign.algorithms.lora",
    "lora_update": "fedalign.algorithms.lora",
    "Outcome": "fedalign.algorithms.pipeline",
    "Plan": "fedalign.algorithms.pipeline",
    "aggregate": "fedalign.algorithms.pipeline",
    "aggregate_local": "fedalign.algorithms.pipeline",
    "REPAIR_RULES": "fedalign.algorithms.pipeline",
    "RepairInputs": "fedalign.algorithms.repair",
    "SERVER_OPTIMIZERS": "fedalign.algorithms.server_opt",
    "STATISTICS": "fedalign.algorithms.pipeline",
    "StatContext": "fedalign.algorithms.stats",
    "OBJECTIVES": "fedalign.client.training",
    "OPTIMIZERS": "fedalign.client.training",
    "RunConfig": "fedalign.config.schema",
    "from_dict": "fedalign.config.load",
    "load_config": "fedalign.config.load",
    "Strategy": "fedalign.fl.strategy",
    "StrategyContext": "fedalign.config.components",
    "ConfigError": "fedalign.core.errors",
    "RoundFailedError": "fedalign.core.errors",
    "load_plugin": "fedalign.core.plugins",
    "STRATEGIES": "fedalign.core.registry",
    "Context": "fedalign.core.registry",
    "Registry": "fedalign.core.registry",
    "RegistryError": "fedalign.core.registry",
    "DATASETS": "fedalign.data",
    "Arrays": "fedalign.data",
    "MODELS": "fedalign.models",
    "load_model": "fedalign.runs.artifacts",
    "evaluate": "fedalign.runs.artifacts",
}
"""Public name -> the module it is taken from, imported on first use: ``import fedalign`` loads
neither torch nor the config, Flower or Ray until a name needs them. The algorithm registries come
through the pipeline, which imports every built-in step and statistic (the ``pfnm`` aligner is
registered in ``fusion``, statistics beside the rules that read them)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def register_model(
    name: str, builder: Callable[..., Any], *, replace: bool = False
) -> Callable[..., Any]:
    """A model a config can name (``model: {name: NAME, ...options}``): ``builder(**options)``
    returns an ``nn.Module``; the options a dataset implies (``in_features``, ``in_channels``,
    ``image_size``, ``num_classes``, ``vocab_size``, a text window's ``context``) are passed when
    it takes them."""
    from fedalign.models import MODELS

    return MODELS.register(name, builder, options={}, replace=replace)


def register_dataset(
    name: str, loader: Callable[..., Arrays], *, replace: bool = False
) -> Callable[..., Arrays]:
    """A dataset a config can name (``data.dataset``): ``loader(split, data_dir, **options)``
    returns :class:`fedalign.data.Arrays` for ``split`` ``"train"`` or ``"test"``."""
    from fedalign.data import DATASETS

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
    from fedalign.algorithms.fusion import FUSE_RULES

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
    ``fedalign.algorithms.align.aligners``."""
    from fedalign.algorithms.align import ALIGNERS

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
    from fedalign.algorithms.repair import REPAIR_RULES

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
    from fedalign.algorithms.server_opt import SERVER_OPTIMIZERS, options_problem

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
    from fedalign.algorithms.stats import STATISTICS

    return STATISTICS.register(name, compute, permute=permute, replace=replace)


def register_strategy(
    name: str,
    strategy: type,
    *,
    objective: str = "plain",
    pipeline: bool = False,
    replace: bool = False,
) -> type:
    """A strategy (``strategy.name``): a :class:`fedalign.Strategy` subclass, the client
    ``objective`` it trains with, and whether it takes the align/fuse/repair pipeline. Its options
    are its constructor's keyword-only parameters, with their defaults and annotations (a config
    writes them in the ``strategy`` section; each value is checked against its annotation);
    ``Strategy.problem`` says why a model or federation cannot run it."""
    import inspect

    from fedalign.core.registry import STRATEGIES, RegistryError
    from fedalign.fl.strategy import Strategy

    if not (inspect.isclass(strategy) and issubclass(strategy, Strategy)):
        raise RegistryError(f"strategy {name!r}: {strategy!r} is not a fedalign.Strategy subclass")
    required = [
        p.name
        for p in inspect.signature(strategy.__init__).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    if required:  # a config could not leave it out, and nothing would say so until a run
        raise RegistryError(f"strategy {name!r}: option {required[0]!r} needs a default")
    return STRATEGIES.register(
        name, strategy, objective=objective, pipeline=pipeline, replace=replace
    )


def run(
    config: RunConfig | str | Path, overrides: list[str] | None = None, **options: Any
) -> RunOutcome:
    """Simulate a run (a ``RunConfig``, or a YAML path with ``overrides``) on Flower and Ray;
    ``options`` go to :func:`fedalign.runs.runner.run` (``output_dir``, ``verbose``, ``progress``,
    ``resume_dir``). Returns the run folder and its summary."""
    from fedalign.config.load import load_config
    from fedalign.config.schema import RunConfig
    from fedalign.runs import runner  # Flower and Ray load only when a simulation runs

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return runner.run(cfg, **options)


__all__ = [
    "ALIGNERS",
    "DATASETS",
    "FUSE_RULES",
    "LORA_RULES",
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
    "Strategy",
    "StrategyContext",
    "aggregate",
    "aggregate_local",
    "apply_permutation",
    "build_model",
    "dataset_arrays",
    "evaluate",
    "from_dict",
    "interpolation_barrier",
    "load_config",
    "load_model",
    "load_plugin",
    "lora_update",
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
    "train_local",
    "weight_matching",
]
