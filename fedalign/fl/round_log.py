"""The record of one round: what it measured, which clients failed and why; one metrics row.

Every exchange of a round (train, the pipeline's align and repair queries, PFNM's scores, FedMA's
layer phases) adds its bytes, seconds and failures here, so the row a strategy's round ends with
accounts for all of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fedalign")


@dataclass
class RoundLog:
    """What one round measured; becomes one line of metrics.jsonl."""

    round: int
    clients_sampled: int = 0
    clients_ok: int = 0
    clients_failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    train_loss: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    phase_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def fail(
        self, partition_id: int | None, node_id: int, reason: str, phase: str = "train"
    ) -> None:
        """Count a client's failure; reasons from phases after ``train`` name their phase."""
        reason = reason if phase == "train" else f"{phase}: {reason}"
        self.clients_failed += 1
        self.failures.append({"partition": partition_id, "node": node_id, "reason": reason})
        log.warning("round %d: client %s rejected: %s", self.round, partition_id, reason)

    def timed(self, phase: str, t0: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def row(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """The metrics.jsonl line of this round."""
        return {
            "round": self.round,
            "test_accuracy": metrics.get("test-accuracy"),
            "test_loss": metrics.get("test-loss"),
            "val_accuracy": metrics.get("val-accuracy"),
            "train_loss": self.train_loss,
            "clients_sampled": self.clients_sampled,
            "clients_ok": self.clients_ok,
            "clients_failed": self.clients_failed,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            **{f"seconds_{k}": round(v, 4) for k, v in self.seconds.items()},
            "bytes_by_phase": self.phase_bytes,
            "failures": self.failures,
            **self.extra,
        }


def error_summary(reason: str) -> str:
    """The client's own exception message out of the Ray traceback Flower wraps it in."""
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1].strip().rstrip("'>").strip()
    else:
        lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else "unknown error"
    first_sentence = reason.split(". ", 1)[0]
    return first_sentence if len(first_sentence) >= 20 else reason[:200]
