"""A user's strategy's options (``BoostAvg`` in ``tests/integration/toy_plugin.py``, its run in
``test_plugins``) and the built-ins' are checked at load: a misspelt or mistyped option, or one
no chosen strategy reads, is one line and exit 2 before any run folder or Ray exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedalign.cli import main
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
