"""Run a configured federation on Flower's simulation engine (Ray), into a run folder.

Flower's ``run_simulation`` is deprecated as a public entry point (``flwr run`` is the supported
one), so it is wrapped here, behind one function: if Flower moves, only this module changes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from flwr.simulation import run_simulation
from tqdm.auto import tqdm

from fedalign.checkpoint import CheckpointError, load_latest
from fedalign.components import run_federation, run_model
from fedalign.config import RunConfig
from fedalign.data.federation import Federation
from fedalign.errors import ConfigError, RoundFailedError
from fedalign.fl.client_app import app as client_app
from fedalign.fl.server_app import make_server_app
from fedalign.plugins import plugin_environment
from fedalign.results import RunRecorder
from fedalign.run_folder import new_run

log = logging.getLogger("fedalign")

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_DISABLE_IMPORT_WARNING": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]


def backend_config(cfg: RunConfig, verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend settings: client resources and how Ray starts or attaches."""
    sim = cfg.simulation
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "ignore_reinit_error": True,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    address = sim.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        init_args["address"] = address
    return {
        "client_resources": {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus},
        "init_args": init_args,
    }


def node_resources(address: str | None) -> list[dict[str, float]]:
    """CPUs and GPUs of every alive node: of the cluster at ``address`` (attaching to it), or of
    this machine, which Flower will start Ray on."""
    if not address:
        return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
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


def check_model(cfg: RunConfig, fed: Federation) -> None:
    """The model builds for the data's shapes (on the meta device: no memory, no init cost);
    options that only fail there (LeNet on 8x8 digits) are a config error, not a crash later."""
    try:
        with torch.device("meta"):
            run_model(cfg, fed)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model: {exc}") from None


def configure_logging(verbose: bool) -> None:
    """Flower's and Ray's logs stay quiet unless asked for; fedalign's warnings always show."""
    # Client failures are reported by fedalign in one line each; Flower's ERROR logs repeat them
    # with full Ray tracebacks, so they show only with -v.
    for name in ("flwr", "ray", "filelock", "datasets"):
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
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    configure_logging(verbose)
    # Ray workers inherit the environment: they import the modules that registered the user's
    # models, datasets and rules, so those exist on every client too.
    os.environ.update(plugin_environment())

    # Partition (and load) once here, and size the model for the data: a bad dataset, partition
    # or model option fails before any folder or Ray exists.
    check_model(cfg, run_federation(cfg))
    check_resources(
        cfg, node_resources(cfg.simulation.ray_address or os.environ.get("RAY_ADDRESS"))
    )
    resume = None
    if resume_dir is not None:
        recorder = RunRecorder(resume_dir)
        resume = load_latest(recorder.dir / "checkpoints")
        if resume is None:
            raise CheckpointError(
                f"{resume_dir}: no intact checkpoint to resume from (it stopped before its first "
                "one); start the run afresh"
            )
        recorder.truncate_after(resume.round)
        log.warning("resuming %s after round %d", recorder.dir, resume.round)
    else:
        recorder = new_run(cfg, output_dir or cfg.output.dir)
    bar = _progress_bar(cfg, 0 if resume is None else resume.round) if progress else None
    outcome: dict[str, Any] = {}

    def on_round(row: dict[str, Any]) -> None:
        if bar is not None and row["round"] > 0:
            bar.update(1)
            if row.get("test_accuracy") is not None:
                bar.set_postfix(acc=f"{100 * row['test_accuracy']:.2f}%", refresh=False)

    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=make_server_app(cfg, recorder, on_round, outcome, resume),
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_config=backend_config(cfg, verbose),
            verbose_logging=verbose,
        )
    except RoundFailedError as exc:
        exc.run_dir = recorder.dir
        exc.resumable = load_latest(recorder.dir / "checkpoints") is not None
        raise
    finally:
        if bar is not None:
            bar.close()
    outcome.setdefault("wall_seconds", round(time.perf_counter() - t0, 2))
    return RunOutcome(recorder.dir, outcome)


def _progress_bar(cfg: RunConfig, done: int = 0):
    return tqdm(
        total=cfg.strategy.rounds,
        initial=done,
        desc=f"{cfg.name} [{cfg.strategy.name}]",
        unit="round",
    )
