"""A user's strategy's options (``tests/integration/boost_plugin.py``) and the built-ins' are
checked at load: a misspelt or mistyped option, or one no chosen strategy reads, is one line and
exit 2 before any run folder or Ray exists."""

from __future__ import annotations

import pytest

from tests.integration.test_user_strategy import DIGITS, PLUGIN, fedalign


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.bost=2.5", "unknown key 'strategy.bost': not an option of strategy boost-avg"),
        ("strategy.boost=abc", "strategy.boost: expected a number, got 'abc'"),
    ],
)
def test_a_bad_option_of_a_users_strategy_is_one_line_and_exit_2(tmp_path, override, message):
    done = fedalign(
        "run",
        str(DIGITS),
        "--plugin",
        str(PLUGIN),
        "--output",
        str(tmp_path),
        "--set",
        "strategy.name=boost-avg",
        "--set",
        override,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"fedalign: config error: {message}")
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_an_option_no_chosen_strategy_reads_is_one_line_and_exit_2(tmp_path):
    done = fedalign(
        "run",
        str(DIGITS),
        "--output",
        str(tmp_path),
        "--set",
        "strategy.matching.sigma=0.3",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "fedalign: config error: unknown key 'strategy.matching': not an option of strategy fedavg"
    )
    assert list(tmp_path.iterdir()) == []
