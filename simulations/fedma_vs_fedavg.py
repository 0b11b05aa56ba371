"""FedMA against FedAvg and FedProx on Fashion-MNIST (issue 4, study b), through the Flower
simulation: accuracy by communication round and by bytes.

FedMA's round is several communication rounds (one per phase); the comparison counts
communication rounds, as the FedMA paper does. Defaults are scaled to a 2-core CPU: LeNet, J=10,
Dirichlet(0.5), 2 local epochs per phase, 20 FedAvg/FedProx rounds against 4 FedMA rounds
(= 20 communication rounds).

    .venv/bin/python simulations/fedma_vs_fedavg.py --out docs/results/fedma_vs_fedavg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedalign.config import load_config
from fedalign.results import cumulative_bytes, read_rows
from fedalign.runner import run

ROOT = Path(__file__).resolve().parents[1]


def communication_rounds(rows: list[dict]) -> list[int]:
    """Cumulative message exchanges up to each round (a FedMA round has several phases)."""
    total, out = 0, []
    for r in rows:
        total += r.get("fedma", {}).get("phases", 1) if r["round"] > 0 else 0
        out.append(total)
    return out


def comparison_table(results: dict[str, dict]) -> str:
    """Final/best accuracy, cost, and the cost of reaching FedAvg's final accuracy."""
    target = results["FedAvg"]["accuracy"][-1]
    lines = [("| strategy | final acc (%) | best acc (%) | comm. rounds | MiB | comm. rounds to FedAvg's final "
              "| MiB to FedAvg's final | wall s |"), "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        accs = r["accuracy"]
        reach = next((i for i, a in enumerate(accs) if a >= target), None)
        to_comm = "not reached" if reach is None else str(r["comm"][reach])
        to_mib = "-" if reach is None else f"{r['bytes'][reach] / 2**20:.1f}"
        lines.append(f"| {label} | {100 * accs[-1]:.2f} | {100 * max(accs):.2f} | {r['comm'][-1]} | "
                     f"{r['bytes'][-1] / 2**20:.1f} | {to_comm} | {to_mib} | {r['wall_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="FedAvg/FedProx rounds")
    parser.add_argument("--fedma-rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx mu")
    parser.add_argument("--only", nargs="+", choices=["FedAvg", "FedProx", "FedMA"],
                        help="run only these (FedAvg is the target: omit it and the table has no target)")
    parser.add_argument("--fedma-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra overrides for the FedMA run, e.g. strategy.matching.gamma=1.0")
    parser.add_argument("--out", type=Path, default=Path("docs/results/fedma_vs_fedavg"))
    args = parser.parse_args()
    common = [f"train.local_epochs={args.epochs}"]
    runs = {
        "FedAvg": load_config(ROOT / "configs/fmnist_lenet_fedavg.yaml", common + [f"strategy.rounds={args.rounds}"]),
        "FedProx": load_config(ROOT / "configs/fmnist_lenet_fedprox.yaml",
                               common + [f"strategy.rounds={args.rounds}", f"train.proximal_mu={args.mu}"]),
        "FedMA": load_config(ROOT / "configs/fmnist_lenet_fedma.yaml",
                             common + [f"strategy.rounds={args.fedma_rounds}", *args.fedma_set]),
    }
    runs = {k: v for k, v in runs.items() if not args.only or k in args.only}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for label, cfg in runs.items():
        outcome = run(cfg, output_dir=args.out / "runs", progress=False)
        rows = read_rows(outcome.run_dir)
        results[label] = {"run_dir": str(outcome.run_dir), "rows": rows,
                          "accuracy": [row["test_accuracy"] for row in rows],
                          "comm": communication_rounds(rows), "bytes": cumulative_bytes(rows),
                          "wall_seconds": outcome.summary.get("wall_seconds")}
        print(f"{label}: final {100 * rows[-1]['test_accuracy']:.2f}% after {results[label]['comm'][-1]} "
              f"communication rounds, {results[label]['bytes'][-1] / 2**20:.1f} MiB", flush=True)

    if "FedAvg" in results:
        table = comparison_table(results)
        print(table)
        (args.out / "table.md").write_text(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results.items():
        acc = [100 * row["test_accuracy"] for row in r["rows"]]
        a1.plot(r["comm"], acc, marker="o", markersize=3, label=label)
        a2.plot([b / 2**20 for b in r["bytes"]], acc, marker="o", markersize=3, label=label)
    a1.set_xlabel("communication rounds")
    a2.set_xlabel("MiB communicated (down + up)")
    for ax in (a1, a2):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    a1.legend()
    fig.tight_layout()
    fig.savefig(args.out / "accuracy.png", dpi=120)
    (args.out / "results.json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
