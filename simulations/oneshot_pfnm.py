"""One-shot fusion on Fashion-MNIST (issue 4, study a; benchmarks.md "one-shot fusion").

J=10 clients, Dirichlet(0.5) label skew, an MLP 784-100-10 trained 10 local epochs on each client
from its own random init; then one fusion, no further training. Compared: mean and best local
model, the prediction ensemble (mean softmax), naive parameter averaging, weight matching to client
0 then averaging, PFNM with defaults, and PFNM with (sigma, sigma0, gamma) picked from the
reference's grid by the clients' summed training accuracy (the server sees only those numbers).

    .venv/bin/python simulations/oneshot_pfnm.py --out docs/results/oneshot_pfnm.json
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch

from fedalign.align import apply_permutation, permutation_spec, weight_matching
from fedalign.data import federation
from fedalign.fusion import pfnm, pfnm_grid_search, weighted_average
from fedalign.models import build_model
from fedalign.training import evaluate, predict_logits, train_local

GRID = "PFNM (grid by clients' train accuracy)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan", action="store_true",
                        help="also print width and accuracy over a (sigma, sigma0, gamma) grid")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    fed = federation("fashion-mnist", args.clients, "dirichlet", seed=args.seed, val_fraction=0.0,
                     alpha=args.alpha, min_partition_size=10)
    X_test, y_test = fed.test
    clients = [fed.client(j) for j in range(args.clients)]
    counts = [np.bincount(c.y_train, minlength=10).tolist() for c in clients]

    t0 = time.perf_counter()
    models = []
    for j, c in enumerate(clients):
        torch.manual_seed(1000 + j)                     # every client starts from its own init
        model = build_model("mlp", hidden=[args.hidden])
        train_local(model, c.X_train, c.y_train, epochs=args.epochs, batch_size=64, optimizer="sgd",
                    lr=0.01, momentum=0.9, seed=j)
        models.append(model.eval())
    train_seconds = time.perf_counter() - t0

    def accuracy(model) -> float:
        return evaluate(model, X_test, y_test)[1]

    def clients_train_accuracy(model) -> float:
        """What the federation would compute: each client scores the model on its own data."""
        correct = sum(evaluate(model, c.X_train, c.y_train)[1] * len(c.y_train) for c in clients)
        return correct / sum(len(c.y_train) for c in clients)

    rows: dict[str, dict] = {}
    local = [accuracy(m) for m in models]
    rows["local (mean)"] = {"accuracy": float(np.mean(local)), "width": args.hidden}
    rows["local (best)"] = {"accuracy": float(np.max(local)), "width": args.hidden}
    probs = torch.stack([predict_logits(m, X_test).softmax(1) for m in models]).mean(0)
    rows["prediction ensemble"] = {"accuracy": float((probs.argmax(1) == torch.as_tensor(y_test)).float().mean()),
                                   "width": args.hidden * args.clients}
    sizes = [len(c.y_train) for c in clients]
    naive = build_model("mlp", hidden=[args.hidden])
    naive.load_state_dict(weighted_average([m.state_dict() for m in models], sizes))
    rows["parameter average"] = {"accuracy": accuracy(naive), "width": args.hidden}

    spec = permutation_spec(models[0])
    t = time.perf_counter()
    aligned = [models[0].state_dict()] + [
        apply_permutation(spec, weight_matching(spec, models[0].state_dict(), m.state_dict()), m.state_dict())
        for m in models[1:]]
    wm = build_model("mlp", hidden=[args.hidden])
    wm.load_state_dict(weighted_average(aligned, sizes))
    rows["weight matching + average"] = {"accuracy": accuracy(wm), "width": args.hidden,
                                         "seconds": time.perf_counter() - t}

    t = time.perf_counter()
    fused, assignment = pfnm(models, counts)
    rows["PFNM (sigma=sigma0=gamma=1)"] = {"accuracy": accuracy(fused), "width": assignment.widths[0],
                                           "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    fused, assignment, chosen = pfnm_grid_search(models, counts, clients_train_accuracy)
    rows[GRID] = {
        "accuracy": accuracy(fused), "width": assignment.widths[0], "seconds": time.perf_counter() - t,
        "chosen": chosen}

    print(f"J={args.clients}, Dirichlet({args.alpha}), MLP 784-{args.hidden}-10, {args.epochs} local epochs "
          f"(training {train_seconds:.0f} s)\n")
    print("| method | test accuracy (%) | global width | fusion seconds |\n|---|---|---|---|")
    for name, r in rows.items():
        seconds = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        print(f"| {name} | {100 * r['accuracy']:.2f} | {r['width']} | {seconds} |")
    print(f"\ngrid choice: {rows[GRID]['chosen']}")
    if args.scan:
        print("\n| sigma | sigma0 | gamma | global width | test accuracy (%) |\n|---|---|---|---|---|")
        for sigma, sigma0, gamma in product((0.1, 0.3), (1.0, 10.0), (1e-3, 1.0, 5.0, 20.0)):
            fused, assignment = pfnm(models, counts, sigma=sigma, sigma0=sigma0, gamma=gamma)
            print(f"| {sigma} | {sigma0} | {gamma} | {assignment.widths[0]} | {100 * accuracy(fused):.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
