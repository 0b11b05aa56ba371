"""Checkpoints: atomic safetensors + JSON, checksum verification, fallback to the previous one."""

import json
from collections import OrderedDict

import pytest
import torch

from fedalign.runs.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_mismatch,
    list_checkpoints,
    load_latest,
    read_checkpoint,
    save_checkpoint,
)


def _checkpoint(round_: int) -> Checkpoint:
    torch.manual_seed(round_)
    model = OrderedDict(w=torch.randn(4, 3), b=torch.randn(4), n=torch.tensor(7))
    return Checkpoint(
        round_, model, {"stage": round_, "widths": [4, 5]}, {"assign": torch.arange(4)}
    )


def test_round_trip_is_exact(tmp_path):
    saved = _checkpoint(3)
    save_checkpoint(tmp_path, saved)
    loaded = load_latest(tmp_path)
    assert loaded.round == 3 and loaded.state == saved.state
    assert list(loaded.model) == ["w", "b", "n"]
    assert all(torch.equal(loaded.model[k], v) for k, v in saved.model.items())
    assert torch.equal(loaded.tensors["assign"], torch.arange(4))
    assert not list(tmp_path.glob("*.tmp"))


def test_state_that_shares_the_models_memory_is_saved_and_read_back(tmp_path):
    """A strategy's state may hold the model's own tensors (FLoRA's folded base is the global
    weight) or slices of one buffer; safetensors refuses shared memory, so each is written on
    its own and reads back with its value."""
    saved = _checkpoint(1)
    packed = torch.arange(6.0)
    saved.tensors.update(
        base=saved.model["w"], first=packed[:3], second=packed[3:], empty=packed[:0]
    )
    save_checkpoint(tmp_path, saved)
    loaded = load_latest(tmp_path)
    assert torch.equal(loaded.tensors["base"], saved.model["w"])
    assert torch.equal(loaded.model["w"], saved.model["w"])
    assert [loaded.tensors[k].tolist() for k in ("first", "second", "empty")] == [
        [0.0, 1.0, 2.0],
        [3.0, 4.0, 5.0],
        [],
    ]


def test_keeps_only_the_newest(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, _checkpoint(r), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "round-000004.json",
        "round-000005.json",
    ]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_corrupted_checkpoint_is_detected_and_skipped(tmp_path, caplog):
    save_checkpoint(tmp_path, _checkpoint(1))
    save_checkpoint(tmp_path, _checkpoint(2))
    tensors = tmp_path / "round-000002.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_checkpoint(tmp_path / "round-000002.json")
    loaded = load_latest(tmp_path)
    assert loaded.round == 1
    assert "skipping damaged checkpoint" in caplog.text


def test_truncated_and_missing_files_are_reported(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(1))
    tensors = tmp_path / "round-000001.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(tmp_path / "round-000001.json")
    tensors.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        read_checkpoint(tmp_path / "round-000001.json")
    (tmp_path / "round-000001.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        read_checkpoint(tmp_path / "round-000001.json")
    assert load_latest(tmp_path) is None


def test_unknown_format_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, _checkpoint(1))
    manifest = json.loads(path.read_text())
    manifest["format"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unknown checkpoint format 99"):
        read_checkpoint(path)


def test_a_resumed_run_may_change_its_rounds_and_backend_and_nothing_else():
    then = {"seed": 0, "strategy": {"rounds": 3}, "simulation": {"backend": "ray", "cpus": 1}}
    written = Checkpoint(2, OrderedDict(w=torch.zeros(1)), config=then)

    def now(**changes):
        config = json.loads(json.dumps(then))
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            config[section][key] = value
        return config

    assert (
        config_mismatch(written, now(strategy__rounds=10, simulation__backend="inprocess")) is None
    )
    old = Checkpoint(2, written.model, config={**then, "simulation": {"cpus": 1}})  # before the key
    assert config_mismatch(old, now()) is None
    assert config_mismatch(written, now(simulation__cpus=2)) == (
        "simulation.cpus was 1 when round 2 was checkpointed, is now 2"
    )
