"""Loss barrier between two independently trained MLPs, before and after weight matching.

Git Re-Basin's MLP experiment on Fashion-MNIST: two MLPs (784-512-512-10) trained from different
seeds (initialisation and shuffling); test-loss barrier of naive interpolation against
interpolation after weight matching of the second model to the first. Issue 3 accepts weight
matching when it removes at least 80% of the naive barrier.

    .venv/bin/python simulations/barrier_mlp.py --epochs 5 --out docs/results/barrier_mlp.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedalign.algorithms.align import apply_permutation, permutation_spec, weight_matching
from fedalign.algorithms.analysis import BarrierResult, interpolation_barrier
from fedalign.client.training import evaluate
from fedalign.models import build_model
from fedalign.runs.studies import load_fashion_mnist, train_from_own_inits, write_json

ACCEPTED_REDUCTION = 0.8


def summary(name: str, r: BarrierResult) -> str:
    return (
        f"{name:>16}: loss barrier {r.loss_barrier:.4f}, "
        f"midpoint loss barrier {r.midpoint_loss_barrier:.4f}, "
        f"midpoint accuracy {100 * r.accuracy[r.midpoint]:.2f}% "
        f"(accuracy barrier {100 * r.accuracy_barrier:.2f} points)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (two threads on a shared 2-core machine ran erratically slower)",
    )
    parser.add_argument("--out", type=Path, help="write the curves and barriers here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    X, y, X_test, y_test = load_fashion_mnist()
    t0 = time.perf_counter()
    a, b = train_from_own_inits(
        lambda: build_model("mlp", hidden=args.hidden),
        [(X, y)] * 2,
        args.seeds,
        epochs=args.epochs,
        batch_size=128,
        optimizer="adam",
        lr=1e-3,
    )
    train_seconds = time.perf_counter() - t0
    spec = permutation_spec(a)
    t0 = time.perf_counter()
    perms = weight_matching(spec, a.state_dict(), b.state_dict())
    match_seconds = time.perf_counter() - t0
    b_aligned = apply_permutation(spec, perms, b.state_dict())
    naive = interpolation_barrier(a, a.state_dict(), b.state_dict(), X_test, y_test, args.points)
    matched = interpolation_barrier(a, a.state_dict(), b_aligned, X_test, y_test, args.points)
    reduction = 1 - matched.loss_barrier / naive.loss_barrier
    result = {
        "setup": {
            "hidden": args.hidden,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "points": args.points,
            "optimizer": "adam lr 1e-3, batch 128",
            "threads": args.threads,
        },
        "endpoint_test_accuracy": [evaluate(m, X_test, y_test)[1] for m in (a, b)],
        "naive": naive.to_dict(),
        "weight_matching": matched.to_dict(),
        "loss_barrier_reduction": reduction,
        "accepted": reduction >= ACCEPTED_REDUCTION,
        "train_seconds": train_seconds,
        "weight_matching_seconds": match_seconds,
    }
    acc_a, acc_b = result["endpoint_test_accuracy"]
    print(
        f"endpoints: test accuracy {100 * acc_a:.2f}% / {100 * acc_b:.2f}% "
        f"(both trained in {train_seconds:.0f} s)"
    )
    print(summary("naive", naive))
    print(summary("weight matching", matched))
    print(
        f"loss barrier reduction: {100 * reduction:.1f}% "
        f"(acceptance: >= {100 * ACCEPTED_REDUCTION:.0f}%: "
        f"{'met' if result['accepted'] else 'NOT met'}); weight matching took {match_seconds:.2f} s"
    )
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
