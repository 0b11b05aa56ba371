"""What a run prints while it goes: one line per round, above the progress bar when there is one.

A long run must be followable from a terminal, a ``nohup`` file, a Slurm or a CI log, so every
metrics row (the same row metrics.jsonl gets) becomes one line: round, test accuracy and loss,
training loss, clients ok/failed, MiB communicated and seconds per phase. Under ``fedalign run``
the lines, fedalign's and Flower's log records and Python warnings are all written through the
progress bar's writer (``tqdm.write``), so none of them breaks the bar; under ``flwr run`` the
ServerApp writes the same lines to stderr, which Flower streams to ``flwr run --stream``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

MIB = 2**20
Write = Callable[[str], None]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def round_line(row: Mapping[str, Any], rounds: int) -> str:
    """The log line of one metrics row, e.g. ``round 3/10: test acc 83.27% loss 0.4812 | train
    loss 0.5123 | clients 10 ok 0 failed | 1.53 MiB | s: train 4.10 aggregate 0.21 evaluate
    0.30 total 4.61``. Round 0 is the initial model's evaluation."""
    number = row["round"]
    parts = [
        f"round {number}/{rounds}"
        + (" (initial model)" if number == 0 else "")
        + f": test acc {_percent(row.get('test_accuracy'))}"
        + f" loss {_number(row.get('test_loss'))}"
        + (
            f" val acc {_percent(row['val_accuracy'])}"
            if row.get("val_accuracy") is not None
            else ""
        )
    ]
    if number > 0:
        parts.append(f"train loss {_number(row.get('train_loss'))}")
        parts.append(f"clients {row.get('clients_ok', 0)} ok {row.get('clients_failed', 0)} failed")
        mib = (int(row.get("bytes_down", 0)) + int(row.get("bytes_up", 0))) / MIB
        parts.append(f"{mib:.2f} MiB")
    phases = {k.removeprefix("seconds_"): v for k, v in row.items() if k.startswith("seconds_")}
    total = phases.pop("total", None)
    if total is not None:
        phases["total"] = total  # last, whatever order the phases ran in
    if phases:
        parts.append("s: " + " ".join(f"{phase} {float(s):.2f}" for phase, s in phases.items()))
    return " | ".join(parts)


class RoundPrinter:
    """The round callback that writes each row's line (and advances ``bar``, when given)."""

    def __init__(self, rounds: int, write: Write, bar: tqdm | None = None) -> None:
        self.rounds = rounds
        self.write = write
        self.bar = bar
        self.rows = 0  # lines written so far

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if self.bar is not None and row["round"] > 0:
            self.bar.update(1)
            if row.get("test_accuracy") is not None:
                self.bar.set_postfix(acc=_percent(row["test_accuracy"]), refresh=False)
        self.write(round_line(row, self.rounds))


def stderr_writer(stream: TextIO | None = None) -> Write:
    """Write whole lines to ``stream`` (default: the current ``sys.stderr``, which Flower mirrors
    into the log ``flwr run --stream`` shows), flushed at once."""

    def write(line: str) -> None:
        out = stream or sys.stderr
        out.write(line + "\n")
        out.flush()

    return write


@contextmanager
def round_output(
    rounds: int, *, bar: bool, desc: str = "", done: int = 0, stream: TextIO | None = None
) -> Iterator[RoundPrinter]:
    """The round printer of a run, for the duration of the run. With ``bar``, a progress bar on
    ``stream`` (default stderr) and every line, log record and warning written above it; without,
    plain lines."""
    stream = stream or sys.stderr
    if not bar:
        yield RoundPrinter(rounds, stderr_writer(stream))
        return
    progress = tqdm(total=rounds, initial=done, desc=desc, unit="round", file=stream)

    def write(line: str) -> None:
        progress.write(line, file=stream)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        write(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    try:
        with (
            warnings.catch_warnings(),  # restores warnings.showwarning afterwards
            logging_redirect_tqdm(
                loggers=[logging.getLogger(), logging.getLogger("flwr")], tqdm_class=tqdm
            ),
        ):
            warnings.showwarning = show_warning
            yield RoundPrinter(rounds, write, progress)
    finally:
        progress.close()
