r"""Start-up of a simulated federation at 10 / 1,000 / 10,000 nodes (issue 17), with Flower's own
message dispatch and with ``simulation.fast_dispatch`` (``fedalign/fl/dispatch.py``), each run in
a fresh process (nothing cached from the one before).

A run is the quickstart (Fashion-MNIST, Dirichlet 0.5, MLP 784-200-10) with N clients, a cohort
of ``--cohort`` (10), evaluated every round, ``--rounds`` rounds, ``--set`` overrides; issue 17's
10,000-client run is ``--nodes 10000 --cohort 100 --rounds 5 --flower-dispatch-up-to 0 --set
data.partition=iid`` (Dirichlet 0.5 cannot split Fashion-MNIST's 60,000 images among 10,000
clients: the partitioner leaves some empty at any minimum size). Printed per run: seconds from
the call of ``runner.run`` to the end of round 1 (its summary's ``first_round_end_s``: all a user
waits for once Python has imported fedalign, the figure the targets are about: 10 nodes <= 6 s,
1,000 <= 10 s), some of the phases in it (the driver's data load and partition; Flower's
``RayBackend.init_ray`` and ``build``, about 0 when the run started Ray and its actor pool itself,
``runner.ray_started_early``; node discovery: the info query or the recorded mapping), round 1's
own seconds (its actors' first messages), the median round after the first, the run's wall time
and the peak memory of the process tree. Phases are timed by wrapping those functions in this
script only. (Before issue 27 the clock started after the data load and the model check, and the
data load was added to it; they are now inside it.)

    .venv/bin/python simulations/bench_startup.py --nodes 10 1000 10000 \
        --out docs/results/bench_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))


def one_run(nodes: int, fast: bool, rounds: int, cohort: int, out: Path, extra: list[str]) -> dict:
    """One federation in this process, its phases timed."""
    from bench_overhead import PeakMemory
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from fedalign.config.load import load_config
    from fedalign.fl.engine import RoundEngine
    from fedalign.report.results import read_rows
    from fedalign.runs import runner
    from fedalign.runs.runner import run

    phases: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(RayBackend, "init_ray", "ray_init_s")
    timed(RayBackend, "build", "actor_pool_s")
    timed(RoundEngine, "discover", "discover_s")
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"data.num_clients={nodes}",
            "data.min_partition_size=1",
            f"strategy.fraction_train={cohort / nodes}",
            f"strategy.min_train_clients={cohort}",
            f"strategy.rounds={rounds}",
            f"simulation.fast_dispatch={'true' if fast else 'false'}",
            "output.checkpoint_every=0",
            "output.plot=false",
            "output.save_model=false",
            *extra,
        ],
    )
    timed(runner, "run_federation", "driver_data_s")
    with PeakMemory() as memory:
        t0 = time.perf_counter()
        outcome = run(cfg, output_dir=out, progress=False)
        wall = time.perf_counter() - t0
    rows = [r for r in read_rows(outcome.run_dir) if r["round"] > 0]
    return {
        "nodes": nodes,
        "cohort": cohort,
        "rounds": rounds,
        "fast_dispatch": fast,
        "to_first_round_end_s": outcome.summary["first_round_end_s"],
        **{k: round(v, 2) for k, v in phases.items()},
        "round_1_s": rows[0]["seconds_total"],
        "later_round_s": statistics.median(r["seconds_total"] for r in rows[1:]),
        "wall_s": round(wall, 2),
        "peak_mib": round(memory.peak / 2**20),
        "final_accuracy": rows[-1]["test_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cohort", type=int, default=10, help="clients per round")
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument(
        "--flower-dispatch-up-to",
        type=int,
        default=1000,
        help="run Flower's own dispatch only up to this many nodes (10^8 checks a scan at 10,000)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/fedalign-bench-startup"))
    parser.add_argument("--one", nargs=2, metavar=("NODES", "FAST"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        row = one_run(
            int(args.one[0]), args.one[1] == "1", args.rounds, args.cohort, args.runs, args.set
        )
        print("ROW " + json.dumps(row), flush=True)
        return
    rows = []
    for nodes in args.nodes:
        for fast in [False, True] if nodes <= args.flower_dispatch_up_to else [True]:
            command = [sys.executable, __file__, "--one", str(nodes), str(int(fast))]
            command += ["--rounds", str(args.rounds), "--cohort", str(args.cohort)]
            command += ["--runs", str(args.runs), *(f"--set={s}" for s in args.set)]
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.timeout, check=False
                )
            except subprocess.TimeoutExpired:
                row = {"nodes": nodes, "fast_dispatch": fast, "error": f"> {args.timeout:g} s"}
            else:
                found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
                row = (
                    json.loads(found[-1][4:])
                    if found
                    else {"nodes": nodes, "fast_dispatch": fast, "error": done.stderr[-500:]}
                )
            row["load_average"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        from fedalign.runs.studies import write_json  # after the runs: the parent stays light

        write_json(args.out, {"cores": os.cpu_count(), "rows": rows})


if __name__ == "__main__":
    main()
