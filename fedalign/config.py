"""The validated run configuration.

A run is described by one YAML file (plus ``--set key=value`` overrides). It is loaded into frozen
dataclasses, so a typo or an impossible value stops the run before Ray starts, with one message that
names the key (``ConfigError``), instead of a traceback twenty seconds into a simulation.

One ``seed`` derives the separate seeds of partitioning, model init, client sampling and data
shuffling; the resolved config written to the run folder records them all, so any run can be
repeated from its folder alone.

Every choice (dataset, model, optimizer, client objective, strategy, aligner, solver, fuse and
repair rule, and their options) is checked against the registries that own it, with the owner's
own ``supports`` checks: the config restates no list of names, no default of an algorithm. The
config turns into the pipeline's ``Plan`` (``to_plan``), never the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedalign.align import ALIGNERS, SOLVERS
from fedalign.data import DATASETS, partition_schemes
from fedalign.errors import ConfigError
from fedalign.fusion import FUSE_RULES
from fedalign.models import MODELS, build_model, model_options
from fedalign.pipeline import Plan
from fedalign.registry import STRATEGIES, Context, RegistryError
from fedalign.repair import REPAIR_RULES
from fedalign.server_opt import SERVER_OPTIMIZERS
from fedalign.stats import STATISTICS
from fedalign.training import OBJECTIVES, OPTIMIZERS


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    num_clients: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    min_partition_size: int = 10
    val_fraction: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    objective: str | None = None  # the client objective; None: the strategy's (fedprox: proximal)
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class MatchingConfig:
    """BBP-MAP's hyperparameters for PFNM and FedMA. ``gamma`` defaults to each method's reference
    value (PFNM 1, FedMA 7); ``grid: true`` (PFNM) lets the clients pick sigma, sigma0 and gamma
    from the reference's grid by their training accuracy, keeping the smallest model within
    ``grid_tolerance`` of the best score (0: the best, as the reference does)."""

    sigma: float = 1.0
    sigma0: float = 1.0
    gamma: float | None = None
    iterations: int = 5
    solver: str = "hungarian"
    max_width: int | None = None
    popularity: str = "consistent"
    grid: bool = False
    grid_tolerance: float = 0.0


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    rounds: int = 10
    fraction_train: float = 1.0
    min_train_clients: int = 2
    fraction_evaluate: float = 0.0
    eval_every: int = 1
    timeout: float = 3600.0
    round_retries: int = 1
    max_update_norm: float | None = None
    max_client_examples: int | None = None
    max_stat_ratio: float | None = 1e4
    max_fused_ratio: float | None = 10.0
    matching: MatchingConfig = field(default_factory=MatchingConfig)


@dataclass(frozen=True)
class AggregationConfig:
    """The server's align -> fuse -> repair pipeline (strategies that take it: fedavg, fedprox).

    ``align``, ``fuse`` and ``repair`` name registered steps; ``options`` holds their options
    (e.g. ``regmean_alpha``, ``ridge``, ``gram_conv``, ``fisher_labels``, ``fisher_floor``), which
    may also be written directly in the section; the resolved config records every option the
    chosen steps take, with its value. Steps that need data get it from the clients as statistics
    (see ``fedalign.pipeline``). ``stats_samples`` caps the examples each client uses for them
    (0: all of its training data). ``own_init``: in round 1 every client trains from its own
    initialisation (one-shot fusion of independent models). ``workers``: processes that align
    clients to the reference in parallel (Sinkhorn re-basin).
    """

    align: str = Plan.align
    solver: str = Plan.solver
    fuse: str = Plan.fuse
    repair: str = Plan.repair
    options: dict[str, Any] = field(default_factory=dict)
    stats_samples: int = 2000
    own_init: bool = False
    workers: int = Plan.workers


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """The server's step from the global model towards the fused one (``fedalign.server_opt``):
    ``sgd`` with ``lr: 1`` (the default) takes the fused model; ``momentum``, ``adam``, ``yogi``
    and ``adagrad`` make FedAvgM, FedAdam, FedYogi and FedAdagrad of any strategy. Its options
    (``lr``, ``momentum``, ``betas``, ``tau``, ``bias_correction``) may be written directly in the
    section; the resolved config records those the chosen optimizer takes, with their values."""

    name: str = "sgd"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SimulationConfig:
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str | None = None
    server_device: str = "cpu"


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"
    save_model: bool = True
    plot: bool = True
    checkpoint_every: int = 1
    keep_checkpoints: int = 2


FAULT_KINDS = ("raise", "nan", "wrong-shape", "missing-key", "scale", "crash")


@dataclass(frozen=True)
class FaultConfig:
    """An injected client fault, for testing a federation's robustness: in ``round``, client
    ``client`` raises, returns NaN weights, a wrong shape, a missing key, its update scaled by
    ``factor``, or kills its worker process (``crash``)."""

    round: int
    client: int
    kind: str
    factor: float = 1e6


@dataclass(frozen=True)
class Seeds:
    """Seeds derived from the run seed; each may be pinned in the config."""

    partition: int
    init: int
    sampling: int
    shuffle: int


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    faults: tuple[FaultConfig, ...] = ()
    seeds: Seeds | None = None

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


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key '{where}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {
        name: _check_type(f"{prefix}.{name}" if prefix else name, value, hints[name])
        for name, value in values.items()
    }
    return cls(**kwargs)


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


def _check(need: Callable[[bool, str, str], None], key: str, registry: Any, name: str) -> None:
    need(
        name in registry,
        key,
        f"unknown {registry.kind} {name!r}; choose one of {', '.join(registry)}",
    )


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
    for key, registry, value in (
        ("align", ALIGNERS, a.align),
        ("fuse", FUSE_RULES, a.fuse),
        ("repair", REPAIR_RULES, a.repair),
        ("solver", SOLVERS, a.solver),
    ):
        _check(need, f"aggregation.{key}", registry, value)
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
    need(a.stats_samples >= 0, "aggregation.stats_samples", f"must be >= 0, got {a.stats_samples}")
    need(a.workers >= 1, "aggregation.workers", f"must be >= 1, got {a.workers}")
    unknown = sorted(set(a.options) - _step_options())
    need(
        not unknown,
        "aggregation.options",
        f"no registered step takes {unknown[0]!r}" if unknown else "",
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


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A run name is one path component of safe characters: ``../x`` or ``/abs`` would escape the
output folder."""


