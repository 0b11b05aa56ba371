"""What a wheel install gets: the LICENSE pyproject.toml names, py.typed, and the configs as
package data, so that ``fedalign run quickstart`` finds its config with no clone around it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from fedalign.cli import main
from fedalign.config.bundled import bundled_names, resolve_config
from fedalign.core.errors import ConfigError
from tests.helpers import CONFIGS, ROOT


def test_shipped_configs_resolve_by_name_and_paths_stay_paths(tmp_path, monkeypatch):
    assert set(bundled_names()) == {p.stem for p in CONFIGS.glob("*.yaml")}
    assert resolve_config("quickstart").read_text() == (CONFIGS / "quickstart.yaml").read_text()
    assert resolve_config("bench_tiny.yaml").name == "bench_tiny.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("name: mine\n")  # a file of that name wins
    assert resolve_config("quickstart") == tmp_path.joinpath("quickstart").relative_to(tmp_path)
    assert resolve_config("configs/nowhere.yaml").name == "nowhere.yaml"  # load_config reports it
    with pytest.raises(ConfigError, match="'quikstart' is neither a config file nor a shipped"):
        resolve_config("quikstart")


def test_an_unknown_config_name_is_one_line_listing_the_shipped_ones(capsys):
    assert main(["run", "quikstart"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quickstart" in err and "digits_mlp" in err


def test_the_wheel_ships_license_py_typed_and_configs_found_by_name(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "fedalign", source / "fedalign", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "configs", source / "configs")
    # the PEP 517 hook pip would call, without pip (and its index look-ups)
    build = f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path / 'dist')!r})"
    subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fedalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fedalign/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    shipped = {n.removeprefix("fedalign/configs/") for n in names if "/configs/" in n}
    assert shipped == {p.name for p in CONFIGS.glob("*.yaml")}
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]

    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"  # no configs/ folder here
    elsewhere.mkdir()
    script = (
        "from fedalign.config.bundled import resolve_config; "
        "from fedalign.config import load_config; "
        "p = resolve_config('quickstart'); print(p); print(load_config(p).name)"
    )
    found = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=True,
    )
    path, name = found.stdout.split()
    assert path == str(installed / "fedalign" / "configs" / "quickstart.yaml")
    assert name == "quickstart"
