"""Creating a run folder: the one place a run's directory is made and its config written.

``fedalign run`` (through ``fedalign.runs.runner``), ``flwr run .`` (the ServerApp's own entry
point) and the bench all start a run here, so every run folder begins the same way.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fedalign.config.load import to_yaml
from fedalign.config.schema import RunConfig
from fedalign.core.errors import ConfigError
from fedalign.report.results import RunRecorder


def create_run_dir(output_dir: str | Path, name: str) -> Path:
    """A new folder ``<output_dir>/<name>-<timestamp>``, suffixed ``-2``, ``-3``... when taken.

    The folder is claimed by ``mkdir`` itself (which fails if the name exists), not by a check
    before it: several processes starting a run of the same name in the same second (a seed
    sweep, an array job) each get their own folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, n = base, 1
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                path.mkdir()
                return path
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")
    except OSError as exc:  # the output is a file, read-only, on a full or missing disk
        raise ConfigError(
            f"output folder {str(output_dir)!r}: cannot create a run folder in it "
            f"({exc.strerror or exc})"
        ) from None


def new_run(cfg: RunConfig, output_dir: str | Path) -> RunRecorder:
    """A recorder on a new folder for ``cfg`` under ``output_dir``, its resolved config written
    and its trackers (``output.trackers``) started."""
    recorder = RunRecorder(create_run_dir(output_dir, cfg.name))
    recorder.write_text("config.yaml", to_yaml(cfg))
    recorder.open_trackers(cfg.output.trackers, cfg.to_dict())
    return recorder
