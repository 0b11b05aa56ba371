"""``fedalign bench SUITE.yaml``: a grid of strategies x partitions x seeds (x models, x
variants), one run folder each, then a summary table with intervals over seeds, a paired
comparison against a baseline, and plots with bands.

A suite file::

    name: tiny
    base: digits_mlp.yaml              # a run config, relative to the suite file
    overrides: [strategy.rounds=3]     # applied to every run
    target_accuracy: 0.8               # for "rounds / MiB to reach the target"
    output: bench/tiny                 # relative to the working directory
    strategies:                        # label -> overrides
      fedavg: []
      fedprox: [strategy.name=fedprox, train.proximal_mu=0.01]
    partitions:
      iid: [data.partition=iid]
      dirichlet-0.5: [data.partition=dirichlet, data.alpha=0.5]
    seeds: 3                           # seeds 0, 1, 2 (the default); or a list: [0, 1, 7]
    baseline: fedavg                   # optional: the strategy the others are compared with
    models:                            # optional; default: the base config's model, by its name
      mlp: []
    variants:                          # optional: any other axis, e.g. local momentum
      momentum-0: [train.momentum=0]
      momentum-0.9: [train.momentum=0.9]

Every expanded run config is validated before anything runs, so a bad override stops the suite
with a message naming the run and the key. Runs go one after another, each into
``<output>/runs/<model>[/<variant>]/<partition>/<strategy>/seed-<s>/``; a run whose folder holds
a finished run is skipped, one with checkpoints but no summary is resumed, so an interrupted suite
continues where it stopped. The summary (``summary.md``, ``summary.csv``,
``accuracy-<model>[-<variant>]-<partition>.png``) gives per (model, variant, partition, strategy)
the mean and 95% t interval over seeds (``fedalign.report.intervals``) of final and best
accuracy, rounds and MiB to reach the target, total MiB, the median seconds per round (rounds
2..R) and wall time; with a
baseline, the per-seed difference of final and best accuracy to the baseline's run with the same
seed, its paired-t interval and p-value. The plots draw the mean over seeds with the interval as a
band.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedalign.config.load import load_config, read_yaml
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from fedalign.report.intervals import Interval, paired, t_interval
from fedalign.report.plots import Curve, accuracy_plot
from fedalign.report.results import cumulative_bytes, read_rows
from fedalign.runs.shared_ray import one_ray

SUITE_KEYS = {
    "name",
    "base",
    "overrides",
    "target_accuracy",
    "output",
    "strategies",
    "partitions",
    "seeds",
    "baseline",
    "models",
    "variants",
}
DEFAULT_SEEDS = 3  # the fewest that give an interval worth reading (2 give t = 12.7)
MIB = 2**20


@dataclass(frozen=True)
class BenchRun:
    """One cell of the grid at one seed; ``variant`` is ``None`` in a suite without variants."""

    model: str
    variant: str | None
    partition: str
    strategy: str
    seed: int
    cfg: RunConfig

    @property
    def cell(self) -> tuple[str, ...]:
        """The labels that place the run, outermost first (without the strategy and seed)."""
        return tuple(x for x in (self.model, self.variant, self.partition) if x is not None)

    @property
    def folder(self) -> Path:
        return Path("runs", *self.cell, self.strategy, f"seed-{self.seed}")


@dataclass(frozen=True)
class Suite:
    name: str
    output: Path
    target_accuracy: float | None
    runs: list[BenchRun]
    baseline: str | None = None

    @property
    def has_variants(self) -> bool:
        return any(r.variant is not None for r in self.runs)


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


def _seeds(raw: Any, count: int | None) -> list[int]:
    """The suite's seeds: ``--seeds N`` (seeds 0..N-1) over the suite's ``seeds:`` (a count or
    a list), by default ``DEFAULT_SEEDS``."""
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"--seeds: the number of seeds per cell, at least 1; got {count!r}")
        return list(range(count))
    if raw is None:
        return list(range(DEFAULT_SEEDS))
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return list(range(raw))
    if (
        isinstance(raw, list)
        and raw
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw)
        and len(set(raw)) == len(raw)
    ):
        return raw
    raise ConfigError(
        f"seeds: a number of seeds (at least 1) or a non-empty list of distinct integers >= 0, "
        f"got {raw!r}"
    )


def load_suite(
    path: str | Path,
    output: str | Path | None = None,
    overrides: Sequence[str] = (),
    seeds: int | None = None,
    baseline: str | None = None,
) -> Suite:
    """Read and expand a suite; every run's config is loaded (and so validated) here.
    ``overrides`` apply to every run after the suite's own (a scaled-down run of a full suite);
    ``seeds`` (a count: seeds 0..seeds-1) and ``baseline`` (a strategy label) replace the
    suite's."""
    path = Path(path)
    raw = read_yaml(path, "suite")  # missing, binary, bad YAML, empty: one line each
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
    seed_list = _seeds(raw.get("seeds"), seeds)
    target = raw.get("target_accuracy")
    if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ConfigError(f"target_accuracy: a fraction in (0, 1], got {target!r}")
    strategies = _labelled(raw.get("strategies"), "strategies")
    partitions = _labelled(raw.get("partitions"), "partitions")
    models = _labelled(raw["models"], "models") if "models" in raw else {None: []}
    variants = _labelled(raw["variants"], "variants") if "variants" in raw else {None: []}
    baseline = baseline if baseline is not None else raw.get("baseline")
    if baseline is not None and baseline not in strategies:
        raise ConfigError(
            f"baseline: {baseline!r} is not one of the suite's strategies ({', '.join(strategies)})"
        )
    name = str(raw.get("name", path.stem))
    runs = []
    for (model, m), (variant, v), (partition, p), (strategy, s), seed in itertools.product(
        models.items(), variants.items(), partitions.items(), strategies.items(), seed_list
    ):
        where = "/".join(x for x in (model, variant, partition, strategy) if x is not None)
        cell = [
            *common,
            *m,
            *v,
            *p,
            *s,
            *overrides,
            f"seed={seed}",
            f"name={strategy}-{partition}-s{seed}",
        ]
        try:
            cfg = load_config(base, cell)
        except ConfigError as exc:
            raise ConfigError(f"run {where}/seed-{seed}: {exc}") from None
        # without a models axis the label is the model's name, so tables and plots say "mlp"
        runs.append(BenchRun(model or cfg.model.name, variant, partition, strategy, seed, cfg))
    out = Path(output) if output is not None else Path(str(raw.get("output", Path("bench") / name)))
    return Suite(name, out, None if target is None else float(target), runs, baseline)


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
    """Run every cell not finished yet; returns what happened to each (ran, resumed, skipped).
    The suite's runs on Ray share one Ray and its actor pools (``fedalign.runs.shared_ray``):
    Ray's start-up, about 20 s on a busy machine, is paid once, not once per run."""
    from fedalign.runs.runner import run

    done = []
    sharing = False
    with contextlib.ExitStack() as stack:
        for i, cell in enumerate(suite.runs, 1):
            folder = suite.output / cell.folder
            label = f"[{i}/{len(suite.runs)}] {'/'.join(cell.folder.parts[1:])}"
            if finished_run(folder) is not None:
                print(f"{label}: finished before, skipped", flush=True)
                done.append((cell, "skipped"))
                continue
            if cell.cfg.simulation.backend == "ray" and not sharing:
                stack.enter_context(one_ray())  # from the first run that needs Ray on
                sharing = True
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
    """One finished run's numbers for the summary (``COLUMNS``' keys) and its rows."""
    rows = read_rows(run_dir)
    evaluated = [r for r in rows if r.get("test_accuracy") is not None]
    trained = [r for r in rows if r["round"] > 0 and r.get("seconds_total") is not None]
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds, spent = reach(rows, target)
    return {
        "final_accuracy": evaluated[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in evaluated),
        "rounds_to_target": rounds,
        "mib_to_target": None if spent is None else spent / MIB,
        "mib_total": cumulative_bytes(rows)[-1] / MIB,
        # the median of rounds 2..R: round 1 also waits for the Ray workers to start (tens of
        # seconds at load); round 1 alone when it is the only one
        "seconds_per_round": (
            statistics.median(r["seconds_total"] for r in trained[1:] or trained)
            if trained
            else None
        ),
        "wall_seconds": summary.get("wall_seconds"),
        "rows": rows,
    }


