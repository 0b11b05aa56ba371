r"""PFNM one-shot fusion beside the reference code, on the same client models (issue 14).

The reference (IBM/probabilistic-federated-neural-matching, ``matching/pfnm.py``) is imported from
a checkout given by ``--reference`` (a folder holding ``matching/pfnm.py``); nothing of it is in
this repository. Both fuse the same locally trained MLPs (J clients, Fashion-MNIST, Dirichlet
label skew, each trained from its own init); the script reports, per (sigma, sigma0, gamma) of
the reference grid, each side's global width, clients' pooled training accuracy and test
accuracy, both sides' pick by training accuracy (the reference's rule), and each fusion's seconds
timed in the same process one after the other.

    git --git-dir=<mirror of IBM/probabilistic-federated-neural-matching> show \
        HEAD:matching/pfnm.py > /tmp/refpfnm/matching/pfnm.py   # plus an empty __init__.py
    .venv/bin/python simulations/pfnm_reference.py --reference /tmp/refpfnm \
        --clients 16 --alpha 0.1 --hidden 200 --epochs 5 --optimizer adam \
        --out docs/results/pfnm_reference_J16.json
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
from oneshot_pfnm import local_models  # this folder is the script's: on sys.path

from fedalign.algorithms.fusion import REFERENCE_GRID, pfnm
from fedalign.client.training import evaluate
from fedalign.data import federation
from fedalign.models import MLP
from fedalign.runs.studies import write_json


def reference_fuse(module, models: list[MLP], counts: np.ndarray, sigma, sigma0, gamma, seed):
    """The reference's ``layer_group_descent`` on the models' weights (its layout: W as (in,
    out)), returned as a fedalign MLP."""
    weights = []
    for m in models:
        net = []
        for layer in m.layers:
            net += [layer.weight.detach().numpy().T, layer.bias.detach().numpy()]
        weights.append(net)
    np.random.seed(seed)
    out = module.layer_group_descent(
        weights,
        list(counts),
        sigma_layers=sigma,
        sigma0_layers=sigma0,
        gamma_layers=gamma,
        it=5,
    )
    widths = [out[i].shape[1] for i in range(0, len(out) - 2, 2)]
    fused = MLP(out[0].shape[0], widths, out[-1].shape[0])
    with torch.no_grad():
        for k, layer in enumerate(fused.layers):
            layer.weight.copy_(torch.as_tensor(out[2 * k].T))
            layer.bias.copy_(torch.as_tensor(out[2 * k + 1]))
    return fused


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-width", type=int, default=700, help="fedalign's cap (the reference's: 700)"
    )
    parser.add_argument(
        "--grid",
        choices=("reference", "timing"),
        default="reference",
        help="timing: only sigma=sigma0=gamma=1, both sides, three runs each",
    )
    parser.add_argument(
        "--gammas", type=float, nargs="*", help="only these gammas of the reference grid"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fedalign-oneshot-cache"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.reference))
    module = importlib.import_module("matching.pfnm")

    fed = federation(
        "fashion-mnist",
        args.clients,
        "dirichlet",
        seed=args.seed,
        val_fraction=0.0,
        alpha=args.alpha,
        min_partition_size=10,
    )
    clients = [fed.client(j) for j in range(args.clients)]
    counts = np.array([np.bincount(c.y_train, minlength=10) for c in clients])
    models, _ = local_models(args, clients)
    X_train = np.concatenate([c.X_train for c in clients])
    y_train = np.concatenate([c.y_train for c in clients])
    X_test, y_test = fed.test

    def scores(model: MLP) -> dict[str, float]:
        return {
            "train": evaluate(model, X_train, y_train)[1],
            "test": evaluate(model, X_test, y_test)[1],
        }

    sides = {
        "reference": lambda s, s0, g: reference_fuse(module, models, counts, s, s0, g, args.seed),
        "fedalign": lambda s, s0, g: pfnm(
            models, counts, sigma=s, sigma0=s0, gamma=g, max_width=args.max_width, seed=args.seed
        )[0],
        "fedalign uncapped": lambda s, s0, g: pfnm(
            models, counts, sigma=s, sigma0=s0, gamma=g, seed=args.seed
        )[0],
    }
    grid = (
        list(product(REFERENCE_GRID["sigma"], REFERENCE_GRID["sigma0"], REFERENCE_GRID["gamma"]))
        if args.grid == "reference"
        else [(1.0, 1.0, 1.0)]
    )
    grid = [point for point in grid if not args.gammas or point[2] in args.gammas]
    repeats = 1 if args.grid == "reference" else 3
    rows = []
    for sigma, sigma0, gamma in grid:
        for side, fuse in sides.items():
            seconds = []
            for _ in range(repeats):
                t = time.perf_counter()
                fused = fuse(sigma, sigma0, gamma)
                seconds.append(time.perf_counter() - t)
            row = {
                "side": side,
                "sigma": sigma,
                "sigma0": sigma0,
                "gamma": gamma,
                "width": fused.layers[0].out_features,
                "seconds": min(seconds),
                **scores(fused),
            }
            rows.append(row)
            print(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True
            )
    picks = {}
    for side in sides:
        mine = [r for r in rows if r["side"] == side]
        picks[side] = max(mine, key=lambda r: r["train"])
        print("pick", side, picks[side], flush=True)
    result = {
        "setting": vars(args)
        | {"reference": str(args.reference), "cache": str(args.cache), "out": str(args.out)},
        "local_test_accuracy": [evaluate(m, X_test, y_test)[1] for m in models],
        "rows": rows,
        "picks": picks,
    }
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
