"""A user's strategy's options (``BoostAvg`` in ``tests/integration/toy_plugin.py``, its run in
``test_plugins``) and the built-ins' are checked at load: a misspelt or mistyped option, or one
no chosen strategy reads, is one line and exit 2 before any run folder or Ray exists."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import fedalign
from fedalign.cli import main
from fedalign.fl.strategy import build_strategy
from fedalign.models import build_model
from tests.helpers import ROOT

PLUGIN = ROOT / "tests/integration/toy_plugin.py"
DIGITS = ROOT / "configs/digits_mlp.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.bost=2.5", "unknown key 'strategy.bost': not an option of strategy boost-avg"),
        ("strategy.boost=abc", "strategy.boost: expected a number, got 'abc'"),
    ],
)
def test_a_bad_option_of_a_users_strategy_is_one_line_and_exit_2(tmp_path, override, message):
    # the plugin file runs in its own process, as `fedalign run --plugin` runs it
    args = ["run", str(DIGITS), "--plugin", str(PLUGIN), "--output", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "fedalign.cli", *args, "--set", "strategy.name=boost-avg"]
        + ["--set", override],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"fedalign: config error: {message}")
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_an_option_no_chosen_strategy_reads_is_one_line_and_exit_2(tmp_path, capsys):
    args = ["run", str(DIGITS), "--output", str(tmp_path), "--set", "strategy.matching.sigma=0.3"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "fedalign: config error: unknown key 'strategy.matching': not an option of strategy fedavg"
    )
    assert list(tmp_path.iterdir()) == []


class Picky(fedalign.Strategy):
    """A user's strategy whose options have types a config must meet, and a constructor that
    refuses some values with an error of its own."""

    def __init__(
        self, *args, pair: tuple[int, str] = (1, "a"), ratio: float = 0.5, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        if ratio > 1:
            raise RuntimeError("ratio above 1 is not supported")
        self.pair, self.ratio = pair, ratio


@pytest.fixture
def picky():
    fedalign.register_strategy("picky", Picky)
    yield
    fedalign.STRATEGIES.unregister("picky")


def test_options_reach_the_strategy_as_their_annotations_say(picky):
    cfg = fedalign.load_config(
        DIGITS, ["strategy.name=picky", "strategy.pair=[2, b]", "strategy.ratio=1"]
    )
    assert cfg.strategy.options == {"pair": [2, "b"], "ratio": 1.0}  # as YAML records them
    strategy = build_strategy(cfg, build_model("mlp", in_features=64, hidden=[8], num_classes=10))
    assert (strategy.pair, strategy.ratio) == ((2, "b"), 1.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.pair=[2, 3]", "strategy.pair[1]: expected a string, got 3"),
        ("strategy.pair=[2]", "strategy.pair: expected 2 items"),
        ("strategy.ratio=2", "strategy: picky: RuntimeError('ratio above 1 is not supported')"),
    ],
)
def test_a_refused_option_value_is_one_config_error(picky, override, message):
    with pytest.raises(fedalign.ConfigError, match=re.escape(message)):
        fedalign.load_config(DIGITS, ["strategy.name=picky", override])


def test_register_strategy_refuses_what_a_config_could_not_build():
    class NoDefault(fedalign.Strategy):
        def __init__(self, *args, k: float, **kwargs) -> None:
            super().__init__(*args, **kwargs)

    with pytest.raises(fedalign.RegistryError, match="option 'k' needs a default"):
        fedalign.register_strategy("no-default", NoDefault)
    with pytest.raises(fedalign.RegistryError, match="is not a fedalign.Strategy subclass"):
        fedalign.register_strategy("not-a-strategy", object)
    assert "no-default" not in fedalign.STRATEGIES and "not-a-strategy" not in fedalign.STRATEGIES