@dataclass(frozen=True)
class Column:
    """A summary value: its key in ``run_metrics``, its table header (``{target}`` filled in),
    the factor from the CSV's unit to the table's and the table's decimals."""

    key: str
    header: str
    scale: float = 1.0
    digits: int = 1


COLUMNS = (
    Column("final_accuracy", "final acc (%)", 100, 2),
    Column("best_accuracy", "best acc (%)", 100, 2),
    Column("rounds_to_target", "rounds to {target}"),
    Column("mib_to_target", "MiB to {target}"),
    Column("mib_total", "MiB total"),
    Column("seconds_per_round", "s/round", digits=2),
    Column("wall_seconds", "wall s"),
)
PAIRED = ("final_accuracy", "best_accuracy")  # compared with the baseline seed by seed
REACHED = ("rounds_to_target", "mib_to_target")  # over the seeds that reached the target


def _by_seed(runs: Sequence[dict], key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in runs}


def csv_columns(has_baseline: bool) -> list[str]:
    """summary.csv's header: accuracies as fractions, MiB, seconds; ``_ci95_low/high`` bound the
    95% t interval over seeds (empty for one seed), ``_diff_`` the paired difference to the
    baseline."""
    columns = ["model", "variant", "partition", "strategy", "seed_count", "seeds"]
    for column in COLUMNS:
        columns += [f"{column.key}_{s}" for s in ("mean", "std", "ci95_low", "ci95_high")]
        if column.key == REACHED[-1]:
            columns.append("reached")
    if has_baseline:
        columns += ["baseline", "paired_seeds"]
        for key in PAIRED:
            columns += [f"{key}_diff_{s}" for s in ("mean", "ci95_low", "ci95_high", "p")]
    return columns


