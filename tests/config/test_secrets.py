"""Every route a secret comes by is known to the scrubbers, each on a value that does not look like a hub token."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import SMOKE

from clm_runner.config.load import load_recipe
from clm_runner.config.secrets import (
    drop_secret_sets,
    redact_argv,
    scrub,
    secret_values,
    strip_secrets,
)


@pytest.mark.parametrize(
    "name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY"]
)
def test_each_environment_variable_is_a_secret(name: str) -> None:
    value = f"corp-{name.lower()}-31337"
    assert value in secret_values(environ={name: value})
    assert value not in secret_values(environ={})
    assert scrub(f"said {value}.", secret_values(environ={name: value})) == "said <redacted>."


def test_each_recipe_key_is_a_secret_of_that_recipe() -> None:
    recipe = load_recipe(SMOKE)
    recipe = dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, token="corp-model-route-77777"),
        training={**recipe.training, "hub_token": "corp-hub-route-88888"},
    )
    known = secret_values(recipe, environ={})
    assert "corp-model-route-77777" in known and "corp-hub-route-88888" in known


def test_a_recipe_read_makes_its_secrets_known_to_every_later_scrub() -> None:
    """A message about a recipe (or a library's warning) can quote a token before anyone holds the recipe."""
    load_recipe(SMOKE, ["model.token=corp-read-model-42424242", "training.hub_token=corp-read-hub-5151515"])
    known = secret_values(environ={})
    assert "corp-read-model-42424242" in known and "corp-read-hub-5151515" in known


def test_short_values_and_placeholders_are_not_secrets() -> None:
    assert secret_values(environ={"HF_TOKEN": "short", "WANDB_API_KEY": "<redacted>"}) == [
        s for s in secret_values(environ={}) if s not in ("short", "<redacted>")
    ]


def test_secret_keys_are_left_out_of_written_recipes_and_command_lines() -> None:
    resolved = {
        "model": {"token": "corp-a-11111111", "revision": "main"},
        "training": {"hub_token": "corp-b-2222222"},
    }
    plain, dropped = strip_secrets(resolved)
    assert plain == {"model": {"revision": "main"}, "training": {}}
    assert dropped == ["model.token", "training.hub_token"]
    argv = ["train", "--set", "training.hub_token=corp-b-2222222", "--set=model.token=corp-a-11111111", "-q"]
    assert redact_argv(argv) == [
        "train",
        "--set",
        "training.hub_token=<redacted>",
        "--set=model.token=<redacted>",  # still the option it was: the record reads as a command line
        "-q",
    ]
    assert drop_secret_sets(argv) == (["train", "-q"], ["training.hub_token", "model.token"])
    # Spaced as --set reads it too (the key is stripped): a short value is no known secret to scrub.
    assert redact_argv(["--set", " model.token = abc"]) == ["--set", "model.token=<redacted>"]
    assert drop_secret_sets(["-q", "--set", "model.token =abc"]) == (["-q"], ["model.token"])
