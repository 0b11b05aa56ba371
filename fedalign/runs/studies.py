"""What the studies under ``simulations/`` share, so each script holds only its experiment.

- ``load_fashion_mnist``: the data as tensors, from ``fedalign.data`` or from one ``.npz`` (a
  machine without the data packages, such as a GPU host);
- ``train_from_own_inits``: independently initialised models, each trained on its own data, with
  an optional cache, because the fusion and barrier studies rerun on the same trained models;
- ``weight_matched``: a state aligned to a reference by weight matching;
- ``baseline_rows``: the rows every one-shot fusion table is read against;
- ``midpoint_barrier`` / ``barrier_row``: the midpoint loss barrier as the studies report it,
  through ``analysis.interpolation_barrier``;
- ``write_json``: a study's results file.

Pure like the other package modules: no Flower, no run configs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedalign.algorithms.align import PermutationSpec, apply_permutation, weight_matching
from fedalign.algorithms.analysis import ArrayLike, BarrierResult, Correction, interpolation_barrier
from fedalign.client.training import evaluate, predict_logits, train_local
from fedalign.core.types import StateDict

# ``training.evaluate``'s batch, in which the studies' barriers were measured: the batch size can
# change a network's outputs in the last bits.
EVAL_BATCH = 1024


def load_fashion_mnist(
    npz: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``X_train, y_train, X_test, y_test`` of Fashion-MNIST: float images in [0, 1] and int64
    labels, from ``fedalign.data`` or from ``npz``, which holds the four arrays under those names
    (uint8 images, the raw files' format, are scaled to [0, 1]; float images are taken as they are).
    """
    if npz is None:
        from fedalign.data import load_dataset  # here: the .npz route needs no data packages

        arrays = [*load_dataset("fashion-mnist", "train"), *load_dataset("fashion-mnist", "test")]
    else:
        with np.load(npz) as data:
            arrays = [data[k] for k in ("X_train", "y_train", "X_test", "y_test")]
    X, y, X_test, y_test = (torch.as_tensor(a) for a in arrays)
    X, X_test = (Z.float() / 255 if Z.dtype == torch.uint8 else Z for Z in (X, X_test))
    return X, y.long(), X_test, y_test.long()


def train_from_own_inits(
    build: Callable[[], nn.Module],
    datasets: Sequence[tuple[ArrayLike, ArrayLike]],
    init_seeds: Sequence[int],
    shuffle_seeds: Sequence[int] | None = None,
    *,
    cache: Path | None = None,
    key: str = "",
    device: str | torch.device = "cpu",
    **options: Any,
) -> list[nn.Module]:
    """One model per ``datasets[j]``: built after ``torch.manual_seed(init_seeds[j])`` (its own
    initialisation, as independent clients have) and trained by ``train_local`` with shuffling
    seed ``shuffle_seeds[j]`` (default: the init seed) and ``options``; returned on the CPU in
    eval mode.

    With ``cache``, model ``j`` is loaded from ``<cache>/<key>-<options>-i<init>-s<shuffle>``
    (safetensors) when that file exists and written there after training otherwise. The options
    and seeds are in the name; ``key`` must name everything else that changes the models (data,
    partition, architecture), which only the caller knows.
    """
    shuffle_seeds = init_seeds if shuffle_seeds is None else shuffle_seeds
    if not len(datasets) == len(init_seeds) == len(shuffle_seeds):
        raise ValueError(
            f"{len(datasets)} datasets for {len(init_seeds)} init seeds and "
            f"{len(shuffle_seeds)} shuffle seeds"
        )
    if cache is not None and not key:
        raise ValueError("a cache needs a key naming the data and the architecture")
    setting = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    models = []
    for (X, y), init, shuffle in zip(datasets, init_seeds, shuffle_seeds):
        torch.manual_seed(init)
        model = build()
        path = None if cache is None else cache / f"{key}-{setting}-i{init}-s{shuffle}.safetensors"
        if path is not None and path.exists():
            model.load_state_dict(load_file(path))
        else:
            train_local(model, X, y, seed=shuffle, device=device, **options)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                state = model.state_dict()
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)
        models.append(model.cpu().eval())
    return models


def weight_matched(
    spec: PermutationSpec, reference: StateDict, state: StateDict
) -> dict[str, torch.Tensor]:
    """``state`` permuted into ``reference``'s basis by weight matching: the same function, its
    units in the order that makes the two networks' weights closest."""
    return apply_permutation(spec, weight_matching(spec, reference, state), state)


