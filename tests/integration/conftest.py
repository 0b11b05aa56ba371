"""Integration tests: each runs real Flower simulations on Ray. Every test collected here is marked
``integration`` (the modules say so too), so ``pytest -m "not integration"`` leaves them out."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in item.nodeid:
            item.add_marker(pytest.mark.integration)
