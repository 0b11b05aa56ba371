"""A Ray cluster on the machine: two nodes on 127.0.0.1, started and stopped by this module (by
process group, never `ray stop`, which would stop other users' Ray). A run attaches to it when told
to; a local run beside it starts a Ray of its own, and stops at one SIGTERM."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fedalign.cli import main
from fedalign.config.load import load_config
from fedalign.report.results import read_rows
from fedalign.runs.runner import run
from tests.helpers import ROOT
from tests.integration.processes import is_loopback, left_after, listening, run_until_checkpoint

RAY = Path(sys.executable).with_name("ray")

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class Cluster:
    address: str
    ray_tmpdir: str  # its nodes' RAY_TMPDIR, where RAY_TMPDIR/ray/ray_current_cluster names it


def _start(args: list[str], log: Path, ray_tmpdir: str) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group, so the test can stop exactly it."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmpdir}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [
            str(RAY),
            "start",
            "--block",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            *args,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every node's process group at once (each ``ray start --block`` stops its own
    processes, a second or two each), then SIGKILL to those still running after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        running = [proc for proc in procs if proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))


def _wait_for_nodes(address: str, count: int, timeout: float = 90.0) -> None:
    probe = (
        "import ray, sys, time\n"
        f"ray.init(address='{address}', include_dashboard=False, logging_level='ERROR')\n"
        f"deadline = time.time() + {timeout}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.time() < deadline: "
        "time.sleep(1)\n"
        f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=timeout + 60)


@pytest.fixture(scope="module")
def two_node_cluster(own_ray, tmp_path_factory):
    """Both tests attach to one cluster (it takes seconds to start and stop on 2 cores); Flower
    handles Ray itself here (``own_ray``), as it does outside the tests."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # Ray's socket paths must stay under 107 bytes: a short temp dir, not pytest's. As RAY_TMPDIR
    # rather than --temp-dir: the head writes its address where `ray.init()` looks for a cluster
    # to join, as a `ray start` on a user's machine does in /tmp/ray (for the processes given the
    # same RAY_TMPDIR only: other users' runs never see it).
    temp = tempfile.mkdtemp(prefix="fa-ray-", dir="/tmp")
    head = _start(
        ["--head", f"--port={port}", "--include-dashboard=false"], tmp_path / "head.log", temp
    )
    nodes = [head]
    try:
        deadline = time.monotonic() + 60
        while not _accepts(port):  # the head's GCS is up: a node can join it
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the head's GCS did not start in 60 s"
            time.sleep(0.1)
        nodes.append(_start([f"--address={address}"], tmp_path / "worker.log", temp))
        _wait_for_nodes(address, 2)
        yield Cluster(address, temp)
    finally:
        _stop(nodes)
        shutil.rmtree(temp, ignore_errors=True)


def test_simulation_attached_to_a_two_node_cluster_runs_clients_on_both(two_node_cluster, tmp_path):
    cfg = load_config(
        ROOT / "configs/digits_mlp.yaml",
        [
            "name=cluster",
            "strategy.rounds=2",
            "data.num_clients=4",
            "train.local_epochs=1",
            f"simulation.ray_address={two_node_cluster.address}",
            "simulation.client_cpus=1",
        ],
    )
    try:
        outcome = run(cfg, output_dir=tmp_path, progress=False)
    finally:
        import ray

        ray.shutdown()
    rows = read_rows(outcome.run_dir)
    nodes = set().union(*(r["ray_nodes"] for r in rows[1:]))
    assert len(nodes) == 2, nodes  # one client actor per 1-CPU node
    assert rows[-1]["clients_ok"] == 4 and rows[-1]["test_accuracy"] > 0.5


def test_clients_that_fit_no_node_are_a_config_error(two_node_cluster, tmp_path, capsys):
    code = main(
        [
            "run",
            str(ROOT / "configs/digits_mlp.yaml"),
            "--set",
            f"simulation.ray_address={two_node_cluster.address}",
            "--set",
            "simulation.client_cpus=2",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    import ray

    ray.shutdown()
    assert code == 2
    assert "client_cpus=2" in capsys.readouterr().err


def test_a_local_run_beside_a_cluster_runs_on_its_own_loopback_ray_and_stops_at_sigterm(
    two_node_cluster, tmp_path
):
    # ray.init() without an address would join the cluster (it finds the address file), fail
    # after 60 s to find a node at 127.0.0.1 on it and hang; a local run starts its own Ray
    out = tmp_path / "out"
    env = {**os.environ, "RAY_TMPDIR": two_node_cluster.ray_tmpdir}
    env.pop("RAY_ADDRESS", None)
    settings = ["strategy.rounds=200", "name=local"]
    with run_until_checkpoint(out, settings, 2, tmp_path / "run.log", env) as proc:
        run = psutil.Process(proc.pid)
        started = run.children(recursive=True)
        assert {"gcs_server", "raylet"} <= {p.name() for p in started}  # a Ray of its own
        sockets = listening([run, *started])
        assert sockets and {s for s in sockets if not is_loopback(s[1])} == set()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # as Slurm, Docker and systemd stop a job
        code = proc.wait(timeout=120)
        seconds = time.monotonic() - t0
    text = (tmp_path / "run.log").read_text()
    assert code == 143, text
    assert seconds < 10, f"{seconds:.1f} s from SIGTERM to exit"
    assert "Traceback" not in text and "SIGTERM received" not in text  # Ray's stack dump
    assert "joining the Ray cluster" not in text
    (run_dir,) = out.iterdir()
    assert f"continue with `fedalign run --resume {run_dir}`" in text.splitlines()[-1]
    left = left_after(started, 5)  # Ray's dashboard and runtime-env agents included
    assert left == [], [p.name() for p in left]
