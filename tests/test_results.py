"""The run folder's tables: metrics.csv has a column for every scalar any row has, and is rewritten
whole (atomically) when a row brings a new one; metrics.jsonl keeps every row as written."""

from __future__ import annotations

import csv

from fedalign.report.results import CSV_COLUMNS, RunRecorder, read_rows


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_metrics_csv_gets_every_column_even_those_that_appear_late(tmp_path):
    recorder = RunRecorder(tmp_path)
    recorder.record({"round": 0, "test_accuracy": 0.1, "seconds_evaluate": 0.5})
    first_header, _ = read_csv(tmp_path / "metrics.csv")
    recorder.record(
        {
            "round": 1,
            "test_accuracy": 0.8,
            "seconds_train": 2.0,
            "seconds_match": 0.25,
            "attempts": 2,
            "failures": [{"partition": 1, "reason": "NaN"}],  # nested: jsonl only
            "bytes_by_phase": {"train": {"down": 10, "up": 10}},
        }
    )
    recorder.record({"round": 2, "test_accuracy": 0.85, "seconds_train": 1.5, "attempts": 1})
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert first_header == CSV_COLUMNS
    assert header == [*CSV_COLUMNS, "attempts", "seconds_match"]
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert [r["attempts"] for r in rows] == ["", "2", "1"]
    assert [r["seconds_match"] for r in rows] == ["", "0.25", ""]
    assert [r["seconds_train"] for r in rows] == ["", "2.0", "1.5"]
    assert "failures" not in header and "bytes_by_phase" not in header
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]
    assert read_rows(tmp_path)[1]["failures"] == [{"partition": 1, "reason": "NaN"}]


def test_truncating_for_a_resume_keeps_the_columns_of_the_kept_rows(tmp_path):
    recorder = RunRecorder(tmp_path)
    for number in range(3):
        recorder.record({"round": number, "test_accuracy": 0.5, f"seconds_phase{number}": 1.0})
    again = RunRecorder(tmp_path)
    again.truncate_after(1)
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == [*CSV_COLUMNS, "seconds_phase0", "seconds_phase1"]
    assert [r["round"] for r in rows] == ["0", "1"]
    again.record({"round": 2, "test_accuracy": 0.6})
    assert [r["round"] for r in read_csv(tmp_path / "metrics.csv")[1]] == ["0", "1", "2"]
    assert [r["round"] for r in read_rows(tmp_path)] == [0, 1, 2]
