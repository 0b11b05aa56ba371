"""``fedalign merge``: the server's aggregation pipeline applied offline to saved models.

The checkpoints play the clients: each is aligned, its statistics are computed on a small sample
of a local dataset (only when the chosen steps need them), and they are fused and repaired by
``pipeline.aggregate_local`` -> ``pipeline.aggregate``, the code a federation's server runs. The
choices are checked as a run config's are (the same registries, options and step checks), so
``--fuse regmean --ridge ...`` fails the way ``aggregation: {fuse: regmean}`` would. Files are
read as safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedalign.algorithms.pipeline import Outcome, aggregate_local
from fedalign.client.training import evaluate
from fedalign.config.components import shape_options
from fedalign.config.load import from_dict
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from fedalign.core.types import StateDict
from fedalign.data import dataset_arrays
from fedalign.models import build_model, fit_to_state


def read_state(path: str | Path) -> StateDict:
    """A state dict from a safetensors file (never a pickle); ConfigError names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file ({exc})") from None
    if not state:
        raise ConfigError(f"{path}: holds no tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"{path}: {bad[0]} holds NaN or Inf")
    return state


@dataclasses.dataclass(frozen=True)
class MergeRequest:
    """What to merge and how: the ``aggregation`` section of a run config (``align``, ``solver``,
    ``fuse``, ``repair`` and the steps' options), the model and its options, and where the
    statistics' data comes from."""

    paths: Sequence[str]
    model: str
    model_options: Mapping[str, Any]
    aggregation: Mapping[str, Any]
    data: str | None = None
    data_dir: str | None = None
    samples: int = 500
    weights: Sequence[float] | None = None
    seed: int = 0
    out: str | None = None


def check(request: MergeRequest) -> RunConfig:
    """The request as a validated run config: every name, option and step combination checked by
    the config's own rules, with the merged checkpoints as the round's clients."""
    n = len(request.paths)
    if n < 2:
        raise ConfigError(f"merge needs at least two checkpoints, got {n}")
    if request.weights is not None and len(request.weights) != n:
        raise ConfigError(f"--weights: {len(request.weights)} weights for {n} checkpoints")
    if request.weights is not None and not all(w > 0 for w in request.weights):
        raise ConfigError("--weights: every weight must be > 0")
    if request.samples < 1:
        raise ConfigError(f"--samples: must be >= 1, got {request.samples}")
    if request.out is not None:
        _check_out(Path(request.out), request.paths)
    values: dict[str, Any] = {
        "seed": request.seed,
        "model": {"name": request.model, **request.model_options},
        "data": {"num_clients": n, "data_dir": request.data_dir},
        "strategy": {"min_train_clients": n},
        "aggregation": dict(request.aggregation),
    }
    if request.data is not None:
        values["data"]["dataset"] = request.data
    cfg = from_dict(values)
    plan = cfg.to_plan()
    if plan.fuses_in_alignment:
        raise ConfigError(
            f"--align {plan.align} fuses by its own matching and grows the model; "
            "merge takes a permutation aligner"
        )
    return cfg


def merge(request: MergeRequest) -> tuple[StateDict, Outcome]:
    """The merged state dict of ``request.paths`` (and the pipeline's outcome)."""
    cfg = check(request)
    plan = cfg.to_plan()
    states = [read_state(p) for p in request.paths]
    needs = [k for phase in ("train", "align", "repair") for k in plan.statistics(phase)]
    options: dict[str, Any] = {}
    sample: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0, dtype=torch.long))
    if needs and request.data is None:
        raise ConfigError(
            f"the chosen steps need statistics ({', '.join(dict.fromkeys(needs))}) "
            "of some data: give --data NAME (and --samples N)"
        )
    if request.data is not None:  # the model is sized for the data, statistics or not
        arrays = dataset_arrays(request.data, "train", cfg.data.data_dir)
        X, y = arrays.X, arrays.y
        options = shape_options(request.model, X.shape[1:], arrays.num_classes)
        rng = np.random.default_rng(request.seed)
        index = np.sort(rng.choice(len(y), min(request.samples, len(y)), replace=False))
        sample = (torch.as_tensor(X[index]), torch.as_tensor(y[index]))
    try:
        model = build_model(request.model, **{**options, **request.model_options})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--model {request.model}: {exc}") from None
    _check_fit(model, states, request, sample)
    weights = list(request.weights or [1.0] * len(states))
    outcome = aggregate_local(plan, model, states, weights, [sample] * len(states), request.seed)
    return outcome.state, outcome


