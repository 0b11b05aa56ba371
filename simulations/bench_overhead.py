"""Benchmarks B1 and B2 (benchmarks.md): fedalign's FedAvg through the Flower simulation on Ray
against a plain sequential PyTorch loop doing identical training, and against the peer to beat,
Flower's own FedAvg (``flwr.serverapp.strategy.FedAvg``) with a minimal ClientApp, measured in
the same run.

The plain loop reproduces the run exactly: the same partition (``run_federation``), the same
initial model (the run's init seed), the same clients per round (``sample_partitions``), the
clients' own training (``components.train_client``: optimizer, objective, shuffling seeds), the
same weighted mean and the same test-set evaluation every round; one torch thread, as each
fedalign client uses with ``client_cpus: 1``. Final accuracies are printed side by side as the
check that the work is the same.

- B1 (overhead): logistic regression 784->10, 1000 clients, Dirichlet(0.5), 10 sampled per round,
  1 local epoch, batch 32; compute is tiny, so the time is overhead.
- B2 (throughput): 1000 IID users x 60 images, cohort 50, 1 local epoch, batch 10, a LeNet widened
  to about 1.2M parameters.

The Flower peer (``flower_fedavg``) is a ServerApp running Flower's FedAvg and a ClientApp that
trains with the same function as the other two sides, through Flower's ``run_simulation`` with
fedalign's Ray settings (one CPU per client): the same model and initial weights, the same
clients' data, the same cohort size, the same local training (``components.train_client``, its
shuffling seeded by round and partition) and the same test-set pass after every round. Flower
samples its cohort itself (``random.sample`` of node ids), so its clients, and with them its final
accuracy, differ from the other two sides'; with IID clients of equal size, not the work a round.

Reported: start-up (the run's wall time less rounds 1..R: Ray, node discovery, the round-0
evaluation), steady-state seconds per round, its ratios to the plain loop and to Flower's FedAvg,
client updates per second, and peak memory of the process tree (driver, Ray's daemons and workers)
as proportional set size, which counts a page shared between processes once (``PeakMemory``; the
summed resident sets this benchmark reported before count it once per process, and are printed
beside it). Every side's round is timed the same way: the seconds between the ends of two
consecutive test-set passes (``RoundClock``), median over rounds 2..R. fedalign's own
``seconds_total`` would not do: with ``strategy.overlap_evaluation`` (the default) it leaves out
the evaluation that runs beside the next round, including any part of it the round then waits for.

    .venv/bin/python simulations/bench_overhead.py --out docs/results/bench_overhead.md
"""

from __future__ import annotations

from fedalign.core.memory import one_arena

one_arena()  # before torch's import starts a thread, as the fedalign command does (core.memory)

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

import fedalign.runs.server_app
from fedalign.client.training import evaluate
from fedalign.config.components import run_federation, run_model, train_client
from fedalign.config.load import load_config
from fedalign.config.schema import RunConfig
from fedalign.core.tensors import weighted_average
from fedalign.fl.engine import EvaluateFn
from fedalign.fl.round import sample_partitions
from fedalign.report.results import read_rows
from fedalign.runs.runner import backend_config, run
from fedalign.runs.studies import write_json

ROOT = Path(__file__).resolve().parents[1]

B1 = [
    "name=b1",
    "data.dataset=fashion-mnist",
    "data.num_clients=1000",
    "data.partition=dirichlet",
    "data.alpha=0.5",
    "data.min_partition_size=5",
    "data.val_fraction=0.0",
    "model.hidden=[]",
    "train.local_epochs=1",
    "train.batch_size=32",
    "train.lr=0.05",
    "strategy.fraction_train=0.01",
    "strategy.min_train_clients=10",
]
B2 = [
    "name=b2",
    "data.dataset=fashion-mnist",
    "data.num_clients=1000",
    "data.partition=iid",
    "data.val_fraction=0.0",
    "model.name=lenet",
    "model.widths=[32, 64, 1000, 128]",
    "train.local_epochs=1",
    "train.batch_size=10",
    "train.lr=0.05",
    "train.momentum=0.0",
    "strategy.fraction_train=0.05",
    "strategy.min_train_clients=50",
]


def release_free_memory() -> None:
    """Give back to the system what the side measured before left free in this process's heap
    (its dropped states and messages), so that each side's peak starts from what the process
    holds: the sides run one after another in this process (glibc only)."""
    gc.collect()
    if platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


