"""The fedalign ServerApp.

``make_server_app(cfg, recorder)`` is what our runner simulates (the config arrives by closure,
since ``run_simulation`` leaves ``context.run_config`` empty). The module-level ``app`` is what
``flwr run .`` starts: it reads the YAML config named in ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedalign.client.training import evaluate
from fedalign.config.components import model_builder, run_federation, run_model, server_device
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from fedalign.core.types import StateDict
from fedalign.data import DataError, Federation
from fedalign.fl.engine import EvaluateFn, RoundCallback, RoundEngine, StrategySnapshot
from fedalign.fl.round_log import RoundLog
from fedalign.fl.strategy import build_strategy
from fedalign.models import build_for_state
from fedalign.report.results import RunRecorder
from fedalign.runs.app_config import load_app_config, resolve
from fedalign.runs.checkpoint import Checkpoint, save_checkpoint
from fedalign.runs.folder import new_run
from fedalign.runs.progress import RoundPrinter, stderr_writer

log = logging.getLogger("fedalign")


def run_server(
    grid: Grid,
    cfg: RunConfig,
    recorder: RunRecorder,
    on_round: RoundCallback | None = None,
    resume: Checkpoint | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_copy: str | None = None,
    carried: dict[int, RoundLog] | None = None,
) -> dict[str, Any]:
    """Run the configured strategy to the end; write metrics, checkpoints, the final model and
    the summary. With ``resume``, continue after that checkpoint's round (the wall time counts
    the earlier segments too). ``data_copy``: the folder of the run's shared data copy, which
    every message names (``fedalign.data.shared``); ``carried``: records of rounds to start from
    (a restart's, ``RoundEngine``)."""
    t0 = time.perf_counter()
    earlier = 0.0 if resume is None else resume.wall_seconds
    config = json.loads(cfg.to_json())
    fed = run_federation(cfg, data_copy)  # the shared copy when there is one, as the clients
    recorder.write_json("partition.json", fed.summary())
    model = run_model(
        cfg, fed, init_seed=cfg.resolved_seeds.init, state=None if resume is None else resume.model
    )
    X_test, y_test = fed.test
    device = server_device(cfg)
    log.info("server device: %s", device)

    def record(row: dict[str, Any]) -> None:
        recorder.record(row)
        if on_round is not None:
            on_round(row)

    every = cfg.output.checkpoint_every

    def checkpoint(server_round: int, state: StateDict, snapshot: StrategySnapshot) -> None:
        if every and (server_round % every == 0 or server_round == cfg.strategy.rounds):
            save_checkpoint(
                recorder.dir / "checkpoints",
                Checkpoint(
                    server_round,
                    OrderedDict(state),
                    snapshot.state,
                    snapshot.tensors,
                    config=config,
                    wall_seconds=round(earlier + time.perf_counter() - t0, 2),
                ),
                keep=cfg.output.keep_checkpoints,
            )

    # specs are traced on the clients' own input (token ids for text, images at their size)
    strategy = build_strategy(cfg, run_model(cfg, fed), torch.as_tensor(fed.train.X[:2]))
    if resume is not None:
        strategy.load_state(resume.state)
        strategy.load_tensors(resume.tensors)
    engine = RoundEngine(
        cfg,
        strategy,
        evaluate_fn=server_evaluation(cfg, fed, X_test, y_test, device),
        on_round=record,
        on_round_end=checkpoint,
        example_limits={i: fed.client(i).num_train for i in range(fed.num_clients)},
        example=(torch.as_tensor(X_test[:1]), torch.as_tensor(y_test[:1])),
        should_stop=should_stop,
        data_copy=data_copy,
        carried=carried,
    )
    try:
        final = engine.run(
            grid,
            OrderedDict(model.state_dict()),
            first_round=1 if resume is None else resume.round + 1,
        )
    except BaseException:
        recorder.close(failed=True)  # the trackers' runs end as failed; the folder keeps the rows
        raise
    if cfg.output.save_model:
        recorder.save_model(final)
    return recorder.finish(earlier + time.perf_counter() - t0, plot=cfg.output.plot)


def server_evaluation(
    cfg: RunConfig, fed: Federation, X: np.ndarray, y: np.ndarray, device: torch.device
) -> EvaluateFn:
    """The server's test-set pass of a round's global model (on ``X``, ``y``). Its model is built
    from one made here, on the caller's thread: the pass may run on another thread beside the next
    round (``strategy.overlap_evaluation``), where it must touch nothing process-wide that a client
    answered in this process uses: torch's global RNG (``models.build_for_state`` draws nothing),
    nor the torch init functions and default dtype that transformers' ``from_pretrained`` patches
    while it loads (the model is copied, not loaded again)."""
    with torch.device("meta"):  # no weights: each pass loads the round's
        template = model_builder(cfg, fed)()

    def evaluate_fn(server_round: int, state: StateDict) -> dict[str, float]:
        # widths may have grown (PFNM, FedMA)
        global_model = build_for_state(lambda: copy.deepcopy(template), state)
        loss, accuracy = evaluate(global_model, X, y, device=device)
        return {"test-loss": loss, "test-accuracy": accuracy}

    return evaluate_fn


def make_server_app(
    cfg: RunConfig,
    recorder: RunRecorder,
    on_round: RoundCallback | None = None,
    outcome: dict[str, Any] | None = None,
    resume: Checkpoint | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_copy: str | None = None,
    carried: dict[int, RoundLog] | None = None,
) -> ServerApp:
    """A ServerApp bound to one run; its summary is put into ``outcome`` when given;
    ``should_stop`` is read after every exchange (a Ctrl-C); ``data_copy`` and ``carried`` as in
    ``run_server``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_server(grid, cfg, recorder, on_round, resume, should_stop, data_copy, carried)
        if outcome is not None:
            outcome.update(summary)

    return app


# ---- `flwr run .` -------------------------------------------------------------------------------

APP_DIR = Path(__file__).resolve().parents[2]

app = ServerApp()


def federation_size(grid: Grid, settle: float = 1.0, timeout: float = 120.0) -> int | None:
    """The number of SuperNodes of a simulated federation (``num-supernodes``), or None when
    ``grid`` is not a simulation's. The simulation engine registers all its SuperNodes at once, in
    one loop, just after the ServerApp starts: the count that holds still for ``settle`` seconds."""
    if type(grid).__name__ != "InMemoryGrid":  # a deployment's nodes join when they join
        return None
    t0 = time.monotonic()
    count, since = 0, time.monotonic()
    while time.monotonic() - t0 < timeout:
        now = len(grid.get_node_ids())
        if now != count:
            count, since = now, time.monotonic()
        elif count and time.monotonic() - since >= settle:
            break
        time.sleep(0.05)
    return count


def check_federation(grid: Grid, cfg: RunConfig) -> None:
    """``num-supernodes`` (Flower's federation config) must equal ``data.num_clients``: with fewer
    nodes the server would wait for the rest, then train a subset; with more, nodes would hold
    partitions that do not exist."""
    size = federation_size(grid)
    if size is not None and size != cfg.data.num_clients:
        raise ConfigError(
            f"the federation has num-supernodes={size} but data.num_clients="
            f"{cfg.data.num_clients}: pass --federation-config "
            f"'num-supernodes={cfg.data.num_clients}' "
            f"(or -c \"overrides='data.num_clients={size}'\")"
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = load_app_config(context.run_config, APP_DIR)
        check_federation(grid, cfg)
        output = resolve(str(context.run_config.get("output-dir", cfg.output.dir)), APP_DIR)
        recorder = new_run(cfg, output)
    except (ConfigError, DataError) as exc:
        # one line in the log flwr streams, as `fedalign run` prints it, instead of a traceback
        stderr_writer()(f"fedalign: config error: {exc}")
        return
    # no progress bar in Flower's log stream: one line per round, on stderr, which it streams
    summary = run_server(grid, cfg, recorder, RoundPrinter(cfg.strategy.rounds, stderr_writer()))
    log.warning("fedalign run finished: %s -> %s", summary, recorder.dir)
