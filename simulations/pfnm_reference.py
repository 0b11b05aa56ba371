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
import json
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
from oneshot_pfnm import local_models  # this folder is the script's: on sys.path

from fedalign.algorithms.fusion import REFERENCE_GRID, pfnm
from fedalign.algorithms.fusion.bbp_map import POPULARITY
from fedalign.algorithms.fusion.neural_matching import grid_sweep_orders
from fedalign.client.training import evaluate
from fedalign.core.registry import keyword_defaults
from fedalign.data import federation
from fedalign.models import MLP
from fedalign.runs.studies import write_json

SIDES = ("reference", "fedalign", "fedalign uncapped")


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


def fuse(side: str, module, models: list[MLP], counts: np.ndarray, point, seed: int, args) -> MLP:
    """One fusion by ``side`` at grid point ``point`` = (sigma, sigma0, gamma)."""
    sigma, sigma0, gamma = point
    if side == "reference":
        return reference_fuse(module, models, counts, sigma, sigma0, gamma, seed)
    cap = args.max_width if side == "fedalign" else None
    options = {
        "max_width": cap,
        "popularity": args.popularity,
        "popularity_cap": args.popularity_cap,
        "restarts": args.restarts,
        "seed": seed,
    }
    return pfnm(models, counts, sigma=sigma, sigma0=sigma0, gamma=gamma, **options)[0]


def set_reference_cap(module, cap: int) -> None:
    """The reference hard-codes its cap (``max(700 - L, 1)`` new neurons per match, in
    ``compute_cost``); a smaller study scales it by swapping that constant in the imported
    function's code object (its source is left as it is)."""
    code = module.compute_cost.__code__
    if 700 not in code.co_consts:
        raise SystemExit("the reference's compute_cost has no 700 cap to change")
    consts = tuple(cap if c == 700 else c for c in code.co_consts)
    module.compute_cost.__code__ = code.replace(co_consts=consts)


