"""Conversions between torch state dicts and Flower records, and message-size accounting."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

RUN_CONFIG_KEY = "fedalign-run"  # ConfigRecord entry carrying the run config as JSON
# ConfigRecord entry naming the folder of the run's shared data copy (fedalign.data.shared)
DATA_COPY_KEY = "fedalign-data-copy"


def to_arrays(state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in state_dict.items()))


def to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Tensors that own their memory (ArrayRecord's numpy views are read-only)."""
    return OrderedDict(
        (key, torch.from_numpy(np.array(array.numpy(), copy=True))) for key, array in record.items()
    )


def config_record(run_config_json: str, **entries: Any) -> ConfigRecord:
    return ConfigRecord({RUN_CONFIG_KEY: run_config_json, **entries})


def content_bytes(content: RecordDict) -> int:
    """Bytes of array payload in a message (what dominates communication).

    Configs and metrics are a few hundred bytes and are not counted, matching how FL papers
    report communication.
    """
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )


def message_bytes(messages: list[Message]) -> int:
    return sum(content_bytes(m.content) for m in messages if m.has_content())
