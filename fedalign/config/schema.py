"""The validated run configuration.

A run is described by one YAML file (plus ``--set key=value`` overrides). Every key is declared
once, below, as a dataclass field ``name: type = key(default, "comment", choices=..., bounds)``:
the loader checks its type, choices and bounds from that declaration, and
``fedalign.config.reference`` renders the commented default YAML, the README's reference and a
JSON Schema from it. A config is loaded into those frozen dataclasses, so a typo or an impossible
value stops the run before Ray starts, with one message that names the key (``ConfigError``),
instead of a traceback twenty seconds into a simulation.

One ``seed`` derives the separate seeds of partitioning, model init, client sampling and data
shuffling; the resolved config written to the run folder records them all, so any run can be
repeated from its folder alone.

Every choice (dataset, model, optimizer, client objective, strategy, aligner, solver, fuse and
repair rule, and their options) is checked against the registries that own it, with the owner's
own ``supports`` checks: the config restates no list of names, no default of an algorithm. The
config turns into the pipeline's ``Plan`` (``to_plan``), never the reverse.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedalign.algorithms.align import ALIGNERS, SOLVERS
from fedalign.algorithms.fusion import FUSE_RULES
from fedalign.algorithms.pipeline import Plan
from fedalign.algorithms.repair import REPAIR_RULES
from fedalign.algorithms.server_opt import SERVER_OPTIMIZERS
from fedalign.algorithms.stats import STATISTICS
from fedalign.client.training import OBJECTIVES, OPTIMIZERS
from fedalign.core.errors import ConfigError
from fedalign.core.registry import STRATEGIES, Context, RegistryError
from fedalign.data import DATASETS, dataset_options, partition_schemes
from fedalign.data.hub import HF_NAME_PATTERN
from fedalign.models import MODELS, build_model, model_options
from fedalign.report.trackers import TRACKERS

# --------------------------------------------------------------------------------------------------
# The schema: every key declared once, with its default, its one-line comment and its checks


@dataclass(frozen=True)
class Choices:
    """Names a key accepts that no registry owns (a registry, having ``kind`` and iterating its
    names, serves as a key's choices directly)."""

    kind: str
    names: Callable[[], Iterable[str]]
    pattern: str | None = None  # a regex for names beyond ``names`` (hf:<org>/<name>)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, value: object) -> bool:
        if (
            self.pattern is not None
            and isinstance(value, str)
            and re.fullmatch(self.pattern, value)
        ):
            return True
        return value in self.names()


def key(
    default: Any,
    doc: str,
    *,
    choices: Iterable[str] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config key: its default (``REQUIRED``: none; a dataclass: a section), its one-line
    comment (``fedalign config --defaults``, the README's reference and the JSON Schema print it),
    the names it accepts (a registry or :class:`Choices`) and its bounds, which the loader checks
    for every config. Adding a key is one line: a field whose default is ``key(...)``."""
    meta = {"doc": doc, "choices": choices, "bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt}}
    if dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED: Any = dataclasses.MISSING
"""The default of a key that must be given (in a list item such as a fault)."""
FAULT_KINDS = ("raise", "nan", "wrong-shape", "missing-key", "scale", "crash", "slow")


@dataclass(frozen=True)
class DataConfig:
    """The dataset and how it is split across the clients."""

    dataset: str = key(
        "fashion-mnist",
        "the dataset, or hf:<org>/<name>",
        choices=Choices("dataset", lambda: tuple(DATASETS), pattern=HF_NAME_PATTERN),
    )
    data_dir: str | None = key(None, "its folder; null: FEDALIGN_DATA_DIR or the defaults")
    options: dict[str, Any] = key({}, "the dataset loader's options (fortunes: seq_len; hf:...)")
    num_clients: int = key(10, "clients in the federation", ge=1)
    partition: str = key("dirichlet", "label split", choices=Choices("scheme", partition_schemes))
    alpha: float = key(0.5, "Dirichlet concentration: smaller is more skewed", gt=0)
    classes_per_client: int = key(2, "labels per client (shards, pathological)", ge=1)
    min_partition_size: int = key(10, "resample a partition until every client has this many", ge=0)
    val_fraction: float = key(0.1, "each client's local validation split", ge=0, lt=1)


@dataclass(frozen=True)
class ModelConfig:
    """The model; every key of the section but ``name`` is one of its options."""

    name: str = key("mlp", "the model", choices=MODELS)
    options: dict[str, Any] = key(
        {}, "its options (keyword arguments), also writable in the section"
    )


@dataclass(frozen=True)
class TrainConfig:
    """The clients' local training."""

    local_epochs: int = key(1, "epochs over the local data per round", ge=1)
    batch_size: int = key(32, "local minibatch size", ge=1)
    optimizer: str = key("sgd", "local optimizer", choices=OPTIMIZERS)
    lr: float = key(0.05, "local learning rate", gt=0)
    momentum: float = key(0.0, "SGD momentum", ge=0, lt=1)
    weight_decay: float = key(0.0, "L2 weight decay", ge=0)
    objective: str | None = key(None, "local objective; null: the strategy's", choices=OBJECTIVES)
    proximal_mu: float = key(0.0, "FedProx's mu (objective proximal)", ge=0)


@dataclass(frozen=True)
class MatchingConfig:
    """BBP-MAP's hyperparameters for PFNM and FedMA. ``grid: true`` (PFNM) lets the clients pick
    sigma, sigma0 and gamma from the reference's grid by their training accuracy, keeping the
    smallest model within ``grid_tolerance`` of the best score (0: the best, as the reference
    does)."""

    sigma: float = key(1.0, "noise of a client's neuron around its global neuron", gt=0)
    sigma0: float = key(1.0, "prior spread of global neurons", gt=0)
    gamma: float | None = key(None, "new-neuron rate; null: the method's (PFNM 1, FedMA 7)", gt=0)
    iterations: int = key(5, "BBP-MAP passes over the clients", ge=0)
    solver: str = key("hungarian", "assignment solver", choices=SOLVERS)
    max_width: int | None = key(None, "cap on the global widths; null: none", ge=1)
    popularity: str = key(
        "consistent",
        "popularity weight: 2 log, 1 (PFNM code)",
        choices=Choices("popularity", lambda: ("consistent", "reference")),
    )
    grid: bool = key(False, "pfnm: clients score the reference's (sigma, sigma0, gamma) grid")
    grid_tolerance: float = key(
        0.0, "pfnm grid: keep the smallest model within this accuracy of the best", ge=0, le=1
    )


FEDMA_PROTOCOLS = ("fedalign", "reference")
REFERENCE_BASELINES = ("fedavg", "fedprox", "fedma")
"""The strategies ``strategy.fedma.protocol: reference`` schedules (FedMA and its baselines)."""


@dataclass(frozen=True)
class FedMAConfig:
    """FedMA's training schedule (``docs/fidelity.md``). ``fedalign``: every phase trains
    ``train.local_epochs`` at ``train.lr``. ``reference``: IBM/FedMA's comparison (its
    ``main.py``): round 1 trains ``train.local_epochs`` from each client's own init; every later
    training (FedMA's layer phases and later rounds, the baselines' rounds) ``retrain_epochs`` at
    ``retrain_lr``; FedMA's phase that retrains only the output layer 3x as long at a tenth of
    ``retrain_lr`` with weight decay 1e-4, the baselines' rounds with weight decay 1e-4; FedMA
    matches with ``matching.gamma`` (7) in round 1 and ``round_gamma`` later. fedavg and fedprox
    take it too: round 1 from the clients' own inits, so round 2 starts from the plain average of
    the locally trained models, as the reference's baselines do."""

    protocol: str = key(
        "fedalign",
        "reference: IBM/FedMA's schedule, for fedma, fedavg, fedprox",
        choices=Choices("protocol", lambda: FEDMA_PROTOCOLS),
    )
    retrain_epochs: int | None = key(
        None, "reference: epochs of each training after round 1's; null: local_epochs", ge=1
    )
    retrain_lr: float | None = key(None, "reference: their learning rate; null: train.lr", gt=0)
    round_gamma: float = key(5.0, "reference: FedMA's gamma after round 1", gt=0)


@dataclass(frozen=True)
class StrategyConfig:
    """The server's strategy and its rounds."""

    name: str = key("fedavg", "the strategy", choices=STRATEGIES)
    rounds: int = key(10, "federated rounds", ge=1)
    fraction_train: float = key(
        1.0, "clients sampled per round (seeded), at least min_train_clients", gt=0, le=1
    )
    min_train_clients: int = key(2, "fewest valid replies a round needs", ge=1)
    fraction_evaluate: float = key(
        0.0, "> 0: federated evaluation on the clients' validation splits", ge=0, le=1
    )
    eval_every: int = key(1, "test-set evaluation every k rounds (and the last)", ge=1)
    overlap_evaluation: bool = key(
        False, "true: round r's test-set pass runs while round r+1 trains (same rows)"
    )
    timeout: float = key(3600.0, "seconds a round waits for its clients", gt=0)
    round_retries: int = key(1, "resamples of a round with too few valid replies", ge=0)
    max_update_norm: float | None = key(
        None, "reject updates whose norm exceeds this; null: no bound", gt=0
    )
    max_client_examples: int | None = key(
        None, "clip self-reported example counts to this; null: no bound", ge=1
    )
    max_stat_ratio: float | None = key(
        1e4, "drop a client whose Gram/Fisher scale exceeds this x the median", ge=1
    )
    max_fused_ratio: float | None = key(
        10.0, "fall back to the mean if the fused norm exceeds this x the inputs'", ge=1
    )
    matching: MatchingConfig = key(MatchingConfig, "pfnm / fedma: BBP-MAP hyperparameters")
    fedma: FedMAConfig = key(FedMAConfig, "fedma's schedule (and its baselines')")


@dataclass(frozen=True)
class AggregationConfig:
    """The server's align -> fuse -> repair pipeline (strategies that take it: fedavg, fedprox).

    ``align``, ``fuse`` and ``repair`` name registered steps; ``options`` holds their options,
    which may also be written directly in the section; the resolved config records every option
    the chosen steps take, with its value. Steps that need data get it from the clients as
    statistics (see ``fedalign.algorithms.pipeline``).
    """

    align: str = key(Plan.align, "matching", choices=ALIGNERS)
    solver: str = key(Plan.solver, "assignment solver", choices=SOLVERS)
    fuse: str = key(Plan.fuse, "fusion rule", choices=FUSE_RULES)
    repair: str = key(Plan.repair, "fused-model fix", choices=REPAIR_RULES)
    options: dict[str, Any] = key({}, "the steps' options (below), also writable in the section")
    stats_samples: int = key(2000, "examples per client for the statistics (0: all)", ge=0)
    own_init: bool = key(False, "round 1 from each client's own init (one-shot fusion studies)")
    workers: int = key(Plan.workers, "processes aligning clients in parallel", ge=1)


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """The server's step from the global model towards the fused one
    (``fedalign.algorithms.server_opt``):
    ``sgd`` with ``lr: 1`` (the default) takes the fused model; ``momentum``, ``adam``, ``yogi``
    and ``adagrad`` make FedAvgM, FedAdam, FedYogi and FedAdagrad of any strategy. Its options
    (``lr``, ``momentum``, ``betas``, ``tau``, ``bias_correction``) may be written directly in the
    section; the resolved config records those the chosen optimizer takes, with their values."""

    name: str = key("sgd", "the server optimizer", choices=SERVER_OPTIMIZERS)
    options: dict[str, Any] = key({}, "its options (below), also writable in the section")


@dataclass(frozen=True)
class SimulationConfig:
    """Where the clients run: Flower's simulation engine on Ray."""

    client_cpus: float = key(1.0, "Ray CPUs per client; 0.5 runs two clients per core", gt=0)
    client_gpus: float = key(0.0, "Ray GPUs per client; fractions share a GPU", ge=0)
    ray_address: str | None = key(None, "attach to an existing Ray cluster (or set RAY_ADDRESS)")
    server_device: str = key(
        "cpu",
        "the server's evaluation and alignment",
        choices=Choices("device", lambda: ("cpu", "cuda", "auto")),
    )
    max_restarts: int = key(
        2,
        "restarts from the last checkpoint on a fresh actor pool after a client worker dies",
        ge=0,
    )
    fast_dispatch: bool = key(
        True, "message dispatch in O(messages), no info query (fedalign/fl/dispatch.py)"
    )
    shared_data: bool = key(
        True,
        "clients map one copy of the data written in the run folder (fedalign/data/shared.py)",
    )
    ray_dashboard: bool = key(
        False, "Ray's dashboard for this run (needs fedalign[dashboard], i.e. ray[default])"
    )


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes into its folder."""

    dir: str = key("runs", "parent folder of the run folders")
    save_model: bool = key(True, "write the final model.safetensors")
    plot: bool = key(True, "draw accuracy.png")
    checkpoint_every: int = key(1, "checkpoint every k rounds (0: none)", ge=0)
    keep_checkpoints: int = key(2, "newest checkpoints kept", ge=1)
    trackers: tuple[str, ...] = key(
        (), "copies of metrics.jsonl for tensorboard | mlflow (optional extras)"
    )


@dataclass(frozen=True)
class FaultConfig:
    """An injected client fault, for testing a federation's robustness."""

    round: int = key(REQUIRED, "the round it happens in", ge=1)
    client: int = key(REQUIRED, "the client (index) that misbehaves", ge=0)
    kind: str = key(REQUIRED, "the fault", choices=Choices("fault", lambda: FAULT_KINDS))
    factor: float = key(1e6, "scale: the factor its update is multiplied by")
    seconds: float = key(0.0, "slow: how late its (honest) reply comes", ge=0)


@dataclass(frozen=True)
class Seeds:
    """Seeds derived from the run seed; each may be pinned in the config."""

    partition: int = key(REQUIRED, "the partition of the data")
    init: int = key(REQUIRED, "the global model's initialisation")
    sampling: int = key(REQUIRED, "the clients sampled per round")
    shuffle: int = key(REQUIRED, "the clients' data shuffling")


@dataclass(frozen=True)
class RunConfig:
    """A run: every section below."""

    name: str = key("run", "the run folder's prefix")
    seed: int = key(0, "derives the partition, init, sampling and shuffling seeds")
    data: DataConfig = key(DataConfig, "the dataset and its partition")
    model: ModelConfig = key(ModelConfig, "the model; other keys are its options")
    train: TrainConfig = key(TrainConfig, "the clients' local training")
    strategy: StrategyConfig = key(StrategyConfig, "the server's strategy")
    aggregation: AggregationConfig = key(
        AggregationConfig, "fedavg / fedprox: the server's align -> fuse -> repair pipeline"
    )
    server_optimizer: ServerOptimizerConfig = key(
        ServerOptimizerConfig, "the server's step towards the fused model (FedAvgM, FedAdam, ...)"
    )
    simulation: SimulationConfig = key(SimulationConfig, "where clients run (Ray)")
    output: OutputConfig = key(OutputConfig, "what the run folder gets")
    faults: tuple[FaultConfig, ...] = key((), "injected client faults, to test robustness")
    seeds: Seeds | None = key(None, "pin derived seeds; the run folder's config records all four")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_plan(self, device: str = "cpu") -> Plan:
        """The server pipeline this config describes (``device``: where alignment runs)."""
        a = self.aggregation
        return Plan(
            align=a.align,
            solver=a.solver,
            fuse=a.fuse,
            repair=a.repair,
            options=dict(a.options),
            workers=a.workers,
            device=device,
        )

    @property
    def objective(self) -> str:
        """The client objective: the one named in ``train.objective``, else the strategy's."""
        return self.train.objective or STRATEGIES.get(self.strategy.name).meta.get(
            "objective", "plain"
        )

    @property
    def resolved_seeds(self) -> Seeds:
        assert self.seeds is not None, "load configs through load_config/from_dict"
        return self.seeds


def derive_seeds(seed: int) -> Seeds:
    """Four independent 31-bit seeds from one, so that changing e.g. the sampling seed does not
    change the partition."""
    words = np.random.SeedSequence(seed).generate_state(4, dtype=np.uint32)
    return Seeds(*(int(w) & 0x7FFFFFFF for w in words))


# --------------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses, with type checks that name the key


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1]
        return tuple(_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # programming error


def _check_declared(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """The choices and bounds a key declares (``key(...)``); None passes (a nullable key)."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{key}: unknown {choices.kind} {value!r}; choose one of {', '.join(choices)}"
        )
    bounds = {op: b for op, b in meta.get("bounds", {}).items() if b is not None}
    if any(not _COMPARE[op](value, b) for op, b in bounds.items()):
        raise ConfigError(f"{key}: must be {_bounds_text(bounds)}, got {value!r}")


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "ge": operator.ge,
    "gt": operator.gt,
    "le": operator.le,
    "lt": operator.lt,
}


def _bounds_text(bounds: Mapping[str, float]) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``"in [0, 1)"``; ``{"gt": 0}`` -> ``"> 0"``."""
    low = [(op, b) for op, b in bounds.items() if op in ("ge", "gt")]
    high = [(op, b) for op, b in bounds.items() if op in ("le", "lt")]
    if low and high:
        (lo, a), (hi, b) = low[0], high[0]
        return f"in {'[' if lo == 'ge' else '('}{a:g}, {b:g}{']' if hi == 'le' else ')'}"
    op, b = (low or high)[0]
    return f"{ {'ge': '>=', 'gt': '>', 'le': '<=', 'lt': '<'}[op] } {b:g}"


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key '{where}{unknown[0]}'; valid keys here: {', '.join(sorted(fields))}"
        )
    missing = [n for n, f in fields.items() if _required(f) and n not in values]
    if missing:
        raise ConfigError(
            f"{prefix}.{missing[0]}: required" if prefix else f"{missing[0]}: required"
        )
    kwargs = {}
    for name, value in values.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(where, value, hints[name])
        _check_declared(where, kwargs[name], fields[name].metadata)
    return cls(**kwargs)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


_STEP_REGISTRIES = (ALIGNERS, FUSE_RULES, REPAIR_RULES)


def _named_section(key: str, raw: Any, default: str) -> dict[str, Any]:
    """Accept ``model: {name: mlp, hidden: [200]}`` (or ``server_optimizer: {name: adam, lr:
    0.1}``, or the name alone): every key but ``name`` is an option of the named thing."""
    if isinstance(raw, str):
        return {"name": raw, "options": {}}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    raw = dict(raw)
    name = raw.pop("name", default)
    options = raw.pop("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{key}.options: expected a mapping, got {options!r}")
    return {"name": name, "options": {**options, **raw}}


def _step_options() -> set[str]:
    """Every option some registered pipeline step or statistic takes."""
    return {
        name
        for registry in (*_STEP_REGISTRIES, STATISTICS)
        for n in registry
        for name in registry.get(n).options
    }


def _aggregation_section(raw: Any) -> Any:
    """Options of the pipeline's steps may be written directly in the section
    (``aggregation: {fuse: regmean, ridge: 0.01}``): they move into ``options``."""
    if not isinstance(raw, dict):
        return raw
    fields = {f.name for f in dataclasses.fields(AggregationConfig)}
    known = _step_options()
    moved = {k: v for k, v in raw.items() if k not in fields and k in known}
    if not moved:
        return raw
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"aggregation.options: expected a mapping, got {options!r}")
    return {**{k: v for k, v in raw.items() if k not in moved}, "options": {**options, **moved}}


def clients_per_round(cfg: RunConfig) -> int:
    s = cfg.strategy
    return max(round(s.fraction_train * cfg.data.num_clients), s.min_train_clients)


def _validate_aggregation(
    cfg: RunConfig, context: Context, need: Callable[[bool, str, str], None]
) -> RunConfig:
    """The pipeline's steps exist, fit together and with the model; returns ``cfg`` with the
    options of the chosen steps resolved (options of steps not chosen are dropped, as a run folder
    of an earlier version records every step's)."""
    a = cfg.aggregation
    unknown = sorted(set(a.options) - _step_options())
    need(
        not unknown,
        "aggregation.options",
        f"no registered step takes {unknown[0]!r}" if unknown else "",
    )
    if not (cfg.to_plan().active or a.own_init):
        return cfg
    strategy = STRATEGIES.get(cfg.strategy.name)
    need(
        bool(strategy.meta.get("pipeline")),
        "aggregation",
        f"the align/fuse/repair pipeline runs with strategy "
        f"{' or '.join(n for n in STRATEGIES if STRATEGIES.get(n).meta.get('pipeline'))}, "
        f"not {cfg.strategy.name!r} ({cfg.strategy.name} fuses by its own matching)",
    )
    plan = cfg.to_plan()
    for step, problem in plan.problems(context):
        need(False, f"aggregation.{step}", problem)
    try:
        resolved = plan.resolved_options()
        for entry in plan.steps():  # an option's value is checked by the step that takes it
            entry.resolve(resolved)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"aggregation.options: {exc}") from None
    return dataclasses.replace(cfg, aggregation=dataclasses.replace(a, options=resolved))


def _validate_server_optimizer(cfg: RunConfig, need: Callable[[bool, str, str], None]) -> RunConfig:
    """The server optimizer takes the options given, with valid values; returns ``cfg`` with its
    options resolved (every option it takes, with the value it uses)."""
    o = cfg.server_optimizer
    entry = SERVER_OPTIMIZERS.get(o.name)
    unknown = sorted(set(o.options) - set(entry.options))
    need(
        not unknown,
        f"server_optimizer.{unknown[0] if unknown else ''}",
        f"{o.name} takes no option {unknown[0] if unknown else ''!r}; "
        f"it takes {', '.join(sorted(entry.options)) or 'none'}",
    )
    resolved = entry.resolve(o.options)
    resolved = {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}
    problem = entry.meta["check"](resolved)
    need(problem is None, "server_optimizer", f"{o.name}: {problem}")
    return dataclasses.replace(cfg, server_optimizer=dataclasses.replace(o, options=resolved))


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A run name is one path component of safe characters: ``../x`` or ``/abs`` would escape the
output folder."""


def _validate(cfg: RunConfig) -> RunConfig:
    """Checks that involve more than one key or the registries' own checks (each key's type,
    choices and bounds were checked while building); returns ``cfg`` with the options of the
    pipeline's steps resolved."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    d, s = cfg.data, cfg.strategy
    need(
        RUN_NAME.fullmatch(cfg.name) is not None,
        "name",
        f"{cfg.name!r} is not a run name: letters, digits, '.', '_' and '-', starting with a "
        "letter or digit, at most 100 characters (it names a folder under output.dir)",
    )
    loader_options = dataset_options(d.dataset)
    unknown_options = sorted(set(d.options) - set(loader_options))
    need(
        not unknown_options,
        "data.options",
        f"dataset {d.dataset!r} takes no option {next(iter(unknown_options), '')!r} "
        f"(it takes: {', '.join(loader_options) or 'none'})",
    )
    if d.data_dir is not None:
        need(
            Path(d.data_dir).expanduser().is_dir(),
            "data.data_dir",
            f"directory {d.data_dir!r} does not exist",
        )
    options = model_options(cfg.model.name)
    unknown = sorted(set(cfg.model.options) - set(options))
    need(
        not unknown,
        f"model.{unknown[0] if unknown else ''}",
        f"model {cfg.model.name!r} takes no option {unknown[0] if unknown else ''!r}; "
        f"it takes {', '.join(sorted(options))}",
    )
    need(
        s.min_train_clients <= d.num_clients,
        "strategy.min_train_clients",
        f"{s.min_train_clients} is more than data.num_clients ({d.num_clients})",
    )
    try:
        model = build_model(cfg.model.name, **cfg.model.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None
    context = Context(model, clients_per_round(cfg))
    problem = STRATEGIES.get(s.name).problem(context)
    need(problem is None, "strategy.name", f"{s.name}: {problem}")
    strategy_problem = STRATEGIES.get(s.name).meta.get("check", lambda c: None)(cfg)
    need(strategy_problem is None, "strategy.name", f"{s.name}: {strategy_problem}")
    wanted = OBJECTIVES.get(cfg.objective).meta.get("strategy")
    need(
        wanted in (None, s.name),
        "train.objective",
        f"the {cfg.objective} objective runs with strategy {wanted}, not {s.name!r}",
    )
    need(
        STRATEGIES.get(s.name).meta.get("objective") != "scaffold" or cfg.objective == "scaffold",
        "train.objective",
        f"strategy {s.name} trains with its own objective (scaffold), not {cfg.objective!r}",
    )
    need(
        s.fedma.protocol == "fedalign" or s.name in REFERENCE_BASELINES,
        "strategy.fedma.protocol",
        f"the reference schedule runs fedma and its baselines "
        f"({', '.join(REFERENCE_BASELINES)}), not {s.name!r}",
    )
    cfg = _validate_aggregation(cfg, context, need)
    cfg = _validate_server_optimizer(cfg, need)
    if cfg.objective == "proximal":
        need(
            cfg.train.proximal_mu > 0,
            "train.proximal_mu",
            f"strategy {s.name} needs proximal_mu > 0",
        )
    for i, fault in enumerate(cfg.faults):
        need(
            fault.client < d.num_clients,
            f"faults[{i}].client",
            f"no client {fault.client} among {d.num_clients}",
        )
    trackers = cfg.output.trackers
    for i, tracker in enumerate(trackers):
        need(
            tracker in TRACKERS,
            f"output.trackers[{i}]",
            f"unknown tracker {tracker!r}; choose one of {', '.join(TRACKERS)}",
        )
    need(len(set(trackers)) == len(trackers), "output.trackers", "a tracker is named twice")
    return cfg


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; derives the seeds the config does not pin."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {values!r}")
    values = dict(values)
    if "model" in values:
        values["model"] = _named_section("model", values["model"], ModelConfig().name)
    if "server_optimizer" in values:
        values["server_optimizer"] = _named_section(
            "server_optimizer", values["server_optimizer"], ServerOptimizerConfig().name
        )
    if "aggregation" in values:
        values["aggregation"] = _aggregation_section(values["aggregation"])
    seeds_given = values.pop("seeds", None) or {}
    cfg = _build(RunConfig, values)
    seeds = dataclasses.asdict(derive_seeds(cfg.seed))
    if not isinstance(seeds_given, dict):
        raise ConfigError(f"seeds: expected a mapping, got {seeds_given!r}")
    cfg = dataclasses.replace(cfg, seeds=_build(Seeds, {**seeds, **seeds_given}, "seeds"))
    try:
        cfg = _validate(cfg)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.data.data_dir is not None:
        # the config travels to every client, on every node: a relative path would resolve
        # against each worker's own working directory
        data = dataclasses.replace(
            cfg.data, data_dir=str(Path(cfg.data.data_dir).expanduser().resolve())
        )
        cfg = dataclasses.replace(cfg, data=data)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> (["train", "lr"], 0.1); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=0.1")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``values`` with each ``key.path=value`` set."""
    result = json.loads(json.dumps(values))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return from_dict(apply_overrides(values, overrides or []))


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
