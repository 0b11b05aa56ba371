"""Fixtures shared by the whole suite. Plain helpers (paths, seeded models) are in tests/helpers.py.

Layout: tests/<package>/ mirrors fedalign/<package>/ (align, fusion, fl, data, models); modules at
the top of fedalign are tested at the top of tests/; tests/integration/ holds every test that runs a
real Flower simulation on Ray (marked ``integration``: ``pytest -m "not integration"`` skips them).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import DIGITS, ROOT


def pytest_configure(config):
    """One torch thread in the test process and in the processes it starts (CLI runs, notebook
    kernels, Ray's workers, through ``OMP_NUM_THREADS``), unless the environment names another
    count: the suite's matrix products are small, and on a shared 2-core machine two threads ran
    them many times slower (tests/align/test_align_data.py's Sinkhorn test: 74 s with two threads,
    1.5 s with one, in one sitting at load 2-4)."""
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def root():
    """The repository root."""
    return ROOT


@pytest.fixture(scope="session")
def digits_config():
    """configs/digits_mlp.yaml, the small config the simulation tests start from."""
    return DIGITS
