"""Issue 25, item 6: federated LoRA fine-tuning of a pre-trained character transformer, rule by
rule (docs/lora.md, "Study").

Every run is ``configs/fortunes_lora.yaml`` (its base made once by ``fedalign pretrain``) through
the in-process backend (Flower's grid and apps without Ray's start-up), with ``--set`` overrides,
per seed, rank and rule; full fine-tuning with FedAvg (``adapters.kind: none``) is the reference.
Each run's rows (test and client-validation accuracy, bytes, the rule's aggregation error) are
kept in ``OUT/runs/<name>.json``, so an interrupted study continues where it stopped. Then
``OUT/summary.md`` (mean and 95% t interval over seeds) and ``OUT/lora_study.png``.

    .venv/bin/python simulations/lora_study.py --out docs/results/lora_study
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from fedalign.config.load import load_config
from fedalign.report.intervals import t_interval
from fedalign.report.results import read_rows
from fedalign.runs.runner import run

RULES = ("fedit", "ffa-lora", "fedsa-lora", "fedex-lora", "flora", "flexlora", "aligned-lora")
REFERENCE = "fedavg (full)"


def run_overrides(rule: str, rank: int, seed: int, lora_lr: float, full_lr: float) -> list[str]:
    """One cell's overrides of the config: a rule at a rank (alpha = 2 r), or FedAvg on the whole
    model."""
    if rule == REFERENCE:
        return [f"seed={seed}", "strategy.name=fedavg", "adapters.kind=none", f"train.lr={full_lr}"]
    return [
        f"seed={seed}",
        f"adapters.rule={rule}",
        f"adapters.rank={rank}",
        f"adapters.alpha={2 * rank}",
        f"train.lr={lora_lr}",
    ]


def one_run(
    config: str, overrides: list[str], out: Path, name: str, folders: Path
) -> dict[str, Any]:
    """The run's rows and seconds, from ``out/runs/name.json`` when it was run before (its run
    folder goes under ``folders``)."""
    cache = out / "runs" / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    outcome = run(cfg, output_dir=folders, progress=False)
    result = {
        "overrides": overrides,
        "seconds": time.perf_counter() - t0,
        "rows": [r for r in read_rows(outcome.run_dir) if r["round"] >= 1],
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def cell(values: list[float], digits: int = 3, percent: bool = False) -> str:
    """``mean ± half-width`` of the 95% t interval over seeds (``mean`` alone for one seed)."""
    scale = 100 if percent else 1
    i = t_interval([scale * v for v in values])
    half = "" if i.half_width is None else f" ± {i.half_width:.{digits}f}"
    return f"{i.mean:.{digits}f}{half}"


def train_bytes(row: dict[str, Any], way: str) -> int:
    """A round's bytes of the training exchange (``up`` or ``down``): what the rule costs; the
    federated evaluation sends every client the whole model whatever the rule."""
    return row["bytes_by_phase"]["train"][way]


def summarise(results: dict[tuple[str, int, int], dict]) -> str:
    """The study's table: per rule and rank, over seeds."""
    lines = [
        (
            "| rule | rank | test acc. r1 (%) | test acc. final (%) | client val. acc. final (%) "
            "| aggregation error r1 | aggregation error final | train KB up / client / round "
            "| train KB down / client / round |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted({(rule, rank) for rule, rank, _ in results}, key=lambda c: (c[1], c[0]))
    for rule, rank in cells:
        runs = [r for (ru, ra, _), r in results.items() if (ru, ra) == (rule, rank)]
        rows = [r["rows"] for r in runs]
        first, last = [rs[0] for rs in rows], [rs[-1] for rs in rows]
        clients = [sum(x["clients_ok"] for x in rs) for rs in rows]
        up, down = (
            [sum(train_bytes(x, way) for x in rs) / c / 1000 for rs, c in zip(rows, clients)]
            for way in ("up", "down")
        )
        errors = (
            [
                cell([x["lora"]["aggregation_error"] for x in first]),
                cell([x["lora"]["aggregation_error"] for x in last]),
            ]
            if "lora" in first[0]
            else ["-", "-"]
        )
        lines.append(
            f"| {rule} | {rank or '-'} | {cell([x['test_accuracy'] for x in first], 2, True)} "
            f"| {cell([x['test_accuracy'] for x in last], 2, True)} "
            f"| {cell([x['val_accuracy'] for x in last], 2, True)} | {errors[0]} | {errors[1]} "
            f"| {cell(up, 1)} | {cell(down, 1)} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[tuple[str, int, int], dict], path: Path) -> None:
    """Test accuracy and aggregation error by round, mean over seeds, one panel per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({rank for _, rank, _ in results if rank})
    fig, axes = plt.subplots(2, len(ranks), figsize=(5 * len(ranks), 7), squeeze=False)
    for col, rank in enumerate(ranks):
        for rule in (*RULES, REFERENCE):
            runs = [r for (ru, ra, _), r in results.items() if ru == rule and ra in (rank, 0)]
            if not runs:
                continue
            n = min(len(r["rows"]) for r in runs)
            x = range(1, n + 1)
            acc = [sum(r["rows"][i]["test_accuracy"] for r in runs) / len(runs) for i in range(n)]
            style = "k--" if rule == REFERENCE else "-"
            axes[0][col].plot(x, [100 * a for a in acc], style, label=rule)
            if rule != REFERENCE:
                err = [
                    sum(r["rows"][i]["lora"]["aggregation_error"] for r in runs) / len(runs)
                    for i in range(n)
                ]
                axes[1][col].plot(x, err, style, label=rule)
        axes[0][col].set(title=f"rank {rank}", xlabel="round", ylabel="test accuracy (%)")
        axes[1][col].set(xlabel="round", ylabel="aggregation error")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fortunes_lora.yaml")
    parser.add_argument("--out", type=Path, default=Path("docs/results/lora_study"))
    parser.add_argument(
        "--folders", type=Path, default=Path("runs/lora_study"), help="the run folders"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--lora-lr", type=float, default=0.01)
    parser.add_argument("--full-lr", type=float, default=0.003)
    parser.add_argument("--set", action="append", default=[], help="a config override for all")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small products on a shared machine: one thread is faster
    common = ["output.plot=false", "output.save_model=false", "output.checkpoint_every=0"]
    results = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):  # seed by seed: a stopped study has whole seeds
        cells = [(REFERENCE, 0)] + [(rule, rank) for rank in args.ranks for rule in args.rules]
        for rule, rank in cells:
            overrides = [
                *common,
                *args.set,
                *run_overrides(rule, rank, seed, args.lora_lr, args.full_lr),
            ]
            name = f"{rule.split()[0]}-r{rank}-s{seed}"
            results[(rule, rank, seed)] = r = one_run(
                args.config, overrides, args.out, name, args.folders
            )
            last = r["rows"][-1]
            print(
                f"{name}: test {100 * last['test_accuracy']:.2f}%, error "
                f"{last.get('lora', {}).get('aggregation_error', '-')}, {r['seconds']:.1f} s "
                f"(study {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    table = summarise(results)
    (args.out / "summary.md").write_text(table)
    plot(results, args.out / "lora_study.png")
    print(table)


if __name__ == "__main__":
    main()
