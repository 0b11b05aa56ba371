"""Loading a run config: YAML and ``--set`` overrides -> the validated, resolved ``RunConfig``.

Each key's type, choices and bounds come from its declaration in ``fedalign.config.schema``; every
option of a registered thing (the strategy, the pipeline's steps, the server optimizer, the
model, the dataset) is checked against the signature that declares it: an option nothing chosen
reads, or a value of the wrong type, is one line naming the key (``ConfigError``, exit 2) before
any folder or Ray exists. The resolved config records every option the chosen steps take, with the
value they use, so a run folder says everything that ran.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fedalign.algorithms.lora import LORA_RULES
from fedalign.algorithms.pipeline import PHASES
from fedalign.algorithms.server_opt import SERVER_OPTIMIZERS
from fedalign.algorithms.stats import STATISTICS
from fedalign.client.training import OBJECTIVES
from fedalign.config.bundled import resolve_config
from fedalign.config.components import strategy_context
from fedalign.config.schema import (
    AdaptersConfig,
    AggregationConfig,
    ModelConfig,
    RunConfig,
    Seeds,
    ServerOptimizerConfig,
    StrategyConfig,
    clients_per_round,
    derive_seeds,
)
from fedalign.core.errors import ConfigError, did_you_mean
from fedalign.core.options import Range, conform
from fedalign.core.registry import STRATEGIES, Context, Entry, RegistryError, option_types
from fedalign.data import dataset_options
from fedalign.models import MODELS, build_model, model_options
from fedalign.report.trackers import TRACKERS

Need = Callable[[bool, str, str], None]


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``: sections
    (dataclasses, alone, optional or in a list) are built here, everything else is
    ``core.options.conform``'s, as for every registered option."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and any(map(dataclasses.is_dataclass, args)):
        if value is None and type(None) in args:
            return None
        (section,) = [a for a in args if dataclasses.is_dataclass(a)]
        return _build(section, value, key)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin in (tuple, list) and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    return conform(key, value, annotation)


def _check_declared(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """The choices and bounds a key declares (``key(...)``); None passes (a nullable key)."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{key}: unknown {choices.kind} {value!r}{did_you_mean(value, choices)}; "
            f"choose one of {', '.join(choices)}"
        )
    bounds = meta.get("bounds", {})
    low, high = _first(bounds, "ge", "gt"), _first(bounds, "le", "lt")
    declared = Range(low[1], high[1], open_low=low[0] == "gt", open_high=high[0] == "lt")
    if (problem := declared.problem(value)) is not None:
        raise ConfigError(f"{key}: {problem}, got {value!r}")


def _first(bounds: Mapping[str, float | None], *ops: str) -> tuple[str | None, float | None]:
    """The first of ``ops`` that ``bounds`` sets, with its bound (``(None, None)``: none)."""
    return next(((op, bounds[op]) for op in ops if bounds.get(op) is not None), (None, None))


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key '{where}{unknown[0]}'{did_you_mean(unknown[0], fields)}; "
            f"valid keys here: {', '.join(sorted(fields))}"
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


def _named_section(key: str, raw: Any, section: type) -> dict[str, Any]:
    """Accept ``model: {name: mlp, hidden: [200]}`` (or ``server_optimizer: {name: adam, lr:
    0.1}``, or the name alone): every key but the section's own (``name``, ``model.init``) is an
    option of the named thing."""
    if isinstance(raw, str):
        return {"name": raw, "options": {}}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    raw = dict(raw)
    own = {f.name: raw.pop(f.name) for f in dataclasses.fields(section) if f.name in raw}
    options = own.pop("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{key}.options: expected a mapping, got {options!r}")
    return {"name": section().name, **own, "options": {**options, **raw}}


def _options_section(key: str, raw: Any, section: type) -> Any:
    """A section whose keys besides its own are options of the thing it names: ``strategy:
    {name: pfnm, sigma: 0.5}``, ``aggregation: {fuse: regmean, ridge: 0.01}``; they move into
    ``options`` (and are checked against what reads them when the config is validated)."""
    if not isinstance(raw, dict):
        return raw
    fields = {f.name for f in dataclasses.fields(section)}
    moved = {k: v for k, v in raw.items() if k not in fields}
    if not moved:
        return raw
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{key}.options: expected a mapping, got {options!r}")
    return {**{k: v for k, v in raw.items() if k not in moved}, "options": {**options, **moved}}


