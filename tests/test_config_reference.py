"""The config reference is generated from the schema: every key declared once with its comment,
the README's block equal to ``fedalign config --defaults``, and a JSON Schema that accepts the
shipped configs and rejects what the loader rejects."""

import dataclasses
import json
import typing

import jsonschema
import pytest
import yaml

from fedalign.cli import main
from fedalign.config.load import from_dict, load_config
from fedalign.config.reference import BEGIN, END, defaults_yaml, json_schema, readme_block
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from tests.helpers import ROOT


def sections(cls=RunConfig, prefix=""):
    """``(key, field)`` for every key of the config, sections and list items included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", f
        inner = [hints[f.name], *typing.get_args(hints[f.name])]
        for sub in (a for a in inner if dataclasses.is_dataclass(a)):
            yield from sections(sub, f"{prefix}{f.name}.")


def test_every_key_is_declared_with_a_comment():
    keys = dict(sections())
    assert len(keys) > 60
    undocumented = [k for k, f in keys.items() if not f.metadata.get("doc")]
    assert not undocumented, (
        f"declare {undocumented} as `name: type = key(default, 'one-line comment', ...)` "
        "in fedalign/config/schema.py, then run `python -m fedalign.config.reference README.md`"
    )


def test_readme_reference_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:end] == readme_block(), (
        "README.md's config reference differs from `fedalign config --defaults`: "
        "run `python -m fedalign.config.reference README.md` and commit README.md"
    )


def test_defaults_yaml_is_the_default_config_with_every_key():
    text = defaults_yaml()
    assert from_dict(yaml.safe_load(text)) == from_dict({})
    for key, f in sections():
        leaf = key.rsplit(".", 1)[-1]
        assert f"{leaf}:" in text and f.metadata["doc"] in text, key
    assert "momentum: 0.0" in text
    assert "#   regmean_alpha: 0.9" in text  # step options come from the registries


def test_cli_prints_defaults_schema_and_a_resolved_config(capsys):
    assert main(["config", "--defaults"]) == 0
    assert capsys.readouterr().out == defaults_yaml()
    assert main(["config", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()
    assert main(["config", str(ROOT / "configs/quickstart.yaml"), "--set", "train.lr=0.2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 0.2
    assert main(["config", str(ROOT / "configs/quickstart.yaml"), "--set", "train.momentum=1"]) == 2
    err = capsys.readouterr().err
    assert err == "fedalign: config error: train.momentum: must be in [0, 1), got 1.0\n"


def test_json_schema_accepts_the_shipped_configs_and_rejects_bad_values():
    schema = json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    configs = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if "bench_" not in p.name]
    for path in configs:
        validator.validate(yaml.safe_load(path.read_text()))
    resolved = yaml.safe_load(load_config(ROOT / "configs/quickstart.yaml").to_json())
    validator.validate(resolved)
    for bad in (
        {"train": {"momentum": 1.0}},
        {"train": {"lrr": 0.1}},
        {"data": {"dataset": "cifar-1000"}},
        {"aggregation": {"fuse": "no-such-rule"}},
        {"faults": [{"round": 1, "client": 0}]},
    ):
        assert not validator.is_valid(bad), bad
        with pytest.raises(ConfigError):
            from_dict(bad)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train": {"momentum": 1.0}}, "train.momentum: must be in [0, 1), got 1.0"),
        ({"aggregation": {"workers": 0}}, "aggregation.workers: must be >= 1, got 0"),
        ({"strategy": {"max_update_norm": 0}}, "strategy.max_update_norm: must be > 0, got 0.0"),
        ({"faults": [{"round": 1, "client": 0}]}, "faults[0].kind: required"),
        ({"faults": [{"round": 1, "client": 0, "kind": "x"}]}, "faults[0].kind: unknown fault"),
        (
            {"aggregation": {"fuse": "no-such-rule"}},
            "aggregation.fuse: unknown fuse rule 'no-such-rule'",
        ),
    ],
)
def test_declared_checks_name_the_key(values, message):
    with pytest.raises(ConfigError) as caught:
        from_dict(values)
    assert str(caught.value).startswith(message)
