"""The server's copy of a record every client keeps between rounds (FedDyn's ``D_k``, MOON's
previous local model), as SCAFFOLD keeps its clients' control variates.

A client's own record lives in its node's state (``fedalign.client.state.ClientState``), and the
server computes the same record from the client's reply, for two reasons: a checkpoint holds it (a
resumed simulation starts its nodes with empty states, so the server sends each client its copy
the first time it samples it again, and the run continues bit for bit), and a client whose reply
was rejected has already moved its own record, so it gets the server's copy with its next message
(the server's copy, which never saw the rejected update, is the one the run continues from).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedalign.core.types import StateDict


@dataclass
class ClientCopies:
    """Every client's record as the server last accepted it; ``prefix`` names its tensors in a
    checkpoint (``{prefix}/{partition}/{key}``)."""

    prefix: str
    copies: dict[int, OrderedDict[str, torch.Tensor]] = field(default_factory=dict)
    restore: set[int] = field(default_factory=set)
    """Partitions whose own record cannot be trusted to be the server's copy: sent it next time."""
    sampled: set[int] = field(default_factory=set)

    def to_send(self, partitions: Iterable[int], missing: StateDict) -> dict[int, StateDict]:
        """The copies to send with this round's models: to the sampled partitions in ``restore``
        (``missing`` for one the server has no copy of: what a client starts from)."""
        partitions = list(partitions)
        self.sampled.update(partitions)
        return {p: self.copies.get(p, missing) for p in partitions if p in self.restore}

    def accept(self, records: Mapping[int, StateDict]) -> None:
        """The accepted clients' new records; every other client sampled since the last call moved
        its own record without the server: it gets the server's copy next time."""
        self.copies.update({p: OrderedDict(r) for p, r in records.items()})
        self.restore = (self.restore | self.sampled) - set(records)
        self.sampled = set()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{self.prefix}/{p}/{k}": v
            for p, record in self.copies.items()
            for k, v in record.items()
        }

    def load(self, tensors: Mapping[str, torch.Tensor], order: Sequence[str]) -> None:
        """Restore the copies from a checkpoint's ``tensors`` (each record's keys in ``order``, the
        model's); a resumed simulation's nodes start with empty states, so every client with a
        copy gets it with its next model."""
        found: dict[int, dict[str, torch.Tensor]] = {}
        head = f"{self.prefix}/"
        for name, value in tensors.items():
            if name.startswith(head):
                partition, key = name[len(head) :].split("/", 1)
                found.setdefault(int(partition), {})[key] = value
        self.copies = {
            p: OrderedDict((k, record[k]) for k in order if k in record)
            for p, record in found.items()
        }
        self.restore |= set(self.copies)
