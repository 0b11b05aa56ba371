"""What a run leaves, read back: its model, and how good a model is on a dataset.

``load_model(run_dir)`` rebuilds the run's architecture from the folder's resolved
``config.yaml`` at the widths its weights have (PFNM and FedMA grow them) and loads the final
``model.safetensors``, or the newest checkpoint's model when the run stopped early. Only
safetensors and YAML are read: nothing is unpickled. ``evaluate(model, config_or_dataset)`` is the
server's test-set evaluation, on the dataset a run config (or a config file) names, or on a
registered dataset by name.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from fedalign.client.training import evaluate as evaluate_arrays
from fedalign.config.load import from_dict, load_config
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from fedalign.core.types import StateDict
from fedalign.data import dataset_arrays
from fedalign.models import build_model, fit_to_state
from fedalign.runs.checkpoint import load_latest
from fedalign.runs.merge import read_state


def run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run folder records (``config.yaml``), validated again."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return from_dict(values)


def final_state(run_dir: str | Path) -> StateDict:
    """The run's final model, or its newest checkpoint's when it has none (a stopped run)."""
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").is_file():
        return read_state(run_dir / "model.safetensors")
    checkpoint = load_latest(run_dir / "checkpoints")
    if checkpoint is None:
        raise ConfigError(f"{run_dir}: no model.safetensors and no readable checkpoint")
    return checkpoint.model


def load_model(run_dir: str | Path) -> nn.Module:
    """The model a run folder holds, as an ``nn.Module`` in eval mode: the run's architecture and
    options (``config.yaml``) at the widths of its saved weights."""
    cfg = run_config(run_dir)
    state = final_state(run_dir)
    model = fit_to_state(build_model(cfg.model.name, **cfg.model.options), state)
    return model.eval()


def evaluate(
    model: nn.Module, config_or_dataset: RunConfig | str | Path, split: str = "test"
) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of ``model`` on ``split`` of a dataset: the one a ``RunConfig``
    names (with its folder and options), the one of a YAML config file, or a registered dataset
    by name (from its default folder)."""
    source = config_or_dataset
    if isinstance(source, (str, Path)) and Path(source).suffix in (".yaml", ".yml"):
        source = load_config(source)
    if isinstance(source, RunConfig):
        d = source.data
        arrays = dataset_arrays(d.dataset, split, d.data_dir, **d.options)
    else:
        arrays = dataset_arrays(str(source), split)
    loss, accuracy = evaluate_arrays(model, arrays.X, arrays.y)
    return {"loss": loss, "accuracy": accuracy}
