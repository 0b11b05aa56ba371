"""Types shared by every layer, defined once.

A state dict is what every algorithm takes and returns; statistics are what clients compute for the
server, nested by kind and layer (``{"grams": {"fc1": tensor}}``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

StateDict = Mapping[str, torch.Tensor]
"""Parameter and buffer name -> tensor, as ``nn.Module.state_dict()`` returns it."""

MutableState = OrderedDict[str, torch.Tensor]
"""A state dict an algorithm builds and returns (insertion order = the model's order)."""

Stats = dict[str, dict[str, Any]]
"""One kind of client statistic: layer or group name -> named tensors (or a tensor)."""

ClientStats = Mapping[str, Stats]
"""Every statistic one client reported: kind (``"grams"``, ``"fisher"``, ...) -> its values."""
