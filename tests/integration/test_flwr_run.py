"""``flwr run .`` as the README gives it: every listener of the run (the SuperLink,
flwr-simulation, Ray's GCS, raylet, agents and client actors) is on the loopback interface.

The real run is opt-in (``FEDALIGN_FLWR_RUN=1``): ``flwr run`` starts a SuperLink, builds and
installs the app into ``FLWR_HOME`` and starts its own Ray: 163 s and 249 s for one digits round
on this project's two cores at load 20-30 (``tests/integration/test_flwr_app.py`` runs the same
ServerApp in-process on every ``make test``). The SuperLink it starts is stopped by its process
id. What the installed Ray makes of the README's variables is checked on every run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT
from tests.integration.processes import is_loopback, listening

pytestmark = pytest.mark.integration


def readme_flwr_environment() -> dict[str, str]:
    """The variables the README's ``flwr run .`` command line sets before ``flwr run``."""
    text = (ROOT / "README.md").read_text()
    (line,) = [x for x in text.splitlines() if re.match(r"^(\w+=\S+ )+flwr run \. ", x)]
    return dict(word.split("=", 1) for word in shlex.split(line.split(" flwr run ")[0]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readmes_ray_environment_gives_a_local_ray_on_loopback() -> None:
    """What the installed Ray makes of the README's variables, without starting it: no cluster to
    join (a new local instance), and 127.0.0.1 as the node address it listens on."""
    env = {**os.environ, **readme_flwr_environment()}
    probe = (
        "import ray._private.services as s\n"
        "print(s.canonicalize_bootstrap_address(None), s.resolve_ip_for_localhost('127.0.0.1'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["None", "127.0.0.1"]


@pytest.mark.skipif(
    os.environ.get("FEDALIGN_FLWR_RUN") != "1",
    reason="a real flwr run takes minutes: set FEDALIGN_FLWR_RUN=1",
)
def test_flwr_run_as_the_readme_gives_it_listens_on_loopback_only(tmp_path: Path) -> None:
    home = tmp_path / "flwr_home"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        **readme_flwr_environment(),
    }
    cmd = ["flwr", "run", ".", "--stream"]
    cmd += ["--federation-config", "num-supernodes=4 client-resources-num-cpus=1"]
    cmd += ["-c", f"config='configs/digits_mlp.yaml' num-server-rounds=1 output-dir='{tmp_path}'"]
    with open(tmp_path / "flwr.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def superlinks() -> list[psutil.Process]:
        return [
            p
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"]
            and "flower-superlink" in " ".join(p.info["cmdline"][:2])
            and str(home) in " ".join(p.info["cmdline"])
        ]

    found: set[tuple[str, str]] = set()
    names: set[str] = set()
    try:
        while proc.poll() is None:
            for link in superlinks():
                try:
                    processes = [link, *link.children(recursive=True)]
                except psutil.Error:
                    continue
                for process in processes:
                    with contextlib.suppress(psutil.Error):
                        names.add(process.name())
                found |= listening(processes)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for link in superlinks():
            link.terminate()
    text = (tmp_path / "flwr.log").read_text()
    assert "fedalign run finished" in text, text[-3000:]
    assert {"flwr-simulation", "gcs_server", "raylet"} <= names, names
    assert found and {s for s in found if not is_loopback(s[1])} == set(), sorted(found)
