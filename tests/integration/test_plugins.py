"""A dataset, a model, a fuse rule and a strategy added from outside the package (``toy_plugin``,
through the public API only) run in a real Flower simulation on Ray, named by a config like
built-in ones; the public API reads the run back (``load_model``, ``evaluate``)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
import yaml

import fedalign

PLUGIN = "tests.integration.toy_plugin"


@pytest.fixture
def toy_plugin():
    """The plugin module, imported (so registered) for this test only: its names must not leak into
    the other tests' registries, nor its module into their runs' ``FEDALIGN_PLUGINS``."""
    module = importlib.import_module(PLUGIN)
    yield module
    fedalign.DATASETS.unregister("toy-blobs")
    fedalign.MODELS.unregister("toy-net")
    fedalign.FUSE_RULES.unregister("toy-trimmed-mean")
    fedalign.STRATEGIES.unregister("boost-avg")
    sys.modules.pop(PLUGIN)


TOY = {
    "name": "plugins",
    "seed": 0,
    "data": {"dataset": "toy-blobs", "num_clients": 5, "partition": "iid", "val_fraction": 0.0},
    "model": {"name": "toy-net", "hidden": 12},
    "train": {"local_epochs": 2, "lr": 0.1},
    "strategy": {"name": "fedavg", "rounds": 2, "min_train_clients": 5},
    "output": {"plot": False, "checkpoint_every": 0},
}


def test_a_users_dataset_model_and_fuse_rule_run_through_a_config(tmp_path, toy_plugin):
    cfg = fedalign.from_dict({**TOY, "aggregation": {"fuse": "toy-trimmed-mean", "trim": 1}})
    assert cfg.aggregation.options == {"trim": 1}
    outcome = fedalign.run(cfg, output_dir=tmp_path, progress=False)
    rows = [
        json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert toy_plugin.CALLS == [{"clients": 5, "trim": 1}] * 2  # the server used the rule
    assert [r["clients_ok"] for r in rows[1:]] == [5, 5]  # every client ran the toy model
    assert rows[-1]["test_accuracy"] > 0.5  # 0.80 measured on the toy data (chance: 0.25)
    assert rows[-1]["aggregation"]["fuse"] == "toy-trimmed-mean"
    from safetensors.torch import load_file

    state = load_file(outcome.run_dir / "model.safetensors")
    assert state["fc1.weight"].shape == torch.Size([12, 8])  # toy-net at the config's width


def test_a_users_strategy_is_built_with_the_option_a_config_gives(tmp_path, toy_plugin):
    """``BoostAvg(fedalign.Strategy)`` with ``def __init__(self, *args, boost: float = 1.0,
    **kwargs)``, named with ``--set``'s syntax: built with boost=2.5 in a real run, recorded in the
    resolved config; ``load_model`` and ``evaluate`` give back the server's final accuracy."""
    toy = tmp_path / "toy.yaml"
    toy.write_text(yaml.safe_dump(TOY))
    cfg = fedalign.load_config(toy, ["strategy.name=boost-avg", "strategy.boost=2.5"])
    assert cfg.strategy.options == {"boost": 2.5}
    outcome = fedalign.run(cfg, output_dir=tmp_path, progress=False)
    rows = [
        json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r.get("boost") for r in rows] == [None, 2.5, 2.5]  # round 0: the initial model
    assert [r["clients_ok"] for r in rows[1:]] == [5, 5]
    resolved = yaml.safe_load((outcome.run_dir / "config.yaml").read_text())
    assert resolved["strategy"]["options"] == {"boost": 2.5}
    score = fedalign.evaluate(fedalign.load_model(outcome.run_dir), cfg)
    assert score["accuracy"] == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)
    assert score["loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-6)
