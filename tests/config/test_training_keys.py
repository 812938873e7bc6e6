"""Every TrainingArguments key clm-runner owns is honoured or refused with its way; none is silently dropped."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import SMOKE, snapshot, train_args

from clm_runner.cli import cli
from clm_runner.config import training_keys
from clm_runner.config.load import load_recipe
from clm_runner.config.types import training_argument_types, training_defaults
from clm_runner.errors import RecipeError
from clm_runner.train.device import DeviceInfo


def _fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _non_default(key: str):
    """A value of the key's type that is not its default."""
    default = training_defaults().get(key)
    annotation = training_argument_types()[key]
    args = typing.get_args(annotation) or (annotation,)
    if bool in args or annotation is bool:
        return not bool(default)
    if int in args or annotation is int:
        return (default or 0) + 2
    if float in args:
        return 0.5
    if any(typing.get_origin(a) is list for a in args):
        return ["loss"]
    return "something"


def test_the_policy_names_only_real_keys_and_each_once() -> None:
    assert set(training_keys.HONOURED) <= _fields()
    assert set(training_keys.REFUSED) <= _fields()
    assert not set(training_keys.HONOURED) & set(training_keys.REFUSED)
    assert not set(training_keys.RENAMED) & _fields()  # renamed keys are gone from TrainingArguments


@pytest.mark.parametrize("key", sorted(training_keys.REFUSED))
def test_each_refused_key_is_refused_naming_the_clm_runner_way(key: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(SMOKE, [f"training.{key}={_non_default(key)!r}".replace("'", '"')])
    assert str(caught.value).startswith(
        f"training.{key} is not used by clm-runner: {training_keys.REFUSED[key]}"
    )
    # At its default (as recipe.toml records every key) it is accepted.
    assert load_recipe(SMOKE).training.get(key) is None


def test_every_key_clm_runner_sets_or_overrides_is_in_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from clm_runner.train import device as performance
    from clm_runner.train.setup import training_kwargs

    recipe = load_recipe(SMOKE, ["training.use_cpu=false"])
    touched = {"save_total_limit", "resume_from_checkpoint", "hub_token", "eval_on_start", "output_dir"}
    gpu = DeviceInfo("cuda", "NVIDIA H100", 8, True, (9, 0), True)
    for device in (None, gpu):
        if device is not None:
            monkeypatch.setattr(performance, "probe_device", lambda training, d=device: d)
        for environ in ({}, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}):
            for name, value in environ.items():
                monkeypatch.setenv(name, value)
            touched |= set(training_kwargs(recipe)) - set(recipe.training)
            for name in environ:
                monkeypatch.delenv(name)
    assert touched <= set(training_keys.HONOURED), sorted(touched - set(training_keys.HONOURED))


@pytest.mark.slow
def test_resume_from_checkpoint_in_the_recipe_resumes_as_resume_from(
    tmp_path: Path, fresh_cache: Path
) -> None:
    first = tmp_path / "first"
    result = CliRunner().invoke(cli, train_args(first, max_steps=4))
    assert result.exit_code == 0, result.output
    second = tmp_path / "second"
    checkpoint = first / "checkpoint-4"
    result = CliRunner().invoke(
        cli, train_args(second, f"training.resume_from_checkpoint={checkpoint}", max_steps=6)
    )
    assert result.exit_code == 0, result.output
    assert f"Resuming from {checkpoint} (--resume-from)" in result.output
    import json

    assert json.loads((second / "trainer_state.json").read_text())["global_step"] == 6
    assert json.loads((second / "run.json").read_text())["resumed_from"] == str(checkpoint)
    # Both ways at once, naming different checkpoints, is a contradiction.
    result = CliRunner().invoke(
        cli,
        train_args(
            tmp_path / "third",
            f"training.resume_from_checkpoint={checkpoint}",
            flags=("--resume-from", str(first / "checkpoint-2")),
        ),
    )
    assert result.exit_code == 2 and "name different checkpoints" in result.output


def test_push_to_hub_needs_the_hub_before_any_heavy_work(tmp_path: Path, monkeypatch) -> None:
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, train_args(tmp_path / "run", "training.push_to_hub=true"))
    assert result.exit_code == 2, result.output
    assert "training.push_to_hub needs the Hugging Face Hub" in result.output
    assert snapshot(tmp_path) == before  # no cache built, no output dir
