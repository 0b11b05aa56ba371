"""Device selection: GPUs only when the run asks for them and one is visible; resources that fit no
node are a config error before Ray starts; the model check's device (real or meta) by size; what a
local Ray's workers import as they start."""

import logging

import pytest
import ray
import torch

from fedalign.config.components import run_federation
from fedalign.config.load import load_config
from fedalign.core.errors import ConfigError
from fedalign.fl.client_app import _log_device, client_device
from fedalign.runs import runner
from fedalign.runs.runner import backend_config, check_dashboard, check_resources
from tests.helpers import DIGITS

CONFIG = DIGITS


def test_clients_train_on_the_cpu_unless_a_gpu_is_asked_for_and_visible(caplog):
    _log_device.cache_clear()
    assert client_device(load_config(CONFIG)) == torch.device("cpu")
    wanted = client_device(load_config(CONFIG, ["simulation.client_gpus=0.5"]))
    assert wanted == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert any(
            r.levelno == logging.WARNING and "no CUDA device" in r.message for r in caplog.records
        )


def test_resources_that_fit_no_node_name_the_setting():
    cfg = load_config(CONFIG, ["simulation.client_cpus=4", "simulation.client_gpus=0.5"])
    with pytest.raises(
        ConfigError, match="client_cpus=4, client_gpus=0.5.*2 CPU / 0 GPU, 1 CPU / 0 GPU"
    ):
        check_resources(cfg, [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 1.0}])
    check_resources(cfg, [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}])  # the second node fits


def test_the_ray_dashboard_is_off_unless_asked_for_and_needs_its_packages(monkeypatch):
    assert backend_config(load_config(CONFIG))["init_args"]["include_dashboard"] is False
    cfg = load_config(CONFIG, ["simulation.ray_dashboard=true"])
    assert backend_config(cfg)["init_args"]["include_dashboard"] is True
    monkeypatch.setattr(
        ray._private.utils,
        "get_dashboard_dependency_error",
        lambda: ModuleNotFoundError("No module named 'aiohttp_cors'"),
    )
    with pytest.raises(ConfigError, match=r"ray_dashboard: .*ray\[default\].*aiohttp_cors"):
        check_dashboard(cfg)
    check_dashboard(load_config(CONFIG))  # off: nothing to check
    monkeypatch.setattr(ray._private.utils, "get_dashboard_dependency_error", lambda: None)
    check_dashboard(cfg)


def test_a_local_run_starts_its_own_ray_and_joins_only_a_named_cluster(monkeypatch):
    # ray.init() without an address joins the last cluster `ray start` left on the machine
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = backend_config(load_config(CONFIG))["init_args"]
    assert (local["address"], local["_node_ip_address"]) == ("local", "127.0.0.1")
    # its workers import the client app as Ray starts them; metrics only feed the dashboard
    system = local["_system_config"]
    assert "fedalign.fl.client_app" in system["preload_python_modules"]
    assert system["enable_metrics_collection"] is False
    # a socket not there yet is retried every 0.1 s, within the time Ray's defaults allow
    ray_default = ray._raylet.Config
    assert system["raylet_client_connect_timeout_milliseconds"] == 100
    assert (
        system["raylet_client_connect_timeout_milliseconds"]
        * system["raylet_client_num_connect_attempts"]
        == ray_default.raylet_client_connect_timeout_milliseconds()
        * ray_default.raylet_client_num_connect_attempts()
    )
    dashboard = load_config(CONFIG, ["simulation.ray_dashboard=true"])
    assert backend_config(dashboard)["init_args"]["_system_config"]["enable_metrics_collection"]
    cfg = load_config(CONFIG, ["simulation.ray_address=10.0.0.5:6379"])
    joined = backend_config(cfg)["init_args"]
    assert joined["address"] == "10.0.0.5:6379" and "_node_ip_address" not in joined
    assert "_system_config" not in joined  # a cluster's settings are its own
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6379")
    assert backend_config(load_config(CONFIG))["init_args"]["address"] == "10.0.0.6:6379"
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's word for a Ray of one's own
    assert backend_config(load_config(CONFIG))["init_args"]["_node_ip_address"] == "127.0.0.1"


def test_a_small_model_is_checked_for_real_leaving_the_random_state_and_a_large_on_meta(
    monkeypatch,
):
    """``check_model`` runs a small model on a real example (a forward on the meta device costs
    1.5-2.6 s of start-up) without drawing from torch's global generator, and a model over
    ``REAL_CHECK_PARAMETERS`` on the meta device; both still refuse a model that does not fit."""
    cfg = load_config(DIGITS)
    fed = run_federation(cfg)
    built: list[str] = []
    real_run_model = runner.run_model

    def noting(*args, **kwargs):
        model = real_run_model(*args, **kwargs)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(runner, "run_model", noting)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    runner.check_model(cfg, fed)
    assert built == ["meta", "cpu"] and torch.equal(torch.get_rng_state(), state)
    built.clear()
    monkeypatch.setattr(runner, "REAL_CHECK_PARAMETERS", 10)
    runner.check_model(cfg, fed)
    assert built == ["meta"]
    for limit in (10, 10**9):
        monkeypatch.setattr(runner, "REAL_CHECK_PARAMETERS", limit)
        with pytest.raises(ConfigError, match="digits has 10 classes"):
            runner.check_model(load_config(DIGITS, ["model.num_classes=3"]), fed)
