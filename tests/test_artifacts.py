"""``fedalign.load_model`` and ``fedalign.evaluate`` on a run folder written as a run writes it:
the model comes back at the widths of its weights (grown by matching) from safetensors and YAML
only, or from the newest checkpoint when the run stopped; bad folders are one ConfigError."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fedalign
from fedalign.client.training import evaluate
from fedalign.config.load import to_yaml
from fedalign.data import dataset_arrays
from fedalign.models import build_model
from fedalign.runs.checkpoint import Checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_folder(tmp_path: Path, final: bool = True) -> tuple[Path, OrderedDict]:
    cfg = fedalign.load_config(ROOT / "configs/digits_mlp.yaml")
    torch.manual_seed(0)
    grown = build_model("mlp", in_features=64, hidden=[80], num_classes=10)  # wider than [64]
    state = OrderedDict((k, v.contiguous()) for k, v in grown.state_dict().items())
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    if final:
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        save_checkpoint(
            tmp_path / "checkpoints", Checkpoint(2, state, {}, {}, config=cfg.to_dict()), keep=2
        )
    return tmp_path, state


@pytest.mark.parametrize("final", [True, False])
def test_load_model_rebuilds_the_runs_model_at_its_widths(tmp_path, final):
    run_dir, state = run_folder(tmp_path, final)
    model = fedalign.load_model(run_dir)
    assert not model.training
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    test = dataset_arrays("digits", "test")
    loss, accuracy = evaluate(model, test.X, test.y)
    by_config = fedalign.evaluate(model, ROOT / "configs/digits_mlp.yaml")
    by_name = fedalign.evaluate(model, "digits")
    assert by_config == by_name == {"loss": loss, "accuracy": accuracy}


def test_a_folder_without_a_run_is_one_config_error(tmp_path):
    with pytest.raises(fedalign.ConfigError, match="not a run folder"):
        fedalign.load_model(tmp_path)
    run_dir, _ = run_folder(tmp_path)
    (run_dir / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(fedalign.ConfigError, match="not a readable safetensors file"):
        fedalign.load_model(run_dir)