def _typed_options(
    where: str, given: Mapping[str, Any], entries: Iterable[Entry], owner: str, section: type
) -> dict[str, Any]:
    """``given`` checked against the options ``entries`` take: a key none of them reads is one
    line naming it, what reads options here and the section's own keys; a value is conformed to
    the annotation of the first entry that declares it."""
    entries = list(entries)
    takes = {name: e for e in reversed(entries) for name in e.options}
    unknown = sorted(set(given) - takes.keys())
    if unknown:
        keys = ", ".join(f.name for f in dataclasses.fields(section) if f.name != "options")
        raise ConfigError(
            f"unknown key '{where}.{unknown[0]}': not an option of {owner}"
            f"{did_you_mean(unknown[0], [*takes, *keys.split(', ')])} "
            f"(options: {', '.join(sorted(takes)) or 'none'}; keys of {where}: {keys})"
        )
    return {k: conform(f"{where}.{k}", v, takes[k].types.get(k, Any)) for k, v in given.items()}


def _validate_aggregation(cfg: RunConfig, context: Context, need: Need) -> RunConfig:
    """The pipeline's steps exist, fit together and with the model, and read every option given;
    returns ``cfg`` with the options of the chosen steps resolved."""
    a = cfg.aggregation
    plan = cfg.to_plan()
    readers = [
        *plan.steps(),
        *(STATISTICS.get(k) for phase in PHASES for k in plan.statistics(phase)),
    ]
    owner = f"the chosen steps (align {a.align}, fuse {a.fuse}, repair {a.repair})"
    options = _typed_options("aggregation", a.options, readers, owner, AggregationConfig)
    cfg = dataclasses.replace(cfg, aggregation=dataclasses.replace(a, options=options))
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
    return dataclasses.replace(
        cfg, aggregation=dataclasses.replace(cfg.aggregation, options=plan.resolved_options())
    )


def _validate_strategy(cfg: RunConfig, model: Any, need: Need) -> RunConfig:
    """The strategy takes the options given, with values of their types and that it accepts,
    and can run with this model and federation (``Strategy.problem``); returns ``cfg`` with every
    option it takes resolved. The strategy is built once here, on the model at the config's
    widths, so a value it refuses stops the run at load."""
    s = cfg.strategy
    entry = STRATEGIES.get(s.name)
    given = _typed_options("strategy", s.options, [entry], f"strategy {s.name}", StrategyConfig)
    resolved = {k: list(v) if isinstance(v, tuple) else v for k, v in entry.resolve(given).items()}
    cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(s, options=resolved))
    context = strategy_context(cfg, model)
    problem = entry.obj.problem(context)
    need(problem is None, "strategy.name", f"{s.name}: {problem}")
    try:
        entry.obj(context, **given)
    except Exception as exc:  # noqa: BLE001 - a user's constructor may raise anything: one line
        reason = str(exc) if isinstance(exc, (TypeError, ValueError)) else repr(exc)
        raise ConfigError(f"strategy: {s.name}: {reason}") from None
    return cfg


