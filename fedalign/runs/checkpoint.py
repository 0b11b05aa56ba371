"""Round checkpoints: safetensors plus JSON, written atomically, verified by checksum on load.

A checkpoint is two files in ``RUN_DIR/checkpoints``: ``round-000012.safetensors`` (the global
model and any tensors of the strategy's state) and ``round-000012.json`` (the round, the strategy's
JSON state and the SHA-256 of the tensor file). Each is written to a temporary file, fsynced and
renamed, and the JSON is written last, so a checkpoint whose JSON exists is complete. Loading
verifies the checksum and falls back to the previous checkpoint when the newest is damaged. Nothing
is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("fedalign")

FORMAT = 1
_NAME = re.compile(r"round-(\d{6})\.json$")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or does not match its checksum."""


@dataclass
class Checkpoint:
    """One round's global model and strategy state; ``config`` is the resolved config the run was
    started with (``--resume`` refuses a config.yaml edited since) and ``wall_seconds`` the run's
    time so far (a resumed run's summary counts every segment)."""

    round: int
    model: OrderedDict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    wall_seconds: float = 0.0


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key where two JSON-like values differ, with both values (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(
                a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}."
            )
            if found is not None:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


EXTENDABLE = (("strategy", "rounds"), ("simulation", "backend"))
"""The keys a resumed run may change. The number of rounds: no round's seeds, sampling or updates
depend on it, so a run stopped at round r and resumed with more rounds is the run that had them
from the start (tests/integration/test_strategy_catalogue.py checks it bitwise). The backend: a
run gives the same rounds on Ray and in-process (tests/integration/test_inprocess.py), so a run
started on Ray may continue where Ray is not installed, and a checkpoint written before the key
existed still resumes."""


def config_mismatch(checkpoint: Checkpoint, config: dict[str, Any]) -> str | None:
    """Why ``config`` (a resolved config as JSON) is not the one ``checkpoint`` was written with
    (None: it is, or the checkpoint predates recording it); ``EXTENDABLE``'s keys may differ."""
    if checkpoint.config is None:
        return None
    then, now = dict(checkpoint.config), dict(config)
    for section, key in EXTENDABLE:
        then[section] = {**then.get(section, {}), key: None}
        now[section] = {**now.get(section, {}), key: None}
    found = first_difference(then, now)
    if found is None:
        return None
    key, was, now = found
    return f"{key} was {was!r} when round {checkpoint.round} was checkpointed, is now {now!r}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, contiguous, none sharing memory with another: safetensors refuses
    to write tensors that share memory, and a strategy's state may hold the global model's own
    tensors (FLoRA's folded base is the new global weight), which would stop the run at its
    checkpoint. A tensor whose memory an earlier one uses is copied."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            value = value.clone()
        elif pointer:  # (empty tensors have none)
            seen.add(pointer)
        out[key] = value
    return out


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write ``checkpoint`` atomically; keep the newest ``keep`` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"round-{checkpoint.round:06d}"
    tensor_path = directory / f"{stem}.safetensors"
    payload = _unshared(
        {
            **{f"model/{k}": v for k, v in checkpoint.model.items()},
            **{f"state/{k}": v for k, v in checkpoint.tensors.items()},
        }
    )
    tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    save_file(payload, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, tensor_path)
    manifest = {
        "format": FORMAT,
        "round": checkpoint.round,
        "tensors": tensor_path.name,
        "sha256": _sha256(tensor_path),
        "model_keys": list(checkpoint.model),
        "state": checkpoint.state,
        "config": checkpoint.config,
        "wall_seconds": checkpoint.wall_seconds,
    }
    _atomic_write(directory / f"{stem}.json", json.dumps(manifest, indent=1).encode())
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return directory / f"{stem}.json"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Manifest paths, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def read_checkpoint(manifest_path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint; CheckpointError names what is wrong."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
        tensor_path = manifest_path.parent / manifest["tensors"]
        expected, round_ = manifest["sha256"], int(manifest["round"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path.name}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{manifest_path.name}: unknown checkpoint format {manifest.get('format')!r}"
        )
    if not tensor_path.is_file():
        raise CheckpointError(f"{manifest_path.name}: {tensor_path.name} is missing")
    actual = _sha256(tensor_path)
    if actual != expected:
        raise CheckpointError(
            f"{tensor_path.name}: checksum mismatch (file truncated or corrupted)"
        )
    try:
        payload = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensor_path.name}: not a valid safetensors file ({exc})") from None
    model = OrderedDict((k, payload[f"model/{k}"]) for k in manifest["model_keys"])
    tensors = {k[len("state/") :]: v for k, v in payload.items() if k.startswith("state/")}
    return Checkpoint(
        round_,
        model,
        manifest.get("state", {}),
        tensors,
        manifest.get("config"),
        float(manifest.get("wall_seconds", 0.0)),
    )


def load_latest(directory: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for manifest in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(manifest)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return None
