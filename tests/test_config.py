"""Config loading: defaults, overrides, derived seeds, and errors that name the key."""

import pytest
import yaml

from fedalign.cli import main
from fedalign.config.load import from_dict, load_config, to_yaml
from fedalign.config.schema import derive_seeds
from fedalign.core.errors import ConfigError
from tests.helpers import ROOT, shipped_overrides


def test_every_shipped_config_and_suite_loads():
    from fedalign.runs.bench import load_suite

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    suites = [p for p in configs if p.name.startswith("bench_")]
    assert len(configs) - len(suites) >= 6 and len(suites) >= 3
    for path in configs:
        if path in suites:
            assert load_suite(path).runs  # every expanded run config is validated
        else:
            cfg = load_config(path, shipped_overrides(path))
            assert cfg.seeds is not None and cfg.name


def test_overrides_and_model_options():
    cfg = load_config(
        ROOT / "configs/quickstart.yaml",
        ["strategy.rounds=3", "data.alpha=0.1", "model.hidden=[50, 20]"],
    )
    assert cfg.strategy.rounds == 3 and cfg.data.alpha == 0.1
    assert cfg.model.options == {"hidden": [50, 20]}


def test_seeds_are_derived_distinct_and_pinnable():
    seeds = derive_seeds(0)
    assert len({seeds.partition, seeds.init, seeds.sampling, seeds.shuffle}) == 4
    assert derive_seeds(0) == seeds and derive_seeds(1) != seeds
    cfg = from_dict({"seed": 0, "seeds": {"sampling": 7}})
    assert cfg.seeds.sampling == 7 and cfg.seeds.partition == seeds.partition


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"strategy": {"rounds": 2.5}}, "strategy.rounds: expected an integer"),
        ({"data": {"alpha": 0}}, "data.alpha: must be > 0"),
        ({"data": {"alpha": -1.0}}, "data.alpha: must be > 0"),
        ({"data": {"dataset": "cifar-1000"}}, "data.dataset: unknown dataset 'cifar-1000'"),
        ({"data": {"partition": "random"}}, "data.partition: unknown scheme"),
        ({"model": {"name": "mlp", "depth": 3}}, "model.depth"),
        ({"model": {"name": "transformer"}}, "model.name"),
        ({"strategy": {"name": "fedsgd"}}, "strategy.name: unknown strategy 'fedsgd'"),
        ({"strategy": {"name": "fedprox"}}, "train.proximal_mu"),
        ({"strategy": {"min_train_clients": 50}}, "strategy.min_train_clients"),
        ({"data": {"data_dir": "/no/such/dir"}}, "data.data_dir"),
        ({"train": {"lr": float("inf")}}, "train.lr: expected a finite number, got inf"),
        ({"data": {"alpha": float("nan")}}, "data.alpha: expected a finite number, got nan"),
        ({"name": "../../escaped"}, "name: '../../escaped' is not a run name"),
        ({"name": "/abs/path"}, "name: '/abs/path' is not a run name"),
        ({"name": "a/b"}, "name: 'a/b' is not a run name"),
        ({"name": ".."}, "name: '..' is not a run name"),
        ({"name": ""}, "name: '' is not a run name"),
        (
            {"strategy": {"name": "pfnm", "protocol": "reference"}},
            "unknown key 'strategy.protocol': not an option of strategy pfnm",
        ),
        ({"strategy": {"protocol": "paper"}}, "strategy: fedavg: protocol must be one of"),
        (
            {"strategy": {"matching": {"sigma": 0.3}}},
            "unknown key 'strategy.matching': not an option of strategy fedavg",
        ),
        ({"strategy": {"name": "fedma", "sigma": "abc"}}, "strategy.sigma: expected a number"),
        ({"strategy": {"name": "fedma", "sigma": -1}}, "strategy: fedma: sigma must be > 0"),
        (
            {"aggregation": {"fuse": "trimmed-mean", "beta": "x"}},
            "aggregation.beta: expected a number",
        ),
        (
            {"aggregation": {"ridge": 0.1}},
            "unknown key 'aggregation.ridge': not an option of the chosen steps",
        ),
        ({"aggregation": {"fuse": "regmean", "ridge": -1}}, "aggregation.ridge: must be >= 0"),
        (
            {"aggregation": {"fuse": "regmean", "regmean_alpha": 2}},
            "aggregation.regmean_alpha: must be in [0, 1]",
        ),
        (
            {"aggregation": {"fuse": "fisher", "fisher_floor": -1}},
            "aggregation.fisher_floor: must be >= 0",
        ),
        (
            {"aggregation": {"fuse": "regmean", "stats_every": 0}},
            "aggregation.stats_every: must be >= 1",
        ),
        (
            {"aggregation": {"align": "weight", "repair": "repair", "repair_every": 0}},
            "aggregation.repair_every: must be >= 1",
        ),
        ({"seed": -1}, "seed"),
        ({"aggregation": {"fuse": "multi-krum"}}, "the plain mean, no protection"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_dict(values)


# ``fedalign`` in this process (the exit status is what ``main`` returns); the ``python -m
# fedalign.cli`` entry point's own exit 2 is test_strategy_options.py's (a plugin file loads in a
# process of its own)
def test_cli_bad_config_exits_2_with_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  lr: -1\n")
    assert main(["run", str(bad)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "train.lr: must be > 0" in line


def test_cli_unknown_override_key_exits_2(capsys):
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "--set", "strategy.roundz=3"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown key 'strategy.roundz'" in line


def test_run_names_of_safe_characters_pass():
    assert from_dict({"name": "fmnist-lenet_v2.1"}).name == "fmnist-lenet_v2.1"
