"""Bringing a user's own models, datasets and rules to every process of a run.

Registering from Python (``fedalign.register_model(...)``) changes the registries of the process
that ran it; the Ray workers that run the clients are other processes. Before a simulation starts,
the runner puts the modules that registered anything outside fedalign into the environment
(``FEDALIGN_PLUGINS``, which Ray workers inherit); a worker imports them (by name, or by file for
a script run as ``__main__`` or a ``--plugin`` file) before it reads its first message, so the
registrations happen there too. A config file never names a module: what runs is what the user ran.

Entries defined in a ``__main__`` that has no file to run again (a Jupyter notebook, a REPL,
``python -c``, a script fed to ``python -`` on stdin) cannot be imported by a worker. They travel
by value instead, the way Ray itself ships the functions and classes a driver defines in
``__main__``: pickled with cloudpickle into ``FEDALIGN_PLUGIN_OBJECTS`` and registered again on
the worker. What cannot be pickled, or is too large for the environment, is refused before Ray
starts, in one line naming the entry (otherwise every client would fail with an ImportError and
the round with RoundFailedError, after Ray's start-up).
"""

from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import json
import os
import sys
import traceback
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import cloudpickle

from fedalign.core.errors import ConfigError
from fedalign.core.registry import REGISTRIES, Entry, Registry, user_modules

ENV_KEY = "FEDALIGN_PLUGINS"
OBJECTS_KEY = "FEDALIGN_PLUGIN_OBJECTS"
"""The entries defined in a ``__main__`` without a file: cloudpickle, zlib, base64."""

MAX_OBJECTS_CHARS = 120_000
"""The most ``OBJECTS_KEY`` may hold: Linux refuses to start a process (a Ray worker) whose
environment has one string over 128 KiB (``MAX_ARG_STRLEN``), so a larger value would fail there,
after Ray's start-up, instead of here."""

PLUGIN_PREFIX = "fedalign_plugin_"


