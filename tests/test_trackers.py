"""Trackers get the rows metrics.jsonl gets: read back from TensorBoard's event files and from
MLflow's tracking store; a failing tracker is dropped with one warning and the run goes on.

The TensorBoard and MLflow tests need the extras (``pip install 'fedalign[tensorboard,mlflow]'``)
and are skipped, saying so, where they are missing."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from fedalign.config.load import load_config
from fedalign.core.errors import ConfigError
from fedalign.report.results import RunRecorder
from fedalign.report.trackers import (
    TRACKERS,
    default_tracking_uri,
    flat_config,
    missing_package,
    quiet_mlflow,
    scalars,
    tracker_name,
)
from tests.helpers import DIGITS

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="the tensorboard extra is not installed (pip install 'fedalign[tensorboard]')",
)
needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None,
    reason="the mlflow extra is not installed (pip install 'fedalign[mlflow]')",
)


def rows(rounds: int = 3) -> list[dict]:
    """Metrics rows shaped as the engine writes them."""
    out = []
    for number in range(rounds + 1):
        row = {
            "round": number,
            "test_accuracy": 0.1 + 0.2 * number,
            "test_loss": 2.0 / (1 + number),
            "val_accuracy": None,
            "clients_failed": number % 2,
            "bytes_up": 1000 * number,
            "seconds_evaluate": 0.5,
            "bytes_by_phase": {"train": {"down": 100 * number, "up": 90 * number}},
            "failures": [],
            "ray_nodes": ["00000000abcd"],
        }
        if number:
            row["seconds_train"] = 1.0 + number
        out.append(row)
    return out


def test_scalars_are_the_numbers_of_a_row_nested_ones_flattened():
    row = rows()[2]
    assert scalars(row) == {
        "test_accuracy": row["test_accuracy"],
        "test_loss": row["test_loss"],
        "clients_failed": 0.0,
        "bytes_up": 2000.0,
        "seconds_evaluate": 0.5,
        "bytes_by_phase/train/down": 200.0,
        "bytes_by_phase/train/up": 180.0,
        "seconds_train": 3.0,
    }
    assert flat_config({"name": "x", "train": {"lr": 0.05, "hidden": [10]}, "faults": []}) == {
        "name": "x",
        "train.lr": "0.05",
        "train.hidden": "[10]",
        "faults": "[]",
    }


def test_a_config_names_registered_trackers_only():
    assert load_config(DIGITS, ["output.trackers=[tensorboard, mlflow]"]).output.trackers == (
        "tensorboard",
        "mlflow",
    )
    assert load_config(DIGITS).output.trackers == ()  # nothing by default
    with pytest.raises(ConfigError, match=r"output.trackers\[0\]: unknown tracker 'wandb'"):
        load_config(DIGITS, ["output.trackers=[wandb]"])
    with pytest.raises(ConfigError, match="output.trackers: a tracker is named twice"):
        load_config(DIGITS, ["output.trackers=[mlflow, mlflow]"])


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert missing_package("mlflow") == (
        "tracker 'mlflow' needs the mlflow package: pip install 'fedalign[mlflow]'"
    )


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_rows_still_written(tmp_path, caplog):
    class Broken:
        def __init__(self, run_dir, config, *, resume_after=None):
            self.logged = 0

        def log(self, row):
            raise ConnectionError("tracking server unreachable\nsecond line")

        def close(self, failed=False):
            raise AssertionError("a dropped tracker is not closed")

    TRACKERS.register("broken", Broken, options={}, package="json", extra="none")
    try:
        recorder = RunRecorder(tmp_path)
        recorder.open_trackers(["broken"], {"name": "t"})
        with caplog.at_level(logging.WARNING, logger="fedalign"):
            for row in rows(2):
                recorder.record(row)
        recorder.close()
    finally:
        TRACKERS.unregister("broken")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["tracker broken dropped: ConnectionError: tracking server unreachable"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


@needs_tensorboard
def test_tensorboard_gets_every_curve_and_a_resume_replaces_the_redone_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = RunRecorder(tmp_path)
    recorder.open_trackers(["tensorboard"], {"name": "tb", "train": {"lr": 0.05}})
    for row in rows(3):
        recorder.record(row)
    recorder.close(failed=True)  # stopped after round 3; resumed after round 1's checkpoint
    resumed = RunRecorder(tmp_path)
    resumed.truncate_after(1)
    resumed.open_trackers(["tensorboard"], {"name": "tb"}, resume_after=1)
    redone = [dict(r, test_accuracy=r["test_accuracy"] / 2) for r in rows(3)[2:]]
    for row in redone:
        resumed.record(row)
    resumed.finish(1.0, plot=False)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    accuracy = [(e.step, round(e.value, 6)) for e in events.Scalars("test/accuracy")]
    expected = [(r["round"], round(r["test_accuracy"], 6)) for r in rows(3)[:2] + redone]
    assert accuracy == expected
    assert [e.step for e in events.Scalars("time/train")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("bytes/by_phase/train/down")] == [0, 100, 200, 300]
    assert "val/accuracy" not in events.Tags()["scalars"]  # null: not a number
    final = json.loads((tmp_path / "summary.json").read_text())["final_accuracy"]
    assert [round(e.value, 6) for e in events.Scalars("summary/final_accuracy")] == [
        round(final, 6)
    ]


@needs_tensorboard
def test_a_restart_in_the_same_run_replaces_the_redone_steps(tmp_path):
    """A simulation restarted on a fresh actor pool (``runner.restart_point``) cuts the rows back
    to its checkpoint in the same recorder, whose trackers are open: TensorBoard must hold each
    redone round once, with its new value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = RunRecorder(tmp_path)
    recorder.open_trackers(["tensorboard"], {"name": "tb"})
    for row in rows(3):
        recorder.record(row)
    recorder.truncate_after(1)
    redone = [dict(r, test_accuracy=r["test_accuracy"] / 2) for r in rows(3)[2:]]
    for row in redone:
        recorder.record(row)
    recorder.finish(1.0, plot=False)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    accuracy = [(e.step, round(e.value, 6)) for e in events.Scalars("test/accuracy")]
    assert accuracy == [(r["round"], round(r["test_accuracy"], 6)) for r in rows(3)[:2] + redone]


