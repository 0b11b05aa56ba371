"""FedMA against FedAvg and FedProx (issue 4, studies b and c), through the Flower simulation:
accuracy by communication round and by bytes.

The three runs share one config (``--config``; FedProx and FedMA only change the strategy), so
partition, seeds and local training are the same. FedMA's round is several communication rounds
(one per phase: full training, then one per hidden layer); the comparison counts communication
rounds, as the FedMA paper does, and by default gives FedMA as many FedMA rounds as fit in
``--rounds`` communication rounds. Defaults are scaled to a 2-core CPU: LeNet on Fashion-MNIST,
J=10, Dirichlet(0.5), 2 local epochs per phase, 20 FedAvg/FedProx rounds against 4 FedMA rounds.

``--protocol reference`` runs all three under IBM/FedMA's schedule (``strategy.protocol``):
``--epochs`` local epochs from the clients' own inits in round 1 (so the baselines' round 2
starts from the plain average of the locally trained models), ``--retrain-epochs`` in every later
phase and round; ``--set`` overrides go to all three runs.

    .venv/bin/python simulations/fedma_vs_fedavg.py --out docs/results/fedma_vs_fedavg
    .venv/bin/python simulations/fedma_vs_fedavg.py --config configs/fortunes_char_lstm.yaml \
        --rounds 9 --epochs 1 --out docs/results/fedma_char_lstm
    .venv/bin/python simulations/fedma_vs_fedavg.py --protocol reference --epochs 10 \
        --retrain-epochs 2 --rounds 9 --set model.name=mlp --set 'model.hidden=[100, 100]' \
        --out docs/results/fedma_reference_protocol
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.fusion.layer_matching import matched_layers
from fedalign.config.components import run_federation, run_model
from fedalign.config.load import load_config
from fedalign.config.schema import RunConfig
from fedalign.report.plots import Curve, accuracy_plot
from fedalign.report.results import cumulative_bytes, read_rows
from fedalign.runs.runner import run
from fedalign.runs.studies import write_json

ROOT = Path(__file__).resolve().parents[1]


def communication_rounds(rows: list[dict]) -> list[int]:
    """Cumulative message exchanges up to each round (a FedMA round has several phases)."""
    total, out = 0, []
    for r in rows:
        total += r.get("fedma", {}).get("phases", 1) if r["round"] > 0 else 0
        out.append(total)
    return out


def phases_per_fedma_round(cfg: RunConfig) -> int:
    """Communication rounds in one FedMA round: the training phase plus one per matched layer."""
    model = run_model(cfg, run_federation(cfg))
    return 1 + len(matched_layers(permutation_spec(model), model))


def comparison_table(results: dict[str, dict]) -> str:
    """Final/best accuracy, cost, and the cost of reaching FedAvg's final accuracy."""
    target = results["FedAvg"]["accuracy"][-1]
    lines = [
        (
            "| strategy | final acc (%) | best acc (%) | comm. rounds | MiB "
            "| comm. rounds to FedAvg's final | MiB to FedAvg's final | wall s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        accs = r["accuracy"]
        reach = next((i for i, a in enumerate(accs) if a >= target), None)
        to_comm = "not reached" if reach is None else str(r["comm"][reach])
        to_mib = "-" if reach is None else f"{r['bytes'][reach] / 2**20:.1f}"
        lines.append(
            f"| {label} | {100 * accs[-1]:.2f} | {100 * max(accs):.2f} | {r['comm'][-1]} | "
            f"{r['bytes'][-1] / 2**20:.1f} | {to_comm} | {to_mib} | {r['wall_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs/fmnist_lenet_fedavg.yaml",
        help="the shared run config (its strategy is replaced)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="FedAvg/FedProx rounds")
    parser.add_argument(
        "--fedma-rounds", type=int, help="default: as many as fit in --rounds communication rounds"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx mu")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["FedAvg", "FedProx", "FedMA"],
        help="run only these (FedAvg is the target: omit it and the table has no target)",
    )
    parser.add_argument(
        "--fedma-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for the FedMA run, e.g. strategy.gamma=1.0",
    )
    parser.add_argument(
        "--protocol", choices=("fedalign", "reference"), default="fedalign", help="see above"
    )
    parser.add_argument(
        "--retrain-epochs", type=int, help="reference: epochs after round 1 (default --epochs)"
    )
    parser.add_argument("--retrain-lr", type=float, help="reference: their lr (default train.lr)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for all runs"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/fedma_vs_fedavg"))
    args = parser.parse_args()
    common = [
        f"train.local_epochs={args.epochs}",
        f"strategy.rounds={args.rounds}",
        f"strategy.protocol={args.protocol}",
        *([f"strategy.retrain_epochs={args.retrain_epochs}"] if args.retrain_epochs else []),
        *([f"strategy.retrain_lr={args.retrain_lr}"] if args.retrain_lr else []),
        *args.set,
    ]
    base = load_config(args.config, common)
    fedma_rounds = args.fedma_rounds or max(1, args.rounds // phases_per_fedma_round(base))
    runs = {
        "FedAvg": ["strategy.name=fedavg"],
        "FedProx": ["strategy.name=fedprox", f"train.proximal_mu={args.mu}"],
        "FedMA": ["strategy.name=fedma", f"strategy.rounds={fedma_rounds}", *args.fedma_set],
    }
    runs = {
        label: load_config(args.config, [*common, f"name={base.name}-{label.lower()}", *overrides])
        for label, overrides in runs.items()
    }
    runs = {k: v for k, v in runs.items() if not args.only or k in args.only}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for label, cfg in runs.items():
        outcome = run(cfg, output_dir=args.out / "runs", progress=False)
        rows = read_rows(outcome.run_dir)
        results[label] = {
            "run_dir": str(outcome.run_dir),
            "rows": rows,
            "accuracy": [row["test_accuracy"] for row in rows],
            "comm": communication_rounds(rows),
            "bytes": cumulative_bytes(rows),
            "wall_seconds": outcome.summary.get("wall_seconds"),
        }
        print(
            f"{label}: final {100 * rows[-1]['test_accuracy']:.2f}% "
            f"after {results[label]['comm'][-1]} communication rounds, "
            f"{results[label]['bytes'][-1] / 2**20:.1f} MiB",
            flush=True,
        )

    if "FedAvg" in results:
        table = comparison_table(results)
        print(table)
        (args.out / "table.md").write_text(table)

    curves = {
        label: Curve(r["comm"], [b / 2**20 for b in r["bytes"]], [100 * a for a in r["accuracy"]])
        for label, r in results.items()
    }
    accuracy_plot(curves, args.out / "accuracy.png", x_label="communication rounds")
    write_json(
        args.out / "results.json",
        {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in results.items()},
    )


if __name__ == "__main__":
    main()
