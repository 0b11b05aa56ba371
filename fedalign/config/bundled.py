"""The configs and suites that ship inside the package, found by name.

``configs/`` is package data (``fedalign/configs`` links to it in a checkout; a wheel holds the
files), so ``fedalign run quickstart`` or ``fedalign bench bench_tiny`` works from a wheel install,
in any directory, with no clone. A path that exists is always taken as given.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fedalign.core.errors import ConfigError

SUFFIXES = (".yaml", ".yml")


def bundled_dir() -> Path:
    """Where the shipped configs are (a real directory: the package is installed unzipped)."""
    return Path(str(files("fedalign") / "configs"))


def bundled_names() -> list[str]:
    """The shipped configs and suites, by the names ``fedalign run`` and ``bench`` take."""
    folder = bundled_dir()
    return (
        sorted(p.stem for p in folder.iterdir() if p.suffix in SUFFIXES) if folder.is_dir() else []
    )


def resolve_config(name_or_path: str | Path) -> Path:
    """``name_or_path`` if it is a file, else the shipped config of that name (``quickstart``,
    ``quickstart.yaml``); a bare name that is neither is a one-line error listing the names."""
    path = Path(name_or_path).expanduser()
    if path.is_file() or len(path.parts) != 1:
        return path  # a path: load_config says if it is missing
    stem = path.stem if path.suffix in SUFFIXES else path.name
    for suffix in SUFFIXES:
        candidate = bundled_dir() / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{str(name_or_path)!r} is neither a config file nor a shipped config; shipped: "
        f"{', '.join(bundled_names()) or 'none'}"
    )
