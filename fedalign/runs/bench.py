"""``fedalign bench SUITE.yaml``: a grid of strategies x partitions x seeds (x models), one run
folder each, then a summary table and plots.

A suite file::

    name: tiny
    base: digits_mlp.yaml              # a run config, relative to the suite file
    overrides: [strategy.rounds=3]     # applied to every run
    target_accuracy: 0.8               # for "rounds / bytes to reach the target"
    output: bench/tiny                 # relative to the working directory
    strategies:                        # label -> overrides
      fedavg: []
      fedprox: [strategy.name=fedprox, train.proximal_mu=0.01]
    partitions:
      iid: [data.partition=iid]
      dirichlet-0.5: [data.partition=dirichlet, data.alpha=0.5]
    seeds: [0, 1]
    models:                            # optional; default: the base config's model
      mlp: []

Every expanded run config is validated before anything runs, so a bad override stops the suite
with a message naming the run and the key. Runs go one after another, each into
``<output>/runs/<model>/<partition>/<strategy>/seed-<s>/``; a run whose folder holds a finished
run is skipped, one with checkpoints but no summary is resumed, so an interrupted suite continues
where it stopped. The summary (``summary.md``, ``summary.csv``,
``accuracy-<model>-<partition>.png``) gives per (model, partition, strategy) the mean +/- std over
seeds of final and best accuracy, rounds and bytes to reach the target, and wall time.
"""

from __future__ import annotations

import csv
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedalign.config.load import load_config
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from fedalign.report.plots import Curve, accuracy_plot
from fedalign.report.results import cumulative_bytes, read_rows

SUITE_KEYS = {
    "name",
    "base",
    "overrides",
    "target_accuracy",
    "output",
    "strategies",
    "partitions",
    "seeds",
    "models",
}


@dataclass(frozen=True)
class BenchRun:
    """One cell of the grid."""

    model: str
    partition: str
    strategy: str
    seed: int
    cfg: RunConfig

    @property
    def folder(self) -> Path:
        return Path("runs") / self.model / self.partition / self.strategy / f"seed-{self.seed}"


@dataclass(frozen=True)
class Suite:
    name: str
    output: Path
    target_accuracy: float | None
    runs: list[BenchRun]


def _labelled(raw: Any, key: str) -> dict[str, list[str]]:
    """``label -> overrides`` from a mapping (or a list of labels without overrides)."""
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return {label: [] for label in raw}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{key}: expected a non-empty mapping of label -> list of key=value overrides"
        )
    out = {}
    for label, overrides in raw.items():
        overrides = overrides or []
        if not isinstance(overrides, list) or not all(
            isinstance(o, str) and "=" in o for o in overrides
        ):
            raise ConfigError(
                f"{key}.{label}: expected a list of key=value overrides, got {overrides!r}"
            )
        if "/" in str(label):
            raise ConfigError(f"{key}.{label}: a label names a folder; no '/'")
        out[str(label)] = overrides
    return out


