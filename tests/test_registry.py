"""Registries: what a config may name, with defaults, needs and limits declared by each entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fedalign
from fedalign.algorithms.pipeline import Plan, aggregate
from fedalign.core.registry import Context, Registry, RegistryError, keyword_defaults
from tests.helpers import ROOT


def test_entries_take_their_options_from_the_signature():
    def rule(states, weights, stats, *, alpha: float = 0.5, ridge: float = 1.0):
        return states[0]

    registry = Registry("test rule")
    registry.register("r", rule, needs={"train": ("grams",)})
    entry = registry.get("r")
    assert entry.options == {"alpha": 0.5, "ridge": 1.0} == keyword_defaults(rule)
    assert entry.resolve({"alpha": 0.1, "other": 3}) == {"alpha": 0.1, "ridge": 1.0}
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("r", rule)
    with pytest.raises(RegistryError, match="unknown test rule 'x'; choose one of r"):
        registry.get("x")


def test_algorithm_defaults_live_with_the_algorithm():
    """The config's defaults are the algorithms' own (RegMean's were restated, and differed)."""
    from fedalign.algorithms.fusion.regmean import regmean

    cfg = fedalign.load_config(ROOT / "configs/quickstart.yaml", ["aggregation.fuse=regmean"])
    defaults = keyword_defaults(fedalign.FUSE_RULES.get("regmean").obj)
    assert cfg.aggregation.options["regmean_alpha"] == defaults["regmean_alpha"]
    assert cfg.aggregation.options["ridge"] == defaults["ridge"]
    import inspect

    signature = inspect.signature(regmean).parameters
    assert (signature["alpha"].default, signature["ridge"].default) == (
        defaults["regmean_alpha"],
        defaults["ridge"],
    )


@pytest.fixture
def toy_rule():
    """A fuse rule registered by a test, with its own statistic and an option."""
    seen = []

    def sums(model, X, y, context):
        return {"count": torch.tensor(float(len(X)))}

    def scaled_first(states, weights, stats, *, scale: float = 1.0):
        seen.append([float(s["sizes"]["count"]) for s in stats])
        return {k: v * scale for k, v in states[0].items()}

    fedalign.register_statistic("sizes", sums, permute=lambda spec, perms, value, state: value)
    fedalign.register_fuse_rule("scaled-first", scaled_first, needs=("sizes",))
    yield seen
    fedalign.FUSE_RULES.unregister("scaled-first")
    fedalign.STATISTICS.unregister("sizes")


def test_a_new_fuse_rule_is_one_registration(toy_rule):
    cfg = fedalign.load_config(
        ROOT / "configs/quickstart.yaml", ["aggregation.fuse=scaled-first", "aggregation.scale=2.0"]
    )
    plan = cfg.to_plan()
    assert plan.train_statistics() == ("sizes",)  # what the clients are asked for
    assert cfg.aggregation.options == {"scale": 2.0}
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    spec = fedalign.permutation_spec(model)
    states = [model.state_dict(), {k: v + 1 for k, v in model.state_dict().items()}]
    stats = [{"sizes": {"count": torch.tensor(5.0)}}, {"sizes": {"count": torch.tensor(7.0)}}]
    outcome = aggregate(plan, spec, states, [5.0, 7.0], stats, ask_cross=None, ask_fused=None)
    assert toy_rule == [[5.0, 7.0]]
    torch.testing.assert_close(outcome.state["0.weight"], 2.0 * states[0]["0.weight"])


def test_config_choices_come_from_the_registries(toy_rule):
    with pytest.raises(
        fedalign.ConfigError, match="unknown fuse rule 'nope'; choose one of .*scaled-first"
    ):
        fedalign.load_config(ROOT / "configs/quickstart.yaml", ["aggregation.fuse=nope"])
    with pytest.raises(fedalign.ConfigError, match="unknown key 'aggregation.nonsense'"):
        fedalign.load_config(
            ROOT / "configs/quickstart.yaml",
            ["aggregation.fuse=scaled-first", "aggregation.options.nonsense=1"],
        )
    with pytest.raises(fedalign.ConfigError, match="unknown key 'aggregation.nonsense'"):
        fedalign.load_config(ROOT / "configs/quickstart.yaml", ["aggregation.nonsense=1"])
    # an option of a step that is not chosen is read by nothing: one line, not silently dropped
    with pytest.raises(fedalign.ConfigError, match="unknown key 'aggregation.ridge'"):
        fedalign.load_config(
            ROOT / "configs/quickstart.yaml",
            ["aggregation.fuse=scaled-first", "aggregation.ridge=0.01"],
        )
    with pytest.raises(fedalign.ConfigError, match="unknown model 'os.system'"):
        fedalign.load_config(ROOT / "configs/quickstart.yaml", ["model.name=os.system"])


def test_limits_are_declared_beside_the_algorithm():
    fuse = fedalign.FUSE_RULES.get("regmean")
    lstm = fedalign.MODELS.get("char_lstm").obj()
    assert "recurrent" in fuse.problem(Context(lstm))
    assert fuse.problem(Context(fedalign.MODELS.get("mlp").obj())) is None
    plan = Plan(align="none", repair="repair")
    assert ("repair", "repair corrects aligned fusions: set align") in plan.problems(
        Context(fedalign.MODELS.get("mlp").obj())
    )
    assert any(
        "set align" in why for _, why in plan.problems(Context(fedalign.MODELS.get("mlp").obj()))
    )


def test_a_plugin_file_registers_in_this_process_and_in_a_worker(tmp_path):
    """``--plugin FILE.py`` runs a file the user chose; a fresh process (a Ray worker) that gets
    ``FEDALIGN_PLUGINS`` registers the same names before its first message."""
    plugin = tmp_path / "my_models.py"
    plugin.write_text(
        textwrap.dedent("""
        import torch
        import fedalign

        class Wide(torch.nn.Module):
            def __init__(self, in_features=784, num_classes=10):
                super().__init__()
                self.fc = torch.nn.Linear(in_features, num_classes)

            def forward(self, x):
                return self.fc(x.flatten(1))

        fedalign.register_model("wide-plugin", Wide)
    """)
    )
    fedalign.load_plugin(plugin)
    try:
        cfg = fedalign.from_dict({"model": {"name": "wide-plugin"}, "data": {"dataset": "digits"}})
        assert cfg.model.name == "wide-plugin"
        env = fedalign.core.plugins.plugin_environment()
        assert json.loads(env["FEDALIGN_PLUGINS"]) == [["fedalign_plugin_my_models", str(plugin)]]
        worker = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fedalign.fl.client_app, fedalign; print('wide-plugin' in fedalign.MODELS)",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            check=False,
        )
        assert worker.stdout.strip() == "True", worker.stderr[-2000:]
    finally:
        fedalign.MODELS.unregister("wide-plugin")


