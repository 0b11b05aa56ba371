"""Run a configured federation on Flower's simulation engine (Ray), or in this process
(``simulation.backend: inprocess``, ``fedalign.runs.inprocess``), into a run folder.

Flower's ``run_simulation`` is deprecated as a public entry point (``flwr run`` is the supported
one), so it is wrapped here, behind one function: if Flower moves, only this module changes. Ray is
imported only by a run on the Ray backend: an in-process run works where Ray is not installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedalign.config.components import run_federation, run_federation_key, run_model
from fedalign.config.schema import RunConfig
from fedalign.core.errors import (
    ActorPoolBroken,
    ConfigError,
    RoundFailedError,
    RunInterrupted,
)
from fedalign.core.memory import one_arena
from fedalign.core.plugins import plugin_environment
from fedalign.data.federation import Federation, forget_loaded
from fedalign.data.shared import shared_copy
from fedalign.fl.client_app import app as client_app
from fedalign.fl.dispatch import fast_dispatch
from fedalign.fl.round_log import RoundLog
from fedalign.report.results import RunRecorder, read_json
from fedalign.report.trackers import missing_package
from fedalign.runs.agent_ports import LOOPBACK, runtime_env_agent_port, write_agent_ports
from fedalign.runs.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_mismatch,
    list_checkpoints,
    load_latest,
)
from fedalign.runs.folder import new_run
from fedalign.runs.inprocess import run_in_process
from fedalign.runs.interrupts import keep_sigterm_handler, stop_on_signals
from fedalign.runs.progress import round_output
from fedalign.runs.reaper import descendants, fate_sharing, wait_or_kill
from fedalign.runs.server_app import make_server_app
from fedalign.runs.shared_ray import shared_ray_active

log = logging.getLogger("fedalign")

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_DISABLE_IMPORT_WARNING": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]
    already_finished: bool = False  # a --resume of a run with nothing left to simulate


def cluster_address(cfg: RunConfig) -> str | None:
    """The Ray cluster the run joins: ``simulation.ray_address``, else ``RAY_ADDRESS``; None for a
    local run, which starts a Ray of its own (also ``RAY_ADDRESS=local``, Ray's word for that, as
    the README's ``flwr run`` recipe sets it)."""
    address = cfg.simulation.ray_address or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else address


#: What a run's Ray workers import as Ray starts them, before any actor exists: the actor's
#: module and the client app (torch, Flower, fedalign's registries and the user's plugins). Not
#: ``torch._dynamo``: the registered local optimizers leave it unimported (``client.optim``).
WORKER_MODULES = ("fedalign.runs.ray_actor", "fedalign.fl.client_app")

#: How a run's own Ray retries a local socket not there yet: Ray's default is 10 tries 1 s apart,
#: and its raylet's first connection to its own object store, made while the store's thread is
#: still starting, missed it in about one start in four on two busy cores: a second of every such
#: start spent asleep (benchmarks.md, issue 27). The same 10 s, in steps of 0.1 s.
SOCKET_RETRIES = {
    "raylet_client_connect_timeout_milliseconds": 100,
    "raylet_client_num_connect_attempts": 100,
}


def backend_config(cfg: RunConfig, verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend settings: client resources and how Ray starts or attaches.

    A local run passes ``address="local"``: ``ray.init()`` without an address would join the last
    cluster ``ray start`` left on the machine (its address file in Ray's temp folder), a user's
    other work, instead of starting the run's own Ray. Its Ray also starts its workers on
    ``WORKER_MODULES`` (imported as Ray starts them, before any client is asked for), retries its
    local sockets every 0.1 s (``SOCKET_RETRIES``) and, without the dashboard, collects no
    metrics (its minimal node agent runs no metrics server; ``lean_ray`` writes the agents' ports
    before the raylet waits for them, about 1 s of every start: benchmarks.md, issue 27).
    """
    sim = cfg.simulation
    init_args: dict[str, Any] = {
        "include_dashboard": sim.ray_dashboard,
        "ignore_reinit_error": True,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    address = cluster_address(cfg)
    if address:
        init_args["address"] = address
    else:  # a Ray of its own, listening on the loopback interface only (see loopback_ray)
        init_args["address"] = "local"
        init_args["_node_ip_address"] = LOOPBACK
        init_args["_system_config"] = {
            "preload_python_modules": list(WORKER_MODULES),
            "enable_metrics_collection": sim.ray_dashboard,
            **SOCKET_RETRIES,
        }
    return {
        "client_resources": {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus},
        "init_args": init_args,
    }


DATA_COPY = ".shared-data"


@contextlib.contextmanager
def loopback_ray(local: bool) -> Iterator[None]:
    """While a local run starts Ray, keep its node address on the loopback interface.

    Ray has no authentication: whoever reaches its ports can run code. Its servers listen on the
    loopback interface only when the node address is 127.0.0.1, but ``ray.init`` replaces that
    address by the machine's (``services.resolve_ip_for_localhost``, so that other nodes could
    join); a local simulation has no other nodes, so that replacement is switched off here. Runs
    attaching to a cluster (``simulation.ray_address``) are left as they are.
    """
    if not local:
        yield
        return
    import ray._private.services as ray_services

    original = ray_services.resolve_ip_for_localhost
    ray_services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        ray_services.resolve_ip_for_localhost = original


@contextlib.contextmanager
def lean_ray(local: bool, verbose: bool, dashboard: bool = False) -> Iterator[None]:
    """While a local run starts Ray, leave out the daemons it would not use: the autoscaler's
    monitor (a Ray of one machine's fixed size has nothing to scale), the dashboard's head
    process (``simulation.ray_dashboard: false``, the default, still starts it for Ray's state
    and job APIs, which fedalign does not call) and, unless ``verbose`` sends the workers' output
    to the terminal, the log monitor that forwards it. ``ray.init`` has no options for the first
    and last (``ray start`` has), so its node's parameters are set while it starts. About 160 MiB
    of the run's memory (benchmarks.md). Without the ``dashboard``, Ray's node agent also runs
    its minimal modules, as on a Ray installed without the dashboard's packages: Ray decides that
    by importing them (aiohttp, OpenTelemetry), in the raylet's start, on the way to the first
    worker (0.15-0.4 s of the driver's CPU), and the raylet finds its agents' ports already
    written (``agent_ports``). Runs attaching to a cluster are left as they are."""
    if not local:
        yield
        return
    import ray._private.utils as ray_utils
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    original_params, original_api = RayParams.__init__, Node.start_api_server
    original_raylet = Node.start_raylet
    original_check = ray_utils.get_dashboard_dependency_error

    def params(self: RayParams, *args: Any, **kwargs: Any) -> None:
        original_params(self, *args, **kwargs)
        self.no_monitor = True
        if not verbose:
            self.include_log_monitor = False
        if not dashboard and not self.runtime_env_agent_port:
            self.runtime_env_agent_port = runtime_env_agent_port()  # None: the agent's choice

    def raylet(self: Node, *args: Any, **kwargs: Any) -> Any:
        port = self._ray_params.runtime_env_agent_port
        write_agent_ports(self._session_dir, self._node_id, port)
        return original_raylet(self, *args, **kwargs)

    def api_server(self: Node, *, include_dashboard: bool | None, **kwargs: Any) -> None:
        if include_dashboard:
            original_api(self, include_dashboard=include_dashboard, **kwargs)

    def minimal_agent() -> ImportError:
        return ImportError("simulation.ray_dashboard is off: the node agent runs minimal")

    RayParams.__init__, Node.start_api_server = params, api_server
    if not dashboard:
        ray_utils.get_dashboard_dependency_error = minimal_agent
        Node.start_raylet = raylet
    try:
        yield
    finally:
        RayParams.__init__, Node.start_api_server = original_params, original_api
        Node.start_raylet = original_raylet
        ray_utils.get_dashboard_dependency_error = original_check


@contextlib.contextmanager
def quiet_ray_errors(quiet: bool) -> Iterator[None]:
    """While ``quiet``, the Ray driver started in the block does not print the errors its raylets
    publish. Its thread for them writes to the terminal whatever the log settings (after a client
    crash: "(raylet) A worker died or was killed while executing a task ... Lease ID ... Worker
    exit detail ..."), and fedalign reports each failed client in a line and a row of its own;
    ``-v`` shows them."""
    if not quiet:
        yield
        return
    import ray._private.worker as ray_worker

    original = ray_worker.listen_error_messages
    ray_worker.listen_error_messages = lambda worker, threads_stopped: None
    try:
        yield
    finally:
        ray_worker.listen_error_messages = original


@contextlib.contextmanager
def ray_started_early(enabled: bool, cfg: RunConfig, verbose: bool) -> Iterator[Callable[[], None]]:
    """When ``enabled`` (a run on a Ray of its own), Ray and the run's actor pool start on a
    thread at once, while this one loads and checks the data and the model, writes the run folder
    and the data copy and starts Flower's simulation. Ray's workers import ``WORKER_MODULES`` as
    Ray starts them (``backend_config``), during Ray's own start, so the actors
    (``ray_actor.ClientActor``, which spares each worker Flower's simulation package) are warm
    when round 1 starts. Flower's backend finds Ray started and takes that pool (``build_once``;
    a restarted simulation builds Flower's own).

    Yields ``ready``, which waits for the start and raises what it raised. Ray starts with the
    settings Flower would give it (``backend_config``; the driver's ``sys.path`` in
    ``PYTHONPATH``, which Ray's processes inherit: Flower's ``RayBackend.init_ray`` also passes
    it as a runtime environment, which starts every worker through Ray's ``setup_worker.py``,
    about 0.4 s of CPU more each) and under the same guards as a run's own start (loopback
    only, no idle daemons, SIGTERM left to fedalign, its processes dying with this one); it
    stops when the block ends, however the run ended, and its processes are ended before the
    block is left (``terminate_noting``). A data or model error found inside the block waits
    for Ray's start (about 2 s) and stops it, before any folder exists."""
    if not enabled:
        yield lambda: None
        return
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    from fedalign.runs.ray_actor import ClientActor

    backend = backend_config(cfg, verbose)
    paths = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = paths
    failed: list[BaseException] = []
    pools: list[BasicActorPool] = []  # the actors started with Ray, for the first simulation
    started, run_over = threading.Event(), threading.Event()

    def start() -> None:
        try:
            ray.init(**backend["init_args"])
            pool = BasicActorPool(ClientActor, backend["client_resources"], {})
            pool.add_actors_to_pool(pool.actors_capacity)
            pools.append(pool)
        except BaseException as exc:  # noqa: BLE001 (raised by ready, in the run's thread)
            failed.append(exc)
        started.set()
        # Ray's processes die when the thread that started them ends (their parent-death
        # signal, PR_SET_PDEATHSIG, follows the thread): this one lives as long as the run.
        run_over.wait()

    def ready() -> None:
        started.wait()
        if failed:
            raise failed[0]

    build, terminate = RayBackend.build, RayBackend.terminate
    before: set[psutil.Process] = set()  # the watchdog, and whatever the caller runs beside
    ray_processes: set[psutil.Process] = set()  # Ray's, noted while they are descendants

    def build_once(ray_backend: RayBackend, app_fn: Callable) -> None:
        """Flower's backend takes the pool started with Ray (a restart builds its own)."""
        if pools:
            ray_backend.pool, ray_backend.app_fn = pools.pop(), app_fn
        else:
            build(ray_backend, app_fn)

    def terminate_noting(ray_backend: RayBackend) -> None:
        """Flower stops Ray at the end of each simulation: Ray's processes are noted first,
        since its workers are orphans (no longer descendants) once their raylet is gone."""
        ray_processes.update(descendants() - before)
        terminate(ray_backend)

    with (
        contextlib.ExitStack() as restore,
        loopback_ray(True),
        lean_ray(True, verbose, cfg.simulation.ray_dashboard),
        quiet_ray_errors(not verbose),
        keep_sigterm_handler(),
        fate_sharing(True),
    ):
        RayBackend.build, RayBackend.terminate = build_once, terminate_noting
        restore.callback(setattr, RayBackend, "build", build)
        restore.callback(setattr, RayBackend, "terminate", terminate)
        before.update(descendants())
        thread = threading.Thread(target=start, name="fedalign-ray-start", daemon=True)
        thread.start()
        try:
            yield ready
        finally:
            started.wait()
            ray_processes.update(descendants() - before)  # Ray still up: the run failed early
            if ray.is_initialized():
                ray.shutdown()
            run_over.set()
            thread.join()
            # the run returns with none left; Ray is down, so they have nothing left to do
            wait_or_kill(ray_processes, timeout=1.0)


def node_resources(address: str | None) -> list[dict[str, float]]:
    """CPUs and GPUs of every alive node: of the cluster at ``address`` (attaching to it), or of
    this machine, which Flower will start Ray on."""
    if not address:
        return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: RunConfig, nodes: list[dict[str, float]]) -> None:
    """A clear error when no node can hold one client (Flower would fail later with "ActorPool is
    empty")."""
    sim = cfg.simulation
    fits = [
        n
        for n in nodes
        if n.get("CPU", 0.0) >= sim.client_cpus and n.get("GPU", 0.0) >= sim.client_gpus
    ]
    if not fits:
        have = (
            ", ".join(f"{n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU" for n in nodes)
            or "no alive node"
        )
        raise ConfigError(
            f"simulation.client_cpus={sim.client_cpus:g}, client_gpus={sim.client_gpus:g}: "
            f"no Ray node can run one client (nodes: {have})"
        )


#: Models up to this many parameters are checked with a real forward (``check_model``).
REAL_CHECK_PARAMETERS = 20_000_000


def check_model(cfg: RunConfig, fed: Federation) -> None:
    """The model builds for the data's shapes and takes one of its examples, giving a score for
    every class. Options that do not fit the data (LeNet on 8x8 digits, ``in_features: 10`` on 64
    pixels, ``num_classes: 3`` for 10 labels) are then one config error before any folder exists,
    not a crash in round 1.

    The model is first built on the meta device (no memory, no init). One of up to
    ``REAL_CHECK_PARAMETERS`` parameters is then built and run for real, with torch's global
    random state left as it was: a forward on the meta device goes through PyTorch's Python
    decompositions and imports ``torch._dynamo`` and SymPy, 1.5-2.6 s of every run's start-up
    (benchmarks.md, issue 27) where a small model's real forward takes milliseconds. A larger
    model takes the meta forward, whose cost is then small beside its real build."""
    example = torch.tensor(fed.test_arrays.X[:1])
    try:
        with torch.device("meta"):
            model = run_model(cfg, fed)
        if sum(p.numel() for p in model.parameters()) <= REAL_CHECK_PARAMETERS:
            with torch.random.fork_rng(devices=[]):
                model = run_model(cfg, fed)
        else:
            example = example.to("meta")
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model: {_first_line(exc)}") from None
    try:
        with torch.no_grad():
            try:
                out = model.eval()(example)
            except NotImplementedError:  # an op without a meta kernel: one real forward
                out = run_model(cfg, fed)(example.to("cpu"))
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ConfigError(
            f"model: {cfg.model.name} does not take {cfg.data.dataset}'s examples "
            f"(shape {tuple(example.shape[1:])}): {_first_line(exc)}"
        ) from None
    if out.dim() < 2 or out.shape[-1] < fed.num_classes:
        raise ConfigError(
            f"model: {cfg.model.name} gives {tuple(out.shape[1:])} outputs per example, but "
            f"{cfg.data.dataset} has {fed.num_classes} classes (drop model.num_classes or set it "
            f"to {fed.num_classes})"
        )


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (PyTorch's shape errors span several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_dashboard(cfg: RunConfig) -> None:
    """``simulation.ray_dashboard: true`` needs Ray's dashboard packages (``ray[default]``); say so
    before Ray starts rather than let ``ray.init`` fail inside Flower."""
    if not cfg.simulation.ray_dashboard:
        return
    import ray._private.utils

    missing = getattr(ray._private.utils, "get_dashboard_dependency_error", lambda: None)()
    if missing is not None:
        raise ConfigError(
            f"simulation.ray_dashboard: Ray's dashboard needs ray[default] "
            f"(pip install 'fedalign[dashboard]'): {missing}"
        )


def configure_logging(verbose: bool) -> None:
    """Flower's and Ray's logs stay quiet unless asked for; fedalign's warnings always show."""
    # Client failures are reported by fedalign in one line each; Flower's ERROR logs repeat them
    # with full Ray tracebacks, so they show only with -v.
    for name in ("flwr", "ray", "filelock", "datasets", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    logging.getLogger("fedalign").setLevel(logging.INFO if verbose else logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")


def run(
    cfg: RunConfig,
    *,
    output_dir: str | Path | None = None,
    verbose: bool = False,
    progress: bool = True,
    resume_dir: str | Path | None = None,
) -> RunOutcome:
    """Simulate the run described by ``cfg``; returns its folder and summary.

    With ``resume_dir`` (a run folder), continue that run after its last intact checkpoint,
    in the same folder.
    """
    t0 = time.perf_counter()
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    configure_logging(verbose)
    one_arena()  # for the threads still to come (the fedalign command sets it at its start)
    # Ray workers inherit the environment: they import the modules that registered the user's
    # models, datasets and rules, so those exist on every client too.
    os.environ.update(plugin_environment())
    on_ray = cfg.simulation.backend == "ray"
    if not on_ray:
        check_in_process(cfg)
    resume = None if resume_dir is None else resumable(cfg, resume_dir)
    if resume is not None and resume.round >= cfg.strategy.rounds:
        return finished(cfg, Path(resume_dir), resume)
    for name in cfg.output.trackers:
        if (problem := missing_package(name)) is not None:
            raise ConfigError(f"output.trackers: {problem}")
    local = on_ray and cluster_address(cfg) is None
    if local:  # an existing cluster has its own dashboard, or none, and its own nodes
        check_dashboard(cfg)
        check_resources(cfg, node_resources(None))
    own_ray = local and not shared_ray_active()
    with ray_started_early(own_ray, cfg, verbose) as ray_ready:
        # Partition (and load) once here, while Ray starts, and size the model for the data: a
        # bad dataset, partition or model option fails before any folder exists (and stops Ray).
        check_model(cfg, run_federation(cfg))
        return _run(cfg, t0, output_dir, verbose, progress, resume_dir, resume, own_ray, ray_ready)


def _run(
    cfg: RunConfig,
    t0: float,
    output_dir: str | Path | None,
    verbose: bool,
    progress: bool,
    resume_dir: str | Path | None,
    resume: Checkpoint | None,
    ray_started: bool,
    ray_ready: Callable[[], None],
) -> RunOutcome:
    """``run``'s work from the run folder on, while Ray starts (``ray_started``: ``run`` started
    it; ``ray_ready`` waits for it). ``t0``: when ``run`` was called."""
    on_ray = cfg.simulation.backend == "ray"
    fed = run_federation(cfg)  # the one run() checked (cached)
    address = cluster_address(cfg) if on_ray else None
    if address:  # said first: a RAY_ADDRESS left in the environment is easy to overlook
        source = "simulation.ray_address" if cfg.simulation.ray_address else "RAY_ADDRESS"
        log.warning("joining the Ray cluster at %s (%s)", address, source)
    if address:
        with quiet_ray_errors(not verbose):  # joining a cluster starts the driver here
            check_resources(cfg, node_resources(address))
    if resume is not None:
        recorder = RunRecorder(resume_dir)
        recorder.truncate_after(resume.round)
        recorder.open_trackers(cfg.output.trackers, cfg.to_dict(), resume_after=resume.round)
        log.warning("resuming %s after round %d", recorder.dir, resume.round)
    else:
        recorder = new_run(cfg, output_dir or cfg.output.dir)
    outcome: dict[str, Any] = {}
    backend = backend_config(cfg, verbose) if on_ray else None

    def has_checkpoint() -> bool:
        return bool(list_checkpoints(recorder.dir / "checkpoints"))

    restarts = 0
    carried: dict[int, RoundLog] = {}  # rows a restarted simulation starts from (restart_point)
    try:
        with (
            round_output(
                cfg.strategy.rounds,
                bar=progress,
                desc=f"{cfg.name} [{cfg.strategy.name}]",
                done=0 if resume is None else resume.round,
            ) as printer,
            loopback_ray(on_ray and address is None),
            lean_ray(on_ray and address is None, verbose, cfg.simulation.ray_dashboard),
            quiet_ray_errors(on_ray and not verbose),
            stop_on_signals(recorder.dir, has_checkpoint, ray=on_ray) as stop,
            # Ray's processes die with this one (ray_started_early has its own watchdog)
            fate_sharing(on_ray and address is None and not ray_started),
            fast_dispatch(on_ray and cfg.simulation.fast_dispatch),
            # in-process clients read this process's federation: no copy to map
            data_copy(cfg, fed, recorder.dir, on_ray) as copy,
        ):
            if copy is not None:
                # The server reads the data from the copy too (run_server): the process's
                # private arrays (Fashion-MNIST's: 219 MB) go (benchmarks.md, issue 27).
                del fed
                forget_loaded()

            def on_round(row: dict[str, Any]) -> None:
                if row["round"] > 0 and "first_round_end_s" not in outcome:
                    # start-up as users feel it: the data, Ray, the actors and the first round
                    outcome["first_round_end_s"] = round(time.perf_counter() - t0, 2)
                if cfg.simulation.ray_dashboard and not printer.rows:
                    import ray

                    if ray.is_initialized():
                        printer.write(f"Ray dashboard: http://{ray.get_dashboard_url()}")
                printer(row)

            ray_ready()
            while True:
                try:
                    simulate(
                        cfg,
                        make_server_app(
                            cfg, recorder, on_round, outcome, resume, stop, copy, carried
                        ),
                        backend,
                        verbose,
                    )
                    break
                except ActorPoolBroken as exc:
                    resume = restart_point(cfg, recorder, exc, restarts, carried)
                    restarts += 1
                    if printer.bar is not None:
                        printer.bar.n = resume.round
    except (RoundFailedError, RunInterrupted) as exc:
        exc.run_dir = recorder.dir
        exc.resumable = load_latest(recorder.dir / "checkpoints") is not None
        if isinstance(exc, RunInterrupted):
            exc.signal = stop.signal
        raise
    outcome.setdefault("wall_seconds", round(time.perf_counter() - t0, 2))
    return RunOutcome(recorder.dir, outcome)


def simulate(
    cfg: RunConfig, server_app: ServerApp, backend: dict[str, Any] | None, verbose: bool
) -> None:
    """Run ``server_app`` against the run's clients: on Flower's simulation engine with Ray
    ``backend`` settings (``backend_config``), or, with none, in this process."""
    if backend is None:
        run_in_process(server_app, client_app, cfg.data.num_clients)
        return
    from flwr.simulation import run_simulation

    # Flower waits 3 s for the context of a ServerApp that raised (it never comes): the app
    # returns, and its exception (a stop request, a failed round, a dead worker) is raised here.
    raised: list[BaseException] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server_app(grid=grid, context=context)
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in this thread)
            raised.append(exc)

    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=cfg.data.num_clients,
        backend_config=backend,
        verbose_logging=verbose,
    )
    if raised:
        raise raised[0]


def check_in_process(cfg: RunConfig) -> None:
    """The Ray-only keys a run on the in-process backend cannot honour, as one config error."""
    sim = cfg.simulation
    for name, value in (("ray_address", sim.ray_address), ("ray_dashboard", sim.ray_dashboard)):
        if value:
            raise ConfigError(
                f"simulation.{name}={value}: needs simulation.backend: ray "
                f"(simulation.backend: inprocess runs every client in this process)"
            )


@contextlib.contextmanager
def data_copy(
    cfg: RunConfig, fed: Federation, run_dir: Path, wanted: bool = True
) -> Iterator[str | None]:
    """With ``simulation.shared_data`` (and ``wanted``: the clients run in other processes), the
    run's data written once into ``run_dir/DATA_COPY`` for its clients to map
    (``fedalign.data.shared``), removed when the run ends; its folder, or None."""
    if not (cfg.simulation.shared_data and wanted):
        yield None
        return
    copy = shared_copy(fed, run_dir / DATA_COPY, run_federation_key(cfg))
    del fed  # the block holds no reference to the private arrays (see _run)
    with copy as path:
        yield str(path.resolve())


def restart_point(
    cfg: RunConfig,
    recorder: RunRecorder,
    broken: ActorPoolBroken,
    restarts: int,
    carried: dict[int, RoundLog],
) -> Checkpoint:
    """Where a simulation whose actor pool lost a worker starts again, in this process and on a
    fresh pool: its last checkpoint, its rows cut back to it (``simulation.max_restarts`` times at
    most; then, or without a checkpoint, the run stops as a failed round does). The restart is
    put into ``carried`` for the rows (``carry_restart``)."""
    checkpoint = load_latest(recorder.dir / "checkpoints")
    if checkpoint is None or restarts >= cfg.simulation.max_restarts:
        raise RoundFailedError(
            f"{broken} (simulation restarted {restarts} time(s), "
            f"simulation.max_restarts={cfg.simulation.max_restarts}"
            f"{'' if checkpoint else ', no checkpoint to restart from'})"
        ) from broken
    log.warning(
        "%s: restarting the simulation from round %d on a fresh actor pool (%d of %d)",
        broken,
        checkpoint.round,
        restarts + 1,
        cfg.simulation.max_restarts,
    )
    recorder.truncate_after(checkpoint.round)
    carry_restart(carried, broken.lost, checkpoint.round)
    return checkpoint


def carry_restart(
    carried: dict[int, RoundLog], lost: RoundLog | None, checkpoint_round: int
) -> None:
    """Put a restart into the record of the round it belongs to (``restarts`` in its row, summed
    in summary.json). When the round the worker died in is cut back (it failed, or its checkpoint
    had not come), its rerun starts from the lost attempt's failures, which name the dead worker;
    when it finished and was checkpointed (its row names the failure), the restart is counted on
    the round the new simulation starts with."""
    if lost is not None and lost.round > checkpoint_round:
        record = RoundLog(
            lost.round, clients_failed=lost.clients_failed, failures=list(lost.failures)
        )
        record.extra["restarts"] = lost.extra.get("restarts", 0)
    else:
        record = carried.setdefault(checkpoint_round + 1, RoundLog(checkpoint_round + 1))
    record.extra["restarts"] = record.extra.get("restarts", 0) + 1
    carried[record.round] = record


def resumable(cfg: RunConfig, run_dir: str | Path) -> Checkpoint:
    """The checkpoint ``run_dir`` continues from, once its config.yaml is known to be the config
    the checkpoint was written with (an edited one would make a hybrid run)."""
    checkpoint = load_latest(Path(run_dir) / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(
            f"{run_dir}: no intact checkpoint to resume from (it stopped before its first one); "
            "start the run afresh"
        )
    mismatch = config_mismatch(checkpoint, json.loads(cfg.to_json()))
    if mismatch is not None:
        raise ConfigError(
            f"{run_dir}/config.yaml is not the config this run was checkpointed with: {mismatch}; "
            "restore it, or start a new run"
        )
    return checkpoint


def finished(cfg: RunConfig, run_dir: Path, checkpoint: Checkpoint) -> RunOutcome:
    """A run whose last round is checkpointed: nothing to simulate. Its summary is the one it
    wrote, or (killed between its last checkpoint and its summary) written now from its rows."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return RunOutcome(run_dir, read_json(summary_path, "summary.json"), True)
    recorder = RunRecorder(run_dir)
    recorder.truncate_after(checkpoint.round)
    if cfg.output.save_model:
        recorder.save_model(checkpoint.model)
    summary = recorder.finish(checkpoint.wall_seconds, plot=cfg.output.plot)
    return RunOutcome(run_dir, summary, True)
