"""``fedalign pretrain`` (issue 25, item 1): a config's model trained centrally on part of its data
and written where the config's ``model.init`` points, so the federation fine-tunes a real base;
bad input is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedalign.cli import main
from fedalign.client.training import evaluate
from fedalign.config.components import run_federation, run_model
from fedalign.config.load import from_dict, load_config
from fedalign.core.errors import ConfigError
from fedalign.runs.pretrain import pretrain_rows
from tests.helpers import CONFIGS, DIGITS


def digits_config(tmp_path: Path, **model) -> Path:
    """configs/digits_mlp.yaml with ``model`` keys added, written to ``tmp_path``."""
    values = yaml.safe_load(DIGITS.read_text())
    values["model"].update(model)
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_pretrain_writes_the_base_the_config_names(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base.safetensors"
    path = digits_config(tmp_path, init=str(base))
    with pytest.raises(ConfigError, match="does not exist"):  # no base yet: the run refuses
        load_config(path)
    assert main(["pretrain", str(path), "--fraction", "0.8", "--epochs", "3"]) == 0
    cfg = load_config(path)  # the base exists now
    fed = run_federation(cfg)
    examples = round(0.8 * len(fed.train.y))
    assert f"on {examples} examples of digits" in capsys.readouterr().out
    state = load_file(base)
    seeded = load_config(path, ["model.init=null"])  # the model pre-training started from
    fresh = run_model(seeded, fed, init_seed=seeded.resolved_seeds.init).state_dict()
    model = run_model(cfg, fed)  # model.init: the pre-trained weights
    assert set(state) == set(fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert not torch.equal(state["layers.0.weight"], fresh["layers.0.weight"])
    # trained, not just written: far above the 10% of chance on digits' test split
    assert evaluate(model, *fed.test)[1] > 0.7


def test_bad_pretrain_input_is_one_line(tmp_path: Path, capsys) -> None:
    no_init = digits_config(tmp_path)
    cases = [
        ([str(no_init)], "give --out"),
        ([str(no_init), "--out", str(tmp_path / "b.st"), "--fraction", "0"], "--fraction"),
        ([str(no_init), "--out", str(tmp_path / "b.st"), "--epochs", "0"], "--epochs"),
        (  # 10 inputs for digits' 64 pixels
            [str(no_init), "--out", str(tmp_path / "b.st"), "--set", "model.in_features=10"],
            "model: ",
        ),
        (  # an iid federation holds every example: nothing outside it
            [str(no_init), "--out", str(tmp_path / "b.st"), "--outside-federation"],
            "hold every training example",
        ),
    ]
    for args, message in cases:
        assert main(["pretrain", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "b.st").exists()


def test_outside_federation_keeps_the_groups_no_client_holds() -> None:
    cfg = from_dict(
        {
            "data": {
                "dataset": "fortunes",
                "options": {"seq_len": 16, "stride": 2048},
                "num_clients": 5,
                "partition": "natural",
            },
            "model": {"name": "char_transformer", "d_model": 8, "heads": 2, "layers": 1, "ff": 8},
        }
    )
    fed = run_federation(cfg)
    held = np.concatenate(fed.parts)
    rows = pretrain_rows(fed, 1.0, seed=0, outside_federation=True)
    assert len(rows) + len(held) == len(fed.train.y) and not np.isin(rows, held).any()
    groups = fed.train.groups
    assert not set(groups[rows]) & set(groups[held])  # other categories than the clients'
    half = pretrain_rows(fed, 0.5, seed=0, outside_federation=True)
    assert len(half) == round(0.5 * len(rows)) and np.isin(half, rows).all()
    assert not np.array_equal(half, pretrain_rows(fed, 0.5, seed=1, outside_federation=True))


def test_the_shipped_lora_config_names_its_base() -> None:
    """configs/fortunes_lora.yaml fine-tunes the base ``fedalign pretrain`` writes; without it
    the config is refused in one line saying so."""
    shipped = CONFIGS / "fortunes_lora.yaml"
    init = yaml.safe_load(shipped.read_text())["model"]["init"]
    if Path(init).exists():
        pytest.skip(f"{init} was made here: the refusal cannot be seen")
    with pytest.raises(ConfigError, match="fedalign pretrain"):
        load_config(shipped)
