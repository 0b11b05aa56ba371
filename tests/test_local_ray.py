"""runner.lean_ray: a local run's Ray starts without the daemons it would not use."""

import pytest

pytest.importorskip("ray")

from ray._private.node import Node
from ray._private.parameter import RayParams

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
