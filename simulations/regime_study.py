"""Where does alignment before fusion pay? (issue 14, item 3: the regime study.)

FedAvg, FedProx, the weight- and activation-aligned pipelines, FedMA and one-shot PFNM on the
same Fashion-MNIST clients, over local epochs ``E`` and Dirichlet ``alpha``, with the clients
starting round 1 from their own random inits or from one common init. Everything runs in this
process without Flower or Ray (``studies.pipeline_rounds`` for the pipelines; FedMA's round and
PFNM's fusion from ``fusion.layer_matching`` / ``fusion.neural_matching`` directly), so a 2-core
machine runs the grid.

Two budgets are read off each run's per-round history:

- equal communication: the global model after ``--rounds`` communication rounds (a FedMA round
  is one training exchange plus one per matched layer, as ``fedma_vs_fedavg.py`` counts them;
  one-shot PFNM has one round and is read there);
- equal client compute: after ``--epochs-budget`` local epochs per client in total (FedMA's
  retraining after each matched layer counts as epochs too).

    nice -n 10 .venv/bin/python simulations/regime_study.py --out docs/results/regime_study
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.fusion.layer_matching import (
    class_weighted_classifier,
    classifier_keys,
    global_layer,
    hybrid_state,
    match_layer,
    matched_layers,
    slice_to_client,
)
from fedalign.algorithms.fusion.neural_matching import pfnm
from fedalign.algorithms.pipeline import Plan
from fedalign.client.training import evaluate, train_local
from fedalign.data import federation
from fedalign.models import build_model, fit_to_state
from fedalign.runs.studies import pipeline_rounds, write_json

Data = tuple[torch.Tensor, torch.Tensor]
CLASSES = 10

PIPELINES: dict[str, tuple[Plan, dict[str, Any]]] = {
    "FedAvg": (Plan(), {}),
    "FedProx (mu 0.01)": (
        Plan(),
        {"objective": "proximal", "objective_options": {"proximal_mu": 0.01}},
    ),
    "weight / mean": (Plan(align="weight"), {}),
    "weight / regmean": (Plan(align="weight", fuse="regmean"), {}),
    "activation / mean": (Plan(align="activation"), {}),
}
METHODS = (*PIPELINES, "FedMA", "PFNM one-shot")


def clients_of(
    alpha: float, num_clients: int, per_client: int, test: int, seed: int
) -> tuple[list[Data], Data]:
    """A seeded random ``per_client`` of each client's examples of a Dirichlet(``alpha``) split,
    and the first ``test`` test examples."""
    fed = federation(
        "fashion-mnist",
        num_clients,
        "dirichlet",
        seed=seed,
        val_fraction=0.0,
        alpha=alpha,
        min_partition_size=10,
    )
    rng = np.random.default_rng(seed)
    clients = []
    for c in map(fed.client, range(num_clients)):
        keep = np.sort(rng.permutation(len(c.y_train))[:per_client])
        clients.append((torch.as_tensor(c.X_train[keep]), torch.as_tensor(c.y_train[keep])))
    X_test, y_test = (torch.as_tensor(a[:test]) for a in fed.test)
    return clients, (X_test, y_test)


def client_model(build: Callable[[], nn.Module], j: int, own_init: bool, seed: int) -> nn.Module:
    """Client ``j``'s round-1 model, seeded as ``studies.pipeline_rounds`` seeds it."""
    torch.manual_seed(seed + 1000 + j if own_init else seed)
    return build()


def class_counts(datasets: Sequence[Data]) -> list[list[float]]:
    return [torch.bincount(y, minlength=CLASSES).double().tolist() for _, y in datasets]