@needs_mlflow
def test_mlflow_gets_every_curve_and_the_config_and_a_resume_continues_the_run(
    tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    # MLflow's file store (its sqlite default is the same client API, and creating its tables
    # takes seconds)
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run_dir = tmp_path / "demo-20261127-000000"
    config = load_config(DIGITS, ["name=demo"]).to_dict()
    recorder = RunRecorder(run_dir)
    recorder.open_trackers(["mlflow"], config)
    for row in rows(2):
        recorder.record(row)
    recorder.close(failed=True)
    resumed = RunRecorder(run_dir)
    resumed.truncate_after(2)
    resumed.open_trackers(["mlflow"], config, resume_after=2)
    resumed.record(rows(3)[3])
    resumed.finish(1.0, plot=False)

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run.info.run_id
    history = client.get_metric_history(run.info.run_id, "test/accuracy")
    assert [(m.step, m.value) for m in history] == [
        (r["round"], r["test_accuracy"]) for r in rows(3)
    ]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "time/train")] == [
        1,
        2,
        3,
    ]
    final = json.loads((run_dir / "summary.json").read_text())["final_accuracy"]
    assert run.data.metrics["summary/final_accuracy"] == final
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]
    assert run.data.params["train.lr"] == str(config["train"]["lr"])
    assert run.data.params["model.options.hidden"] == json.dumps(
        config["model"]["options"]["hidden"]
    )


def test_tracker_names_group_what_a_metric_measures():
    names = ["test_accuracy", "train_loss", "seconds_train", "bytes_up", "clients_failed"]
    assert [tracker_name(n) for n in names] == [
        "test/accuracy",
        "train/loss",
        "time/train",
        "bytes/up",
        "clients/failed",
    ]
    assert tracker_name("bytes_by_phase/train/down") == "bytes/by_phase/train/down"
    assert tracker_name("wall_seconds") == "wall_seconds"


def test_mlflow_stores_beside_the_run_folders_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "out" / "demo-20261206-000000"
    assert default_tracking_uri(run_dir) == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db')}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(run_dir) == "http://127.0.0.1:5000"


def test_mlflow_info_lines_stay_off_the_terminal():
    quiet_mlflow()
    for name in ("mlflow", "alembic"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
