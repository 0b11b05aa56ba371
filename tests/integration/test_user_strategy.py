"""A strategy from a user's file (``boost_plugin.py``: a ``fedalign.Strategy`` subclass with the
keyword-only option ``boost``) is built with the option a ``--set`` gives, in a real Flower
simulation on Ray (``tests/test_strategy_options.py``: bad options are one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fedalign as fedalign_api

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests/integration/boost_plugin.py"
DIGITS = ROOT / "configs/digits_mlp.yaml"


def fedalign(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedalign.cli", *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_users_strategy_is_built_with_the_option_a_config_gives(tmp_path):
    done = fedalign(
        "run",
        str(DIGITS),
        "--plugin",
        str(PLUGIN),
        "--output",
        str(tmp_path),
        "--no-progress",
        "--set",
        "strategy.name=boost-avg",
        "--set",
        "strategy.boost=2.5",
        "--set",
        "strategy.rounds=2",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("*/metrics.jsonl")]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("boost") for r in rows] == [None, 2.5, 2.5]  # round 0 is the initial model
    assert [r["clients_ok"] for r in rows[1:]] == [4, 4]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["strategy"]["options"] == {"boost": 2.5}
    # the public API reads the run back (its config names the plugin's strategy: load it first):
    # its model, evaluated as the server evaluated it
    fedalign_api.load_plugin(PLUGIN)
    try:
        model = fedalign_api.load_model(run_dir)
    finally:
        fedalign_api.STRATEGIES.unregister("boost-avg")
    score = fedalign_api.evaluate(model, fedalign_api.load_config(DIGITS))
    assert score["accuracy"] == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)
    assert score["loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-6)