def load_suite(
    path: str | Path,
    output: str | Path | None = None,
    overrides: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
) -> Suite:
    """Read and expand a suite; every run's config is loaded (and so validated) here.
    ``overrides`` apply to every run after the suite's own (a scaled-down run of a full suite);
    ``seeds`` replaces the suite's seeds."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the suite: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a suite is a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown suite key '{unknown[0]}'; valid keys: {', '.join(sorted(SUITE_KEYS))}"
        )
    if "base" not in raw:
        raise ConfigError("base: the suite needs a base run config")
    base = (path.parent / str(raw["base"])).resolve()
    if not base.is_file():
        raise ConfigError(f"base: {base} does not exist")
    common = raw.get("overrides") or []
    if not isinstance(common, list):
        raise ConfigError(f"overrides: expected a list of key=value, got {common!r}")
    seeds = list(seeds) if seeds is not None else raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    target = raw.get("target_accuracy")
    if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ConfigError(f"target_accuracy: a fraction in (0, 1], got {target!r}")
    strategies = _labelled(raw.get("strategies"), "strategies")
    partitions = _labelled(raw.get("partitions"), "partitions")
    models = _labelled(raw["models"], "models") if "models" in raw else {"default": []}
    name = str(raw.get("name", path.stem))
    runs = []
    for (model, m), (partition, p), (strategy, s), seed in itertools.product(
        models.items(), partitions.items(), strategies.items(), seeds
    ):
        cell = [
            *common,
            *m,
            *p,
            *s,
            *overrides,
            f"seed={seed}",
            f"name={strategy}-{partition}-s{seed}",
        ]
        try:
            cfg = load_config(base, cell)
        except ConfigError as exc:
            raise ConfigError(f"run {model}/{partition}/{strategy}/seed-{seed}: {exc}") from None
        runs.append(BenchRun(model, partition, strategy, seed, cfg))
    out = Path(output) if output is not None else Path(str(raw.get("output", Path("bench") / name)))
    return Suite(name, out, None if target is None else float(target), runs)


def finished_run(folder: Path) -> Path | None:
    """The finished run folder under ``folder`` (it has a summary), if any."""
    done = sorted(p.parent for p in folder.glob("*/summary.json"))
    return done[-1] if done else None


def resumable_run(folder: Path) -> Path | None:
    """An unfinished run folder under ``folder`` that has checkpoints."""
    started = sorted(p.parent.parent for p in folder.glob("*/checkpoints/*.json"))
    return started[-1] if started else None


def run_suite(
    suite: Suite, verbose: bool = False, progress: bool = True
) -> list[tuple[BenchRun, str]]:
    """Run every cell not finished yet; returns what happened to each (ran, resumed, skipped)."""
    from fedalign.runs.runner import run

    done = []
    for i, cell in enumerate(suite.runs, 1):
        folder = suite.output / cell.folder
        label = (
            f"[{i}/{len(suite.runs)}] "
            f"{cell.model}/{cell.partition}/{cell.strategy}/seed-{cell.seed}"
        )
        if finished_run(folder) is not None:
            print(f"{label}: finished before, skipped", flush=True)
            done.append((cell, "skipped"))
            continue
        resume = resumable_run(folder)
        run(cell.cfg, output_dir=folder, verbose=verbose, progress=progress, resume_dir=resume)
        done.append((cell, "resumed" if resume else "ran"))
        print(f"{label}: {'resumed' if resume else 'done'}", flush=True)
    return done


def reach(rows: Sequence[dict], target: float | None) -> tuple[int | None, int | None]:
    """The first round whose test accuracy reaches ``target`` and the bytes spent by then."""
    if target is None:
        return None, None
    spent = cumulative_bytes(rows)
    for row, total in zip(rows, spent):
        if (
            row.get("test_accuracy") is not None
            and row["test_accuracy"] >= target
            and row["round"] > 0
        ):
            return int(row["round"]), total
    return None, None


def run_metrics(run_dir: Path, target: float | None) -> dict[str, Any]:
    """One finished run's numbers for the summary."""
    import json

    rows = read_rows(run_dir)
    evaluated = [r for r in rows if r.get("test_accuracy") is not None]
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds, spent = reach(rows, target)
    return {
        "final_accuracy": evaluated[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in evaluated),
        "rounds_to_target": rounds,
        "bytes_to_target": spent,
        "wall_seconds": summary.get("wall_seconds"),
        "bytes_total": cumulative_bytes(rows)[-1],
        "rows": rows,
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: Sequence[float | None], scale: float = 1.0, digits: int = 2) -> str:
    reached = [v * scale for v in values if v is not None]
    if not reached:
        return "not reached"
    m, s = mean_std(reached)
    text = f"{m:.{digits}f} ± {s:.{digits}f}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds)"


