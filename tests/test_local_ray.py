"""runner.lean_ray: a local run's Ray starts without the daemons it would not use."""

import pytest

pytest.importorskip("ray")

from ray._private.node import Node
from ray._private.parameter import RayParams

from fedalign.runs import agent_ports
from fedalign.runs.runner import lean_ray


def test_a_local_ray_has_no_autoscaler_monitor_dashboard_head_or_idle_log_monitor():
    with lean_ray(True, verbose=False):
        params = RayParams()
        # a Node without its attributes: the original would fail on it at once
        assert (
            Node.start_api_server(object(), include_dashboard=False, raise_on_failure=False) is None
        )
        with pytest.raises(AttributeError):
            Node.start_api_server(object(), include_dashboard=True, raise_on_failure=True)
    assert params.no_monitor is True
    assert params.include_log_monitor is False
    with lean_ray(True, verbose=True):  # -v: the workers' output reaches the terminal through it
        assert RayParams().include_log_monitor is None  # Ray's default (on)


def test_a_cluster_run_and_ray_after_the_run_are_left_as_they_are():
    with lean_ray(False, verbose=False):
        assert RayParams().no_monitor is False
    with lean_ray(True, verbose=False):
        pass
    assert RayParams().no_monitor is False
    assert RayParams().include_log_monitor is None
    with pytest.raises(AttributeError):
        Node.start_api_server(object(), include_dashboard=False, raise_on_failure=False)


def test_without_the_dashboard_the_node_agent_runs_minimal_without_rays_import_check():
    import ray._private.utils as ray_utils

    original = ray_utils.get_dashboard_dependency_error
    with lean_ray(True, verbose=False):
        assert isinstance(ray_utils.get_dashboard_dependency_error(), ImportError)
    with lean_ray(True, verbose=False, dashboard=True):
        assert ray_utils.get_dashboard_dependency_error is original
    with lean_ray(False, verbose=False):
        assert ray_utils.get_dashboard_dependency_error is original
    assert ray_utils.get_dashboard_dependency_error is original


def test_the_raylet_finds_its_agents_ports_written_before_the_agents_start(tmp_path, monkeypatch):
    """Without the dashboard the raylet reads its agents' port files as soon as it starts: the
    minimal node agent's -1s and the runtime environment agent's port, fixed in advance."""
    import ray
    from ray._raylet import (
        DASHBOARD_AGENT_LISTEN_PORT_NAME,
        METRICS_AGENT_PORT_NAME,
        METRICS_EXPORT_PORT_NAME,
        RUNTIME_ENV_AGENT_PORT_NAME,
        wait_for_persisted_port,
    )

    node_id = ray.NodeID.from_random().hex()
    monkeypatch.setattr(agent_ports, "_ephemeral_range", lambda: (40000, 60999))  # any host

    class Unstarted:  # a Node without the rest of its attributes: the original start fails on it
        _session_dir, _node_id = str(tmp_path), node_id

    with lean_ray(True, verbose=False):
        Unstarted._ray_params = RayParams()
        with pytest.raises(AttributeError):
            Node.start_raylet(Unstarted(), "/dev/shm", str(tmp_path), 10**8)
    port = Unstarted._ray_params.runtime_env_agent_port
    assert agent_ports.LOWEST_PORT <= port < 40000 or port > 60999

    def written(name: str) -> int:
        return wait_for_persisted_port(str(tmp_path), node_id, name, timeout_ms=0)

    assert written(RUNTIME_ENV_AGENT_PORT_NAME) == port
    unused = (METRICS_AGENT_PORT_NAME, METRICS_EXPORT_PORT_NAME, DASHBOARD_AGENT_LISTEN_PORT_NAME)
    assert [written(name) for name in unused] == [-1, -1, -1]


def test_with_the_dashboard_its_agent_writes_its_own_ports():
    original = Node.start_raylet
    with lean_ray(True, verbose=False, dashboard=True):
        assert not RayParams().runtime_env_agent_port  # Ray's: the agent picks and writes it
        assert Node.start_raylet is original
    with lean_ray(False, verbose=False):
        assert Node.start_raylet is original
    assert Node.start_raylet is original


def test_the_agents_port_is_free_and_outside_the_ports_the_kernel_hands_out(monkeypatch):
    """The kernel gives ports of its ephemeral range to connections Ray's processes open while
    it starts: one of them could take the agent's port before the agent binds it."""
    import socket

    monkeypatch.setattr(agent_ports, "_ephemeral_range", lambda: (30000, 60999))
    chosen = {agent_ports.runtime_env_agent_port() for _ in range(20)}
    assert all(20000 <= p < 30000 or p > 60999 for p in chosen) and len(chosen) > 1
    free = agent_ports._bindable
    low = next(p for p in range(29998, 20000, -1) if free(p) and free(p + 1))
    with socket.socket() as taken:
        taken.bind((agent_ports.LOOPBACK, low))
        monkeypatch.setattr(agent_ports, "LOWEST_PORT", low)  # two candidates, one in use
        monkeypatch.setattr(agent_ports, "_ephemeral_range", lambda: (low + 2, 65535))
        assert {agent_ports.runtime_env_agent_port() for _ in range(10)} == {low + 1}
        monkeypatch.setattr(agent_ports, "_ephemeral_range", lambda: (low, 65535))  # none left
        assert agent_ports.runtime_env_agent_port() is None  # the agent picks its own


def test_without_a_port_chosen_the_runtime_environment_agent_writes_its_own(tmp_path):
    import ray
    from ray._raylet import RUNTIME_ENV_AGENT_PORT_NAME, wait_for_persisted_port

    node_id = ray.NodeID.from_random().hex()
    agent_ports.write_agent_ports(str(tmp_path), node_id, None)
    assert len(list(tmp_path.iterdir())) == 3  # the node agent's -1s only
    with pytest.raises(Exception, match="(?i)time"):
        wait_for_persisted_port(str(tmp_path), node_id, RUNTIME_ENV_AGENT_PORT_NAME, timeout_ms=0)
