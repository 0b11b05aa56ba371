"""Resuming a run folder, without Ray: the config must be the one the checkpoint was written
with, torn metrics are re-aligned to the checkpoint atomically, a finished run is left as it is."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

from fedalign.cli import main
from fedalign.config.load import load_config, to_yaml
from fedalign.core.errors import RunFolderError
from fedalign.report.results import RunRecorder, read_rows
from fedalign.runs.checkpoint import Checkpoint, save_checkpoint
from tests.helpers import DIGITS

ROUNDS = 3


def run_folder(tmp_path: Path, checkpointed: int, rows: int) -> Path:
    """A digits run folder as a run leaves it: config.yaml, ``rows`` metrics rows (round 0 on),
    a checkpoint of round ``checkpointed`` recording the config and 12.5 s of wall time."""
    cfg = load_config(DIGITS, [f"strategy.rounds={ROUNDS}", "output.plot=false"])
    run_dir = tmp_path / "run"
    recorder = RunRecorder(run_dir)
    recorder.write_text("config.yaml", to_yaml(cfg))
    for r in range(rows):
        recorder.record({"round": r, "test_accuracy": 0.1 * r, "bytes_down": 10, "bytes_up": 5})
    model = OrderedDict(w=torch.arange(6.0).reshape(2, 3))
    config = json.loads(cfg.to_json())
    save_checkpoint(
        run_dir / "checkpoints",
        Checkpoint(checkpointed, model, config=config, wall_seconds=12.5),
    )
    return run_dir


def resume(run_dir: Path) -> int:
    return main(["run", "--resume", str(run_dir), "--no-progress"])


def test_an_edited_config_is_refused_naming_the_first_differing_key(tmp_path, capsys):
    run_dir = run_folder(tmp_path, checkpointed=2, rows=3)
    config = run_dir / "config.yaml"
    values = yaml.safe_load(config.read_text())
    values["model"]["options"]["hidden"] = [32]
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    assert resume(run_dir) == 2
    err = capsys.readouterr().err
    assert "config.yaml is not the config this run was checkpointed with" in err
    assert "model.options.hidden was [64] when round 2 was checkpointed, is now [32]" in err
    assert len(err.strip().splitlines()) == 1


def test_a_finished_run_says_so_and_exits_0_leaving_its_folder_as_it_was(tmp_path, capsys):
    run_dir = run_folder(tmp_path, checkpointed=ROUNDS, rows=ROUNDS + 1)
    (run_dir / "summary.json").write_text(
        json.dumps({"rounds": 3, "bytes_total": 60, "wall_seconds": 12.5})
    )
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert resume(run_dir) == 0
    out, err = capsys.readouterr()
    assert "already finished all 3 rounds; nothing to resume" in err
    assert f"run folder: {run_dir}" in out
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_finished_run_killed_before_its_summary_gets_one_with_its_wall_time(tmp_path, capsys):
    run_dir = run_folder(tmp_path, checkpointed=ROUNDS, rows=ROUNDS + 1)
    assert resume(run_dir) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["rounds"], summary["wall_seconds"]) == (ROUNDS, 12.5)
    assert (run_dir / "model.safetensors").is_file()


@pytest.fixture
def torn(tmp_path: Path) -> Path:
    """Rows of rounds 0-2, then round 3's line cut by a kill during its append."""
    run_dir = run_folder(tmp_path, checkpointed=2, rows=3)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "test_accur')
    return run_dir


def test_truncate_after_drops_a_torn_last_line_and_later_rounds(torn):
    recorder = RunRecorder(torn)
    recorder.truncate_after(1)
    assert [r["round"] for r in read_rows(torn)] == [0, 1]
    assert (torn / "metrics.csv").read_text().count("\n") == 3  # the header and two rows
    assert not (torn / ".rewrite").exists()


def test_truncate_after_refuses_a_damaged_line_before_the_last(torn):
    text = (torn / "metrics.jsonl").read_text().splitlines()
    (torn / "metrics.jsonl").write_text("\n".join([text[0], "garbage", *text[1:]]) + "\n")
    with pytest.raises(RunFolderError, match="a line before the last is not a metrics row"):
        RunRecorder(torn).truncate_after(1)


def test_a_kill_inside_truncate_after_leaves_the_old_rows(torn, monkeypatch):
    before = (torn / "metrics.jsonl").read_bytes()
    replace = os.replace

    def killed_at_the_second_rename(src, dst):
        if Path(dst).name == "metrics.jsonl":
            raise KeyboardInterrupt  # the kill arrives between the two renames
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        RunRecorder(torn).truncate_after(1)
    assert (torn / "metrics.jsonl").read_bytes() == before  # still a run folder
    monkeypatch.setattr(os, "replace", replace)
    RunRecorder(torn).truncate_after(1)  # and the next resume re-aligns it
    assert [r["round"] for r in read_rows(torn)] == [0, 1]
