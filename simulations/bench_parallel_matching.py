r"""Server-side parallel alignment: J clients matched to one reference, sequentially and on a pool
of worker processes, in the same run (issue 6). Clients are independently initialised MLPs (the
matching's cost does not depend on training); times are the median of ``--repeats`` runs,
pool start-up included.

    .venv/bin/python simulations/bench_parallel_matching.py \
        --out docs/results/bench_parallel_matching.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.align.parallel import match_all
from fedalign.models import build_model

CASES = (("weight", [512, 512], {"restarts": 3}), ("sinkhorn-rebasin", [100], {"steps": 100}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for method, hidden, options in CASES:
        for J in args.clients:
            states = []
            for j in range(J + 1):
                torch.manual_seed(j)
                states.append(build_model("mlp", hidden=hidden).state_dict())
            spec = permutation_spec(build_model("mlp", hidden=hidden))
            times = {}
            for workers in (1, args.workers):
                runs = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    match_all(spec, states[0], states[1:], method, workers=workers, **options)
                    runs.append(time.perf_counter() - t0)
                times[workers] = statistics.median(runs)
            row = {
                "method": method,
                "mlp": "784-" + "-".join(map(str, hidden)) + "-10",
                "clients": J,
                "options": options,
                "sequential_s": times[1],
                "parallel_s": times[args.workers],
                "workers": args.workers,
                "speedup": times[1] / times[args.workers],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| method | MLP | clients | sequential (s) | " + f"{args.workers} workers (s) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} {r['options']} | {r['mlp']} | {r['clients']} | {r['sequential_s']:.2f} | "
        f"{r['parallel_s']:.2f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    table = (
        "\n".join(lines)
        + f"\n\nload average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n"
    )
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