def _interval_fields(prefix: str, iv: Interval | None, std: bool = True) -> dict[str, Any]:
    fields = {
        f"{prefix}_mean": None if iv is None else iv.mean,
        f"{prefix}_ci95_low": None if iv is None else iv.low,
        f"{prefix}_ci95_high": None if iv is None else iv.high,
    }
    if std:
        fields[f"{prefix}_std"] = None if iv is None else iv.std
    return fields


def _record(
    key: tuple[str, str | None, str, str],
    runs: Sequence[dict],
    baseline: str | None,
    baseline_runs: Sequence[dict] | None,
) -> dict[str, Any]:
    """One row of summary.csv (values unformatted; ``None`` where there is none)."""
    model, variant, partition, strategy = key
    record: dict[str, Any] = {
        "model": model,
        "variant": variant,
        "partition": partition,
        "strategy": strategy,
        "seed_count": len(runs),
        "seeds": " ".join(str(r["seed"]) for r in runs),
    }
    for column in COLUMNS:
        reached = [r[column.key] for r in runs if r[column.key] is not None]
        record.update(_interval_fields(column.key, t_interval(reached) if reached else None))
        if column.key == REACHED[-1]:
            record["reached"] = len(reached)
    if baseline is not None:
        record.update(baseline=baseline, paired_seeds=0)
        for k in PAIRED:
            comparison = (
                None
                if baseline_runs is None
                else paired(_by_seed(runs, k), _by_seed(baseline_runs, k))
            )
            difference = None if comparison is None else comparison.difference
            record.update(_interval_fields(f"{k}_diff", difference, std=False))
            record[f"{k}_diff_p"] = None if comparison is None else comparison.p_value
            record["paired_seeds"] = 0 if difference is None else difference.n
    return record


def _text(record: dict[str, Any], column: Column) -> str:
    """A table cell: ``mean ± half-width`` of the t interval (it is symmetric), the mean alone
    for one seed, and how many seeds reached the target where not all did."""
    mean, high = record[f"{column.key}_mean"], record[f"{column.key}_ci95_high"]
    if mean is None:
        return "not reached"
    text = f"{mean * column.scale:.{column.digits}f}"
    if high is not None:
        text += f" ± {(high - mean) * column.scale:.{column.digits}f}"
    if column.key in REACHED and record["reached"] < record["seed_count"]:
        text += f" ({record['reached']}/{record['seed_count']} seeds)"
    return text


def _difference_text(record: dict[str, Any], key: str) -> str:
    """The paired difference to the baseline in percentage points: mean [interval], p."""
    if record["strategy"] == record["baseline"]:
        return "baseline"
    if not record["paired_seeds"]:
        return "no seed shared with the baseline"
    mean, low, high = (record[f"{key}_diff_{s}"] for s in ("mean", "ci95_low", "ci95_high"))
    if low is None:
        return f"{100 * mean:+.2f} (1 seed)"
    return (
        f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}], p={record[f'{key}_diff_p']:.3f}"
    )