def fedma_rounds(
    build: Callable[[], nn.Module],
    datasets: Sequence[Data],
    test: Data,
    rounds: int,
    own_init: bool,
    seed: int,
    **train: Any,
) -> list[dict[str, float]]:
    """FedMA's rounds as ``fl.strategies.fedma`` runs them, in process: the clients train (round 1
    from their init, later from their slice of the global model), then per hidden layer bottom-up
    the server matches it (BBP-MAP, FedMA's defaults) and the clients retrain the layers above with
    the matched ones frozen; the classifier is averaged with the clients' class shares."""
    spec = permutation_spec(build())
    layers = matched_layers(spec, build())
    counts = class_counts(datasets)
    epochs = train["epochs"]
    history, global_state, assignments = [], None, None
    for rnd in range(1, rounds + 1):
        states = []
        for j, (X, y) in enumerate(datasets):
            if global_state is None:
                model = client_model(build, j, own_init, seed)
            else:
                model = fit_to_state(build(), slice_to_client(global_state, spec, assignments[j]))
            train_local(model, X, y, seed=seed + 100 * rnd + j, **train)
            states.append(model.state_dict())
        frozen: list[str] = []
        matched: dict[str, torch.Tensor] = {}
        assignments = [{} for _ in datasets]
        for layer in layers:
            glob = global_layer(states, layer, match_layer(states, layer, seed=seed + rnd))
            matched.update(glob.entries)
            frozen += layer.keys
            for j in range(len(datasets)):
                assignments[j][layer.group] = glob.assignments[j]
            retrained = []
            for j, (X, y) in enumerate(datasets):
                model = fit_to_state(build(), hybrid_state(states[j], layer, glob, j))
                train_local(model, X, y, seed=seed + 100 * rnd + 50 + j, frozen=frozen, **train)
                retrained.append(model.state_dict())
            states = retrained
        keys = classifier_keys(layers, states[0])
        global_state = {**states[0], **matched, **class_weighted_classifier(states, keys, counts)}
        loss, accuracy = evaluate(fit_to_state(build(), global_state), *test)
        history.append(
            {
                "round": rnd,
                "exchanges": rnd * (1 + len(layers)),
                "epochs": rnd * epochs * (1 + len(layers)),
                "loss": loss,
                "accuracy": accuracy,
            }
        )
    return history


def pfnm_one_shot(
    build: Callable[[], nn.Module],
    datasets: Sequence[Data],
    test: Data,
    own_init: bool,
    seed: int,
    **train: Any,
) -> list[dict[str, float]]:
    """One round: the clients train from their inits, PFNM fuses them once (its defaults)."""
    models = []
    for j, (X, y) in enumerate(datasets):
        model = client_model(build, j, own_init, seed)
        train_local(model, X, y, seed=seed + 100 + j, **train)
        models.append(model.eval())
    fused, _ = pfnm(models, class_counts(datasets), seed=seed)
    loss, accuracy = evaluate(fused, *test)
    width = [lin.out_features for lin in fused.modules() if isinstance(lin, nn.Linear)][:-1]
    return [
        {
            "round": 1,
            "exchanges": 1,
            "epochs": train["epochs"],
            "loss": loss,
            "accuracy": accuracy,
            "width": width,
        }
    ]


