"""[adapter]: PEFT's LoraConfig keys with their names and defaults; everything else refused before any work."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import SMOKE

from clm_runner.config import adapter_keys
from clm_runner.config.load import load_recipe
from clm_runner.config.render import render_toml, resolved_dict
from clm_runner.errors import RecipeError

PRETRAINED = ["model.model_name_or_path=some/base", "model.model_type=", "model.config_overrides="]


def adapter_recipe(*items: str):
    return load_recipe(SMOKE, [*PRETRAINED, *items])


def test_no_adapter_section_means_full_fine_tuning() -> None:
    recipe = load_recipe(SMOKE)
    assert recipe.adapter is None
    assert "adapter" not in recipe.to_dict() and "[adapter]" not in render_toml(resolved_dict(recipe))


def test_peft_names_and_defaults_are_taken_and_recorded() -> None:
    recipe = adapter_recipe("adapter.r=4", "adapter.target_modules=c_attn", "adapter.lora_dropout=0.1")
    assert recipe.adapter is not None
    assert recipe.adapter.method == "lora" and not recipe.adapter.load_in_4bit
    assert dict(recipe.adapter.lora) == {"r": 4, "target_modules": "c_attn", "lora_dropout": 0.1}
    resolved = resolved_dict(recipe)["adapter"]
    from peft import LoraConfig

    peft_defaults = LoraConfig()
    assert resolved["r"] == 4 and resolved["lora_alpha"] == peft_defaults.lora_alpha
    assert resolved["bias"] == peft_defaults.bias and resolved["use_rslora"] == peft_defaults.use_rslora
    # The recorded section reads back as the same recipe.
    text = render_toml(resolved_dict(recipe))
    assert "[adapter]" in text and 'method = "lora"' in text


def test_every_recorded_key_is_a_key_the_section_takes() -> None:
    recorded = set(adapter_keys.lora_defaults())
    assert {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save"} <= recorded
    assert not recorded & set(adapter_keys.REFUSED)
    for key, value in adapter_keys.lora_defaults().items():
        if value is not None:
            adapter_recipe(f"adapter.{key}={_toml(value)}")  # each default is accepted back


def _toml(value: object) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("adapter.rank=8", "unknown key adapter.rank: did you mean adapter.r?"),
        ("adapter.lora_aplha=8", "did you mean adapter.lora_alpha?"),
        ("adapter.r=8.5", "adapter.r must be an integer; got 8.5"),
        ("adapter.r=0", "adapter.r is the adapters' rank and must be at least 1"),
        ("adapter.lora_alpha=-2", "adapter.lora_alpha scales the adapters' output"),
        ("adapter.lora_dropout=1.0", "adapter.lora_dropout is a probability"),
        ('adapter.bias="some"', "adapter.bias must be 'none' or 'all' or 'lora_only'"),
        ("adapter.method=ia3", "adapter.method must be 'lora'"),
        ('adapter.load_in_4bit="yes"', "adapter.load_in_4bit must be true or false"),
        (
            "adapter.task_type=SEQ_CLS",
            "adapter.task_type is not a recipe key: clm-runner sets it (CAUSAL_LM)",
        ),
        ("adapter.base_model_name_or_path=x", "the base model is [model] model_name_or_path"),
        ("adapter.inference_mode=true", "`train` trains the adapter"),
        ("adapter.use_qalora=true", "QALoRA needs a GPTQ-quantized base"),
        ("adapter.eva_config=1", "adapter.eva_config takes a Python object"),
        ("adapter.init_lora_weights=pissa", "PiSSA, OLoRA and CorDA rewrite the base weights"),
        ("adapter.target_modules=[]", "adapter.target_modules names no module"),
        ("adapter.layers_to_transform=[-1]", "layer numbers, which start at 0"),
    ],
)
def test_bad_adapter_keys_are_refused_with_the_fix(item: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=None) as caught:
        adapter_recipe(item)
    assert expected in str(caught.value), str(caught.value)


def test_an_adapter_needs_a_pretrained_model() -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(SMOKE, ["adapter.r=4"])  # the smoke recipe builds its model from scratch
    assert "model.model_name_or_path is unset" in str(caught.value)
    assert "remove [adapter] to train every weight" in str(caught.value)


@pytest.mark.parametrize("item", ["training.fsdp=full_shard", 'training.deepspeed="ds.json"'])
def test_adapters_with_sharded_training_are_refused(item: str) -> None:
    with pytest.raises(RecipeError) as caught:
        adapter_recipe("adapter.r=4", item)
    assert "adapters train under DDP" in str(caught.value)


def test_unknown_section_suggests_adapter() -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(SMOKE, ["adaptor.r=4"])
    assert "unknown section [adaptor]: did you mean adapter?" in str(caught.value)


def test_adapter_config_is_frozen() -> None:
    recipe = adapter_recipe("adapter.r=4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.adapter.r = 8  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        recipe.adapter.lora["r"] = 8  # type: ignore[index,union-attr]
