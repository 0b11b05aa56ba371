"""Bringing a user's own models, datasets and rules to every process of a run.

Registering from Python (``fedalign.register_model(...)``) changes the registries of the process
that ran it; the Ray workers that run the clients are other processes. Before a simulation starts,
the runner puts the modules that registered anything outside fedalign into the environment
(``FEDALIGN_PLUGINS``, which Ray workers inherit); a worker imports them (by name, or by file for
a script run as ``__main__`` or a ``--plugin`` file) before it reads its first message, so the
registrations happen there too. A config file never names a module: what runs is what the user ran.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

from fedalign.core.errors import ConfigError
from fedalign.core.registry import user_modules

ENV_KEY = "FEDALIGN_PLUGINS"


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
    return _exec_file(PLUGIN_PREFIX + path.stem, path)


def plugin_environment() -> dict[str, str]:
    """``{FEDALIGN_PLUGINS: ...}`` naming the modules (with their files) that registered entries
    outside fedalign; empty when there are none."""
    entries = [[name, getattr(sys.modules[name], "__file__", None)] for name in user_modules()]
    return {ENV_KEY: json.dumps(entries)} if entries else {}


def load_from_environment() -> None:
    """Import the modules ``FEDALIGN_PLUGINS`` names (a Ray worker's first step). Modules are
    imported by name (Flower gives workers the driver's ``sys.path``); a plugin file, or a script
    that ran as ``__main__``, is run from its file under another name, so its ``__main__`` block
    does not run again."""
    for name, file in json.loads(os.environ.get(ENV_KEY, "[]")):
        if name.startswith(PLUGIN_PREFIX):
            _exec_file(name, Path(file))
        elif name == "__main__":
            if file is None:
                raise ImportError(
                    "entries registered in an interactive session cannot reach Ray workers: "
                    "register them in a module or a --plugin file"
                )
            _exec_file(f"fedalign_main_{Path(file).stem}", Path(file))
        elif name not in sys.modules:
            importlib.import_module(name)
