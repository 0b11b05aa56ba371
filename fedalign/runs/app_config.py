"""``flwr run .``'s run config (``[tool.flwr.app.config]``, fused with ``-c``) as a fedalign config.

Flower's run config is flat and holds scalars only; Flower rejects a ``-c`` key the table does not
declare. So the table declares:

- ``config``: the YAML config to start from; ``output-dir``: where the run folder goes;
- Flower's own names for the settings its examples expose (``num-server-rounds``,
  ``fraction-train``, ...; ``FLOWER_KEYS``), each mapped onto its fedalign key; their default ``""``
  means "as the YAML config says";
- ``overrides``: any other ``key=value`` of ``fedalign run --set``, comma-separated; a comma
  inside brackets or quotes belongs to the value (``model.hidden=[100,100],strategy.rounds=3``).

Values go through the config's own parsing and checks, so a bad one is the same one-line error as
under ``fedalign run``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedalign.config.bundled import resolve_config
from fedalign.config.load import load_config
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError

FLOWER_KEYS = {
    "num-server-rounds": "strategy.rounds",
    "fraction-train": "strategy.fraction_train",
    "fraction-evaluate": "strategy.fraction_evaluate",
    "min-train-clients": "strategy.min_train_clients",
    "local-epochs": "train.local_epochs",
    "batch-size": "train.batch_size",
    "lr": "train.lr",
    "seed": "seed",
}
"""Flower-style run-config key -> the fedalign config key it sets."""

APP_KEYS = ("config", "overrides", "output-dir")


def split_overrides(text: str) -> list[str]:
    """``"a=1, model.hidden=[100,100], name='x,y'"`` -> the three ``key=value`` entries: split at
    the commas outside brackets, braces and quotes."""
    entries, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            entries.append("".join(current))
            current = []
            continue
        current.append(char)
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def _yaml_value(value: Any) -> str:
    """A run-config scalar as the YAML text ``--set`` takes (strings are parsed as YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def app_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """The ``--set`` overrides a run config asks for: its ``overrides``, then the Flower-style keys
    that are set (they win)."""
    unknown = sorted(set(run_config) - set(APP_KEYS) - set(FLOWER_KEYS))
    if unknown:
        raise ConfigError(
            f"run config key {unknown[0]!r}: fedalign's ServerApp takes "
            f"{', '.join([*APP_KEYS, *FLOWER_KEYS])} (other settings: overrides='key=value,...')"
        )
    overrides = split_overrides(str(run_config.get("overrides", "")))
    for key, path in FLOWER_KEYS.items():
        value = run_config.get(key, "")
        if value != "":
            overrides.append(f"{path}={_yaml_value(value)}")
    return overrides


def load_app_config(run_config: Mapping[str, Any], app_dir: Path) -> RunConfig:
    """The fedalign config ``run_config`` describes (paths relative to ``app_dir``)."""
    path = resolve_app_config(str(run_config.get("config", "configs/quickstart.yaml")), app_dir)
    return load_config(path, app_overrides(run_config))


def resolve(path: str, app_dir: Path) -> Path:
    """A path as given, else relative to the app directory (where pyproject.toml is)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return app_dir / candidate


def resolve_app_config(path: str, app_dir: Path) -> Path:
    """The ``config`` key's file: a path (as ``resolve`` finds it), else a shipped config's name."""
    found = resolve(path, app_dir)
    return found if found.is_file() else resolve_config(path)
