"""Helpers shared by the test modules (import them: ``from tests.helpers import ...``).

Fixtures live in ``tests/conftest.py``; plain functions and constants live here, because a test
module cannot import a conftest by name reliably.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from fedalign.algorithms.align import apply_permutation, random_permutation
from fedalign.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DIGITS = CONFIGS / "digits_mlp.yaml"


def fresh_python(code: str) -> str:
    """What ``code`` prints, stripped, run in a fresh interpreter: how a test sees what a
    process imports (a Ray worker's, a run driver's) with nothing imported before it."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def shipped_overrides(path: Path) -> list[str]:
    """What loading shipped config ``path`` needs: nothing, except for a config whose
    ``model.init`` names the base ``fedalign pretrain`` writes on the user's machine (it is not
    shipped: configs/fortunes_lora.yaml), loaded without it."""
    model = yaml.safe_load(path.read_text()).get("model") or {}
    return ["model.init=null"] if model.get("init") else []


def seeded_model(name: str = "mlp", seed: int = 0, **kwargs) -> nn.Module:
    """``build_model(name, **kwargs)`` right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model(name, **kwargs)


def tiny_net(seed: int = 0) -> nn.Module:
    """A 3-4-3 tanh MLP: small enough for hand loops over examples and classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def permuted_copies(spec, state: dict, count: int, generator: torch.Generator) -> list[dict]:
    """``count`` copies of ``state``, each permuted by its own draw from ``generator``."""
    return [
        apply_permutation(spec, random_permutation(spec, generator), state) for _ in range(count)
    ]


def with_state(model: nn.Module, state: dict) -> nn.Module:
    """A deep copy of ``model`` holding ``state``."""
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out
