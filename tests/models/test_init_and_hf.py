"""Issue 25, items 1-2: ``model.init`` starts a run from saved weights (checked against the model
sized for the data), and ``model: {name: hf, path: DIR}`` loads a tiny GPT-2 saved to disk, whose
Conv1D layers take LoRA adapters in their transposed orientation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedalign.config.components import run_model
from fedalign.core.errors import ConfigError
from fedalign.models import build_model
from tests.fl.mock_grid import IN_FEATURES, NUM_CLASSES, Shapes
from tests.fl.test_strategies import make_config

MLP = {"name": "mlp", "in_features": IN_FEATURES, "hidden": [16], "num_classes": NUM_CLASSES}
SHAPES = Shapes((IN_FEATURES,), NUM_CLASSES)


def test_model_init_loads_the_saved_weights_and_refuses_a_misfit(tmp_path: Path) -> None:
    saved = run_model(make_config(2, model=MLP), SHAPES, init_seed=123).state_dict()
    save_file(dict(saved), str(tmp_path / "base.safetensors"))
    cfg = make_config(2, model={**MLP, "init": str(tmp_path / "base.safetensors")})
    model = run_model(cfg, SHAPES, init_seed=7)  # the init seed no longer decides the weights
    for key, value in saved.items():
        assert torch.equal(model.state_dict()[key], value)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_file(dict(saved), str(run_dir / "model.safetensors"))
    from_folder = run_model(make_config(2, model={**MLP, "init": str(run_dir)}), SHAPES)
    assert torch.equal(from_folder.state_dict()["layers.0.weight"], saved["layers.0.weight"])
    wider = make_config(2, model={**MLP, "hidden": [32], "init": str(run_dir)})
    with pytest.raises(ConfigError, match="does not fit the model MLP"):
        run_model(wider, SHAPES)
    with pytest.raises(ConfigError, match="model.init: .* does not exist"):
        make_config(2, model={**MLP, "init": str(tmp_path / "missing.safetensors")})
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        run_model(make_config(2, model={**MLP, "init": str(tmp_path / "empty_run")}), SHAPES)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=40,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_hf_model_from_disk_gives_class_logits_and_checks_the_data(tiny_gpt2: Path) -> None:
    model = build_model("hf", path=str(tiny_gpt2), num_classes=30, context=12)
    tokens = torch.randint(0, 30, (5, 12))
    logits = model(tokens)
    assert logits.shape == (5, 30)
    full = model.model(input_ids=tokens).logits[:, -1]  # the LM's own logits, first 30 tokens
    torch.testing.assert_close(logits, full[:, :30])
    with pytest.raises(ValueError, match="fewer than the dataset's 50"):
        build_model("hf", path=str(tiny_gpt2), num_classes=50)
    with pytest.raises(ValueError, match="more than its 32 positions"):
        build_model("hf", path=str(tiny_gpt2), num_classes=30, context=64)
    with pytest.raises(ValueError, match="holds no config.json"):
        build_model("hf", path=str(tiny_gpt2 / "nowhere"))


def test_lora_on_gpt2_conv1d_changes_the_transposed_weight(tiny_gpt2: Path) -> None:
    """peft's own merge of a trained adapter equals ``W + (alpha / r) (B A)^T`` on GPT-2's
    Conv1D (``fan_in_fan_out``): the orientation the LoRA strategy writes its update in."""
    pytest.importorskip("peft")
    from fedalign.models.adapters import (
        adapted_layers,
        adapter_state,
        inject_lora,
        layer_pairs,
        load_adapter_state,
    )

    model = build_model("hf", path=str(tiny_gpt2), num_classes=30)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, rank=2, alpha=4.0, targets=["c_attn"], seed=0)
    layers = adapted_layers(model)
    assert layers and all(layer.fan_in_fan_out for layer in layers.values())
    trained = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    load_adapter_state(model, trained)
    for name, module in model.named_modules():
        if name in layers:
            module.merge()
    state = model.state_dict()
    for name, (a, b) in layer_pairs(trained).items():
        expected = base[layers[name].weight] + (4.0 / 2) * (b @ a).T
        torch.testing.assert_close(state[f"{name}.base_layer.weight"], expected)
