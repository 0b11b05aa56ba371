"""Loss barrier between two independently trained MLPs, before and after weight matching.

Git Re-Basin's MLP experiment on Fashion-MNIST: two MLPs (784-512-512-10) trained from different
seeds; test-loss barrier of naive interpolation against interpolation after weight matching.

    .venv/bin/python simulations/barrier_mlp.py --epochs 5 --out docs/results/barrier_mlp.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedalign.align import apply_permutation, permutation_spec, weight_matching
from fedalign.analysis import interpolation_barrier
from fedalign.data import load_dataset
from fedalign.models import build_model
from fedalign.training import evaluate, train_local


def train(seed: int, X, y, epochs: int, hidden: list[int]) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp", hidden=hidden)
    train_local(model, X, y, epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3, seed=seed)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    X, y = load_dataset("fashion-mnist", "train")
    X_test, y_test = load_dataset("fashion-mnist", "test")
    a, b = (train(seed, X, y, args.epochs, args.hidden) for seed in (0, 1))
    spec = permutation_spec(a)
    t0 = time.perf_counter()
    perms = weight_matching(spec, a.state_dict(), b.state_dict())
    match_seconds = time.perf_counter() - t0
    b_aligned = apply_permutation(spec, perms, b.state_dict())
    naive = interpolation_barrier(a, a.state_dict(), b.state_dict(), X_test, y_test, args.points)
    matched = interpolation_barrier(a, a.state_dict(), b_aligned, X_test, y_test, args.points)
    result = {
        "setup": {"hidden": args.hidden, "epochs": args.epochs, "optimizer": "adam 1e-3, batch 128"},
        "endpoint_test_accuracy": [evaluate(m, X_test, y_test)[1] for m in (a, b)],
        "naive": naive.to_dict(),
        "weight_matching": matched.to_dict(),
        "loss_barrier_reduction": 1 - matched.loss_barrier / naive.loss_barrier,
        "weight_matching_seconds": match_seconds,
    }
    print(f"endpoints: test accuracy {100 * result['endpoint_test_accuracy'][0]:.2f}% / "
          f"{100 * result['endpoint_test_accuracy'][1]:.2f}%")
    for name, r in (("naive", naive), ("weight matching", matched)):
        mid = r.lambdas.index(0.5) if 0.5 in r.lambdas else len(r.lambdas) // 2
        print(f"{name:>16}: loss barrier {r.loss_barrier:.4f}, midpoint barrier {r.midpoint_loss_barrier:.4f}, "
              f"midpoint accuracy {100 * r.accuracy[mid]:.2f}%")
    print(f"loss barrier reduction: {100 * result['loss_barrier_reduction']:.1f}% "
          f"(weight matching took {match_seconds:.2f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
