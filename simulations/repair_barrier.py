"""How much of the midpoint loss barrier of weight-matched networks REPAIR removes (issue 5).

Two networks of one architecture trained on Fashion-MNIST from different seeds; the second is
aligned to the first by weight matching; the midpoint of the aligned pair is evaluated on the test
set as it is and after REPAIR (``fedalign.repair.repair_with_data``: per-channel statistics of the
endpoints and of the fused model on ``--repair-samples`` training images, the correction folded
into the layers). The barrier is the midpoint's test loss minus the mean of the endpoints' losses;
the issue asks REPAIR to remove at least half of the barrier that alignment leaves.

    .venv/bin/python simulations/repair_barrier.py --models mlp mlp-deep vgg9 --out docs/results/repair_barrier.json

``--data-npz`` reads the four arrays (``X_train, y_train, X_test, y_test``) from one file instead of
``fedalign.data`` (machines without the data packages).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedalign.align import apply_permutation, permutation_spec, weight_matching
from fedalign.analysis import interpolate
from fedalign.models import build_model
from fedalign.repair import repair_with_data
from fedalign.training import evaluate, train_local

ACCEPTED_REDUCTION = 0.5
ARCHITECTURES = {                                  # label -> (zoo model, options)
    "mlp": ("mlp", {"hidden": [512, 512, 512]}),
    "mlp-deep": ("mlp", {"hidden": [256] * 6}),
    "vgg9": ("vgg9", {}),
}


def load(npz: Path | None) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST train and test arrays as tensors."""
    if npz is not None:
        arrays = np.load(npz)             # uint8 images (scaled to [0, 1] here) and labels
        X, y, X_test, y_test = (torch.as_tensor(arrays[k]) for k in ("X_train", "y_train", "X_test", "y_test"))
        return X.float() / 255, y.long(), X_test.float() / 255, y_test.long()
    from fedalign.data import load_dataset

    (X, y), (X_test, y_test) = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    return tuple(torch.as_tensor(a) for a in (X, y, X_test, y_test))


def build(label: str) -> torch.nn.Module:
    name, options = ARCHITECTURES[label]
    return build_model(name, **options)


def train(label: str, seed: int, X: torch.Tensor, y: torch.Tensor, epochs: int, device: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(label)
    train_local(model, X, y, epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3, seed=seed, device=device)
    return model.cpu().eval()


def with_state(label: str, state) -> torch.nn.Module:
    out = build(label)
    out.load_state_dict(state)
    return out.eval()


def measure(label: str, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict:
    """Endpoint, midpoint and repaired-midpoint test losses/accuracies of one architecture."""
    X, y, X_test, y_test = data
    t0 = time.perf_counter()
    a, b = (train(label, seed, X, y, args.epochs, args.device) for seed in args.seeds)
    train_seconds = time.perf_counter() - t0
    spec = permutation_spec(a)
    aligned = with_state(label, apply_permutation(spec, weight_matching(spec, a.state_dict(), b.state_dict()),
                                               b.state_dict()))
    naive = with_state(label, interpolate(a.state_dict(), b.state_dict(), 0.5))
    mid = with_state(label, interpolate(a.state_dict(), aligned.state_dict(), 0.5))
    sample = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:args.repair_samples]]
    t0 = time.perf_counter()
    repaired = with_state(label, repair_with_data(mid, [a, aligned], sample))
    repair_seconds = time.perf_counter() - t0
    scores = {k: evaluate(m, X_test, y_test, device=args.device) for k, m in
              (("a", a), ("b", b), ("naive", naive), ("aligned", mid), ("repaired", repaired))}
    chord = (scores["a"][0] + scores["b"][0]) / 2
    barrier = {k: scores[k][0] - chord for k in ("naive", "aligned", "repaired")}
    return {"model": label, "architecture": ARCHITECTURES[label], "epochs": args.epochs, "seeds": args.seeds,
            "repair_samples": args.repair_samples, "test_loss": {k: s[0] for k, s in scores.items()},
            "test_accuracy": {k: s[1] for k, s in scores.items()}, "barrier": barrier,
            "reduction": 1 - barrier["repaired"] / barrier["aligned"],
            "train_seconds": train_seconds, "repair_seconds": repair_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "vgg9"], choices=sorted(ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--repair-samples", type=int, default=10000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-npz", type=Path)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.data_npz)
    results = []
    for name in args.models:
        r = measure(name, data, args)
        results.append(r)
        acc = r["test_accuracy"]
        print(f"{name}: endpoints {100 * acc['a']:.2f}% / {100 * acc['b']:.2f}%, midpoint naive "
              f"{100 * acc['naive']:.2f}%, aligned {100 * acc['aligned']:.2f}%, aligned+REPAIR "
              f"{100 * acc['repaired']:.2f}%; loss barrier naive {r['barrier']['naive']:.4f}, aligned "
              f"{r['barrier']['aligned']:.4f}, aligned+REPAIR {r['barrier']['repaired']:.4f}: REPAIR removes "
              f"{100 * r['reduction']:.1f}% (accepted: >= {100 * ACCEPTED_REDUCTION:.0f}%) "
              f"[train {r['train_seconds']:.0f} s, repair {r['repair_seconds']:.1f} s]", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
