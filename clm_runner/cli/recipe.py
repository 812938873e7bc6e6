"""`clm-runner recipe show|check`: the resolved recipe, and every check `train` runs before any work."""

from __future__ import annotations

import click

from clm_runner.cli.app import ClmGroup, cli, recipe_options


@cli.group(cls=ClmGroup)
def recipe() -> None:
    """Inspect and validate recipes without running them."""


@recipe.command("show")
@recipe_options()
def recipe_show(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved recipe as TOML, every default filled in.

    \b
    Example:
      clm-runner recipe show --recipe recipes/smoke.toml --set data.block_size=64
    """
    from clm_runner.config.load import load_recipe
    from clm_runner.config.render import render_toml, resolved_dict, unrecorded_secrets
    from clm_runner.train.setup import training_kwargs

    loaded = load_recipe(recipe_path, overrides)
    # The values `train` will use here: what it always sets (do_train, do_eval) and this device's defaults.
    resolved = resolved_dict(loaded, training_overrides=training_kwargs(loaded))
    header = f"Resolved from {recipe_path}: every key with the value `clm-runner train` uses on this machine"
    click.echo(render_toml(resolved, header=header, unrecorded=unrecorded_secrets(loaded)), nl=False)


@recipe.command("check")
@recipe_options()
def recipe_check(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Run every check `train` runs before any heavy work, without training.

    Keys, types and values; the TrainingArguments train would build; files and directories the recipe
    names; the tokenizer, config and block size; where [adapter]'s adapters go; the hub where it is
    needed; and what the output dir allows (new, resume, refused).

    \b
    Example:
      clm-runner recipe check --recipe recipes/smoke.toml
    """
    from clm_runner.config.load import load_recipe
    from clm_runner.logs import setup_logging
    from clm_runner.train.setup import TrainOptions, prepare_run

    setup_logging(quiet=True)
    loaded = load_recipe(recipe_path, overrides)
    setup = prepare_run(loaded, TrainOptions())
    click.echo(f"{recipe_path}: ok (block_size {setup.block_size}). {setup.plan.note}")
    if setup.adapter is not None:
        click.echo(setup.adapter.describe())