def run_method(
    method: str,
    build: Callable[[], nn.Module],
    datasets: Sequence[Data],
    test: Data,
    rounds: int,
    own_init: bool,
    seed: int,
    train: dict[str, Any],
) -> list[dict[str, float]]:
    """The method's history, each entry with its communication rounds and epochs so far."""
    if method == "PFNM one-shot":
        return pfnm_one_shot(build, datasets, test, own_init, seed, **train)
    if method == "FedMA":
        per_round = 1 + len(matched_layers(permutation_spec(build()), build()))
        return fedma_rounds(build, datasets, test, -(-rounds // per_round), own_init, seed, **train)
    plan, extra = PIPELINES[method]
    history = pipeline_rounds(
        plan, build, datasets, test, rounds, own_init=own_init, seed=seed, **train, **extra
    )
    return [{**h, "exchanges": h["round"], "epochs": h["round"] * train["epochs"]} for h in history]


def at_budget(history: Sequence[dict], key: str, budget: float) -> float | None:
    """Accuracy of the last round within ``budget`` of ``key`` (None: even round 1 exceeds it)."""
    within = [h for h in history if h[key] <= budget]
    return within[-1]["accuracy"] if within else None


BASELINES = ("FedAvg", "FedProx (mu 0.01)")


def markdown_table(results: list[dict], key: str) -> str:
    """One row per (alpha, init, E): each method's accuracy (%) at the budget ``key``; what
    alignment alone gains (weight matching then the mean, against FedAvg) and what the best
    aligning method gains over the better of FedAvg and FedProx (points)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    cells: dict[tuple, dict[str, float | None]] = {}
    for r in results:
        cells.setdefault((r["alpha"], r["init"], r["E"]), {})[r["method"]] = r[key]
    lines = [
        "| alpha | init | E | "
        + " | ".join(methods)
        + " | weight / mean - FedAvg | best aligned - best baseline |",
        "|---" * (len(methods) + 5) + "|",
    ]
    for (alpha, init, E), row in sorted(
        cells.items(), key=lambda c: (c[0][0], c[0][1] != "own", c[0][2])
    ):
        base = [row[m] for m in BASELINES if row.get(m) is not None]
        aligned = [row[m] for m in methods if m not in BASELINES and row.get(m) is not None]
        gain = f"{100 * (max(aligned) - max(base)):+.1f}" if base and aligned else "-"
        pair = [row.get("weight / mean"), row.get("FedAvg")]
        alone = f"{100 * (pair[0] - pair[1]):+.1f}" if None not in pair else "-"
        values = [f"{100 * row[m]:.1f}" if row.get(m) is not None else "-" for m in methods]
        lines.append(
            f"| {alpha:g} | {init} | {E} | " + " | ".join(values) + f" | {alone} | {gain} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], epochs: Sequence[int], rounds: int, budget: int, path: Path) -> None:
    """Accuracy against E, one panel per (alpha, init) and budget."""
    cells = sorted({(r["alpha"], r["init"]) for r in results})
    fig = Figure(figsize=(4 * len(cells), 7))
    axes = fig.subplots(2, len(cells), squeeze=False, sharey=True)
    for col, (alpha, init) in enumerate(cells):
        for row, (key, title) in enumerate(
            [
                ("equal_communication", f"{rounds} comm. rounds"),
                ("equal_compute", f"{budget} local epochs"),
            ]
        ):
            ax = axes[row][col]
            for method in METHODS:
                points = [
                    (r["E"], r[key])
                    for r in results
                    if (r["alpha"], r["init"], r["method"]) == (alpha, init, method)
                    and r[key] is not None
                ]
                if points:
                    ax.plot(*zip(*sorted(points)), marker="o", label=method)
            ax.set_xscale("log")
            ax.set_xticks(list(epochs), [str(e) for e in epochs])
            ax.set_title(f"alpha {alpha:g}, {init} init, {title}", fontsize=9)
            ax.set_xlabel("local epochs E")
            ax.grid(alpha=0.3)
        axes[0][col].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 100.0])
    parser.add_argument("--inits", nargs="+", default=["own", "common"], choices=["own", "common"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=5, help="equal communication")
    parser.add_argument("--epochs-budget", type=int, default=20, help="equal client compute")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-client", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--test", type=int, default=2000, help="test images evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/regime_study"))
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the tables and plot of --out's JSON; run nothing",
    )
    args = parser.parse_args()
    if args.table:
        results = json.loads(args.out.with_suffix(".json").read_text())["results"]
        for key in ("equal_communication", "equal_compute"):
            print(f"{key}\n{markdown_table(results, key)}\n")
        plot(
            results,
            sorted({r["E"] for r in results}),
            args.rounds,
            args.epochs_budget,
            args.out.with_suffix(".png"),
        )
        return
    torch.set_num_threads(1)

    def build() -> nn.Module:
        return build_model("mlp", in_features=784, hidden=[args.hidden])

    results_path = args.out.with_suffix(".json")
    done: list[dict] = []
    if results_path.exists():  # resume: a longer grid keeps the cells already measured
        done = json.loads(results_path.read_text())["results"]
    results = list(done)
    for alpha in args.alphas:
        datasets, test = clients_of(alpha, args.clients, args.per_client, args.test, args.seed)
        for init in args.inits:
            for E in args.epochs:
                rounds = max(args.rounds, -(-args.epochs_budget // E))
                train = {"epochs": E, "batch_size": 32, "lr": args.lr, "momentum": 0.9}
                for method in args.methods:
                    key = (alpha, init, E, method)
                    if any((r["alpha"], r["init"], r["E"], r["method"]) == key for r in done):
                        continue
                    t0 = time.perf_counter()
                    history = run_method(
                        method, build, datasets, test, rounds, init == "own", args.seed, train
                    )
                    row = {
                        "alpha": alpha,
                        "init": init,
                        "E": E,
                        "method": method,
                        "equal_communication": at_budget(history, "exchanges", args.rounds),
                        "equal_compute": at_budget(history, "epochs", args.epochs_budget),
                        "final": history[-1]["accuracy"],
                        "history": history,
                        "seconds": time.perf_counter() - t0,
                    }
                    results.append(row)
                    print(
                        f"alpha {alpha:g} {init} E {E:2d} {method:18s} "
                        f"comm {row['equal_communication']} compute {row['equal_compute']} "
                        f"({row['seconds']:.0f} s)",
                        flush=True,
                    )
                    write_json(
                        results_path,
                        {"args": vars(args) | {"out": str(args.out)}, "results": results},
                    )
    plot(
        results,
        sorted({r["E"] for r in results}),
        args.rounds,
        args.epochs_budget,
        args.out.with_suffix(".png"),
    )


if __name__ == "__main__":
    main()
