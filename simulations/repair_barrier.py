r"""How much of the midpoint loss barrier of weight-matched networks REPAIR removes (issue 5).

Two networks of one architecture trained on Fashion-MNIST from different seeds; the second is
aligned to the first by weight matching; the midpoint of the aligned pair is evaluated on the test
set as it is and after REPAIR (``fedalign.algorithms.repair.repair_with_data``: per-channel
statistics of the endpoints and of the fused model on ``--repair-samples`` training images, the
correction folded into the layers). The barrier is the midpoint's test loss minus the mean of the
endpoints' losses; the issue asks REPAIR to remove at least half of the barrier that alignment
leaves.

    .venv/bin/python simulations/repair_barrier.py --models mlp mlp-deep vgg9 \
        --out docs/results/repair_barrier.json

``--data-npz`` reads the four arrays (``X_train, y_train, X_test, y_test``) from one file instead of
``fedalign.data`` (machines without the data packages).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.repair import repair_with_data
from fedalign.models import build_model
from fedalign.runs.studies import (
    load_fashion_mnist,
    midpoint_barrier,
    train_from_own_inits,
    weight_matched,
    write_json,
)

ACCEPTED_REDUCTION = 0.5
ARCHITECTURES = {  # label -> (zoo model, options)
    "mlp": ("mlp", {"hidden": [512, 512, 512]}),
    "mlp-deep": ("mlp", {"hidden": [256] * 6}),
    "vgg9": ("vgg9", {}),
}


def build(label: str) -> torch.nn.Module:
    name, options = ARCHITECTURES[label]
    return build_model(name, **options)


def measure(label: str, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict:
    """Endpoint, midpoint and repaired-midpoint test losses/accuracies of one architecture."""
    X, y, X_test, y_test = data
    t0 = time.perf_counter()
    a, b = train_from_own_inits(
        lambda: build(label),
        [(X, y)] * 2,
        args.seeds,
        device=args.device,
        epochs=args.epochs,
        batch_size=128,
        optimizer="adam",
        lr=1e-3,
    )
    train_seconds = time.perf_counter() - t0
    aligned = weight_matched(permutation_spec(a), a.state_dict(), b.state_dict())
    endpoints = [a, build(label)]
    endpoints[1].load_state_dict(aligned)
    sample = X[
        torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[: args.repair_samples]
    ]
    repair_seconds = []

    def repaired(net: torch.nn.Module, lam: float) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        state = repair_with_data(net, endpoints, sample, weights=[1 - lam, lam])
        repair_seconds.append(time.perf_counter() - t)
        return state

    curves = {
        k: midpoint_barrier(a, a.state_dict(), other, X_test, y_test, correct, args.device)
        for k, other, correct in (
            ("naive", b.state_dict(), None),
            ("aligned", aligned, None),
            ("repaired", aligned, repaired),
        )
    }
    naive = curves["naive"]
    scores = {"a": (naive.loss[0], naive.accuracy[0]), "b": (naive.loss[-1], naive.accuracy[-1])}
    scores |= {k: (r.loss[r.midpoint], r.accuracy[r.midpoint]) for k, r in curves.items()}
    barrier = {k: r.midpoint_loss_barrier for k, r in curves.items()}
    return {
        "model": label,
        "architecture": ARCHITECTURES[label],
        "epochs": args.epochs,
        "seeds": args.seeds,
        "repair_samples": args.repair_samples,
        "test_loss": {k: s[0] for k, s in scores.items()},
        "test_accuracy": {k: s[1] for k, s in scores.items()},
        "barrier": barrier,
        "reduction": 1 - barrier["repaired"] / barrier["aligned"],
        "train_seconds": train_seconds,
        "repair_seconds": sum(repair_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "vgg9"], choices=sorted(ARCHITECTURES)
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--repair-samples", type=int, default=10000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-npz", type=Path)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist(args.data_npz)
    results = []
    for name in args.models:
        r = measure(name, data, args)
        results.append(r)
        acc = r["test_accuracy"]
        print(
            f"{name}: endpoints {100 * acc['a']:.2f}% / {100 * acc['b']:.2f}%, midpoint naive "
            f"{100 * acc['naive']:.2f}%, aligned {100 * acc['aligned']:.2f}%, aligned+REPAIR "
            f"{100 * acc['repaired']:.2f}%; loss barrier naive {r['barrier']['naive']:.4f}, "
            f"aligned {r['barrier']['aligned']:.4f}, "
            f"aligned+REPAIR {r['barrier']['repaired']:.4f}: REPAIR removes "
            f"{100 * r['reduction']:.1f}% (accepted: >= {100 * ACCEPTED_REDUCTION:.0f}%) "
            f"[train {r['train_seconds']:.0f} s, repair {r['repair_seconds']:.1f} s]",
            flush=True,
        )
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
