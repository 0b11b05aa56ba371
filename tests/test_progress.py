"""The per-round log line and the progress output: one line per metrics row, with or without a
bar; log records and warnings written above the bar, not through it."""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings

from fedalign.fl.round_log import RoundLog
from fedalign.runs.progress import RoundPrinter, round_line, round_output


def engine_row(number: int, accuracy: float | None = 0.8327) -> dict:
    """A metrics row as the round engine makes it (``RoundLog.row``)."""
    rlog = RoundLog(number, clients_sampled=10, clients_ok=9, clients_failed=1)
    rlog.train_loss = 0.51234
    rlog.bytes_down, rlog.bytes_up = 3 * 2**20, 2**20
    rlog.seconds = {"train": 4.1, "aggregate": 0.21, "evaluate": 0.3, "total": 4.61}
    rlog.extra["attempts"] = 1
    metrics = {} if accuracy is None else {"test-accuracy": accuracy, "test-loss": 0.48123}
    return rlog.row(metrics)


def test_a_round_line_says_accuracy_loss_clients_mib_and_seconds_per_phase():
    line = round_line(engine_row(3), rounds=10)
    assert line == (
        "round 3/10: test acc 83.27% loss 0.4812 | train loss 0.5123 | clients 9 ok 1 failed | "
        "4.00 MiB | s: train 4.10 aggregate 0.21 evaluate 0.30 total 4.61"
    )
    assert "\n" not in line


def test_round_zero_and_a_round_without_evaluation():
    initial = RoundLog(0)
    initial.seconds = {"evaluate": 0.5}
    line = round_line(initial.row({"test-accuracy": 0.1, "test-loss": 2.3}), rounds=2)
    assert line == "round 0/2 (initial model): test acc 10.00% loss 2.3000 | s: evaluate 0.50"
    assert "test acc - loss -" in round_line(engine_row(1, accuracy=None), rounds=2)


def test_without_a_bar_each_row_is_one_plain_line():
    stream = io.StringIO()
    with round_output(3, bar=False, stream=stream) as printer:
        for number in range(4):
            printer(engine_row(number))
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "round 0/3 (initial model)",
        "round 1/3",
        "round 2/3",
        "round 3/3",
    ]
    assert "\r" not in stream.getvalue()


def screen_lines(output: str) -> list[str]:
    """What a terminal shows of ``output``: each line as left by its last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in output.split("\n")]


def test_with_a_bar_lines_log_records_and_warnings_go_above_it(capsys):
    console = logging.StreamHandler(sys.stderr)  # a console handler, as logging.basicConfig's
    root = logging.getLogger()
    root.addHandler(console)
    try:
        with round_output(2, bar=True, desc="demo") as printer:
            printer(engine_row(0))
            printer(engine_row(1))
            logging.getLogger("fedalign").warning("round 1: client 3 rejected: NaN")
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
            printer(engine_row(2))
            bar_state = printer.bar.n
    finally:
        root.removeHandler(console)
    assert bar_state == 2
    shown = screen_lines(capsys.readouterr().err)
    rounds = [line for line in shown if re.match(r"round \d+/", line)]
    assert [line.split(":")[0] for line in rounds] == [
        "round 0/2 (initial model)",
        "round 1/2",
        "round 2/2",
    ]
    assert "round 1: client 3 rejected: NaN" in shown
    assert any(re.search(r"UserWarning: a library's warning$", line) for line in shown)
    # each message is a line of its own: the bar is erased before it and redrawn after it
    assert not any("%|" in line for line in rounds)
    assert shown[-2].startswith("demo: 100%|")


def test_the_printer_advances_the_bar_only_for_trained_rounds():
    written: list[str] = []
    printer = RoundPrinter(5, written.append)
    printer(engine_row(0))
    printer(engine_row(1))
    assert len(written) == printer.rows == 2
