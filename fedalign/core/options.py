"""An option's value checked against its annotation, with an error that names the key.

A registered algorithm's options are its keyword-only parameters (``fedalign.core.registry``);
their annotations are the one declaration of what each takes. The config loader checks every
option a config gives against them, so ``trim: "x"`` stops the run at load with one line instead
of a traceback in round 1, and a number written as ``2`` reaches a ``float`` option as ``2.0``.
"""

from __future__ import annotations

import collections.abc
import math
import types
import typing
from typing import Any

from fedalign.core.errors import ConfigError

_SEQUENCES = (list, tuple, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def conform(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` takes it (an int for a float becomes a float, a list for a
    tuple a tuple), or ``ConfigError`` naming ``key``. Annotations it does not know pass any
    value (``Any``, a user's own class)."""
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
                return conform(key, value, option)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(
                f"{key}: expected one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        return value
    if origin in _SEQUENCES or annotation in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        # tuple[int, str]: each item its own type; tuple[int, ...] and list[int]: one for all
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
        kinds = args if fixed else [args[0] if args else Any] * len(value)
        items = [conform(f"{key}[{i}]", v, kind) for i, (v, kind) in enumerate(zip(value, kinds))]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin in _MAPPINGS or annotation is dict:
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
    return value