def baseline_rows(
    models: Sequence[nn.Module], X: ArrayLike, y: ArrayLike
) -> tuple[list[float], dict[str, float]]:
    """Each model's own test accuracy, and the rows a one-shot fusion is read against: the mean
    and the best of those (what a client has without fusion) and the prediction ensemble (the
    argmax of the summed softmax: every model at inference, the reference a single fused model
    is rarely expected to pass)."""
    local = [evaluate(m, X, y)[1] for m in models]
    probs = sum(torch.softmax(predict_logits(m, X), 1) for m in models)
    ensemble = float((probs.argmax(1) == torch.as_tensor(y)).float().mean())
    return local, {
        "local (mean)": float(np.mean(local)),
        "local (best)": max(local),
        "prediction ensemble": ensemble,
    }


def midpoint_barrier(
    model: nn.Module,
    state_a: StateDict,
    state_b: StateDict,
    X: ArrayLike,
    y: ArrayLike,
    correct: Correction | None = None,
    device: str | torch.device = "cpu",
) -> BarrierResult:
    """The endpoints and the midpoint of ``interpolation_barrier`` (points 0, 1/2, 1), evaluated
    as they are: no BatchNorm reset, because the studies compare the corrections (REPAIR, a reset
    from pooled moments) and pass the one a row measures as ``correct``."""
    return interpolation_barrier(
        model,
        state_a,
        state_b,
        X,
        y,
        points=3,
        batch_size=EVAL_BATCH,
        device=device,
        reset_bn=False,
        correct=correct,
    )


def barrier_row(result: BarrierResult) -> dict[str, Any]:
    """The midpoint's loss, accuracy and loss barrier (against the endpoints' mean loss), and the
    endpoints' accuracies, as the barrier tables report them."""
    mid = result.midpoint
    return {
        "midpoint_loss": result.loss[mid],
        "midpoint_accuracy": result.accuracy[mid],
        "barrier": result.midpoint_loss_barrier,
        "endpoint_accuracy": [result.accuracy[0], result.accuracy[-1]],
    }


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, folders created; numpy scalars are written as numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")


def pipeline_rounds(
    plan: Any,
    build: Callable[[], nn.Module],
    datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    rounds: int,
    *,
    own_init: bool = True,
    seed: int = 0,
    **train_options: Any,
) -> list[dict[str, float]]:
    """``rounds`` rounds of FedAvg-style training whose server step is ``pipeline.aggregate``
    under ``plan`` (a ``pipeline.Plan``), without Flower: every client trains from the global
    model (round 1: from its own init when ``own_init``) and answers the pipeline's queries
    directly, as the strategy's clients do (``plan.for_round`` decides each round's steps).
    Statistics are read as the server reads what a client sent (``stats.received_statistics``:
    packed Grams unpacked). Returns per round the global model's test loss and accuracy and the
    values each round's clients sent up in the train phase (weights plus statistics as sent), so
    stability and bytes are read off one run.
    """
    from fedalign.algorithms.pipeline import aggregate
    from fedalign.algorithms.stats import StatContext, client_statistics, received_statistics
    from fedalign.models import fit_to_state

    torch.manual_seed(seed)
    global_model = build()
    spec = plan.spec(global_model, datasets[0][0][:2])  # the clients' own input, heads per aligner
    weights = [float(len(y)) for _, y in datasets]
    history = []
    for rnd in range(1, rounds + 1):
        step = plan.for_round(rnd)
        models = []
        for j, (X, y) in enumerate(datasets):
            if rnd == 1 and own_init:
                torch.manual_seed(seed + 1000 + j)
                model = build()
            else:
                model = fit_to_state(build(), global_model.state_dict())
            train_local(model, X, y, seed=seed + 100 * rnd + j, **train_options)
            models.append(model.eval())
        sent_stats = [
            client_statistics(step.train_statistics(), m, X, y, options=step.options)
            for m, (X, y) in zip(models, datasets)
        ]
        states = [m.state_dict() for m in models]
        sent = sum(t.numel() for tree in [*states, *sent_stats] for t in _tensors(tree))
        stats = [received_statistics(s, sd) for s, sd in zip(sent_stats, states)]

        def ask_cross(
            ref: int, others: list[int], models: list = models, states: list = states, step=step
        ) -> dict:
            context = StatContext(reference=models[ref])
            kinds = step.align_statistics()
            return {
                j: received_statistics(
                    client_statistics(
                        kinds, models[j], *datasets[j], context, options=step.options
                    ),
                    states[j],
                )
                for j in others
            }

        def ask_fused(state: dict, targets: dict | None, step: Any = step) -> list:
            fused, context = fit_to_state(build(), state), StatContext(targets=targets)
            kinds = step.repair_statistics()
            return [
                received_statistics(
                    client_statistics(kinds, fused, X, y, context, options=step.options), state
                )
                for X, y in datasets
            ]

        outcome = aggregate(step, spec, states, weights, stats, ask_cross, ask_fused, seed=rnd)
        global_model = fit_to_state(build(), outcome.state)
        loss, accuracy = evaluate(global_model, *test)
        history.append({"round": rnd, "loss": loss, "accuracy": accuracy, "values_up": sent})
    return history


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for value in tree.values() for t in _tensors(value)]
