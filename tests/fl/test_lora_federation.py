"""Issue 25: a federation fine-tunes LoRA adapters through Flower (the in-process backend: Flower's
own grid, messages, ClientApp and ServerApp, without Ray's start-up) on a pre-trained base: the
zoo's character transformer pre-trained by ``fedalign pretrain``'s code, and a tiny GPT-2 saved
with ``save_pretrained``. Two clients, two rounds, FedEx-LoRA: the base's own tensors stay as
they were, the adapted weights move, and each round's bytes are the adapters' (and FedEx-LoRA's
dense base once it changed)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import load_file

from fedalign.config.components import run_federation, run_model
from fedalign.config.load import from_dict
from fedalign.fl.records import content_bytes, to_arrays
from fedalign.models.adapters import adapted_layers, adapter_state, inject_lora
from fedalign.report.results import read_rows
from fedalign.runs.pretrain import pretrain
from fedalign.runs.runner import run

pytest.importorskip("peft")
DATA = {
    "dataset": "fortunes",
    "options": {"seq_len": 16, "stride": 4096},
    "num_clients": 2,
    "partition": "natural",
    "val_fraction": 0.1,
}
ADAPTERS = {"kind": "lora", "rank": 2, "alpha": 4.0, "rule": "fedex-lora"}


def config(tmp_path: Path, model: dict[str, Any], **sections: dict[str, Any]):
    return from_dict(
        {
            "seed": 0,
            "data": DATA,
            "model": model,
            "train": {"batch_size": 16, "optimizer": "adam", "lr": 0.01},
            "strategy": {"name": "lora", "rounds": 2, "min_train_clients": 2},
            "simulation": {"backend": "inprocess"},
            "output": {"dir": str(tmp_path / "runs"), "plot": False, "checkpoint_every": 0},
            **sections,
        }
    )


def fine_tuned(cfg) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict]]:
    """The run's base (its initial model), its final model and its rows; the adapted layers are
    checked against the base: moved; every other tensor: untouched."""
    fed = run_federation(cfg)
    base = run_model(cfg, fed, init_seed=cfg.resolved_seeds.init).state_dict()
    outcome = run(cfg, progress=False)
    final = load_file(outcome.run_dir / "model.safetensors")
    a = cfg.adapters
    injected = inject_lora(
        run_model(cfg, fed), rank=a.rank, alpha=a.alpha, targets=a.targets, seed=0
    )
    adapted = {layer.weight for layer in adapted_layers(injected).values()}
    assert adapted and set(final) == set(base)
    for key, value in base.items():
        if key in adapted:
            assert not torch.equal(final[key], value), key
        else:
            assert torch.equal(final[key], value), key
    rows = [r for r in read_rows(outcome.run_dir) if r["round"] >= 1]
    adapters = content_bytes(RecordDict({"arrays": to_arrays(adapter_state(injected))}))
    full = content_bytes(RecordDict({"arrays": to_arrays(copy.deepcopy(base))}))
    for row in rows:
        assert row["clients_ok"] == 2 and row["bytes_up"] == 2 * adapters
        assert row["lora"]["aggregation_error"] < 1e-6  # FedEx-LoRA is exact
    assert rows[0]["bytes_down"] == 2 * adapters  # round 1: the fresh adapters alone
    assert rows[1]["bytes_down"] > rows[0]["bytes_down"]  # then the changed base too
    assert adapters < full / 4
    return base, final, rows


def test_char_transformer_pre_trained_then_fine_tuned_with_adapters(tmp_path: Path) -> None:
    model = {"name": "char_transformer", "d_model": 16, "heads": 2, "layers": 1, "ff": 16}
    base_file = tmp_path / "base.safetensors"
    central = config(tmp_path, model, strategy={"name": "fedavg"})
    pretrain(central, base_file, outside_federation=True)
    cfg = config(tmp_path, {**model, "init": str(base_file)}, adapters=ADAPTERS)
    base, _, _ = fine_tuned(cfg)
    pre_trained = load_file(base_file)
    assert all(torch.equal(base[k], pre_trained[k]) for k in base)  # the base is the pre-trained


def test_a_saved_hugging_face_gpt2_fine_tuned_with_adapters(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0
    )
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "gpt2")
    cfg = config(tmp_path, {"name": "hf", "path": str(tmp_path / "gpt2")}, adapters=ADAPTERS)
    _, final, _ = fine_tuned(cfg)
    assert "model.transformer.h.0.attn.c_attn.weight" in final
