"""Integration tests: each runs real Flower simulations on Ray. Every test collected here is marked
``integration`` (the modules say so too), so ``pytest -m "not integration"`` leaves them out.

One Ray for the session. Flower's ``run_simulation`` starts Ray (unless it is up), builds a pool of
client actors, and at the end kills the actors and calls ``ray.shutdown()``. On 2 cores that
start-up and tear-down (Ray's processes, then each actor importing torch and fedalign) cost 7-20 s
per run while the rounds of a digits run take about a second, so the simulations that the tests
run in this process share one Ray and one pool of actors per client-resource setting
(``shared_ray``: ``fedalign.runs.shared_ray``, which ``fedalign bench`` uses for a suite; a suite
run in a test uses the session's). Everything else is Flower's and fedalign's own code: the actors
only ever run the ``ClientApp`` that each message names, and fedalign's per-process caches are
keyed by the run's config. Runs in subprocesses (Ctrl-C, SIGTERM, SIGKILL, a dead worker, a script
read from stdin) still start their own Ray, and two tests check that runs on the shared actors give
the metrics of runs on a Ray of their own: test_reliability.py's kill and resume, test_bench.py's
suite. Tests that must see Ray start or attach on their own (the two-node cluster) use the
``own_ray`` fixture.
"""

from __future__ import annotations

import pytest

from fedalign.runs.shared_ray import one_ray


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in item.nodeid:
            item.add_marker(pytest.mark.integration)
    # The integration tests run after the others, so that the shared Ray lives only while they
    # run (tests/test_interrupts.py reaps the test process's children, as a stopped run does its
    # Ray's). Ray starts once: the tests that stop the shared Ray (``own_ray``) run last, and those
    # that change what its workers start with (``toy_plugin``: the module they import, named in
    # FEDALIGN_PLUGINS, which stays set for the session) first, so that it does not restart.
    items.sort(
        key=lambda item: (
            "/integration/" in item.nodeid,
            "own_ray" in getattr(item, "fixturenames", ()),
            "toy_plugin" not in getattr(item, "fixturenames", ()),
        )
    )


@pytest.fixture(scope="session", autouse=True)
def shared_ray():
    """One Ray and one actor pool for the simulations run in the test process (module doc)."""
    with one_ray() as shared:
        yield shared


@pytest.fixture(scope="module")
def own_ray(shared_ray):
    """Flower's own Ray handling for the tests of a module: the shared Ray is stopped first (so
    that a run can attach to another cluster), and Flower starts and stops Ray itself."""
    shared_ray.close()
    shared_ray.disable()
    try:
        yield
    finally:
        shared_ray.enable()
