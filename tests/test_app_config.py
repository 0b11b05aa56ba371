"""``flwr run .``'s run config mapped onto a fedalign config: Flower-style keys, ``overrides``
whose lists keep their commas, one-line errors; and pyproject.toml declares exactly those keys
(Flower rejects a ``-c`` key its table lacks)."""

from __future__ import annotations

import importlib
import tomllib

import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedalign.core.errors import ConfigError
from fedalign.runs.app_config import (
    APP_KEYS,
    FLOWER_KEYS,
    app_overrides,
    load_app_config,
    split_overrides,
)
from tests.helpers import DIGITS, ROOT


def test_overrides_split_at_commas_outside_brackets_and_quotes():
    assert split_overrides("model.hidden=[100,100], strategy.rounds=3,name='a,b'") == [
        "model.hidden=[100,100]",
        "strategy.rounds=3",
        "name='a,b'",
    ]
    assert split_overrides("aggregation.options={ridge: 0.1, regmean_alpha: 0.5}") == [
        "aggregation.options={ridge: 0.1, regmean_alpha: 0.5}"
    ]
    assert split_overrides("") == []


def test_flower_style_keys_set_their_fedalign_keys_and_empty_keeps_the_config():
    run_config = {
        "config": str(DIGITS),
        "output-dir": "runs",
        "num-server-rounds": 7,
        "fraction-train": 0.5,
        "lr": "",
        "seed": 3,
        "overrides": "model.hidden=[100,100],data.alpha=0.1",
    }
    assert app_overrides(run_config) == [
        "model.hidden=[100,100]",
        "data.alpha=0.1",
        "strategy.rounds=7",
        "strategy.fraction_train=0.5",
        "seed=3",
    ]
    cfg = load_app_config(run_config, ROOT)
    assert cfg.strategy.rounds == 7 and cfg.strategy.fraction_train == 0.5 and cfg.seed == 3
    assert cfg.model.options["hidden"] == [100, 100]  # the list kept its comma
    assert cfg.train.lr == 0.1  # digits_mlp.yaml's own
    # the Flower-style key wins over the same setting in overrides
    both = {"config": str(DIGITS), "overrides": "strategy.rounds=2", "num-server-rounds": 4}
    assert load_app_config(both, ROOT).strategy.rounds == 4


def test_a_relative_config_path_is_read_from_the_app_directory():
    cfg = load_app_config({"config": "configs/digits_mlp.yaml"}, ROOT)
    assert cfg.name == "digits-mlp"


def test_bad_keys_and_values_are_one_line_errors():
    with pytest.raises(
        ConfigError, match="run config key 'num-rounds': fedalign's ServerApp takes"
    ):
        app_overrides({"num-rounds": 3})
    with pytest.raises(ConfigError, match="strategy.rounds: expected an integer") as info:
        load_app_config({"config": str(DIGITS), "num-server-rounds": "many"}, ROOT)
    assert "\n" not in str(info.value)


def test_pyproject_declares_exactly_the_keys_the_server_app_takes():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == {*APP_KEYS, *FLOWER_KEYS}
    assert all(table[key] == "" for key in FLOWER_KEYS)  # "": as the YAML config says
    assert app_overrides(table) == []


def test_pyproject_names_the_apps_where_they_are():
    """``flwr run .`` imports the ServerApp and ClientApp pyproject.toml names: after a move of
    the modules, a stale path fails here rather than in a user's ``flwr run``."""
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"
    ]
    for key, kind in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, _, attribute = components[key].partition(":")
        assert isinstance(getattr(importlib.import_module(module), attribute), kind), key
