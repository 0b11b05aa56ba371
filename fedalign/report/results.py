"""Run folders: what a run writes as it goes, and comparison reports over several runs.

A run folder holds::

    config.yaml        the resolved config, derived seeds included (rerun it with `fedalign run`)
    partition.json     the partition summary: sizes and label histogram per client
    metrics.jsonl      one JSON object per round, appended as each round ends
    metrics.csv        the same rows as a table
    model.safetensors  the final global model
    summary.json       final/best accuracy, rounds, bytes, wall time
    accuracy.png       test accuracy by round and by bytes communicated

Rows are flushed after every round, so an interrupted run keeps every finished round.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedalign.core.errors import RunFolderError
from fedalign.report.plots import Curve, accuracy_plot
from fedalign.report.trackers import TrackerSet

CSV_COLUMNS = [
    "round",
    "test_accuracy",
    "test_loss",
    "val_accuracy",
    "train_loss",
    "clients_sampled",
    "clients_ok",
    "clients_failed",
    "bytes_down",
    "bytes_up",
    "seconds_train",
    "seconds_aggregate",
    "seconds_evaluate",
    "seconds_total",
]


class RunRecorder:
    """Writes a run folder incrementally; every row goes to metrics.jsonl, metrics.csv and the
    run's trackers (``open_trackers``)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.trackers = TrackerSet({})
        self._csv_columns: list[str] = []

    def write_json(self, name: str, payload: Any) -> None:
        (self.dir / name).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)

    def open_trackers(
        self, names: Sequence[str], config: Mapping[str, Any], resume_after: int | None = None
    ) -> None:
        """Start the trackers ``names`` (``output.trackers``); rows recorded from now on reach
        them too."""
        self.trackers = TrackerSet.open(names, self.dir, config, resume_after)

    def record(self, row: Mapping[str, Any]) -> None:
        row = dict(row)
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv(row)
        self.trackers.log(row)

    def _write_csv(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` to metrics.csv; when it brings a column the header lacks (a phase that
        first ran this round, a strategy's own number), rewrite the file with every column."""
        columns = csv_columns(self.rows)
        path = self.dir / "metrics.csv"
        if columns == self._csv_columns and path.is_file():
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerow(_csv_row(row, columns))
            return
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(_csv_row(r, columns) for r in self.rows)
        os.replace(tmp, path)  # a reader never sees half a rewrite
        self._csv_columns = columns

    def truncate_after(self, last_round: int) -> None:
        """Keep the rows of rounds up to ``last_round`` (a resumed run redoes the later ones) and
        drop a last line torn by a kill during its append. The files are rewritten beside the old
        ones and renamed over them, so a kill in here leaves the old rows or the new, never a
        folder without metrics."""
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            raise RunFolderError(f"{self.dir} is not a run folder: {path.name} is missing")
        rows, bad = parse_rows(path)
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if bad and (len(bad) > 1 or bad[0] != lines[-1]):
            raise RunFolderError(f"{path}: a line before the last is not a metrics row: {bad[0]!r}")
        scratch = RunRecorder(self.dir / ".rewrite")
        for name in ("metrics.jsonl", "metrics.csv"):
            (scratch.dir / name).unlink(missing_ok=True)
        for row in rows:
            if row["round"] <= last_round:
                scratch.record(row)
        for name in ("metrics.csv", "metrics.jsonl"):  # the rows' source of truth last
            if (scratch.dir / name).exists():
                os.replace(scratch.dir / name, self.dir / name)
            else:
                (self.dir / name).unlink(missing_ok=True)
        scratch.dir.rmdir()
        self.rows, self._csv_columns = scratch.rows, scratch._csv_columns
        self.trackers.rewind(last_round)

    def save_model(
        self, state_dict: Mapping[str, torch.Tensor], name: str = "model.safetensors"
    ) -> None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(self.dir / name)
        )

    def close(self, failed: bool = False) -> None:
        """End the trackers' runs (``failed``: the run stopped before its last round)."""
        self.trackers.close(failed)

    def finish(self, wall_seconds: float, plot: bool = True) -> dict[str, Any]:
        """Write summary.json (and accuracy.png), hand both and the summary to the trackers,
        and end their runs."""
        summary = summarise(self.rows)
        summary["wall_seconds"] = round(wall_seconds, 2)
        self.write_json("summary.json", summary)
        files = [self.dir / "summary.json"]
        if plot and self.rows:
            plot_runs({self.dir.name: self.rows}, self.dir / "accuracy.png", title=self.dir.name)
            files.append(self.dir / "accuracy.png")
        self.trackers.summarise(summary, files)
        self.close()
        return summary


def csv_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """metrics.csv's header: the main columns, then every other key some row has a scalar under
    (sorted); nested values (failures, bytes by phase, widths) are in metrics.jsonl only."""
    extra = {
        k
        for r in rows
        for k, v in r.items()
        if k not in CSV_COLUMNS and not isinstance(v, (dict, list))
    }
    return CSV_COLUMNS + sorted(extra)


def _csv_row(row: Mapping[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    return {k: "" if row.get(k) is None else row[k] for k in columns}


def read_json(path: Path, what: str) -> Any:
    """The JSON document at ``path`` (``what`` names it in errors), or ``RunFolderError``."""
    if not path.is_file():
        raise RunFolderError(f"{path.parent} is not a run folder: {path.name} is missing")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise RunFolderError(f"{path}: not text ({what} is UTF-8 JSON)") from None
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc.msg}; truncated write?)") from None


def parse_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a metrics.jsonl and the lines that are not (a last line torn by a kill during
    its append is one), or ``RunFolderError`` for a file that is not text."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise RunFolderError(f"{path}: not text (metrics.jsonl is UTF-8 JSON lines)") from None
    rows, bad = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
        else:
            bad.append(line)
    return rows, bad


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics rows of a run folder; a line that is not a JSON object with an integer
    ``round`` is a ``RunFolderError`` naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: {path.name} is missing")
    rows, bad = parse_rows(path)
    if bad:
        raise RunFolderError(
            f"{path}: {len(bad)} line(s) are not metrics rows (a JSON object with an integer "
            f"round), e.g. {bad[0][:60]!r}"
        )
    return rows


def _evaluated(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("test_accuracy") is not None]


def cumulative_bytes(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    total, out = 0, []
    for r in rows:
        total += int(r.get("bytes_down", 0)) + int(r.get("bytes_up", 0))
        out.append(total)
    return out


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    evaluated = _evaluated(rows)
    trained = [r for r in rows if r.get("round", 0) > 0]
    total_bytes = cumulative_bytes(rows)[-1] if rows else 0
    summary: dict[str, Any] = {
        "rounds": max((r["round"] for r in rows), default=0),
        "bytes_total": total_bytes,
        "clients_failed": sum(int(r.get("clients_failed", 0)) for r in trained),
    }
    restarts = sum(int(r.get("restarts", 0)) for r in trained)
    if restarts:  # simulations restarted on a fresh actor pool after a worker died
        summary["restarts"] = restarts
    if evaluated:
        best = max(evaluated, key=lambda r: r["test_accuracy"])
        summary.update(
            final_accuracy=evaluated[-1]["test_accuracy"],
            final_loss=evaluated[-1].get("test_loss"),
            best_accuracy=best["test_accuracy"],
            best_round=best["round"],
        )
    return summary


def plot_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str | None = None
) -> None:
    """Test accuracy against rounds and against bytes communicated, and the test loss against
    rounds, one line per run."""
    curves = {}
    for label, rows in runs.items():
        mib = dict(zip((r["round"] for r in rows), (b / 2**20 for b in cumulative_bytes(rows))))
        points = _evaluated(rows)
        rounds = [r["round"] for r in points]
        accuracy = [100 * r["test_accuracy"] for r in points]
        losses = [r.get("test_loss") for r in points]
        loss = None if any(v is None for v in losses) else [float(v) for v in losses]
        curves[label] = Curve(rounds, [mib[r] for r in rounds], accuracy, loss=loss)
    accuracy_plot(curves, path, title=title, legend_fontsize=8)


def _fmt(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def markdown_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One row per run: final and best accuracy, rounds, MiB communicated, seconds."""
    lines = [
        (
            "| run | final acc (%) | best acc (%) | best round | rounds | MiB total | train s "
            "| failed |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in runs.items():
        s = summarise(rows)
        train_s = sum(float(r.get("seconds_total", 0.0)) for r in rows)
        lines.append(
            f"| {label} | {_fmt(s.get('final_accuracy'), scale=100)} | "
            f"{_fmt(s.get('best_accuracy'), scale=100)} | {s.get('best_round', '-')} | "
            f"{s['rounds']} | {s['bytes_total'] / 2**20:.1f} | {train_s:.1f} | "
            f"{s['clients_failed']} |"
        )
    return "\n".join(lines) + "\n"
