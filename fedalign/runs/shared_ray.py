"""One Ray and one actor pool for consecutive simulations in this process: a benchmark suite, a
seed sweep, the integration tests.

Flower's ``run_simulation`` starts Ray (unless it is up), builds a pool of client actors, and at
the end kills the actors and calls ``ray.shutdown()``. Ray's processes, then each actor importing
torch and fedalign, cost 7-20 s per run on 2 cores, while the rounds of a digits run take about a
second. Within ``one_ray()``, Flower's ``RayBackend`` is patched so that the next simulation
reuses Ray and the pool of actors built for the same client resources; everything else is
Flower's and fedalign's own code: the actors only ever run the ``ClientApp`` that each message
names, fedalign's per-process caches are keyed by the run's config, and each simulation registers
its own nodes with fresh ``Context`` objects, so a run's results do not depend on the runs before
it (tests/integration/test_bench.py checks a suite's runs against separate starts).

Ray restarts when what its workers were started with changes: fedalign's ``FEDALIGN_*``
variables (the user's plugin modules a worker imports first) or the run's Ray settings
(``init_args``: a cluster address, the dashboard). A pool is rebuilt when a run asks for other
client resources or when one of its actors is busy, dead or hung (``simulation.max_restarts``'s
fresh pool).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

_active: SharedRay | None = None


class SharedRay:
    """Patches Flower's ``RayBackend``: consecutive simulations reuse Ray and their actors."""

    def __init__(self) -> None:
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

        self.backend = RayBackend
        self.original = {
            "init_ray": RayBackend.init_ray,
            "build": RayBackend.build,
            "terminate": RayBackend.terminate,
        }
        self.pools: dict[tuple, Any] = {}
        self.ray_key: str | None = None  # fedalign's variables and init_args when Ray started
        self.built = 0  # actor pools built
        self.reused = 0  # simulations that found their pool built
        self.active = False

    # -- the patch ---------------------------------------------------------------------------
    def enable(self) -> None:
        global _active
        shared, init_ray, build = self, self.original["init_ray"], self.original["build"]

        def restarting_init_ray(backend: Any, backend_config: dict[str, Any]) -> None:
            """Ray's workers get the environment and settings Ray started with: when they
            changed since, restart."""
            import ray

            key = json.dumps(
                [fedalign_environment(), backend_config.get("init_args", {})],
                sort_keys=True,
                default=str,
            )
            if ray.is_initialized() and key != shared.ray_key:
                shared.close()
            if not ray.is_initialized():
                shared.ray_key = key
            init_ray(backend, backend_config)

        def reusing_build(backend: Any, app_fn: Any) -> None:
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
            shared.built += 1

        def keeping_terminate(backend: Any) -> None:
            """Leave the actors and Ray up for the next simulation (``close`` ends them)."""

        self.backend.init_ray = restarting_init_ray
        self.backend.build, self.backend.terminate = reusing_build, keeping_terminate
        self.active = True
        _active = self

    def disable(self) -> None:
        global _active
        for name, function in self.original.items():
            setattr(self.backend, name, function)
        self.active = False
        if _active is self:
            _active = None

    def close(self) -> None:
        """Kill the shared actors and stop this process's Ray."""
        import ray

        self._terminate_pools()
        if ray.is_initialized():
            ray.shutdown()
        self.ray_key = None

    # -- helpers -----------------------------------------------------------------------------
    def _terminate_pools(self) -> None:
        import ray

        for pool in self.pools.values():
            if ray.is_initialized():
                pool.terminate_all_actors()
        self.pools.clear()

    @staticmethod
    def _healthy(pool: Any) -> bool:
        """Every actor is back in the pool (no job left running) and answers."""
        import ray

        if len(pool.pool) != pool.num_actors:
            return False
        try:
            ray.get([actor.__ray_ready__.remote() for actor in pool.pool], timeout=30)
        except ray.exceptions.RayError:  # a dead or hung actor: build a fresh pool
            return False
        return True


def shared_ray_active() -> bool:
    """Whether this process's simulations run on one shared Ray (``one_ray``), which starts and
    restarts it itself."""
    return _active is not None


def fedalign_environment() -> dict[str, str]:
    """The ``FEDALIGN_*`` environment variables (what fedalign's workers read at start-up)."""
    return {k: v for k, v in os.environ.items() if k.startswith("FEDALIGN_")}


@contextlib.contextmanager
def one_ray() -> Iterator[SharedRay]:
    """Within the block, the simulations this process runs share one Ray and its actor pools,
    stopped when the block ends. Inside a block already open (the test session's), that one is
    used and left running."""
    if _active is not None:
        yield _active
        return
    shared = SharedRay()
    shared.enable()
    try:
        yield shared
    finally:
        shared.disable()
        shared.close()
