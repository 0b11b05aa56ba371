"""Fixtures shared by the whole suite. Plain helpers (paths, seeded models) are in tests/helpers.py.

Layout: tests/<package>/ mirrors fedalign/<package>/ (align, fusion, fl, data, models); modules at
the top of fedalign are tested at the top of tests/; tests/integration/ holds every test that runs a
real Flower simulation on Ray (marked ``integration``: ``pytest -m "not integration"`` skips them).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DIGITS, ROOT


@pytest.fixture(scope="session")
def root():
    """The repository root."""
    return ROOT


@pytest.fixture(scope="session")
def digits_config():
    """configs/digits_mlp.yaml, the small config the simulation tests start from."""
    return DIGITS


@pytest.fixture
def one_thread():
    """Small matrix products on a shared 2-core machine ran 10-20x slower with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
