"""Issue 13's measurement: coordinate-wise robust rules need aligned clients.

One-shot fusion of J MLPs trained from their own initialisations on digits (Dirichlet(alpha)
partitions): each robust fuse rule (median, trimmed mean, Multi-Krum, Bulyan) and the mean, without
alignment and after weight matching to the weighted target (MergeMany's mean of the others) or to
the robust one (the medoid client, then the coordinate-wise median: the default behind a robust
rule, issue 23), with all clients honest and with one Byzantine client in place of the last: a
sign-flipping attacker (its weights times -10; a positive scale alone would leave a ReLU network's
predictions as they are) or a random model at 20x scale. The rules run through
``fedalign.algorithms.pipeline.aggregate``, the function the strategies call. Without alignment, a
coordinate-wise median of permuted networks mixes unrelated neurons; aligned first, it compares like
with like, provided the attacker does not choose the alignment.

    .venv/bin/python simulations/robust_alignment.py --out docs/results/robust_alignment.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.pipeline import Plan, aggregate
from fedalign.client.training import evaluate
from fedalign.data import federation
from fedalign.models import build_model, fit_to_state
from fedalign.runs.studies import baseline_rows, train_from_own_inits, write_json

RULES = [
    ("mean", {}),
    ("median", {}),
    ("trimmed-mean", {"beta": 0.2}),
    ("multi-krum", {"num_byzantine": 1}),
    ("bulyan", {"num_byzantine": 1}),
]
ALIGNMENTS = [
    ("none", {}),
    ("weight", {"align_target": "weighted"}),
    ("weight", {"align_target": "robust"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=7)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/robust_alignment.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    fed = federation(
        "digits", args.clients, "dirichlet", seed=args.seed, val_fraction=0.0, alpha=args.alpha
    )
    X_test, y_test = (torch.as_tensor(a) for a in fed.test)
    clients = [fed.client(j) for j in range(args.clients)]

    def build() -> torch.nn.Module:
        return build_model("mlp", in_features=64, hidden=[args.hidden], num_classes=10)

    models = train_from_own_inits(
        build,
        [(c.X_train, c.y_train) for c in clients],
        [1000 + j for j in range(args.clients)],
        epochs=args.epochs,
        batch_size=16,
        lr=0.1,
    )
    local, rows = baseline_rows(models, X_test, y_test)
    spec = permutation_spec(models[0])
    weights = [float(len(c.y_train)) for c in clients]
    honest = [m.state_dict() for m in models]
    torch.manual_seed(args.seed + 10_000)
    random_model = build().state_dict()
    attacks = {
        "honest": honest,
        "sign-flip x10": [*honest[:-1], {k: -10 * v for k, v in honest[-1].items()}],
        "random x20": [*honest[:-1], {k: 20 * v for k, v in random_model.items()}],
    }
    table: dict[str, dict[str, float]] = {}
    for rule, options in RULES:
        for align, target in ALIGNMENTS:
            plan = Plan(align=align, fuse=rule, options={**options, **target})
            align_label = f"{align}, {target['align_target']} target" if target else align
            for label, states in attacks.items():
                outcome = aggregate(
                    plan,
                    spec,
                    states,
                    weights,
                    [{} for _ in states],
                    lambda ref, others: {},
                    lambda fused, targets: [],
                    seed=args.seed,
                )
                fused = fit_to_state(build(), outcome.state)
                accuracy = evaluate(fused, X_test, y_test)[1]
                table.setdefault(f"{rule} ({align_label})", {})[label] = accuracy
                print(f"{rule:13s} {align_label:24s} {label:14s} test accuracy {accuracy:.4f}")
    write_json(
        args.out,
        {
            "command": "simulations/robust_alignment.py "
            + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
            "local_accuracy": local,
            "baselines": rows,
            "fusion": table,
            "mean_local": float(np.mean(local)),
        },
    )


if __name__ == "__main__":
    main()
