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
    with pytest.raises(fedalign.ConfigError, match="no registered step takes 'nonsense'"):
        fedalign.load_config(
            ROOT / "configs/quickstart.yaml",
            ["aggregation.fuse=scaled-first", "aggregation.options.nonsense=1"],
        )
    with pytest.raises(fedalign.ConfigError, match="unknown key 'aggregation.nonsense'"):
        fedalign.load_config(ROOT / "configs/quickstart.yaml", ["aggregation.nonsense=1"])
    # an earlier version's run folder records every step's options: those of other steps are dropped
    old = fedalign.load_config(
        ROOT / "configs/quickstart.yaml",
        ["aggregation.fuse=scaled-first", "aggregation.ridge=0.01"],
    )
    assert old.aggregation.options == {"scale": 1.0}
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
