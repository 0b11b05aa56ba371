"""Issue 5's study: every sensible align x fuse x repair pipeline on one-shot fusion, against
FedAvg's average, the best client and the prediction ensemble; and the midpoint barrier of two
independently trained networks with and without REPAIR.

One-shot: J clients, each trains an MLP from its own initialisation on its Fashion-MNIST partition
(Dirichlet(alpha) and IID), then one aggregation. The pipelines run through
``fedalign.algorithms.pipeline.aggregate``, the function the Flower strategy calls, with the
clients' answers computed directly by ``stats.client_statistics`` on each client's own data (a
seeded sample of ``--stats-samples``, the run config's default), so the numbers are what a
federation computes without Ray's overhead. Barrier: two MLPs (no normalisation) trained on disjoint
halves of the training set from different inits, aligned by weight matching; loss at the midpoint
against the endpoints' mean, with and without REPAIR (statistics on 5,000 training examples).

    .venv/bin/python simulations/aggregation_study.py --out docs/results/aggregation_study.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.analysis import Correction
from fedalign.algorithms.pipeline import Plan, aggregate
from fedalign.algorithms.repair import repair_with_data
from fedalign.algorithms.stats import StatContext, client_statistics, received_statistics
from fedalign.client.training import evaluate
from fedalign.data import federation
from fedalign.models import build_model, fit_to_state
from fedalign.runs.studies import (
    barrier_row,
    baseline_rows,
    load_fashion_mnist,
    midpoint_barrier,
    train_from_own_inits,
    weight_matched,
    write_json,
)

PIPELINES = [
    ("none", "mean", "none"),
    ("none", "regmean", "none"),
    ("none", "fisher", "none"),
    *[
        (a, f, r)
        for a in ("weight", "activation", "sinkhorn-rebasin")
        for f in ("mean", "regmean", "fisher")
        for r in ("none", "repair")
    ],
    ("pfnm", "mean", "none"),
]


def one_shot(args: argparse.Namespace, partition: str) -> dict:
    options = {"alpha": args.alpha, "min_partition_size": 10} if partition == "dirichlet" else {}
    fed = federation(
        "fashion-mnist", args.clients, partition, seed=args.seed, val_fraction=0.0, **options
    )
    X_test, y_test = (torch.as_tensor(a) for a in fed.test)
    clients = [fed.client(j) for j in range(args.clients)]
    models = train_from_own_inits(
        lambda: build_model("mlp", hidden=[args.hidden]),
        [(c.X_train, c.y_train) for c in clients],
        [1000 + j for j in range(len(clients))],
        range(len(clients)),
        cache=args.cache,
        key=f"fmnist-{partition}-a{args.alpha}-J{args.clients}-h{args.hidden}-s{args.seed}",
        epochs=args.epochs,
        batch_size=64,
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
    )
    weights = [float(len(c.y_train)) for c in clients]
    rng = np.random.default_rng(args.seed)
    samples = []
    for c in clients:
        index = np.sort(
            rng.choice(len(c.y_train), min(args.stats_samples, len(c.y_train)), replace=False)
        )
        samples.append((torch.as_tensor(c.X_train[index]), torch.as_tensor(c.y_train[index])))
    counts = [np.bincount(c.y_train, minlength=10).tolist() for c in clients]

    def accuracy(model: torch.nn.Module) -> float:
        return evaluate(model, X_test, y_test)[1]

    local, rows = baseline_rows(models, X_test, y_test)
    spec = permutation_spec(models[0])
    states = [m.state_dict() for m in models]
    seconds: dict[str, float] = {}
    widths: dict[str, list[int]] = {}  # PFNM's global model grows (sigma 0.1, sigma0 1, gamma 5)
    for align, fuse, repair in PIPELINES:
        plan = Plan(align=align, fuse=fuse, repair=repair)
        name = f"{align} / {fuse} / {repair}"
        t0 = time.perf_counter()
        if align == "pfnm":
            from fedalign.algorithms.fusion.neural_matching import pfnm

            fused_model, assignment = pfnm(models, counts, sigma=0.1, sigma0=1.0, gamma=5.0)
            rows[name] = accuracy(fused_model)
            seconds[name] = time.perf_counter() - t0
            widths[name] = assignment.widths
            continue
        stats = [
            received_statistics(client_statistics(plan.train_statistics(), m, X, y), sd)
            for m, sd, (X, y) in zip(models, states, samples)
        ]

        def ask_cross(ref: int, others: list[int], plan: Plan = plan) -> dict:
            return {
                j: client_statistics(
                    plan.align_statistics(),
                    models[j],
                    *samples[j],
                    StatContext(reference=models[ref]),
                )
                for j in others
            }

        def ask_fused(state: dict, targets: dict | None, plan: Plan = plan) -> list:
            fused = build_model("mlp", hidden=[args.hidden])
            fused.load_state_dict(state)
            return [
                client_statistics(
                    plan.repair_statistics(), fused, X, y, StatContext(targets=targets)
                )
                for X, y in samples
            ]

        outcome = aggregate(
            plan, spec, states, weights, stats, ask_cross, ask_fused, seed=args.seed
        )
        fused = fit_to_state(build_model("mlp", hidden=[args.hidden]), outcome.state)
        rows[name] = accuracy(fused)
        seconds[name] = time.perf_counter() - t0
        print(f"  {partition}: {name}: {100 * rows[name]:.2f}% ({seconds[name]:.1f} s)", flush=True)
    return {
        "accuracy": rows,
        "seconds": seconds,
        "widths": widths,
        "local": local,
        "clients": len(clients),
    }


def aligned_pair(
    name: str,
    options: dict,
    X: torch.Tensor,
    y: torch.Tensor,
    halves: list[torch.Tensor],
    epochs: int,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two models trained from different inits on the two halves (Adam lr 1e-3, batch 128): the
    first, and the second's state as trained and aligned to the first by weight matching."""
    a, b = train_from_own_inits(
        lambda: build_model(name, **options),
        [(X[h], y[h]) for h in halves],
        range(len(halves)),
        epochs=epochs,
        batch_size=128,
        optimizer="adam",
        lr=1e-3,
    )
    return a, b.state_dict(), weight_matched(permutation_spec(a), a.state_dict(), b.state_dict())


