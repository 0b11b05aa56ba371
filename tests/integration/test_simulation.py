"""Integration: real Flower simulations on Ray (digits, a few rounds), through the CLI and
runner."""

import contextlib
import importlib.util
import io
import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from fedalign.cli import main
from fedalign.config.load import load_config
from fedalign.data import Arrays, Federation
from fedalign.data.shared import shared_copy
from fedalign.report.results import read_rows
from fedalign.runs import runner
from fedalign.runs.runner import run
from tests.helpers import DIGITS

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Printed:
    """What ``fedalign run`` wrote to its standard output and error."""

    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``fedalign run`` in this process, on the session's Ray (``main`` returns the exit status;
    the ``python -m fedalign.cli`` entry point starts the runs of test_interrupt.py and
    test_reliability.py). Its output is what the command writes to ``sys.stdout`` and
    ``sys.stderr``, neither a terminal."""
    out = tmp_path_factory.mktemp("runs")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(
            ["run", str(DIGITS), "--output", str(out), "--no-progress"]
            + ["--set", "strategy.rounds=3"]
        )
    assert code == 0, stderr.getvalue()[-3000:]
    (run_dir,) = list(out.iterdir())
    return Printed(stdout.getvalue(), stderr.getvalue()), run_dir


def test_cli_writes_a_complete_run_folder(cli_run):
    printed, run_dir = cli_run
    for name in (
        "config.yaml",
        "partition.json",
        "metrics.jsonl",
        "metrics.csv",
        "model.safetensors",
        "summary.json",
        "accuracy.png",
    ):
        assert (run_dir / name).is_file(), name
    assert "final test accuracy" in printed.stdout
    # one log line per round on stderr, though the bar is off (--no-progress, and no terminal)
    lines = [line for line in printed.stderr.splitlines() if re.match(r"round \d+/3", line)]
    assert [line.split(":")[0] for line in lines] == [
        "round 0/3 (initial model)",
        "round 1/3",
        "round 2/3",
        "round 3/3",
    ]
    assert "\r" not in printed.stderr
    rows = read_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert r["clients_ok"] == 4 and r["clients_failed"] == 0
        assert r["bytes_down"] > 0 and r["bytes_up"] == r["bytes_down"]
        assert r["seconds_train"] > 0
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("round,test_accuracy")
    partition = json.loads((run_dir / "partition.json").read_text())
    assert len(partition["label_histogram"]) == 4


def test_federated_training_beats_chance_and_improves(cli_run):
    _, run_dir = cli_run
    rows = read_rows(run_dir)
    assert rows[0]["test_accuracy"] < 0.3  # untrained: about chance (10 classes)
    assert rows[-1]["test_accuracy"] > 0.6  # three rounds of FedAvg on digits
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["test_accuracy"]


def test_same_config_and_seed_repeat_the_metrics(cli_run, tmp_path):
    _, first_dir = cli_run
    cfg = load_config(first_dir / "config.yaml")  # the resolved config replays the run
    outcome = run(cfg, output_dir=tmp_path, progress=False)
    keys = ("test_accuracy", "test_loss", "train_loss", "bytes_down", "bytes_up")
    first = [{k: r[k] for k in keys} for r in read_rows(first_dir)]
    again = [{k: r[k] for k in keys} for r in read_rows(outcome.run_dir)]
    assert first == again


def test_flowers_own_dispatch_gives_the_same_metrics(cli_run, tmp_path):
    """simulation.fast_dispatch (on in the CLI run) changes how messages reach the actors and
    skips the info query, not what the clients compute."""
    _, first_dir = cli_run
    cfg = load_config(first_dir / "config.yaml", ["simulation.fast_dispatch=false"])
    outcome = run(cfg, output_dir=tmp_path, progress=False)
    keys = ("test_accuracy", "test_loss", "train_loss", "clients_ok", "bytes_down", "bytes_up")
    first = [{k: r[k] for k in keys} for r in read_rows(first_dir)]
    again = [{k: r[k] for k in keys} for r in read_rows(outcome.run_dir)]
    assert first == again


def test_clients_read_the_shared_data_copy_with_the_same_metrics(cli_run, tmp_path, monkeypatch):
    """simulation.shared_data (on in the CLI run): the clients map the copy the driver writes into
    the run folder; with it off they load and partition the data themselves, with the same
    metrics. A copy whose labels are shifted changes what they train on, so they do read it."""
    _, first_dir = cli_run
    cfg = load_config(first_dir / "config.yaml", ["simulation.shared_data=false"])
    outcome = run(cfg, output_dir=tmp_path / "off", progress=False)
    keys = ("test_accuracy", "test_loss", "train_loss", "clients_ok", "bytes_down", "bytes_up")
    first = [{k: r[k] for k in keys} for r in read_rows(first_dir)]
    assert first == [{k: r[k] for k in keys} for r in read_rows(outcome.run_dir)]
    assert not (first_dir / runner.DATA_COPY).exists()  # removed when the run ended

    def shifted_copy(fed, directory, key):
        y = (np.asarray(fed.train.y) + 1) % fed.num_classes
        train = Arrays(fed.train.X, y, fed.num_classes)
        shifted = Federation(
            fed.dataset,
            train,
            fed.test_arrays,
            fed.parts,
            fed.val_fraction,
            fed.seed,
            fed.scheme,
            fed.options,
            splits=fed.splits,
        )
        return shared_copy(shifted, directory, key)

    monkeypatch.setattr(runner, "shared_copy", shifted_copy)
    cfg = load_config(first_dir / "config.yaml", ["strategy.rounds=1"])
    shifted = read_rows(run(cfg, output_dir=tmp_path / "shifted", progress=False).run_dir)
    assert shifted[1]["train_loss"] != first[1]["train_loss"]
    assert shifted[1]["test_accuracy"] < 0.5 < first[1]["test_accuracy"]


def test_fedprox_with_client_sampling(tmp_path):
    cfg = load_config(
        DIGITS,
        [
            "strategy.name=fedprox",
            "train.proximal_mu=0.1",
            "strategy.fraction_train=0.5",
            "strategy.rounds=2",
            "strategy.fraction_evaluate=1.0",
        ],
    )
    outcome = run(cfg, output_dir=tmp_path, progress=False)
    rows = read_rows(outcome.run_dir)
    assert [r["clients_sampled"] for r in rows[1:]] == [2, 2]
    assert rows[-1]["test_accuracy"] > 0.3
    assert rows[-1]["val_accuracy"] is not None


def test_report_and_partition_commands(cli_run, tmp_path, capsys):
    # ``fedalign report`` and ``partition`` in this process (``main`` returns the exit status)
    _, run_dir = cli_run
    capsys.readouterr()
    assert main(["report", str(run_dir), str(run_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| run | final acc (%)")
    assert out.count(run_dir.name) == 2 and out.count("\n| ") == 2
    assert (tmp_path / "report.md").is_file() and (
        tmp_path / "comparison.png"
    ).stat().st_size > 1000
    assert main(["partition", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "digits / iid" in out
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl is missing" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("mlflow") is None,
    reason="needs the tensorboard and mlflow extras (pip install 'fedalign[tensorboard,mlflow]')",
)
def test_tensorboard_and_mlflow_receive_the_curves_of_a_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = load_config(DIGITS, ["strategy.rounds=2", "output.trackers=[tensorboard, mlflow]"])
    outcome = run(cfg, output_dir=tmp_path / "runs", progress=False)
    accuracy = [(r["round"], r["test_accuracy"]) for r in read_rows(outcome.run_dir)]
    assert len(accuracy) == 3

    events = EventAccumulator(str(outcome.run_dir / "tensorboard"))
    events.Reload()
    board = [(e.step, e.value) for e in events.Scalars("test/accuracy")]
    assert board == [(step, pytest.approx(value)) for step, value in accuracy]  # float32

    client = MlflowClient()
    (tracked,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    assert tracked.info.run_name == outcome.run_dir.name
    assert tracked.info.status == "FINISHED"
    history = client.get_metric_history(tracked.info.run_id, "test/accuracy")
    assert [(m.step, m.value) for m in history] == accuracy
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert artifacts == {"summary.json", "accuracy.png"}
    assert tracked.data.metrics["summary/final_accuracy"] == accuracy[-1][1]
