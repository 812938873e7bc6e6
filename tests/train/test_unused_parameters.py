"""ddp_find_unused_parameters: false by default in a multi-process run, checked against the model once."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_gpt2_config

from clm_runner.errors import RecipeError
from clm_runner.train.unused_parameters import find_unused_setting, unused_trainable_parameters

CROSS_ATTENTION = ("crossattention.", "ln_cross_attn.")
"""GPT-2 with add_cross_attention has these in every block; without encoder states no forward pass uses them."""


def gpt2(**overrides: object):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides))


def args(**values: object) -> SimpleNamespace:
    return SimpleNamespace(**{"gradient_checkpointing": False, "activation_checkpointing": False, **values})


def test_gpt2_gives_every_trainable_parameter_a_gradient() -> None:
    assert unused_trainable_parameters(gpt2()) == []


def test_gpt2_with_cross_attention_leaves_exactly_those_layers_unused() -> None:
    model = gpt2(add_cross_attention=True)
    unused = unused_trainable_parameters(model)
    # The oracle: a real backward pass, and which trainable parameters it left without a gradient.
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    no_gradient = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert sorted(unused) == sorted(no_gradient)
    assert unused and all(any(part in name for part in CROSS_ATTENTION) for name in unused)


def test_lora_adapters_are_all_used_and_the_frozen_base_is_not_counted() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    assert unused_trainable_parameters(model) == []
    frozen = gpt2()
    for parameter in frozen.transformer.h[0].parameters():
        parameter.requires_grad_(False)
    assert unused_trainable_parameters(frozen) == []


def test_the_check_draws_no_random_numbers_and_leaves_no_gradient_or_mode_behind() -> None:
    model = gpt2(add_cross_attention=True).eval()
    before = torch.random.get_rng_state()
    unused_trainable_parameters(model)
    assert torch.equal(torch.random.get_rng_state(), before)  # dropout ran on a forked generator
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_the_default_is_false_where_every_parameter_is_used() -> None:
    assert find_unused_setting({}, args(), gpt2()) is False


def test_a_model_with_unused_parameters_falls_back_to_true_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="clm_runner"):
        assert find_unused_setting({}, args(), gpt2(add_cross_attention=True)) is True
    assert "without a gradient" in caplog.text and "crossattention" in caplog.text
    assert "ddp_find_unused_parameters = true" in caplog.text


def test_false_set_in_the_recipe_for_such_a_model_is_refused_naming_them() -> None:
    with pytest.raises(RecipeError, match=r"ddp_find_unused_parameters = false, but .*crossattention") as err:
        find_unused_setting({"ddp_find_unused_parameters": False}, args(), gpt2(add_cross_attention=True))
    assert "set it to true" in str(err.value)
    assert find_unused_setting({"ddp_find_unused_parameters": False}, args(), gpt2()) is False


def test_true_in_the_recipe_stands_and_gradient_checkpointing_keeps_the_trainers_false() -> None:
    unused = gpt2(add_cross_attention=True)
    assert find_unused_setting({"ddp_find_unused_parameters": True}, args(), gpt2()) is True
    # The Trainer's own default under gradient checkpointing is false; the walk can't see inside checkpoints.
    assert find_unused_setting({}, args(gradient_checkpointing=True), unused) is False


def test_a_model_that_cannot_be_checked_keeps_ddps_search(caplog: pytest.LogCaptureFixture) -> None:
    class NeedsImages(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

        def forward(self, pixel_values, **kwargs):
            return self.proj(pixel_values)

    with caplog.at_level(logging.WARNING, logger="clm_runner"):
        assert find_unused_setting({}, args(), NeedsImages()) is True
    assert "Could not check" in caplog.text
    assert find_unused_setting({"ddp_find_unused_parameters": False}, args(), NeedsImages()) is False


@pytest.mark.parametrize("settled", [True, False])
def test_what_an_earlier_attempt_settled_is_no_recipe_change_when_the_recipe_leaves_the_key_unset(
    tmp_path, monkeypatch: pytest.MonkeyPatch, settled: bool
) -> None:
    """recipe.toml and run.json record the value the check settled on (true for a model with unused
    parameters); the same recipe run again must not see "True -> False" before its own check runs: a first
    attempt killed before its first checkpoint starts over in place, a resume lists no change."""
    from helpers import SMOKE

    from clm_runner.config.load import load_recipe
    from clm_runner.rundir.changes import changes_what_is_trained, recipe_changes
    from clm_runner.rundir.policy import RunIdentity, plan_output_dir, write_json_atomic
    from clm_runner.train.setup import resolved_recipe, training_kwargs

    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    recipe = load_recipe(SMOKE)
    resolved = resolved_recipe(recipe, training_kwargs(recipe, with_device_defaults=False), 128)
    recorded = {**resolved, "training": {**resolved["training"], "ddp_find_unused_parameters": settled}}
    assert recipe_changes(recorded, resolved) == []
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "run.json", {"status": "running", "recipe": recorded})
    plan = plan_output_dir(run, identity=RunIdentity(resolved, max_steps=12, num_train_epochs=3))
    assert plan.action == "restart" and plan.recipe_changes == ()
    # Set in the recipe, a different value is a change (listed), though not one of what is trained.
    chosen = load_recipe(SMOKE, [f"training.ddp_find_unused_parameters={str(not settled).lower()}"])
    changes = recipe_changes(
        recorded, resolved_recipe(chosen, training_kwargs(chosen, with_device_defaults=False), 128)
    )
    assert changes == [f"training.ddp_find_unused_parameters: {settled} -> {not settled}"]
    assert changes_what_is_trained(changes) == []  # DDP's search changes no gradient