def repaired_towards(a: torch.nn.Module, b: dict[str, torch.Tensor], X: torch.Tensor) -> Correction:
    """REPAIR of the model at ``l`` toward ``(1 - l)`` of ``a``'s and ``l`` of ``b``'s statistics on
    ``X`` (``b``: a state of ``a``'s architecture)."""
    other = copy.deepcopy(a)
    other.load_state_dict(b)
    return lambda net, lam: repair_with_data(net, [a, other], X, weights=[1 - lam, lam])


def barrier(args: argparse.Namespace) -> dict:
    """Midpoint loss barrier of two independently trained MLPs, aligned, with and without REPAIR."""
    X, y, X_test, y_test = load_fashion_mnist()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    halves = [order[: len(y) // 2], order[len(y) // 2 :]]
    a, raw, b = aligned_pair(
        "mlp", {"hidden": list(args.barrier_hidden)}, X, y, halves, args.barrier_epochs
    )
    calibration = X[order[:5000]]
    variants = {
        "naive": (raw, None),
        "weight matching": (b, None),
        "weight matching + REPAIR": (b, repaired_towards(a, b, calibration)),
    }
    out = {
        name: barrier_row(midpoint_barrier(a, a.state_dict(), other, X_test, y_test, correct))
        for name, (other, correct) in variants.items()
    }
    base = out["weight matching"]["barrier"]
    out["repair_reduction_vs_alignment"] = (
        1 - out["weight matching + REPAIR"]["barrier"] / base if base > 0 else None
    )
    return out


def cnn_barriers(args: argparse.Namespace) -> dict:
    """Midpoint barriers of two independently trained CNNs: VGG-9 (no normalisation) with and
    without REPAIR, ResNet-20 (BatchNorm) with and without a BN reset, both after weight matching.
    Each model trains on its own half of ``--cnn-samples`` training examples."""
    from fedalign.algorithms.repair import bn_reset
    from fedalign.algorithms.stats import batchnorm_input_moments

    X, y, X_test, y_test = load_fashion_mnist()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[
        : args.cnn_samples
    ]
    halves = [order[: len(order) // 2], order[len(order) // 2 :]]
    calibration = X[order[:5000]]

    def reset(net: torch.nn.Module, lam: float) -> dict[str, torch.Tensor]:
        return bn_reset(net.state_dict(), batchnorm_input_moments(net, calibration))

    out = {}
    for name, options in (
        ("vgg9", {"widths": (16, 16, 32, 32, 64, 64), "hidden": 128}),
        ("resnet20", {}),
    ):
        t0 = time.perf_counter()
        a, raw, b = aligned_pair(name, options, X, y, halves, args.cnn_epochs)
        if name == "resnet20":
            variants = {
                "naive + BN reset": (raw, reset),
                "weight matching": (b, None),
                "weight matching + BN reset": (b, reset),
            }
        else:
            variants = {
                "naive": (raw, None),
                "weight matching": (b, None),
                "weight matching + REPAIR": (b, repaired_towards(a, b, calibration)),
            }
        curves = {
            row: midpoint_barrier(a, a.state_dict(), other, X_test, y_test, correct)
            for row, (other, correct) in variants.items()
        }
        rows = {
            row: {"barrier": r.midpoint_loss_barrier, "midpoint_accuracy": r.accuracy[r.midpoint]}
            for row, r in curves.items()
        }
        rows["endpoint_accuracy"] = barrier_row(curves["weight matching"])["endpoint_accuracy"]
        rows["train_seconds"] = time.perf_counter() - t0
        out[name] = rows
        print(f"  {name}: {json.dumps(rows)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--stats-samples", type=int, default=2000)
    parser.add_argument("--barrier-epochs", type=int, default=5)
    parser.add_argument(
        "--barrier-hidden",
        type=int,
        nargs="+",
        default=[256] * 6,
        help="REPAIR matters most for deep networks (variance collapse compounds per layer)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--partitions", nargs="*", default=["dirichlet", "iid"], help="none: no one-shot study"
    )
    parser.add_argument("--skip-barrier", action="store_true")
    parser.add_argument(
        "--cnn-barriers", action="store_true", help="also VGG-9 (REPAIR) and ResNet-20 (BN reset)"
    )
    parser.add_argument("--cnn-samples", type=int, default=20000)
    parser.add_argument("--cnn-epochs", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fedalign-aggregation-cache"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"settings": {k: str(v) for k, v in vars(args).items()}}
    for partition in args.partitions:
        results[partition] = one_shot(args, partition)
    if args.partitions:
        names = list(results[args.partitions[0]]["accuracy"])
        print(
            "\n| pipeline (align / fuse / repair) | "
            + " | ".join(f"{p} (%)" for p in args.partitions)
            + " |"
        )
        print("|---|" + "---|" * len(args.partitions))
        for name in names:
            cells = [
                f"{100 * results[p]['accuracy'].get(name, float('nan')):.2f}"
                for p in args.partitions
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
    if not args.skip_barrier:
        results["barrier"] = barrier(args)
        widths = "-".join(map(str, args.barrier_hidden))
        print(
            f"\n| midpoint of two MLPs 784-{widths}-10 | loss barrier | midpoint accuracy (%) |\n"
            "|---|---|---|"
        )
        for name, r in results["barrier"].items():
            if isinstance(r, dict):
                print(f"| {name} | {r['barrier']:.4f} | {100 * r['midpoint_accuracy']:.2f} |")
        reduction = results["barrier"]["repair_reduction_vs_alignment"]
        if reduction is not None:
            print(
                f"\nREPAIR removes {100 * reduction:.1f}% of the barrier left after weight matching"
            )
    if args.cnn_barriers:
        results["cnn_barriers"] = cnn_barriers(args)
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
