"""Experiment trackers: TensorBoard and MLflow get the rows metrics.jsonl gets, as they are written.

metrics.jsonl stays the record of a run (``--resume``, ``report`` and ``bench`` read it); a tracker
is a copy of it for the tools people already follow their runs in. A config asks for them with
``output.trackers: [tensorboard, mlflow]``; each is an optional extra (``pip install
'fedalign[tensorboard]'``, ``'fedalign[mlflow]'``) and nothing is installed or written by default.

Every number of a row is logged at step = the round, under its metrics.jsonl name grouped by what
it measures (``tracker_name``): ``test/accuracy``, ``train/loss``, ``time/train``, ``bytes/up``,
``clients/failed``; nested numbers are flattened with ``/`` (``bytes/by_phase/train/down``). At
the end, the run's summary (final and best accuracy, rounds, bytes, seconds) is logged as summary
values, and ``summary.json`` and ``accuracy.png`` as artifacts. Where they go:

- ``tensorboard``: event files in ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs``), the
  resolved config as text and, at the end, as hyperparameters beside the summary (TensorBoard's
  HPARAMS tab compares runs by them); a resumed or restarted run drops the steps it redoes
  (``purge_step``).
- ``mlflow``: a run named after the run folder, in the experiment named by the config (or
  ``MLFLOW_EXPERIMENT_NAME``), in MLflow's tracking store: ``MLFLOW_TRACKING_URI``, else
  ``OUTPUT_DIR/mlflow.db`` beside the run folders (not the current directory); the config's keys
  as params, the summary as ``summary/...`` metrics, the files as artifacts. ``RUN_DIR/mlflow.json``
  keeps the run's id, so a resumed run continues the same MLflow run. MLflow cannot delete logged
  points: a redone round's step holds both values in the metric's history, the redone one last.
  MLflow's own INFO lines and deprecation warnings are kept out of the round lines.

A tracker that fails (a tracking server gone) is dropped with one warning; the run goes on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedalign.core.registry import Registry

log = logging.getLogger("fedalign")


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any]) -> None: ...

    def summarise(self, summary: Mapping[str, Any], files: Sequence[Path]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


TRACKERS = Registry("tracker")
"""Tracker name -> ``factory(run_dir, config, *, resume_after) -> Tracker``; ``meta["package"]``
is the module it needs, ``meta["extra"]`` the fedalign extra that installs it. ``config`` is the
resolved config as a dict; ``resume_after`` the round a resumed run continues after (None: new)."""


def scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row by name (``round``, text, lists and nulls left out; nested
    mappings flattened with ``/``)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif (
            isinstance(value, (int, float))
            and name != "round"
            and not (isinstance(value, float) and math.isnan(value))
        ):
            out[name] = float(value)
    return out


GROUPS = {
    "test": "test",
    "train": "train",
    "val": "val",
    "seconds": "time",
    "bytes": "bytes",
    "clients": "clients",
}
"""metrics.jsonl key prefix -> the group trackers show it under."""


def tracker_name(key: str) -> str:
    """A metrics.jsonl key as trackers show it, grouped by what it measures: ``test_accuracy`` ->
    ``test/accuracy``, ``seconds_train`` -> ``time/train``, ``bytes_by_phase/train/down`` ->
    ``bytes/by_phase/train/down``; a key of no group keeps its name."""
    head, sep, rest = key.partition("_")
    return f"{GROUPS[head]}/{rest}" if sep and head in GROUPS else key


def flat_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.05}}`` -> ``{"train.lr": "0.05"}``: the config as MLflow params."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def missing_package(name: str) -> str | None:
    """Why tracker ``name`` cannot run here (its package is not installed), or None."""
    meta = TRACKERS.get(name).meta
    if importlib.util.find_spec(meta["package"]) is None:
        return (
            f"tracker {name!r} needs the {meta['package']} package: "
            f"pip install 'fedalign[{meta['extra']}]'"
        )
    return None


class TensorBoardTracker:
    """Scalars into ``RUN_DIR/tensorboard/`` through torch's ``SummaryWriter``."""

    def __init__(
        self, run_dir: Path, config: Mapping[str, Any], *, resume_after: int | None = None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_after is None else resume_after + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        self.config = config
        if resume_after is None:
            self.writer.add_text(
                "config", "    " + json.dumps(config, indent=2).replace("\n", "\n    ")
            )

    def log(self, row: Mapping[str, Any]) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(tracker_name(name), value, global_step=row["round"])
        self.writer.flush()

    def summarise(self, summary: Mapping[str, Any], files: Sequence[Path]) -> None:
        self.writer.add_hparams(
            flat_config(self.config),
            {f"summary/{k}": v for k, v in scalars(summary).items()},
            run_name=".",  # beside the curves, not in a sub-folder of its own
        )
        self.writer.add_text("summary", "    " + json.dumps(dict(summary), indent=2))
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per run folder, through ``MlflowClient`` (no global MLflow state touched)."""

    def __init__(
        self, run_dir: Path, config: Mapping[str, Any], *, resume_after: int | None = None
    ) -> None:
        quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(default_tracking_uri(run_dir))
        self.record = run_dir / "mlflow.json"
        known = json.loads(self.record.read_text()) if self.record.is_file() else {}
        if resume_after is not None and known.get("run_id"):
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or str(config.get("name", "fedalign"))
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id if found is not None else self.client.create_experiment(experiment)
        )
        run = self.client.create_run(
            experiment_id, run_name=run_dir.name, tags={"fedalign.run_dir": str(run_dir.resolve())}
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        batch = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=batch[i : i + 100])
        self.record.write_text(
            json.dumps({"tracking_uri": self.client.tracking_uri, "run_id": self.run_id}) + "\n"
        )

    def log(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(row["round"]), int(time.time() * 1000)
        metrics = [Metric(tracker_name(k), v, now, step) for k, v in scalars(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def summarise(self, summary: Mapping[str, Any], files: Sequence[Path]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(f"summary/{k}", v, now, 0) for k, v in scalars(summary).items()]
        self.client.log_batch(self.run_id, metrics=values)
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def default_tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else an SQLite store beside the run folders
    (``OUTPUT_DIR/mlflow.db``): MLflow's own default, ``./mlflow.db``, lands wherever the
    command happened to be started."""
    explicit = os.environ.get("MLFLOW_TRACKING_URI")
    return explicit or f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"


def quiet_mlflow() -> None:
    """MLflow's INFO lines (its store's migrations) and deprecation warnings off the terminal,
    where the round lines are: they say nothing about the run."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow(\.|$)")


TRACKERS.register(
    "tensorboard", TensorBoardTracker, options={}, package="tensorboard", extra="tensorboard"
)
TRACKERS.register("mlflow", MlflowTracker, options={}, package="mlflow", extra="mlflow")


class TrackerSet:
    """The trackers of one run; a tracker that raises is dropped with one warning."""

    def __init__(
        self,
        trackers: Mapping[str, Tracker],
        run_dir: Path | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.trackers = dict(trackers)
        self.run_dir, self.config = run_dir, config

    @classmethod
    def open(
        cls,
        names: tuple[str, ...] | list[str],
        run_dir: Path,
        config: Mapping[str, Any],
        resume_after: int | None = None,
    ) -> TrackerSet:
        opened: dict[str, Tracker] = {}
        for name in names:
            try:
                opened[name] = TRACKERS.get(name).obj(run_dir, config, resume_after=resume_after)
            except Exception as exc:  # noqa: BLE001  a tracker never stops a run
                log.warning("tracker %s not started: %s", name, _one_line(exc))
        return cls(opened, run_dir, config)

    def rewind(self, last_round: int) -> None:
        """Reopen the trackers as a run resumed after ``last_round`` opens them: a simulation
        restarted in the same process redoes the later rounds, and TensorBoard must drop their
        first values (``purge_step``) as it does on ``--resume``."""
        if not self.trackers or self.run_dir is None or self.config is None:
            return
        names = list(self.trackers)
        self.close(failed=True)
        self.trackers = TrackerSet.open(names, self.run_dir, self.config, last_round).trackers

    def log(self, row: Mapping[str, Any]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(row)
            except Exception as exc:  # noqa: BLE001
                log.warning("tracker %s dropped: %s", name, _one_line(exc))
                self.trackers.pop(name)

    def summarise(self, summary: Mapping[str, Any], files: Sequence[Path]) -> None:
        """Hand every tracker the run's summary and its files (a finished run's last step)."""
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.summarise(summary, files)
            except Exception as exc:  # noqa: BLE001
                log.warning("tracker %s did not take the summary: %s", name, _one_line(exc))

    def close(self, failed: bool = False) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.close(failed)
            except Exception as exc:  # noqa: BLE001
                log.warning("tracker %s did not close cleanly: %s", name, _one_line(exc))
        self.trackers.clear()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
