"""Benchmark B4: server aggregation cost of weight matching against FedAvg's average.

J clients hold an MLP 784-w-10, each trained from its own initialisation on its own IID shard of
Fashion-MNIST (``--train-epochs``; 0 keeps the random initialisations). FedAvg averages the J state
dicts. Weight matching aligns clients 1..J-1 to client 0 and then averages: for each client, build
the hidden group's score matrix ``W1_0 W1_j^T + b1_0 b1_j^T + W2_0^T W2_j`` (matrix products,
``group_scores``), solve it (Hungarian or Sinkhorn, ``solve_assignment``), permute the client.
Every phase is timed over all J-1 clients; ratios are to FedAvg's average measured in the same run.

Times are medians of ``--repeats`` runs, fewer when the repeats would pass ``--budget`` seconds;
a solver cell whose estimated single run (one solve x (J-1)) passes the budget is skipped and shows
that estimate, and a run that passes the budget anyway is stopped and shows how far it got.
Sinkhorn runs only up to ``--sinkhorn-max-width``, because one wide solve alone takes minutes on a
CPU.

    .venv/bin/python simulations/bench_aggregation.py --out docs/results/bench_aggregation.md
    .venv/bin/python simulations/bench_aggregation.py --quick
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from fedalign.algorithms.align import apply_permutation, permutation_spec, solve_assignment
from fedalign.algorithms.align.weight_matching import group_scores
from fedalign.client.training import train_local
from fedalign.core.tensors import weighted_average
from fedalign.data import load_dataset
from fedalign.models import build_model
from fedalign.runs.studies import write_json

SOLVERS = ("hungarian", "sinkhorn")
StateDict = dict[str, torch.Tensor]


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def affordable_repeats(single: float, repeats: int, budget: float) -> int:
    """As many of ``repeats`` as fit in ``budget`` given one run of ``single`` seconds (at
    least 1)."""
    return max(1, min(repeats, int(budget // max(single, 1e-9))))


def make_clients(
    width: int,
    count: int,
    epochs: int,
    samples: int,
    X: torch.Tensor | None,
    y: torch.Tensor | None,
) -> list[StateDict]:
    """``count`` MLP state dicts, client ``j`` initialised with seed ``j`` and trained on the
    ``j``-th of ``count`` disjoint IID shards (a fixed shuffle of the training set) of at most
    ``samples`` examples."""
    order = (
        torch.randperm(len(y), generator=torch.Generator().manual_seed(1234)) if epochs else None
    )
    states = []
    for j in range(count):
        torch.manual_seed(j)
        model = build_model("mlp", hidden=[width])
        if order is not None:
            shard = order[j::count][:samples]
            train_local(
                model,
                X[shard],
                y[shard],
                epochs=epochs,
                batch_size=64,
                optimizer="adam",
                lr=1e-3,
                seed=j,
            )
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def bench_width(
    width: int, client_counts: list[int], states: list[StateDict], args: argparse.Namespace
) -> list[dict]:
    """Rows (one per J) of phase times for clients of one width."""
    spec = permutation_spec(build_model("mlp", hidden=[width]))
    (group,) = spec.sizes  # one hidden layer: one permutation group
    identity = {group: torch.arange(width)}
    ref = states[0]
    options = {
        "sinkhorn": {} if args.sinkhorn_reg is None else {"reg": args.sinkhorn_reg},
        "hungarian": {},
    }

    def scores(sd: StateDict) -> torch.Tensor:
        return group_scores(spec, group, ref, sd, identity)

    def build_all(clients: list[StateDict]) -> list[torch.Tensor]:
        return [scores(sd) for sd in clients]

    def permute_all(
        perms: list[dict[str, torch.Tensor]], clients: list[StateDict]
    ) -> list[StateDict]:
        return [apply_permutation(spec, p, sd) for p, sd in zip(perms, clients)]

    # one solve of client 1's scores per solver: what the budget estimates are made from
    first = scores(states[1])
    single: dict[str, float | None] = {}
    for s in SOLVERS:
        if s == "sinkhorn" and width > args.sinkhorn_max_width:
            single[s] = None
        else:
            single[s] = timed(lambda s=s: solve_assignment(first, s, **options[s]), 1)
    rows = []
    for J in client_counts:
        clients = states[1:J]
        average = partial(weighted_average, states[:J])
        avg = timed(average, affordable_repeats(timed(average, 1), args.repeats, args.budget))
        build_fn = partial(build_all, clients)
        build = timed(build_fn, affordable_repeats(timed(build_fn, 1), args.repeats, args.budget))
        perms = [{group: solve_assignment(scores(sd))} for sd in clients]
        permute = timed(partial(permute_all, perms, clients), args.repeats)
        row: dict = {
            "width": width,
            "J": J,
            "fedavg_average_s": avg,
            "cost_build_s": build,
            "permute_s": permute,
        }
        for s in SOLVERS:
            if single[s] is None:
                row[f"{s}_solve_s"] = f"skipped (width > {args.sinkhorn_max_width})"
                continue
            estimate = single[s] * len(clients)
            if estimate > args.budget:
                row[f"{s}_solve_s"] = f"skipped (~{estimate:.0f} s)"
                continue
            # build each client's matrix outside the timer, time its solve; repeat the whole pass.
            # Sinkhorn's iteration count varies a lot between matrices, so a pass that passes the
            # budget is stopped and reported as such rather than trusted to the estimate.
            passes = []
            for _ in range(affordable_repeats(estimate, args.repeats, args.budget)):
                total, done = 0.0, 0
                for sd in clients:
                    S = scores(sd)
                    t0 = time.perf_counter()
                    solve_assignment(S, s, **options[s])
                    total += time.perf_counter() - t0
                    done += 1
                    if total > args.budget and done < len(clients):
                        break
                if done < len(clients):
                    passes = f"stopped: {total:.0f} s for {done} of {len(clients)}"
                    break
                passes.append(total)
            if isinstance(passes, str):
                row[f"{s}_solve_s"] = passes
                continue
            row[f"{s}_solve_s"] = statistics.median(passes)
            row[f"wm_{s}_over_fedavg"] = (build + row[f"{s}_solve_s"] + permute + avg) / avg
        rows.append(row)
        print(markdown_row(row), flush=True)
    return rows


def markdown_row(row: dict) -> str:
    def cell(v: float | str) -> str:
        return v if isinstance(v, str) else f"{v:.4f}"

    def ratio(s: str) -> str:
        key = f"wm_{s}_over_fedavg"
        return f"{row[key]:.0f}x" if key in row else "-"

    return (
        f"| {row['width']} | {row['J']} | {cell(row['fedavg_average_s'])} | "
        f"{cell(row['cost_build_s'])} | {cell(row['hungarian_solve_s'])} | "
        f"{cell(row['sinkhorn_solve_s'])} | {cell(row['permute_s'])} | "
        f"{ratio('hungarian')} | {ratio('sinkhorn')} |"
    )


HEADER = (
    "| width | J | FedAvg average (s) | cost build (s) | Hungarian solve (s) | Sinkhorn solve (s) "
    "| permute (s) | WM+Hungarian / FedAvg | WM+Sinkhorn / FedAvg |\n" + "|" + "---|" * 9
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32], help="values of J")
    parser.add_argument(
        "--train-epochs", type=int, default=1, help="local epochs per client (0: untrained)"
    )
    parser.add_argument(
        "--samples-per-client", type=int, default=1875, help="shard size cap (60000 / 32)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds allowed per timed cell"
    )
    parser.add_argument("--sinkhorn-max-width", type=int, default=1024)
    parser.add_argument(
        "--sinkhorn-reg", type=float, default=None, help="default: the solver's own"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (two threads on a shared 2-core machine ran erratically slower)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="widths 64 256, J 2 4, 1 repeat, 1 epoch"
    )
    parser.add_argument(
        "--out", type=Path, help="write the markdown table here and the rows next to it as .json"
    )
    args = parser.parse_args()
    if args.quick:
        args.widths, args.clients, args.repeats = [64, 256], [2, 4], 1
    if min(args.clients) < 2:
        raise SystemExit("J must be at least 2 (one reference and one client to match)")
    torch.set_num_threads(args.threads)
    X = y = None
    if args.train_epochs:
        X, y = (torch.as_tensor(a) for a in load_dataset("fashion-mnist", "train"))
    print(HEADER, flush=True)
    rows, train_seconds = [], {}
    t_start = time.perf_counter()
    for width in args.widths:
        t0 = time.perf_counter()
        states = make_clients(
            width, max(args.clients), args.train_epochs, args.samples_per_client, X, y
        )
        train_seconds[width] = time.perf_counter() - t0
        rows += bench_width(width, args.clients, states, args)
    total = time.perf_counter() - t_start
    print(
        f"\ntotal {total:.0f} s, of which client training {sum(train_seconds.values()):.0f} s "
        f"({platform.processor() or platform.machine()}, torch threads {args.threads})"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(HEADER + "\n" + "\n".join(markdown_row(r) for r in rows) + "\n")
        meta = {k: v for k, v in vars(args).items() if k != "out"}
        write_json(
            args.out.with_suffix(".json"),
            {
                "settings": meta,
                "train_seconds": train_seconds,
                "total_seconds": total,
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