class PeakMemory:
    """Peak memory of this process and all its descendants, sampled every 0.2 s (/proc).

    ``peak`` is the proportional set size (``Pss`` of ``/proc/PID/smaps_rollup``): a page shared
    by k processes counts 1/k in each, so the sum over the tree counts a shared page once (torch's
    libraries in every Ray worker, a memory-mapped data copy). ``peak_rss`` sums the resident sets
    instead, as this benchmark did before: it counts a shared page once per process touching it.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.peak_rss = 0
        self.parts: dict[str, float] = {}  # MiB of PSS per kind of process at the PSS peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _tree(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
        return out

    @staticmethod
    def _pss_and_rss(pid: int) -> tuple[int, int]:
        """(Pss, Rss) of one process in bytes; (0, 0) once it has gone."""
        found = {}
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name in ("Pss", "Rss"):
                        found[name] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            return 0, 0
        return found.get("Pss", 0), found.get("Rss", 0)

    @staticmethod
    def _kind(pid: int) -> str:
        """What a process is, for the peak's parts: the driver, a Ray worker or actor (its
        process title), or the script or binary a daemon runs."""
        if pid == os.getpid():
            return "driver"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            return "gone"
        if not args:
            return "gone"
        if args[0].startswith("ray::"):
            return "ray worker"
        script = next((a for a in args[1:] if a.endswith(".py")), args[0])
        return Path(script).name

    def _measure(self) -> tuple[int, int, dict[str, float]]:
        pss = rss = 0
        parts: dict[str, float] = {}
        for p in self._tree(os.getpid()):
            a, b = self._pss_and_rss(p)
            pss, rss = pss + a, rss + b
            kind = self._kind(p)
            parts[kind] = parts.get(kind, 0.0) + a / 2**20
        return pss, rss, parts

    def _sample(self) -> None:
        while not self._stop.is_set():
            pss, rss, parts = self._measure()
            if pss > self.peak:
                self.peak, self.parts = pss, {k: round(v) for k, v in parts.items() if v >= 1}
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(0.2)

    def __enter__(self) -> Self:
        release_free_memory()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class RoundClock:
    """When each test-set pass of a run ended (``perf_counter``): the one timing every side of the
    benchmark shares. A round's seconds are those between the end of the previous round's pass
    and the end of its own, whether the pass ran after the round (the plain loop, Flower) or
    beside the next one (fedalign's overlap)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def timed(self, evaluate_fn: EvaluateFn) -> EvaluateFn:
        """``evaluate_fn``, noting when each call returns."""

        def timed(server_round: int, state: dict) -> dict[str, float]:
            metrics = evaluate_fn(server_round, state)
            self.ends.append(time.perf_counter())
            return metrics

        return timed

    @contextlib.contextmanager
    def fedalign_server(self) -> Iterator[None]:
        """The server's test-set pass of fedalign runs started meanwhile, timed: it runs in this
        process (the ServerApp's thread), with Ray or without."""
        original = fedalign.runs.server_app.server_evaluation
        fedalign.runs.server_app.server_evaluation = lambda *a, **k: self.timed(original(*a, **k))
        try:
            yield
        finally:
            fedalign.runs.server_app.server_evaluation = original

    def rounds(self) -> list[float]:
        """Seconds of rounds 1..R (the first pass is round 0's)."""
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def plain_loop(cfg: RunConfig) -> dict:
    """FedAvg as a sequential loop over the same clients, seeds and training."""
    torch.set_num_threads(max(1, int(cfg.simulation.client_cpus)))
    fed = run_federation(cfg)
    X_test, y_test = fed.test
    state = run_model(cfg, fed, init_seed=cfg.resolved_seeds.init).state_dict()
    partitions = list(range(cfg.data.num_clients))
    s = cfg.strategy
    clock = RoundClock()

    @clock.timed
    def test_pass(server_round: int, state: dict) -> dict[str, float]:
        return {"test-accuracy": evaluate(run_model(cfg, fed, state=state), X_test, y_test)[1]}

    clock.ends.append(time.perf_counter())  # no round-0 pass: round 1 starts here
    accuracy = None
    for server_round in range(1, s.rounds + 1):
        states, sizes = [], []
        for pid in sample_partitions(
            cfg.resolved_seeds.sampling,
            partitions,
            server_round,
            s.fraction_train,
            s.min_train_clients,
        ):
            data = fed.client(pid)
            model = run_model(cfg, fed, state=state)
            stats = train_client(cfg, model, data.X_train, data.y_train, server_round, pid)
            states.append(model.state_dict())
            sizes.append(stats.num_examples)
        state = weighted_average(states, sizes)
        accuracy = test_pass(server_round, state)["test-accuracy"]
    return {"seconds_per_round": clock.rounds(), "final_accuracy": accuracy}


def fedalign_run(cfg: RunConfig, out: Path) -> dict:
    clock = RoundClock()
    t0 = time.perf_counter()
    with clock.fedalign_server():
        outcome = run(cfg, output_dir=out, progress=False)
    wall = time.perf_counter() - t0
    rows = [r for r in read_rows(outcome.run_dir) if r["round"] > 0]
    per_round = clock.rounds()
    return {
        "seconds_per_round": per_round,
        "final_accuracy": rows[-1]["test_accuracy"],
        "wall": wall,
        "startup": wall - sum(per_round),
        "bytes_per_round": rows[-1]["bytes_down"] + rows[-1]["bytes_up"],
        # each phase's median over rounds 2..R (metrics.jsonl's seconds_*)
        "phases": {
            k: statistics.median(r.get(k, 0.0) for r in rows[1:])
            for k in rows[-1]
            if k.startswith("seconds_")
        },
    }


def flower_fedavg(cfg: RunConfig) -> dict:
    """Flower's own FedAvg and a minimal ClientApp doing the run's training, through Flower's
    ``run_simulation`` on Ray (module docstring): the peer fedalign's B2 must not be slower than.
    Each client loads the run's federation once per worker process (``run_federation`` caches
    it), as a Flower user's ClientApp loads its partition; fedalign's clients map a shared copy."""
    fed = run_federation(cfg)
    X_test, y_test = fed.test
    initial = run_model(cfg, fed, init_seed=cfg.resolved_seeds.init).state_dict()
    s, n = cfg.strategy, cfg.data.num_clients
    cohort = max(round(s.fraction_train * n), s.min_train_clients)
    clock = RoundClock()
    accuracy: list[float] = []

    @clock.timed
    def test_pass(server_round: int, state: dict) -> dict[str, float]:
        loss, acc = evaluate(run_model(cfg, fed, state=state), X_test, y_test)
        accuracy.append(acc)
        return {"test-loss": loss, "test-accuracy": acc}

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(max(1, int(cfg.simulation.client_cpus)))
        pid = int(context.node_config["partition-id"])
        local = run_federation(cfg)  # this worker's copy (the driver's is not sent along)
        data = local.client(pid)
        model = run_model(cfg, local, state=msg.content["arrays"].to_torch_state_dict())
        server_round = int(msg.content["config"]["server-round"])
        stats = train_client(cfg, model, data.X_train, data.y_train, server_round, pid)
        reply = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": stats.num_examples}),
            }
        )
        return Message(reply, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=cohort / n,
            min_train_nodes=cohort,
            min_available_nodes=n,
            fraction_evaluate=0.0,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=s.rounds,
            evaluate_fn=lambda r, arrays: MetricRecord(test_pass(r, arrays.to_torch_state_dict())),
        )

    t0 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=n,
        backend_config=backend_config(cfg),
    )
    wall = time.perf_counter() - t0
    per_round = clock.rounds()
    return {
        "seconds_per_round": per_round,
        "final_accuracy": accuracy[-1],
        "wall": wall,
        "startup": wall - sum(per_round),
    }