def summarise_suite(suite: Suite) -> list[dict[str, Any]]:
    """Per (model, variant, partition, strategy): the finished seeds' metrics aggregated; writes
    summary.md, summary.csv and one plot per (model, variant, partition) into the suite folder
    and returns summary.csv's rows."""
    groups: dict[tuple[str, str | None, str, str], list[dict]] = {}
    for run in suite.runs:
        run_dir = finished_run(suite.output / run.folder)
        if run_dir is not None:
            groups.setdefault((run.model, run.variant, run.partition, run.strategy), []).append(
                {"seed": run.seed, **run_metrics(run_dir, suite.target_accuracy)}
            )
    if not groups:  # an empty table and no plot would only hide that nothing ran
        raise FileNotFoundError(
            f"{suite.output}: no finished run of suite {suite.name} to summarise "
            f"(run the suite without --summary-only first)"
        )
    target = "target" if suite.target_accuracy is None else f"{100 * suite.target_accuracy:g}%"
    baseline = suite.baseline
    header = [
        "model",
        *(["variant"] if suite.has_variants else []),
        "partition",
        "strategy",
        "seeds",
        *(c.header.format(target=target) for c in COLUMNS),
        *([f"Δ final acc vs {baseline} (pp)"] if baseline is not None else []),
    ]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    records = []
    for key, runs in groups.items():
        baseline_runs = None if baseline is None else groups.get((*key[:3], baseline))
        record = _record(key, runs, baseline, baseline_runs)
        cells = [
            record["model"],
            *([record["variant"]] if suite.has_variants else []),
            record["partition"],
            record["strategy"],
            str(len(runs)),
            *(_text(record, c) for c in COLUMNS),
            *([_difference_text(record, "final_accuracy")] if baseline is not None else []),
        ]
        table.append("| " + " | ".join(cells) + " |")
        records.append(record)
    note = (
        "Each cell: mean ± half-width of the 95% confidence interval over the cell's seeds "
        "(Student t on the per-seed values, n - 1 degrees of freedom); one seed: its value, no "
        "interval. Rounds and MiB to the target: over the seeds that reached it. s/round: a run's "
        "median round from round 2 on (metrics' seconds_total; round 1 also starts the Ray "
        "workers), wall s: the whole run, start-up included."
    )
    if baseline is not None:
        note += (
            f" Δ final acc vs {baseline}: per seed, the final accuracy minus {baseline}'s run with "
            "the same seed (same partition, initial model and sampling), in percentage points: "
            "mean [95% paired-t interval], p: two-sided paired t-test."
        )
    suite.output.mkdir(parents=True, exist_ok=True)
    (suite.output / "summary.md").write_text(
        f"# {suite.name}\n\n{note}\n\n" + "\n".join(table) + "\n"
    )
    with open(suite.output / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, csv_columns(baseline is not None))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)
    _plot(suite, groups)
    print("\n".join(table))
    return records


def _plot(suite: Suite, groups: dict[tuple[str, str | None, str, str], list[dict]]) -> None:
    """Accuracy against rounds and against MiB, one line per strategy: the mean over seeds, with
    the 95% t interval at each round as a band (none for one seed)."""
    for cell in dict.fromkeys(key[:3] for key in groups):
        lines = {}
        for key, runs in groups.items():
            if key[:3] != cell:
                continue
            curves = [
                [
                    (r["round"], 100 * r["test_accuracy"], b / MIB)
                    for r, b in zip(run["rows"], cumulative_bytes(run["rows"]))
                    if r.get("test_accuracy") is not None
                ]
                for run in runs
            ]
            length = min(len(c) for c in curves)
            accuracy = [t_interval([c[i][1] for c in curves]) for i in range(length)]
            mib = [statistics.fmean(c[i][2] for c in curves) for i in range(length)]
            band = len(runs) > 1
            lines[f"{key[3]} (n={len(runs)})"] = Curve(
                [p[0] for p in curves[0][:length]],
                mib,
                [iv.mean for iv in accuracy],
                low=[iv.low for iv in accuracy] if band else None,
                high=[iv.high for iv in accuracy] if band else None,
            )
        labels = [x for x in cell if x is not None]
        accuracy_plot(
            lines,
            suite.output / f"accuracy-{'-'.join(labels)}.png",
            title=f"{suite.name}: {', '.join(labels)} (mean over seeds, band: 95% t interval)",
            dpi=110,
        )