def _validate_adapters(cfg: RunConfig, need: Need) -> RunConfig:
    """The pre-trained weights exist; adapters run with the ``lora`` strategy (and it with
    them), with the ``hf`` extra installed; the rule reads every option given. Returns ``cfg``
    with the rule's options resolved."""
    if cfg.model.init is not None:
        need(
            Path(cfg.model.init).expanduser().exists(),
            "model.init",
            f"{cfg.model.init!r} does not exist (a safetensors file or a run folder; "
            "`fedalign pretrain CONFIG` writes the one a config names)",
        )
    a = cfg.adapters
    if a.kind == "none":
        need(not a.options, "adapters", "options given but adapters.kind is none")
        need(not a.client_ranks, "adapters", "client_ranks given but adapters.kind is none")
        return cfg
    need(
        cfg.strategy.name == "lora",
        "strategy.name",
        f"adapters.kind: {a.kind} runs with strategy lora, not {cfg.strategy.name!r}",
    )
    need(
        importlib.util.find_spec("peft") is not None,
        "adapters",
        "LoRA needs peft: pip install 'fedalign[hf]'",
    )
    entry = LORA_RULES.get(a.rule)
    if a.client_ranks:
        need(
            all(r >= 1 for r in a.client_ranks),
            "adapters.client_ranks",
            f"ranks must be at least 1, got {list(a.client_ranks)}",
        )
        mixed = [n for n in LORA_RULES if not LORA_RULES.get(n).meta.get("equal_ranks")]
        need(
            not entry.meta.get("equal_ranks"),
            "adapters.client_ranks",
            f"rule {a.rule} averages A and B entrywise and needs equal ranks; "
            f"heterogeneous ranks take {', '.join(mixed)}",
        )
    given = _typed_options("adapters", a.options, [entry], f"lora rule {a.rule}", AdaptersConfig)
    return dataclasses.replace(cfg, adapters=dataclasses.replace(a, options=entry.resolve(given)))


def _validate_server_optimizer(cfg: RunConfig, need: Need) -> RunConfig:
    """The server optimizer takes the options given, with valid values; returns ``cfg`` with its
    options resolved (every option it takes, with the value it uses)."""
    o = cfg.server_optimizer
    entry = SERVER_OPTIMIZERS.get(o.name)
    given = _typed_options("server_optimizer", o.options, [entry], o.name, ServerOptimizerConfig)
    resolved = entry.resolve(given)
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
    strategy, the pipeline's steps and the server optimizer resolved."""

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
    annotations = option_types(MODELS.get(cfg.model.name).obj, cfg.model.options)
    for name, value in cfg.model.options.items():  # a shape error later would not say which
        conform(f"model.{name}", value, annotations.get(name, Any))
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
    wanted = OBJECTIVES.get(cfg.objective).meta.get("strategy")
    need(
        wanted in (None, s.name),
        "train.objective",
        f"the {cfg.objective} objective runs with strategy {wanted}, not {s.name!r}",
    )
    own = STRATEGIES.get(s.name).meta.get("objective", "plain")
    need(  # an objective made for one strategy (scaffold's) is the only one that strategy takes
        OBJECTIVES.get(own).meta.get("strategy") != s.name or cfg.objective == own,
        "train.objective",
        f"strategy {s.name} trains with its own objective ({own}), not {cfg.objective!r}",
    )
    cfg = _validate_aggregation(cfg, context, need)
    cfg = _validate_adapters(cfg, need)
    cfg = _validate_server_optimizer(cfg, need)
    cfg = _validate_strategy(cfg, model, need)
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
        values["model"] = _named_section("model", values["model"], ModelConfig)
    if "server_optimizer" in values:
        values["server_optimizer"] = _named_section(
            "server_optimizer", values["server_optimizer"], ServerOptimizerConfig
        )
    for key, section in (
        ("strategy", StrategyConfig),
        ("aggregation", AggregationConfig),
        ("adapters", AdaptersConfig),
    ):
        if key in values:
            values[key] = _options_section(key, values[key], section)
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
    if cfg.model.init is not None:  # as data_dir: every worker reads the same file
        init = str(Path(cfg.model.init).expanduser().resolve())
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=init))
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


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in ``path`` (a config or a suite: ``what``), or ConfigError in one line
    naming the file and the problem: missing, not UTF-8 text, not valid YAML (with the line),
    or empty (an empty file would otherwise run every default without a word)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a {what} (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if values is None:
        raise ConfigError(f"{path}: the {what} is empty")
    return values


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (a path, or a shipped config's name: ``quickstart``), apply
    ``key=value`` overrides and validate everything."""
    path = resolve_config(path)
    values = read_yaml(path, "config file")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(values).__name__}")
    return from_dict(apply_overrides(values, overrides or []))


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