def table(paths: list[Path]) -> str:
    """A markdown table of the picks in ``--out`` files (any mix of sides): one row per hidden
    widths, seed and J; per side (fedalign's with its popularity term) the pick's test accuracy,
    widths and grid point, and the seconds of all its fusions of the grid."""
    columns: dict[str, None] = {}
    cells: dict[tuple, dict[str, str]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        setting = result["setting"]
        for pick in result["picks"]:
            side = pick["side"]
            key = (tuple(setting["hidden"]), pick["seed"], pick["clients"])
            mine = [
                r
                for r in result["rows"]
                if (r["side"], r["seed"], r["clients"]) == (side, key[1], key[2])
            ]
            seconds = sum(r["seconds"] for r in mine)
            if side != "reference":
                term = setting.get("popularity", "consistent")
                if setting.get("popularity_cap") is not None:
                    term += f", count <= {setting['popularity_cap']}"
                if setting.get("restarts", 1) != 1:
                    term += f", {setting['restarts']} restarts"
                orders = len({r.get("sweep_seed") for r in mine})
                if orders > 1:
                    term += f", {orders} sweep orders"
                side += f" ({term})"
            columns[side] = None
            point = f"{pick['sigma']:g}, {pick['sigma0']:g}, {pick['gamma']:g}"
            cells.setdefault(key, {})[side] = (
                f"{pick['test']:.4f} ({' / '.join(map(str, pick['widths']))}; {point}; "
                f"{seconds:.1f} s)"
            )
    lines = [
        "| hidden | seed | J | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (hidden, seed, J), row in sorted(cells.items()):
        shape = "-".join(map(str, hidden))
        lines.append(
            f"| {shape} | {seed} | {J} | " + " | ".join(row.get(c, "") for c in columns) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, help="the reference checkout (see above)")
    parser.add_argument(
        "--table",
        type=Path,
        nargs="+",
        help="print the picks of these --out files side by side per setting, and run nothing",
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[16], help="one row per J")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, nargs="+", default=[200], help="hidden widths")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0], help="one row each")
    parser.add_argument(
        "--max-width",
        type=int,
        default=700,
        help="both sides' cap (the reference's is 700; another value is set in its code object)",
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
    parser.add_argument(
        "--sides", nargs="+", choices=SIDES, default=list(SIDES), help="which fusions to run"
    )
    parser.add_argument(
        "--popularity",
        choices=POPULARITY,
        default=keyword_defaults(pfnm)["popularity"],
        help="fedalign's popularity term (the reference's is 'reference')",
    )
    parser.add_argument(
        "--popularity-cap",
        type=lambda v: None if v == "none" else int(v),
        default=keyword_defaults(pfnm)["popularity_cap"],
        help="fedalign counts at most this many clients in the popularity term, 'none': all "
        "(the reference counts at most 10)",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=keyword_defaults(pfnm)["restarts"],
        help="fedalign's sweep orders per layer, the best log posterior kept",
    )
    parser.add_argument(
        "--sweep-orders",
        type=int,
        help="fedalign fuses each grid point with this many sweep seeds, all picked among alike "
        "(default: pfnm_grid_search's, 4 under the cap, 1 uncapped)",
    )
    parser.add_argument(
        "--sweep-offset",
        type=int,
        default=0,
        help="sweep seeds start at the client set's seed plus this (a repeat of a setting with "
        "other sweep orders on the same clients)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fedalign-oneshot-cache"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.reference is None:
        parser.error("--reference is required (unless --table)")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.reference))
    module = importlib.import_module("matching.pfnm")
    if args.max_width != 700:
        set_reference_cap(module, args.max_width)

    grid = (
        list(product(REFERENCE_GRID["sigma"], REFERENCE_GRID["sigma0"], REFERENCE_GRID["gamma"]))
        if args.grid == "reference"
        else [(1.0, 1.0, 1.0)]
    )
    grid = [point for point in grid if not args.gammas or point[2] in args.gammas]
    repeats = 1 if args.grid == "reference" else 3
    rows, picks = [], []
    for seed, J in product(args.seeds, args.clients):
        fed = federation(
            "fashion-mnist",
            J,
            "dirichlet",
            seed=seed,
            val_fraction=0.0,
            alpha=args.alpha,
            min_partition_size=10,
        )
        clients = [fed.client(j) for j in range(J)]
        counts = np.array([np.bincount(c.y_train, minlength=10) for c in clients])
        models, _ = local_models(
            argparse.Namespace(**vars(args) | {"clients": J, "seed": seed}), clients
        )
        X_train = np.concatenate([c.X_train for c in clients])
        y_train = np.concatenate([c.y_train for c in clients])
        X_test, y_test = fed.test

        mine = []
        for (sigma, sigma0, gamma), side in product(grid, args.sides):
            # fedalign's side fuses each point with --sweep-orders sweep seeds (seed, seed + 1, ...)
            cap = None if side == "fedalign uncapped" else args.max_width
            orders = (
                1  # the timing grid times one fusion
                if side == "reference" or args.grid == "timing"
                else grid_sweep_orders(args.sweep_orders, cap)
            )
            for order in range(orders):
                seconds = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    point = (sigma, sigma0, gamma)
                    sweep = seed + args.sweep_offset + order
                    fused = fuse(side, module, models, counts, point, sweep, args)
                    seconds.append(time.perf_counter() - t)
                row = {
                    "seed": seed,
                    "clients": J,
                    "side": side,
                    "sweep_seed": sweep,
                    "sigma": sigma,
                    "sigma0": sigma0,
                    "gamma": gamma,
                    "widths": [layer.out_features for layer in fused.layers[:-1]],
                    "seconds": min(seconds),
                    "train": evaluate(fused, X_train, y_train)[1],
                    "test": evaluate(fused, X_test, y_test)[1],
                }
                mine.append(row)
                print(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
                    flush=True,
                )
        for side in args.sides:
            pick = max((r for r in mine if r["side"] == side), key=lambda r: r["train"])
            picks.append(pick)  # the reference's rule: the best clients' training accuracy
            print("pick", pick, flush=True)
        rows += mine
        if args.out:  # after every setting: a stopped study keeps what it finished
            setting = vars(args) | {k: str(getattr(args, k)) for k in ("reference", "cache", "out")}
            write_json(args.out, {"setting": setting, "rows": rows, "picks": picks})
    if args.out:
        print(table([args.out]))


if __name__ == "__main__":
    main()
