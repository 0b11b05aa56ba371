"""Registries: every algorithm, model, dataset and strategy is found by name in one of these.

An entry holds the object (a function or class), the options it takes with their defaults (read
from its keyword-only parameters, so the algorithm's signature is the one place a default lives),
the client statistics it needs per phase, and a ``supports`` check that says why it cannot run
with a given model or federation. Config files name entries; they never name import paths, so a
shared config cannot run code. Code registers entries: the package's own modules, or a user's
(``fedalign.register_*``, or a file passed to ``fedalign run --plugin``).

A registry whose built-in entries live in modules above it (the Flower strategies) names those
modules and imports them on first lookup, the way a plugin is loaded.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fedalign.core.errors import did_you_mean
from fedalign.core.options import conform


class RegistryError(ValueError):
    """An unknown name, or a name registered twice."""


@dataclass(frozen=True)
class Context:
    """What a ``supports`` check may look at: the run's model (at its initial widths) and how many
    clients a round fuses."""

    model: nn.Module
    clients_per_round: int = 2


Supports = Callable[[Context], "str | None"]


@dataclass(frozen=True)
class Entry:
    """One registered thing. ``needs`` maps a phase (``train``, ``align``, ``repair``) to the
    statistics the clients compute in it; ``meta`` holds kind-specific declarations."""

    kind: str
    name: str
    obj: Any
    options: Mapping[str, Any] = field(default_factory=dict)
    needs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    supports: Supports | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    types: Mapping[str, Any] = field(default_factory=dict)
    """Each option's annotation (from the same signatures as its default): the config checks
    values against it (``fedalign.core.options.conform``)."""

    def problem(self, context: Context) -> str | None:
        """Why this entry cannot run in ``context`` (None: it can)."""
        return None if self.supports is None else self.supports(context)

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Its options: the defaults, overridden by those of ``given`` that it takes, each given
        value checked against the option's annotation (type and declared ``Range``), so a
        plan built in Python is held to the same rules as a config file."""
        return {
            k: conform(k, given[k], self.types.get(k, Any)) if k in given else v
            for k, v in self.options.items()
        }


def _option_sources(obj: Any) -> list[Any]:
    """The callables whose keyword-only parameters are ``obj``'s options: ``obj`` itself (a class:
    its ``__init__``) and those it lists in ``options_from``, whose options it passes on (the
    PFNM strategy takes BBP-MAP's from ``pfnm``'s signature, where their defaults live)."""
    own = obj.__init__ if inspect.isclass(obj) else obj
    return [own, *getattr(obj, "options_from", ())]


def keyword_defaults(obj: Any) -> dict[str, Any]:
    """The keyword-only parameters of ``obj`` (a function, or a class's ``__init__``, and the
    callables it names in ``options_from``) with their defaults: the options a registered
    algorithm takes."""
    found: dict[str, Any] = {}
    for target in _option_sources(obj):
        for p in inspect.signature(target).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty:
                found.setdefault(p.name, p.default)
    return found


def option_types(obj: Any, names: typing.Iterable[str]) -> dict[str, Any]:
    """The annotations of ``obj``'s options ``names`` (an option whose annotation cannot be
    resolved, or has none, is left out: any value passes it)."""
    found: dict[str, Any] = {}
    for target in _option_sources(obj):
        try:
            hints = typing.get_type_hints(target, include_extras=True)
        except (NameError, TypeError):  # a user's unresolvable annotation: no type check
            hints = {}
        for name in names:
            if name in hints and name not in found:
                found[name] = hints[name]
    return found


REGISTRIES: weakref.WeakValueDictionary[str, Registry] = weakref.WeakValueDictionary()
"""Every registry by kind (a registry made and dropped by a test leaves with it)."""


class Registry:
    """Name -> :class:`Entry` for one kind of thing (``"fuse rule"``, ``"model"``, ...)."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._builtins = builtins
        self._entries: dict[str, Entry] = {}
        REGISTRIES[kind] = self

    def _load(self) -> None:
        if self._builtins:
            modules, self._builtins = self._builtins, ()
            for module in modules:
                importlib.import_module(module)

    def register(
        self,
        name: str,
        obj: Any = None,
        *,
        options: Mapping[str, Any] | None = None,
        needs: Mapping[str, tuple[str, ...]] | None = None,
        supports: Supports | None = None,
        replace: bool = False,
        **meta: Any,
    ) -> Any:
        """Register ``obj`` under ``name`` (usable as a decorator when ``obj`` is omitted).
        ``options`` defaults to ``obj``'s keyword-only parameters with defaults."""

        def add(target: Any) -> Any:
            self._load()
            if not isinstance(name, str) or not name:
                raise RegistryError(f"{self.kind} names are non-empty strings, got {name!r}")
            if name in self._entries and not replace:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered (pass replace=True to override it)"
                )
            given = dict(keyword_defaults(target) if options is None else options)
            self._entries[name] = Entry(
                self.kind,
                name,
                target,
                given,
                {phase: tuple(kinds) for phase, kinds in (needs or {}).items()},
                supports,
                dict(meta),
                option_types(target, given),
            )
            return target

        return add if obj is None else add(obj)

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise RegistryError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self)}; "
                f"choose one of {', '.join(self)}"
            )
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)


STRATEGIES = Registry("strategy", builtins=("fedalign.fl.strategies",))
"""Strategy name -> a ``fedalign.Strategy`` subclass (``fedalign.fl.strategy``), its options read
from its constructor; ``meta["objective"]`` is the client objective it trains with,
``meta["pipeline"]`` whether it takes the align/fuse/repair pipeline. Its built-in entries live in
the Flower layer (``fl/strategies``, which imports no Flower), above the config that names them,
hence loaded on first lookup."""


def user_modules() -> list[str]:
    """Modules outside fedalign that registered entries, in registration order: Ray workers
    import them (``fedalign.core.plugins``) so a user's model or rule exists on every client."""
    seen: dict[str, None] = {}
    for registry in list(REGISTRIES.values()):
        for entry in registry._entries.values():
            module = getattr(entry.obj, "__module__", None) or ""
            if module and module.split(".")[0] != "fedalign" and module in sys.modules:
                seen[module] = None
    return list(seen)
