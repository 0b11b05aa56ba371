"""An option's value checked against its annotation, with an error that names the key.

A registered algorithm's options are its keyword-only parameters (``fedalign.core.registry``);
their annotations are the one declaration of what each takes. The config loader checks every
option a config gives against them, so ``trim: "x"`` stops the run at load with one line instead
of a traceback in round 1, and a number written as ``2`` reaches a ``float`` option as ``2.0``.
An option's bounds are part of its annotation (``ridge: Annotated[float, Range(low=0)]``), so
they too are declared once, beside the default, and checked at load.
"""

from __future__ import annotations

import collections.abc
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from fedalign.core.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric option, written in its annotation: ``Annotated[float, Range(0, 1)]``
    (inclusive ends; ``open_low``/``open_high`` exclude them)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range (None: it is in)."""
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and (
            value >= self.high if self.open_high else value > self.high
        )
        if not (below or above):
            return None
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"must be in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"must be {'>' if self.open_low else '>='} {self.low:g}"
        return f"must be {'<' if self.open_high else '<='} {self.high:g}"


_SEQUENCES = (list, tuple, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def conform(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` takes it (an int for a float becomes a float, a list for a
    tuple a tuple), or ``ConfigError`` naming ``key``. Annotations it does not know pass any
    value (``Any``, a user's own class)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *marks = typing.get_args(annotation)
        value = conform(key, value, base)
        for mark in marks:
            problem = mark.problem(value) if isinstance(mark, Range) and value is not None else None
            if problem is not None:
                raise ConfigError(f"{key}: {problem}, got {value!r}")
        return value
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
