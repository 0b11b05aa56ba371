"""Benchmark B4: server aggregation cost of weight matching against FedAvg's average.

J clients hold a one-hidden-layer MLP (784-w-10). FedAvg averages the J state dicts; weight
matching aligns clients 1..J-1 to client 0 (one group: build its score matrix with matrix products,
then solve it with the Hungarian algorithm or Sinkhorn) before averaging. Times are medians of
``--repeats`` runs on this machine; ratios are to FedAvg's average measured in the same run.
Cells whose estimated time exceeds ``--budget`` seconds are skipped and marked with the estimate.

    .venv/bin/python simulations/bench_aggregation.py --out docs/results/bench_aggregation.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fedalign.align import permutation_spec, solve_assignment
from fedalign.align.weight_matching import group_scores
from fedalign.fusion.mean import weighted_average
from fedalign.models import build_model


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def clients(width: int, count: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for j in range(count):
        torch.manual_seed(j)
        out.append(build_model("mlp", hidden=[width]).state_dict())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per cell and solver")
    parser.add_argument("--sinkhorn-max-width", type=int, default=1024,
                        help="wider layers skip Sinkhorn (one 4096 solve took ~400 s on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="widths 64 256, J 2 4, 1 repeat")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.clients, args.repeats = [64, 256], [2, 4], 1
    torch.set_num_threads(2)
    header = ("| width | J | FedAvg average (s) | cost build (s) | Hungarian solve (s) | Sinkhorn solve (s) "
              "| WM+Hungarian / FedAvg | WM+Sinkhorn / FedAvg |")
    lines = [header, "|" + "---|" * 8]
    print(header)
    for width in args.widths:
        states = clients(width, max(args.clients))
        spec = permutation_spec(build_model("mlp", hidden=[width]))
        group = next(iter(spec.sizes))
        ref = states[0]
        perms = {group: torch.arange(width)}
        scores = group_scores(spec, group, ref, states[1], perms)
        one_build = timed(lambda: group_scores(spec, group, ref, states[1], perms), args.repeats)
        solvers = ["hungarian"] + (["sinkhorn"] if width <= args.sinkhorn_max_width else [])
        one_solve = {s: timed(lambda s=s: solve_assignment(scores, s), 1) for s in solvers}
        for J in args.clients:
            avg = timed(lambda: weighted_average(states[:J]), args.repeats)
            build = timed(lambda: [group_scores(spec, group, ref, sd, perms) for sd in states[1:J]], args.repeats)
            solve: dict[str, float | str] = {"sinkhorn": f"skipped (width > {args.sinkhorn_max_width})"}
            for s, single in one_solve.items():
                estimate = single * (J - 1) * args.repeats
                if estimate > args.budget:
                    solve[s] = f"skipped (~{single * (J - 1):.0f})"
                    continue
                solve[s] = timed(lambda s=s: [solve_assignment(scores, s) for _ in range(J - 1)], args.repeats)

            def ratio(s: str) -> str:
                return "-" if isinstance(solve[s], str) else f"{(build + solve[s] + avg) / avg:.0f}x"

            def fmt(v: float | str) -> str:
                return v if isinstance(v, str) else f"{v:.4f}"

            line = (f"| {width} | {J} | {avg:.4f} | {build:.4f} | {fmt(solve['hungarian'])} | "
                    f"{fmt(solve['sinkhorn'])} | {ratio('hungarian')} | {ratio('sinkhorn')} |")
            lines.append(line)
            print(line, flush=True)
        print(f"  (width {width}: one cost build {one_build:.4f} s, "
              + ", ".join(f"one {s} solve {t:.4f} s" for s, t in one_solve.items()) + ")", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