def held_out_accuracies(request: MergeRequest, merged: StateDict) -> dict[str, float]:
    """Test accuracy of each input checkpoint and of ``merged`` on ``--data``'s test split
    (``fedalign merge --eval``): whether the merge kept what its inputs knew."""
    if request.data is None:
        raise ConfigError("--eval needs --data NAME: the dataset whose test split to score")
    arrays = dataset_arrays(request.data, "test", request.data_dir)
    options = shape_options(request.model, arrays.X.shape[1:], arrays.num_classes)
    model = build_model(request.model, **{**options, **request.model_options})
    labelled = [*((str(p), read_state(p)) for p in request.paths), ("merged", merged)]
    return {
        label: evaluate(fit_to_state(copy.deepcopy(model), state), arrays.X, arrays.y)[1]
        for label, state in labelled
    }


def _check_fit(
    model: torch.nn.Module,
    states: Sequence[StateDict],
    request: MergeRequest,
    sample: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Every checkpoint has the first one's keys and shapes, fits the model, and the model takes
    the statistics' data."""
    first, *_ = request.paths
    shapes = {k: v.shape for k, v in states[0].items()}
    for path, state in zip(request.paths[1:], states[1:]):
        other = {k: v.shape for k, v in state.items()}
        if other != shapes:
            key = sorted(set(shapes) ^ set(other)) or [k for k in shapes if shapes[k] != other[k]]
            raise ConfigError(
                f"{path}: differs from {first} at {key[0]!r} "
                f"({tuple(other.get(key[0], ()))} vs {tuple(shapes.get(key[0], ()))})"
            )
    if request.model_options:
        _check_options_match(model, shapes, request)
    try:
        fitted = fit_to_state(copy.deepcopy(model), dict(states[0]))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"{first} does not fit model {request.model} {dict(request.model_options)} "
            f"(--model-opt sets its options): {str(exc).splitlines()[0]}"
        ) from None
    if len(sample[1]):
        try:
            with torch.no_grad():
                fitted.eval()(sample[0][:2])
        except RuntimeError as exc:
            raise ConfigError(
                f"--data {request.data}: the checkpoints' model does not take its inputs "
                f"({str(exc).splitlines()[0]})"
            ) from None


def _check_options_match(
    model: torch.nn.Module, shapes: Mapping[str, torch.Size], request: MergeRequest
) -> None:
    """Options given with --model-opt must describe the checkpoints: without them the model's
    widths are read from the checkpoints, but a given ``hidden=[100]`` that the checkpoints
    contradict is a mistake to name, not to override silently."""
    built = {k: v.shape for k, v in model.state_dict().items()}
    key = next((k for k in built if k in shapes and shapes[k] != built[k]), None)
    if key is not None:
        raise ConfigError(
            f"{request.paths[0]}: {key} is {tuple(shapes[key])} but --model-opt "
            f"{dict(request.model_options)} builds {tuple(built[key])}; "
            "drop --model-opt to take the widths from the checkpoints"
        )


def _check_out(out: Path, inputs: Sequence[str]) -> None:
    """Refuse an output that is a folder or one of the inputs, before any work: a merge that
    overwrote its own input would lose it."""
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give the merged .safetensors file's path")
    if out.exists() and any(out.samefile(p) for p in inputs if Path(p).exists()):
        raise ConfigError(f"--out {out}: is one of the checkpoints being merged; choose a new file")


def write_state(state: StateDict, path: str | Path) -> None:
    """Write ``state`` to ``path`` through a temporary file renamed into place, so that a merge
    that fails halfway leaves no torn file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, partial)
    partial.replace(path)