def _validate_server_optimizer(cfg: RunConfig, need: Callable[[bool, str, str], None]) -> RunConfig:
    """The server optimizer exists and takes the options given, with valid values; returns
    ``cfg`` with its options resolved (every option it takes, with the value it uses)."""
    o = cfg.server_optimizer
    _check(need, "server_optimizer.name", SERVER_OPTIMIZERS, o.name)
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


def _validate(cfg: RunConfig) -> RunConfig:
    """Checks of values (types were checked while building); returns ``cfg`` with the options of
    the pipeline's steps resolved."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    d, t, s, sim = cfg.data, cfg.train, cfg.strategy, cfg.simulation
    need(
        RUN_NAME.fullmatch(cfg.name) is not None,
        "name",
        f"{cfg.name!r} is not a run name: letters, digits, '.', '_' and '-', starting with a "
        "letter or digit, at most 100 characters (it names a folder under output.dir)",
    )
    _check(need, "data.dataset", DATASETS, d.dataset)
    need(
        d.partition in partition_schemes(),
        "data.partition",
        f"unknown scheme {d.partition!r}; choose one of {', '.join(partition_schemes())}",
    )
    need(d.num_clients >= 1, "data.num_clients", f"must be >= 1, got {d.num_clients}")
    need(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    need(
        d.classes_per_client >= 1,
        "data.classes_per_client",
        f"must be >= 1, got {d.classes_per_client}",
    )
    need(
        0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}"
    )
    need(d.min_partition_size >= 0, "data.min_partition_size", "must be >= 0")
    if d.data_dir is not None:
        need(
            Path(d.data_dir).expanduser().is_dir(),
            "data.data_dir",
            f"directory {d.data_dir!r} does not exist",
        )

    _check(need, "model.name", MODELS, cfg.model.name)
    options = model_options(cfg.model.name)
    unknown = sorted(set(cfg.model.options) - set(options))
    need(
        not unknown,
        f"model.{unknown[0] if unknown else ''}",
        f"model {cfg.model.name!r} takes no option {unknown[0] if unknown else ''!r}; "
        f"it takes {', '.join(sorted(options))}",
    )

    need(t.local_epochs >= 1, "train.local_epochs", f"must be >= 1, got {t.local_epochs}")
    need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(need, "train.optimizer", OPTIMIZERS, t.optimizer)
    if t.objective is not None:
        _check(need, "train.objective", OBJECTIVES, t.objective)
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(0.0 <= t.momentum < 1.0, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.proximal_mu >= 0, "train.proximal_mu", f"must be >= 0, got {t.proximal_mu}")

    _check(need, "strategy.name", STRATEGIES, s.name)
    need(s.rounds >= 1, "strategy.rounds", f"must be >= 1, got {s.rounds}")
    need(
        0.0 < s.fraction_train <= 1.0,
        "strategy.fraction_train",
        f"must be in (0, 1], got {s.fraction_train}",
    )
    need(
        0.0 <= s.fraction_evaluate <= 1.0,
        "strategy.fraction_evaluate",
        f"must be in [0, 1], got {s.fraction_evaluate}",
    )
    need(1 <= s.min_train_clients, "strategy.min_train_clients", "must be >= 1")
    need(
        s.min_train_clients <= d.num_clients,
        "strategy.min_train_clients",
        f"{s.min_train_clients} is more than data.num_clients ({d.num_clients})",
    )
    need(s.eval_every >= 1, "strategy.eval_every", f"must be >= 1, got {s.eval_every}")
    need(s.timeout > 0, "strategy.timeout", "must be > 0")
    need(s.round_retries >= 0, "strategy.round_retries", "must be >= 0")
    need(
        s.max_update_norm is None or s.max_update_norm > 0,
        "strategy.max_update_norm",
        "must be > 0 (or null for no bound)",
    )
    for key in ("max_client_examples", "max_stat_ratio", "max_fused_ratio"):
        value = getattr(s, key)
        need(value is None or value >= 1, f"strategy.{key}", "must be >= 1 (or null for no bound)")
    o = cfg.output
    need(o.checkpoint_every >= 0, "output.checkpoint_every", "must be >= 0 (0: no checkpoints)")
    need(o.keep_checkpoints >= 1, "output.keep_checkpoints", "must be >= 1")
    try:
        model = build_model(cfg.model.name, **cfg.model.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None
    context = Context(model, clients_per_round(cfg))
    problem = STRATEGIES.get(s.name).problem(context)
    need(problem is None, "strategy.name", f"{s.name}: {problem}")
    m = s.matching
    need(
        m.sigma > 0 and m.sigma0 > 0 and (m.gamma is None or m.gamma > 0),
        "strategy.matching",
        "sigma, sigma0 and gamma must be > 0",
    )
    need(m.iterations >= 0, "strategy.matching.iterations", "must be >= 0")
    _check(need, "strategy.matching.solver", SOLVERS, m.solver)
    need(
        m.popularity in ("consistent", "reference"),
        "strategy.matching.popularity",
        "consistent or reference",
    )
    need(m.max_width is None or m.max_width >= 1, "strategy.matching.max_width", "must be >= 1")
    need(
        0 <= m.grid_tolerance <= 1,
        "strategy.matching.grid_tolerance",
        f"an accuracy difference in [0, 1], got {m.grid_tolerance}",
    )
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
    cfg = _validate_aggregation(cfg, context, need)
    cfg = _validate_server_optimizer(cfg, need)
    if cfg.objective == "proximal":
        need(t.proximal_mu > 0, "train.proximal_mu", f"strategy {s.name} needs proximal_mu > 0")

    for i, fault in enumerate(cfg.faults):
        need(
            fault.kind in FAULT_KINDS,
            f"faults[{i}].kind",
            f"unknown fault {fault.kind!r}; choose one of {', '.join(FAULT_KINDS)}",
        )
        need(
            0 <= fault.client < d.num_clients,
            f"faults[{i}].client",
            f"no client {fault.client} among {d.num_clients}",
        )
        need(fault.round >= 1, f"faults[{i}].round", "must be >= 1")
    need(sim.client_cpus > 0, "simulation.client_cpus", f"must be > 0, got {sim.client_cpus}")
    need(sim.client_gpus >= 0, "simulation.client_gpus", f"must be >= 0, got {sim.client_gpus}")
    need(
        sim.server_device in ("cpu", "cuda", "auto"),
        "simulation.server_device",
        "must be cpu, cuda or auto",
    )
    return cfg


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; derives the seeds the config does not pin."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {values!r}")
    values = dict(values)
    if "model" in values:
        values["model"] = _named_section("model", values["model"], ModelConfig.name)
    if "server_optimizer" in values:
        values["server_optimizer"] = _named_section(
            "server_optimizer", values["server_optimizer"], ServerOptimizerConfig.name
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
