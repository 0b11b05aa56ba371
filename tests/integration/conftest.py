"""Integration tests: each runs real Flower simulations on Ray. Every test collected here is marked
``integration`` (the modules say so too), so ``pytest -m "not integration"`` leaves them out.

One Ray for the session. Flower's ``run_simulation`` starts Ray (unless it is up), builds a pool of
client actors, and at the end kills the actors and calls ``ray.shutdown()``. On 2 cores that
start-up and tear-down (Ray's processes, then each actor importing torch and fedalign) cost 7-20 s
per run while the rounds of a digits run take about a second, so the simulations that the tests
run in this process share one Ray and one pool of actors per client-resource setting
(``shared_ray``). Everything else is Flower's and fedalign's own code: the actors only ever run
the ``ClientApp`` that each message names, and fedalign's per-process caches are keyed by the run's
config. Runs in subprocesses (the CLI tests, kill and resume) still start their own Ray, and
``test_same_config_and_seed_repeat_the_metrics`` checks that a run on the shared actors repeats a
CLI run's metrics exactly. Tests that must see Ray start or attach on their own (the two-node
cluster) use the ``own_ray`` fixture.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in item.nodeid:
            item.add_marker(pytest.mark.integration)
    # Tests that stop the shared Ray (``own_ray``) run last, so that it starts only once.
    items.sort(key=lambda item: "own_ray" in getattr(item, "fixturenames", ()))


class SharedRay:
    """Patches Flower's ``RayBackend``: consecutive simulations reuse Ray and their actors."""

    def __init__(self):
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

        self.backend = RayBackend
        self.original = {
            "init_ray": RayBackend.init_ray,
            "build": RayBackend.build,
            "terminate": RayBackend.terminate,
        }
        self.pools: dict[tuple, object] = {}
        self.ray_env: dict[str, str] | None = None  # fedalign's variables when Ray started
        self.reused = 0
        self.active = False

    # -- the patch ---------------------------------------------------------------------------
    def enable(self) -> None:
        shared, init_ray, build = self, self.original["init_ray"], self.original["build"]

        def restarting_init_ray(backend, backend_config):
            """Ray's workers get the environment Ray started with: when fedalign's variables
            (``FEDALIGN_PLUGINS``, the modules a worker imports first) changed since, restart."""
            import ray

            env = fedalign_environment()
            if ray.is_initialized() and env != shared.ray_env:
                shared.close()
            if not ray.is_initialized():
                shared.ray_env = env
            init_ray(backend, backend_config)

        def reusing_build(backend, app_fn):
            import ray

            key = (
                ray.get_runtime_context().get_job_id(),
                tuple(sorted(backend.client_resources.items())),
            )
            pool = shared.pools.get(key)
            if pool is not None and shared._healthy(pool):
                backend.pool, backend.app_fn = pool, app_fn
                shared.reused += 1
                return
            shared._terminate_pools()  # other resources per client: free the CPUs first
            build(backend, app_fn)
            shared.pools[key] = backend.pool

        def keeping_terminate(backend):
            """Leave the actors and Ray up for the next simulation (``close`` ends them)."""

        self.backend.init_ray = restarting_init_ray
        self.backend.build, self.backend.terminate = reusing_build, keeping_terminate
        self.active = True

    def disable(self) -> None:
        for name, function in self.original.items():
            setattr(self.backend, name, function)
        self.active = False

    def close(self) -> None:
        """Kill the shared actors and stop this process's Ray."""
        import ray

        self._terminate_pools()
        if ray.is_initialized():
            ray.shutdown()
        self.ray_env = None

    # -- helpers -----------------------------------------------------------------------------
    def _terminate_pools(self) -> None:
        import ray

        for pool in self.pools.values():
            if ray.is_initialized():
                pool.terminate_all_actors()
        self.pools.clear()

    @staticmethod
    def _healthy(pool) -> bool:
        """Every actor is back in the pool (no job left running) and answers."""
        import ray

        if len(pool.pool) != pool.num_actors:
            return False
        try:
            ray.get([actor.__ray_ready__.remote() for actor in pool.pool], timeout=30)
        except ray.exceptions.RayError:  # a dead or hung actor: build a fresh pool
            return False
        return True


def fedalign_environment() -> dict[str, str]:
    """The ``FEDALIGN_*`` environment variables (what fedalign's workers read at start-up)."""
    return {k: v for k, v in os.environ.items() if k.startswith("FEDALIGN_")}


@pytest.fixture(scope="session", autouse=True)
def shared_ray():
    """One Ray and one actor pool for the simulations run in the test process (module doc)."""
    shared = SharedRay()
    shared.enable()
    try:
        yield shared
    finally:
        shared.disable()
        shared.close()


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