def _exec_file(name: str, path: Path) -> ModuleType:
    """Run the file ``path`` as module ``name`` (once per process)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_plugin(path: str | Path) -> ModuleType:
    """Run the Python file ``path`` as a module (its ``register_*`` calls take effect); the user
    chose to run it, as with ``fedalign run --plugin FILE.py``."""
    path = Path(path).expanduser().resolve()
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"--plugin {str(path)!r}: not a Python file")
    name = PLUGIN_PREFIX + path.stem
    try:
        return _exec_file(name, path)
    except Exception as exc:  # noqa: BLE001  the user's code: any error is one line naming it
        sys.modules.pop(name, None)
        frames = traceback.extract_tb(exc.__traceback__)
        line = next((f.lineno for f in reversed(frames) if Path(f.filename) == path), None)
        where = f"{path}" + (f", line {line}" if line is not None else "")
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"--plugin {where}: {type(exc).__name__}: {message}".rstrip(": ")
        ) from None


def main_file() -> str | None:
    """The file ``__main__`` runs from, if a worker can run it again: None in a notebook, a REPL,
    ``python -c`` or a script read from stdin (``python -``, whose ``__file__`` is ``<stdin>``)."""
    file = getattr(sys.modules.get("__main__"), "__file__", None)
    return file if isinstance(file, str) and Path(file).is_file() else None


def _defined_in_main(value: Any) -> bool:
    """Whether ``value`` (or the function a ``functools.partial`` wraps) comes from ``__main__``."""
    while isinstance(value, functools.partial):
        value = value.func
    return getattr(value, "__module__", None) == "__main__"


def _home(registry: Registry) -> tuple[str, str] | None:
    """A module and attribute through which a worker reaches ``registry``: fedalign's submodules
    first (where its registries live), then any other importable module; None when only
    ``__main__`` holds it (no config run on a worker can reach such a registry)."""
    modules = sorted(
        ((name, module) for name, module in list(sys.modules.items()) if name != "__main__"),
        key=lambda item: not item[0].startswith("fedalign."),
    )
    for name, module in modules:
        try:
            namespace = vars(module)
        except TypeError:  # not a module (some packages put other objects in sys.modules)
            continue
        for attr, value in list(namespace.items()):
            if value is registry:
                return name, attr
    return None


class Shipped(NamedTuple):
    """One entry sent by value: where a worker finds its registry (``module``'s ``attribute``)
    and what it registers there, exactly as here."""

    kind: str
    module: str
    attribute: str
    name: str
    obj: Any
    options: dict[str, Any]
    needs: dict[str, tuple[str, ...]]
    supports: Any
    meta: dict[str, Any]

    def refusal(self, why: str) -> ConfigError:
        """One line that names the entry and says why it cannot reach the workers."""
        return ConfigError(
            f"{self.kind} {self.name!r}, defined in an interactive session (no __main__ file), "
            f"cannot be sent to the Ray workers: {why}; define it in a module or a --plugin file"
        )

    def pickled(self) -> bytes:
        try:
            return cloudpickle.dumps(self)
        except Exception as exc:  # pickle's errors, TypeError, AttributeError, RecursionError...
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise self.refusal(
                f"cloudpickle cannot pickle it ({type(exc).__name__}: {first_line})"
            ) from exc


def _main_entries() -> list[Shipped]:
    """Every entry whose object, ``supports`` check or a declaration in ``meta`` (a statistic's
    ``permute``, ...) was defined in ``__main__``."""
    shipped = []
    for registry in list(REGISTRIES.values()):
        entries: list[Entry] = [
            e
            for e in registry._entries.values()
            if any(_defined_in_main(v) for v in (e.obj, e.supports, *e.meta.values()))
        ]
        home = _home(registry) if entries else None
        if home is None:
            continue
        shipped += [
            Shipped(
                registry.kind,
                *home,
                e.name,
                e.obj,
                dict(e.options),
                dict(e.needs),
                e.supports,
                dict(e.meta),
            )
            for e in entries
        ]
    return shipped


def ship_main_entries() -> str | None:
    """The value of ``FEDALIGN_PLUGIN_OBJECTS`` for the entries defined in ``__main__`` (None
    when there are none). Raises :class:`ConfigError` naming the entry that cannot be pickled or
    that makes the value too large for a process's environment."""
    entries = _main_entries()
    if not entries:
        return None
    try:
        blob = cloudpickle.dumps(entries)  # one pickle: what the entries share stays shared
    except Exception as exc:
        for entry in entries:  # name the entry at fault
            entry.pickled()
        raise entries[0].refusal(
            f"cloudpickle cannot pickle the entries together ({type(exc).__name__})"
        ) from exc
    text = base64.b64encode(zlib.compress(blob)).decode("ascii")
    if len(text) > MAX_OBJECTS_CHARS:
        sizes = [len(zlib.compress(entry.pickled())) * 4 // 3 for entry in entries]
        largest = max(range(len(entries)), key=sizes.__getitem__)
        raise entries[largest].refusal(
            f"it pickles to {sizes[largest] // 1024} KiB (with the globals it uses), and "
            f"the environment holds at most {MAX_OBJECTS_CHARS // 1024} KiB of such entries"
        )
    return text


def plugin_environment() -> dict[str, str]:
    """The environment that makes a worker register what this process registered outside
    fedalign: ``FEDALIGN_PLUGINS`` (the modules, with their files, to import) and, for entries
    defined in a ``__main__`` without a file, ``FEDALIGN_PLUGIN_OBJECTS`` (the entries by value);
    empty when there are none. Raises :class:`ConfigError` for an entry that cannot be sent."""
    file = main_file()
    modules = [name for name in user_modules() if name != "__main__" or file is not None]
    env = {}
    if modules:
        env[ENV_KEY] = json.dumps(
            [[name, getattr(sys.modules[name], "__file__", None)] for name in modules]
        )
    if file is None and (shipped := ship_main_entries()) is not None:
        env[OBJECTS_KEY] = shipped
    return env


def register_shipped(text: str) -> None:
    """Register the entries ``plugin_environment`` pickled by value (``FEDALIGN_PLUGIN_OBJECTS``).

    Unpickling runs code, which is why fedalign never unpickles a file, a config or anything from
    the network. These bytes are not that case: they come only from this process's environment,
    which the user's own driver process (their notebook or REPL, whose code is what is unpickled
    here) set for the Ray workers it starts; whoever can set a process's environment can already
    run code in it.
    """
    try:
        entries: list[Shipped] = cloudpickle.loads(zlib.decompress(base64.b64decode(text)))
    except Exception as exc:
        raise ImportError(
            f"the entries registered in the driver's interactive session cannot be loaded in "
            f"this worker: {type(exc).__name__}: {exc}"
        ) from exc
    for entry in entries:
        registry = getattr(importlib.import_module(entry.module), entry.attribute)
        registry.register(
            entry.name,
            entry.obj,
            options=entry.options,
            needs=entry.needs,
            supports=entry.supports,
            replace=True,
            **entry.meta,
        )


def load_from_environment() -> None:
    """Import the modules ``FEDALIGN_PLUGINS`` names (a Ray worker's first step), then register
    the entries ``FEDALIGN_PLUGIN_OBJECTS`` holds by value. Modules are imported by name (Flower
    gives workers the driver's ``sys.path``); a plugin file, or a script that ran as ``__main__``,
    is run from its file under another name, so its ``__main__`` block does not run again."""
    for name, file in json.loads(os.environ.get(ENV_KEY, "[]")):
        if name.startswith(PLUGIN_PREFIX):
            _exec_file(name, Path(file))
        elif name == "__main__":
            if file is None or not Path(file).is_file():
                raise ImportError(
                    f"entries registered in __main__ ({file or 'no file'}) cannot reach Ray "
                    "workers through FEDALIGN_PLUGINS: register them in a module or a --plugin "
                    "file"
                )
            _exec_file(f"fedalign_main_{Path(file).stem}", Path(file))
        elif name not in sys.modules:
            importlib.import_module(name)
    if shipped := os.environ.get(OBJECTS_KEY):
        register_shipped(shipped)