def test_cli_plugin_must_be_a_python_file(tmp_path, capsys):
    from fedalign.cli import main

    not_python = tmp_path / "rules.txt"
    not_python.write_text("print('never run')\n")
    assert main(["run", "--plugin", str(not_python), str(ROOT / "configs/quickstart.yaml")]) == 2
    assert "--plugin" in capsys.readouterr().err


NOTEBOOK_DRIVER = """
import json
import threading

import fedalign
from fedalign.core.plugins import plugin_environment

OFFSET = 3.0  # a global of __main__: it travels with the function that reads it


def shifted(states, weights, stats, *, by: float = 1.0):
    return {key: value + by + OFFSET for key, value in states[0].items()}


fedalign.register_fuse_rule("nb-shifted", shifted, needs=("grams",))
env = plugin_environment()

LOCK = threading.Lock()


def locked(states, weights, stats):
    with LOCK:
        return states[0]


fedalign.register_fuse_rule("nb-locked", locked)
try:
    plugin_environment()
    refusal = None
except fedalign.ConfigError as exc:
    refusal = str(exc)
print(json.dumps({"env": env, "refusal": refusal}))
"""

NOTEBOOK_WORKER = """
import json

import torch

from fedalign.core.plugins import load_from_environment

load_from_environment()
from fedalign.algorithms.fusion import FUSE_RULES

entry = FUSE_RULES.get("nb-shifted")
fused = entry.obj([{"w": torch.zeros(2)}], [1.0], [{}], by=2.0)
print(json.dumps({
    "options": entry.options,
    "needs": entry.needs,
    "fused": fused["w"].tolist(),
    "locked": "nb-locked" in FUSE_RULES,
}))
"""


def test_entries_defined_in_a_notebook_reach_a_worker_by_value(tmp_path):
    """A ``__main__`` without a file (a notebook, a REPL, ``python -``) cannot be imported by a Ray
    worker: its entries travel pickled by value, and a fresh process registers them with the same
    options and needs. What cannot be pickled is refused in one line naming it, before Ray starts.
    The driver is a real ``python -`` (its ``__file__`` is ``<stdin>``); the worker a fresh one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDALIGN_PLUGIN")}
    env["PYTHONPATH"] = str(ROOT)

    def python(script: str, extra: dict[str, str]) -> dict:
        proc = subprocess.run(
            [sys.executable, "-"],
            input=script,
            env={**env, **extra},
            cwd=tmp_path,  # nothing of the driver's is importable here
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    driver = python(NOTEBOOK_DRIVER, {})
    shipped = driver["env"]
    assert set(shipped) == {"FEDALIGN_PLUGIN_OBJECTS"}  # no module named: __main__ has no file
    assert python(NOTEBOOK_WORKER, shipped) == {
        "options": {"by": 1.0},
        "needs": {"train": ["grams"]},
        "fused": [5.0, 5.0],  # 0 + by + OFFSET: the function and its global arrived
        "locked": False,  # registered after the environment was taken
    }
    refusal = driver["refusal"]
    assert refusal is not None and "\n" not in refusal
    assert refusal.startswith("fuse rule 'nb-locked', defined in an interactive session")
    assert "cannot pickle" in refusal and "--plugin" in refusal
