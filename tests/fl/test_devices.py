"""Device selection: GPUs only when the run asks for them and one is visible; resources that fit no
node are a config error before Ray starts."""

import logging

import pytest
import torch

from fedalign.config import ConfigError, load_config
from fedalign.fl.client_app import _log_device, client_device
from fedalign.runner import check_resources
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
