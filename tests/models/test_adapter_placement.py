"""Where adapters go and what they cost, decided on a meta-device model before any weight is loaded."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from helpers import tiny_gpt2_config

from clm_runner.config.schema import AdapterConfig, ModelConfig
from clm_runner.errors import RecipeError
from clm_runner.models.adapter_runs import base_identity_change, base_model_identity
from clm_runner.models.adapters import check_quantization, plan_adapter
from clm_runner.models.flops import flops_per_token
from clm_runner.models.summary import describe_model, render_summary


def adapter(**lora: object) -> AdapterConfig:
    return AdapterConfig(lora=types.MappingProxyType(lora))


def test_peft_default_placement_is_resolved_and_counted_exactly() -> None:
    config = tiny_gpt2_config(n_layer=3, n_embd=32)
    plan = plan_adapter(adapter(r=4), config)
    assert plan.lora["target_modules"] == ["c_attn"]  # PEFT's default for GPT-2, as recorded in recipe.toml
    assert plan.lora["fan_in_fan_out"] is True  # GPT-2's Conv1D stores weights transposed
    assert plan.adapted_modules == tuple(f"transformer.h.{i}.attn.c_attn" for i in range(3))
    # Each c_attn (32 -> 96) gets A [4, 32] and B [96, 4]: 4 x (32 + 96) = 512 per block.
    assert plan.trainable_parameters == 3 * 512
    full = describe_model(config).total_parameters
    assert plan.total_parameters == full + 3 * 512
    assert f"{3 * 512:,} trainable of {full + 3 * 512:,}" in plan.describe()


def test_named_targets_reach_every_matching_module() -> None:
    plan = plan_adapter(adapter(r=2, target_modules=["c_proj", "c_fc"]), tiny_gpt2_config(n_layer=2))
    # attn.c_proj 32 -> 32, mlp.c_proj 128 -> 32, mlp.c_fc 32 -> 128, rank 2, in 2 blocks.
    assert plan.trainable_parameters == 2 * 2 * ((32 + 32) + (128 + 32) + (32 + 128))
    assert len(plan.adapted_modules) == 6


def test_targets_naming_no_module_list_the_modules_that_exist() -> None:
    with pytest.raises(RecipeError) as caught:
        plan_adapter(adapter(target_modules=["q_proj", "v_proj"]), tiny_gpt2_config())
    message = str(caught.value)
    assert "adapter.target_modules = ['q_proj', 'v_proj']" in message
    assert "Layers it can adapt: c_attn, c_fc, c_proj, lm_head, wpe, wte." in message


def test_a_layer_peft_cannot_wrap_is_refused() -> None:
    with pytest.raises(RecipeError) as caught:
        plan_adapter(adapter(target_modules=["ln_1"]), tiny_gpt2_config())
    assert "PEFT can't adapt this gpt2 model" in str(caught.value) and "c_attn" in str(caught.value)


def test_a_model_type_without_a_default_placement_asks_for_target_modules() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    config = tiny_gpt2_config()
    config.model_type = "my-own-gpt2"  # the meta model is still GPT-2; PEFT has no default for the name
    assert config.model_type not in DEFAULTS
    with pytest.raises(RecipeError) as caught:
        plan_adapter(adapter(), config)
    assert "no default adapter placement for model type 'my-own-gpt2'" in str(caught.value)
    assert "set adapter.target_modules" in str(caught.value)


def test_adapter_flops_drop_the_frozen_weight_gradients() -> None:
    config = tiny_gpt2_config(n_layer=2)
    plan = plan_adapter(adapter(r=4), config)
    full = describe_model(config, seq_len=64)
    n_base, n_adapter, attention = full.matmul_parameters, plan.trainable_parameters, 12 * 2 * 32 * 64
    assert full.flops_per_token == 6 * n_base + attention
    assert flops_per_token(config, 64, plan) == 4 * n_base + 6 * n_adapter + attention
    summary = describe_model(config, seq_len=64, adapter=plan)
    assert summary.flops_per_token == 4 * n_base + 6 * n_adapter + attention
    assert summary.forward_flops_per_token == 2 * (n_base + n_adapter) + 4 * 2 * 32 * 64
    assert summary.trainable_parameters == n_adapter == summary.adapter_parameters


def test_model_summary_shows_where_the_adapters_sit() -> None:
    config = tiny_gpt2_config()
    text = render_summary(describe_model(config, adapter=plan_adapter(adapter(r=4), config)))
    assert "c_attn: lora.Linear" in text
    assert "base_layer: Conv1D" in text and "lora_A: ModuleDict" in text
    assert "trainable parameters:  512 (" in text and "the LoRA adapters; the base is frozen" in text


def test_qlora_is_refused_without_cuda_in_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    with pytest.raises(RecipeError) as caught:
        check_quantization(AdapterConfig(load_in_4bit=True), use_cpu=False)
    assert "needs a CUDA GPU" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(RecipeError, match=r"training.use_cpu = true"):
        check_quantization(AdapterConfig(load_in_4bit=True), use_cpu=True)
    check_quantization(AdapterConfig(load_in_4bit=False), use_cpu=True)  # plain LoRA runs anywhere


def test_base_identity_tells_a_different_base(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    base = tmp_path / "base"
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(base)
    model = ModelConfig(model_name_or_path=str(base))
    recorded = base_model_identity(model, tiny_gpt2_config())
    assert recorded["path"] == str(base.resolve()) and set(recorded["files"]) == {
        "config.json",
        "model.safetensors",
    }
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in base.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert (
        base_identity_change(recorded, base_model_identity(ModelConfig(model_name_or_path=str(copy)), None))
        is None
    )
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(copy)  # other random weights, same config
    assert base_identity_change(
        recorded, base_model_identity(ModelConfig(model_name_or_path=str(copy)), None)
    ) == ("changed: model.safetensors")


def test_base_identity_digest_of_a_large_file_sees_its_ends(tmp_path: Path) -> None:
    from clm_runner.models import adapter_runs

    big = tmp_path / "model.safetensors"
    big.write_bytes(bytes(5 * adapter_runs._SAMPLE))
    before = adapter_runs._file_digest(big)
    assert "sha256_size_head_tail" in before
    data = bytearray(big.read_bytes())
    data[-1] = 1  # a retrained model's last tensor
    big.write_bytes(bytes(data))
    assert adapter_runs._file_digest(big) != before
