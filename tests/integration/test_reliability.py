"""Fault injection and kill/resume through real Flower simulations on Ray (digits)."""

import contextlib
import json
import os
import signal

import psutil
import pytest

from fedalign.cli import main
from fedalign.config.load import load_config
from fedalign.report.results import read_rows
from fedalign.runs.checkpoint import read_checkpoint
from fedalign.runs.runner import run
from tests.helpers import DIGITS
from tests.integration.processes import left_after, run_until_checkpoint

pytestmark = pytest.mark.integration


def test_faulty_clients_are_rejected_with_reasons_and_the_run_finishes(tmp_path):
    cfg = load_config(
        DIGITS,
        [
            "data.num_clients=6",
            "strategy.rounds=3",
            "strategy.max_update_norm=1000.0",
            (
                "faults=[{round: 2, client: 0, kind: raise}, {round: 2, client: 1, kind: nan},"
                " {round: 2, client: 2, kind: wrong-shape}, {round: 3, client: 3, kind: scale},"
                " {round: 3, client: 4, kind: missing-key}]"
            ),
        ],
    )
    outcome = run(cfg, output_dir=tmp_path, progress=False)
    rows = read_rows(outcome.run_dir)
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows[1:]] == [(6, 0), (3, 3), (4, 2)]
    reasons = {f["partition"]: f["reason"] for r in rows for f in r["failures"]}
    assert reasons[0] == "client error: injected failure in round 2"
    assert "contains NaN or Inf" in reasons[1]
    assert "shape" in reasons[2] and "expected" in reasons[2]
    assert "exceeds max_update_norm=1000" in reasons[3]
    assert "missing keys" in reasons[4]
    # The global model was never poisoned: accuracy is finite and keeps rising.
    accuracies = [r["test_accuracy"] for r in rows]
    assert accuracies[3] > accuracies[1] > 0.2


def test_a_client_slower_than_the_timeout_is_dropped_and_the_round_finishes(tmp_path):
    cfg = load_config(
        DIGITS,
        [
            "strategy.rounds=2",
            "strategy.timeout=5",  # a digits client answers in well under a second
            "faults=[{round: 2, client: 0, kind: slow, seconds: 6}]",
        ],
    )
    rows = read_rows(run(cfg, output_dir=tmp_path, progress=False).run_dir)
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows[1:]] == [(4, 0), (3, 1)]
    assert rows[2]["failures"][0]["reason"] == "no reply within strategy.timeout=5 s"
    assert rows[2]["failures"][0]["partition"] == 0


def test_too_few_valid_replies_retries_then_stops_keeping_finished_rounds(tmp_path, capsys):
    # ``fedalign`` in this process (the exit status is what ``main`` returns): no second Ray start
    faults = ", ".join(f"{{round: 2, client: {c}, kind: nan}}" for c in range(4))
    code = main(
        [
            "run",
            str(DIGITS),
            "--output",
            str(tmp_path),
            "--no-progress",
            "--set",
            "strategy.rounds=3",
            "--set",
            "strategy.round_retries=1",
            "--set",
            f"faults=[{faults}]",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "run stopped: round 2: fewer than min_train_clients=2 valid replies in 2 attempt(s)" in err
    )
    (run_dir,) = tmp_path.iterdir()
    assert [r["round"] for r in read_rows(run_dir)] == [0, 1]
    assert (run_dir / "checkpoints" / "round-000001.json").is_file()


def test_sigkill_then_resume_gives_the_uninterrupted_metrics(tmp_path, caplog):
    killed_out = tmp_path / "killed"
    settings = ["strategy.rounds=6", "name=kill"]
    with run_until_checkpoint(killed_out, settings, 3, tmp_path / "killed.log") as proc:
        try:
            started = psutil.Process(proc.pid).children(recursive=True)
            os.kill(proc.pid, signal.SIGKILL)  # the run only, as the OOM killer does
            proc.wait()
            left = left_after(started, 5)  # Ray's processes die with it, its agents included
            assert left == [], [p.name() for p in left]
        finally:
            with contextlib.suppress(ProcessLookupError):  # what is left of the run and its Ray
                os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = killed_out.iterdir()
    assert not (run_dir / "summary.json").exists()  # it really died mid-run
    # a quick round may checkpoint between the poll and the kill: resume after the last one
    last = max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("round-*.json"))
    assert 3 <= last < 6

    # the resumed part runs in this process: rounds 1..last came from the killed process
    checkpoint = run_dir / "checkpoints" / f"round-{last:06d}.json"
    killed_seconds = read_checkpoint(checkpoint).wall_seconds
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    assert f"resuming {run_dir} after round {last}" in caplog.text
    # the summary's wall time counts the killed segment too, not only the resumed one
    resumed_rounds = sum(r["seconds_total"] for r in read_rows(run_dir) if r["round"] > last)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert killed_seconds > 0 and summary["wall_seconds"] >= killed_seconds + resumed_rounds

    reference = run(
        load_config(DIGITS, ["strategy.rounds=6", "name=kill"]),
        output_dir=tmp_path / "reference",
        progress=False,
    )
    keys = ("round", "test_accuracy", "test_loss", "train_loss")
    got = [{k: r[k] for k in keys} for r in read_rows(run_dir)]
    want = [{k: r[k] for k in keys} for r in read_rows(reference.run_dir)]
    assert got == want  # bitwise: same floats on the same machine


def test_resume_refuses_a_folder_without_checkpoints(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(DIGITS.read_text())
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "no intact checkpoint to resume from" in capsys.readouterr().err


def test_a_dead_client_worker_restarts_the_pool_and_the_run_finishes_every_round(
    tmp_path, capfd, caplog, shared_ray
):
    # On the session's Ray: the crash kills an actor of the shared pool, which the restart
    # replaces (a pool with a dead actor is never reused). Two clients on the pool's two actors:
    # with more, those queued on the dying actor fail with it, a varying number (a round with
    # fewer than min_train_clients valid replies is then retried, and restarted from round 1).
    # pools built once the run has its first: the session's, or one built for it (run alone)
    first = shared_ray.built + (not shared_ray.pools)
    code = main(
        [
            *("run", str(DIGITS), "--output", str(tmp_path), "--no-progress"),
            *("--set", "strategy.rounds=3", "--set", "faults=[{round: 2, client: 1, kind: crash}]"),
            *("--set", "data.num_clients=2", "--set", "strategy.min_train_clients=1"),
        ]
    )
    terminal = "".join(capfd.readouterr())  # Ray's driver prints its raylets' errors on stdout
    assert code == 0, terminal[-2000:]
    assert "restarting the simulation from round 2 on a fresh actor pool" in caplog.text
    assert "(raylet)" not in terminal and "Worker exit" not in terminal  # Ray's own lines
    assert shared_ray.built == first + 1  # the restart ran on a fresh pool
    (run_dir,) = tmp_path.iterdir()
    rows = read_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # round 2 finished with the survivor; round 3 on a working pool
    assert [r.get("clients_ok") for r in rows[1:]] == [2, 1, 2]
    assert [f["partition"] for f in rows[2]["failures"]] == [1]
    assert rows[2]["clients_failed"] == 1
    assert "worker process has died" in rows[2]["failures"][0]["reason"]
    # the restart after round 2's checkpoint: on the round the new simulation starts with
    assert [r.get("restarts", 0) for r in rows] == [0, 0, 0, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["rounds"], summary["restarts"]) == (3, 1)