def measure(
    label: str,
    base: str,
    overrides: list[str],
    rounds: int,
    cpus: float,
    out: Path,
    extra: list[str] = (),
    variants: list[str] = (),
    flower: bool = True,
) -> list[dict]:
    """The plain loop, then fedalign's run, then one fedalign run per override in ``variants``,
    then (with ``flower``) Flower's FedAvg: one row per fedalign run, each against the same plain
    loop and Flower run. ``extra``: overrides for every side."""
    common = [
        *overrides,
        *extra,
        f"strategy.rounds={rounds}",
        f"simulation.client_cpus={cpus}",
        "output.checkpoint_every=0",
        "output.plot=false",
        "output.save_model=false",
    ]
    cfg = load_config(ROOT / "configs" / base, common)
    cohort = max(
        round(cfg.strategy.fraction_train * cfg.data.num_clients), cfg.strategy.min_train_clients
    )
    with PeakMemory() as mem_plain:
        plain = plain_loop(cfg)
    steady_plain = statistics.median(plain["seconds_per_round"][1:])
    rows = []
    for variant in [None, *variants]:
        more = [] if variant is None else [variant]
        run_cfg = load_config(ROOT / "configs" / base, [*common, *more])
        with PeakMemory() as mem_fed:
            fed = fedalign_run(run_cfg, out)
        steady_fed = statistics.median(fed["seconds_per_round"][1:])
        rows.append(
            {
                "benchmark": label if variant is None else f"{label} + {variant}",
                "client_cpus": cpus,
                "rounds": rounds,
                "cohort": cohort,
                "startup_s": fed["startup"],
                "fedalign_round_s": steady_fed,
                "plain_round_s": steady_plain,
                "ratio": steady_fed / steady_plain,
                "fedalign_updates_per_s": cohort / steady_fed,
                "plain_updates_per_s": cohort / steady_plain,
                "fedalign_peak_mib": mem_fed.peak / 2**20,
                "plain_peak_mib": mem_plain.peak / 2**20,
                "fedalign_peak_rss_sum_mib": mem_fed.peak_rss / 2**20,
                "plain_peak_rss_sum_mib": mem_plain.peak_rss / 2**20,
                "fedalign_peak_parts_mib": mem_fed.parts,
                "plain_peak_parts_mib": mem_plain.parts,
                "fedalign_accuracy": fed["final_accuracy"],
                "plain_accuracy": plain["final_accuracy"],
                "fedalign_wall_s": fed["wall"],
                "mib_per_round": fed["bytes_per_round"] / 2**20,
                "fedalign_phases_s": fed["phases"],
                "fedalign_rounds_s": fed["seconds_per_round"],
                "plain_rounds_s": plain["seconds_per_round"],
                "overrides": [*extra, *more],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if flower:
        with PeakMemory() as mem_flower:
            peer = flower_fedavg(cfg)
        steady_flower = statistics.median(peer["seconds_per_round"][1:])
        for row in rows:
            row.update(
                flower_round_s=steady_flower,
                ratio_flower=row["fedalign_round_s"] / steady_flower,
                flower_startup_s=peer["startup"],
                flower_peak_mib=mem_flower.peak / 2**20,
                flower_peak_parts_mib=mem_flower.parts,
                flower_accuracy=peer["final_accuracy"],
                flower_rounds_s=peer["seconds_per_round"],
            )
        print(json.dumps({k: v for k, v in rows[0].items() if k.startswith("flower")}), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    """The rows as a Markdown table; the Flower peer's columns are "-" in a run without it."""

    def flower(r: dict, key: str, spec: str, suffix: str = "") -> str:
        return f"{r[key]:{spec}}{suffix}" if key in r else "-"

    header = (
        "| benchmark | client_cpus | rounds | cohort | start-up fedalign / Flower (s) "
        "| fedalign s/round | plain loop s/round | Flower FedAvg s/round "
        "| fedalign / plain | fedalign / Flower | updates/s fedalign | updates/s plain "
        "| peak MiB fedalign | peak MiB plain | peak MiB Flower "
        "| peak MiB, RSS summed: fedalign / plain | final acc fedalign / plain / Flower (%) |"
    )
    lines = [header, "|" + "---|" * 17]
    for r in rows:
        flower_acc = f"{100 * r['flower_accuracy']:.2f}" if "flower_accuracy" in r else "-"
        lines.append(
            f"| {r['benchmark']} | {r['client_cpus']:g} | {r['rounds']} | {r['cohort']} | "
            f"{r['startup_s']:.1f} / {flower(r, 'flower_startup_s', '.1f')} | "
            f"{r['fedalign_round_s']:.3f} | {r['plain_round_s']:.3f} | "
            f"{flower(r, 'flower_round_s', '.3f')} | "
            f"{r['ratio']:.2f}x | {flower(r, 'ratio_flower', '.2f', 'x')} | "
            f"{r['fedalign_updates_per_s']:.1f} | {r['plain_updates_per_s']:.1f} | "
            f"{r['fedalign_peak_mib']:.0f} | {r['plain_peak_mib']:.0f} | "
            f"{flower(r, 'flower_peak_mib', '.0f')} | "
            f"{r['fedalign_peak_rss_sum_mib']:.0f} / {r['plain_peak_rss_sum_mib']:.0f} | "
            f"{100 * r['fedalign_accuracy']:.2f} / {100 * r['plain_accuracy']:.2f} / "
            f"{flower_acc} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--b1-rounds", type=int, default=30)
    parser.add_argument("--b2-rounds", type=int, default=8)
    parser.add_argument("--cpus", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--only", choices=["B1", "B2"])
    parser.add_argument("--runs", type=Path, default=Path("/tmp/fedalign-bench-overhead"))
    parser.add_argument(
        "--set", action="append", default=[], help="a config override for both sides"
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        help="an override for one more fedalign run against the same plain loop "
        "(e.g. strategy.overlap_evaluation=false)",
    )
    parser.add_argument(
        "--no-flower",
        dest="flower",
        action="store_false",
        help="leave out the Flower FedAvg peer",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for label, base, overrides, rounds in (
        ("B1", "quickstart.yaml", B1, args.b1_rounds),
        ("B2", "fmnist_lenet_fedavg.yaml", B2, args.b2_rounds),
    ):
        if args.only and label != args.only:
            continue
        for cpus in args.cpus:
            rows += measure(
                label, base, overrides, rounds, cpus, args.runs, args.set, args.compare, args.flower
            )
    table = report(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        write_json(args.out.with_suffix(".json"), {"load_average": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
