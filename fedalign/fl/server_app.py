"""The fedalign ServerApp.

``make_server_app(cfg, recorder)`` is what our runner simulates (the config arrives by closure,
since ``run_simulation`` leaves ``context.run_config`` empty). The module-level ``app`` is what
``flwr run .`` starts: it reads the YAML config named in ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedalign.checkpoint import Checkpoint, save_checkpoint
from fedalign.components import run_federation, run_model
from fedalign.config import RunConfig, load_config, to_yaml
from fedalign.fl.records import to_arrays, to_state_dict
from fedalign.fl.strategy import make_strategy
from fedalign.results import RunRecorder
from fedalign.training import evaluate

log = logging.getLogger("fedalign")

RoundCallback = Callable[[dict[str, Any]], None]


def server_device(cfg: RunConfig) -> torch.device:
    wanted = cfg.simulation.server_device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def run_server(
    grid: Grid,
    cfg: RunConfig,
    recorder: RunRecorder,
    on_round: RoundCallback | None = None,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """Run the configured strategy to the end; write metrics, checkpoints, the final model and
    the summary. With ``resume``, continue after that checkpoint's round."""
    t0 = time.perf_counter()
    fed = run_federation(cfg)
    recorder.write_json("partition.json", fed.summary())
    model = run_model(cfg, fed, init_seed=cfg.resolved_seeds.init,
                      state=None if resume is None else resume.model)
    X_test, y_test = fed.test
    device = server_device(cfg)
    log.info("server device: %s", device)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        global_model = run_model(cfg, fed, state=to_state_dict(arrays))  # widths may have grown
        loss, accuracy = evaluate(global_model, X_test, y_test, device=device)
        return {"test-loss": loss, "test-accuracy": accuracy}

    def record(row: dict[str, Any]) -> None:
        recorder.record(row)
        if on_round is not None:
            on_round(row)

    every = cfg.output.checkpoint_every

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        if every and (server_round % every == 0 or server_round == cfg.strategy.rounds):
            save_checkpoint(recorder.dir / "checkpoints",
                            Checkpoint(server_round, to_state_dict(arrays), strategy.state()),
                            keep=cfg.output.keep_checkpoints)

    strategy = make_strategy(cfg, evaluate_fn=evaluate_fn, on_round=record, on_round_end=checkpoint)
    if resume is not None:
        strategy.load_state(resume.state)
    result = strategy.start(
        grid, to_arrays(model.state_dict()), num_rounds=cfg.strategy.rounds,
        timeout=cfg.strategy.timeout, first_round=1 if resume is None else resume.round + 1,
    )
    if cfg.output.save_model:
        recorder.save_model(to_state_dict(result.arrays))
    return recorder.finish(time.perf_counter() - t0, plot=cfg.output.plot)


def make_server_app(cfg: RunConfig, recorder: RunRecorder, on_round: RoundCallback | None = None,
                    outcome: dict[str, Any] | None = None,
                    resume: Checkpoint | None = None) -> ServerApp:
    """A ServerApp bound to one run; its summary is put into ``outcome`` when given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_server(grid, cfg, recorder, on_round, resume)
        if outcome is not None:
            outcome.update(summary)

    return app


# ---- `flwr run .` -------------------------------------------------------------------------------

APP_DIR = Path(__file__).resolve().parents[2]

app = ServerApp()


def _resolve(path: str) -> Path:
    """A path as given, else relative to the app directory (where pyproject.toml is)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return APP_DIR / candidate


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedalign.runner import create_run_dir

    run_config = context.run_config
    overrides = [s.strip() for s in str(run_config.get("overrides", "")).split(",") if s.strip()]
    cfg = load_config(_resolve(str(run_config.get("config", "configs/quickstart.yaml"))), overrides)
    out = _resolve(str(run_config.get("output-dir", cfg.output.dir)))
    recorder = RunRecorder(create_run_dir(out, cfg.name))
    recorder.write_text("config.yaml", to_yaml(cfg))
    summary = run_server(grid, cfg, recorder)
    log.warning("fedalign run finished: %s -> %s", summary, recorder.dir)
