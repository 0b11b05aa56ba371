r"""Server-side alignment at scale (issue 17): J wide clients (MLP 784-W-10) weight-matched to one
reference, against the J Hungarian solves that alignment cannot avoid, in the same run.

A single hidden layer has one permutation group, so weight matching needs one solve per client: its
score matrix (a float64 W x W product), the Hungarian solve, and the objective bookkeeping. The
baseline is the J solves alone on one core, each on the score matrix of the identity start (built
untimed, one at a time, so J matrices of W^2 float64 never sit in memory together); the baseline and
the alignment alternate over chunks of ``--chunk`` clients, so that on a shared machine both see the
same load. The alignment runs with ``fedalign.algorithms.align.parallel.match_all`` on ``--workers``
processes (default: every core); ``--sequential`` also times it on one. The permutations must equal
the solves' (for one group, weight matching's answer is that solve), which the script checks.

    .venv/bin/python simulations/bench_wide_alignment.py --clients 32 --width 4096 \
        --out docs/results/bench_wide_alignment.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fedalign.algorithms.align import identity_permutation, permutation_spec
from fedalign.algorithms.align.parallel import match_all
from fedalign.algorithms.align.solvers import hungarian
from fedalign.algorithms.align.weight_matching import group_scores
from fedalign.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sequential", action="store_true", help="also time one process")
    parser.add_argument("--chunk", type=int, default=8, help="clients per alternation")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    states = []
    for j in range(args.clients + 1):
        torch.manual_seed(j)
        states.append(build_model("mlp", hidden=[args.width]).state_dict())
    spec = permutation_spec(build_model("mlp", hidden=[args.width]))
    (group,) = spec.sizes
    reference, clients = states[0], states[1:]
    double = {k: v.double() for k, v in reference.items()}
    identity = identity_permutation(spec)

    # Baseline and alignment alternate over chunks of clients, so that both see the same load on
    # a shared machine (one pool per chunk: its start-up counts against the alignment).
    solves, timed = 0.0, dict.fromkeys(([1] if args.sequential else []) + [args.workers], 0.0)
    for start in range(0, args.clients, args.chunk):
        chunk = clients[start : start + args.chunk]
        expected = []
        for sd in chunk:
            other = {k: v.double() for k, v in sd.items()}
            scores = group_scores(spec, group, double, other, identity)
            t0 = time.perf_counter()
            expected.append(hungarian(scores))
            solves += time.perf_counter() - t0
            del scores
        for workers in timed:
            t0 = time.perf_counter()
            perms = match_all(spec, reference, chunk, "weight", workers=workers)
            timed[workers] += time.perf_counter() - t0
            if not all(torch.equal(p[group], e) for p, e in zip(perms, expected)):
                raise SystemExit(f"weight matching on {workers} worker(s) differs from the solves")

    row = {
        "clients": args.clients,
        "mlp": f"784-{args.width}-10",
        "solves_s": round(solves, 2),
        "solve_mean_s": round(solves / args.clients, 3),
        **{f"align_{w}_workers_s": round(s, 2) for w, s in timed.items()},
        **{f"ratio_{w}_workers": round(s / solves, 3) for w, s in timed.items()},
        "same_permutations": True,
        "cores": os.cpu_count(),
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(row), flush=True)
    print(
        f"{args.clients} clients 784-{args.width}-10: solves alone {solves:.2f} s; alignment on "
        f"{args.workers} workers {timed[args.workers]:.2f} s = "
        f"{timed[args.workers] / solves:.2f}x the solves (target <= 1.5x)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