def summarise_suite(suite: Suite) -> list[dict[str, Any]]:
    """Per (model, partition, strategy): the finished seeds' metrics aggregated; writes
    summary.md, summary.csv and one plot per (model, partition) into the suite folder."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for cell in suite.runs:
        run_dir = finished_run(suite.output / cell.folder)
        if run_dir is not None:
            groups.setdefault((cell.model, cell.partition, cell.strategy), []).append(
                run_metrics(run_dir, suite.target_accuracy)
            )
    if not groups:  # an empty table and no plot would only hide that nothing ran
        raise FileNotFoundError(
            f"{suite.output}: no finished run of suite {suite.name} to summarise "
            f"(run the suite without --summary-only first)"
        )
    target = "target" if suite.target_accuracy is None else f"{100 * suite.target_accuracy:g}%"
    header = [
        "model",
        "partition",
        "strategy",
        "seeds",
        "final acc (%)",
        "best acc (%)",
        f"rounds to {target}",
        f"MiB to {target}",
        "wall s",
    ]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    records = []
    for (model, partition, strategy), runs in groups.items():
        cells = [
            model,
            partition,
            strategy,
            str(len(runs)),
            _cell([r["final_accuracy"] for r in runs], 100),
            _cell([r["best_accuracy"] for r in runs], 100),
            _cell([r["rounds_to_target"] for r in runs], digits=1),
            _cell([r["bytes_to_target"] for r in runs], 2**-20, 1),
            _cell([r["wall_seconds"] for r in runs], digits=1),
        ]
        table.append("| " + " | ".join(cells) + " |")
        records.append(
            {
                "model": model,
                "partition": partition,
                "strategy": strategy,
                "seeds": len(runs),
                **{
                    k: [r[k] for r in runs]
                    for k in (
                        "final_accuracy",
                        "best_accuracy",
                        "rounds_to_target",
                        "bytes_to_target",
                        "wall_seconds",
                    )
                },
            }
        )
    suite.output.mkdir(parents=True, exist_ok=True)
    (suite.output / "summary.md").write_text(f"# {suite.name}\n\n" + "\n".join(table) + "\n")
    with open(suite.output / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "model",
                "partition",
                "strategy",
                "seed_count",
                "final_accuracy_mean",
                "final_accuracy_std",
                "best_accuracy_mean",
                "best_accuracy_std",
                "rounds_to_target_mean",
                "reached",
                "bytes_to_target_mean",
                "wall_seconds_mean",
            ]
        )
        for r in records:
            reached = [v for v in r["rounds_to_target"] if v is not None]
            spent = [v for v in r["bytes_to_target"] if v is not None]
            writer.writerow(
                [
                    r["model"],
                    r["partition"],
                    r["strategy"],
                    r["seeds"],
                    *mean_std(r["final_accuracy"]),
                    *mean_std(r["best_accuracy"]),
                    statistics.fmean(reached) if reached else "",
                    len(reached),
                    statistics.fmean(spent) if spent else "",
                    statistics.fmean(r["wall_seconds"]),
                ]
            )
    _plot(suite, groups)
    print("\n".join(table))
    return records


def _plot(suite: Suite, groups: dict[tuple[str, str, str], list[dict]]) -> None:
    """Accuracy against rounds and against MiB, one line per strategy (mean over seeds)."""
    for model, partition in dict.fromkeys((m, p) for m, p, _ in groups):
        lines = {}
        for (m, p, strategy), runs in groups.items():
            if (m, p) != (model, partition):
                continue
            curves = [
                [
                    (r["round"], r["test_accuracy"], b)
                    for r, b in zip(run["rows"], cumulative_bytes(run["rows"]))
                    if r.get("test_accuracy") is not None
                ]
                for run in runs
            ]
            length = min(len(c) for c in curves)
            rounds = [c[0] for c in curves[0][:length]]
            acc = [100 * statistics.fmean(c[i][1] for c in curves) for i in range(length)]
            mib = [statistics.fmean(c[i][2] for c in curves) / 2**20 for i in range(length)]
            lines[f"{strategy} (n={len(runs)})"] = Curve(rounds, mib, acc)
        accuracy_plot(
            lines,
            suite.output / f"accuracy-{model}-{partition}.png",
            y_label="test accuracy (%), mean over seeds",
            title=f"{suite.name}: {model}, {partition}",
            dpi=110,
        )
