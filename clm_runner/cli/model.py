"""`clm-runner model`: the architecture, exact parameter count and FLOPs per token (adapters included)."""

from __future__ import annotations

from pathlib import Path

import click

from clm_runner.cli.app import (
    checkpoint_option,
    cli,
    json_option,
    model_location,
    print_json,
    quiet_option,
    recipe_options,
    run_option,
)


@cli.command("model")
@run_option(help="A run (or checkpoint) to describe: the recipe it was trained with.")
@checkpoint_option()
@recipe_options(required=False)
@json_option()
@quiet_option()
def model_command(
    run_dir: str | None,
    checkpoint: str | None,
    recipe_path: str | None,
    overrides: tuple[str, ...],
    as_json: bool,
    quiet: bool,
) -> None:
    """Show the model's architecture, exact parameter count and FLOPs per token (no weights loaded).

    With an [adapter] section, the LoRA adapters appear in the module tree and only they count as trainable.

    \b
    Examples:
      clm-runner model --recipe recipes/gpt2-wikitext.toml
      clm-runner model --run runs/smoke-lora
      clm-runner model --run runs/smoke --json
    """
    from clm_runner.config.load import load_recipe
    from clm_runner.errors import OutputDirError
    from clm_runner.logs import setup_logging

    if (run_dir is None and checkpoint is None) == (recipe_path is None):
        raise click.UsageError("Say which model: --recipe FILE, or --run DIR (a trained run or checkpoint).")
    setup_logging(quiet=quiet)
    if recipe_path is None:
        from clm_runner.rundir.policy import RECIPE_FILE, run_dir_of

        where = model_location(run_dir, checkpoint)
        owner = run_dir_of(Path(where))
        if owner is None:
            raise OutputDirError(
                f"--run {where}: not a clm-runner run or checkpoint (no {RECIPE_FILE} there or above it)."
            )
        recipe_path = str(owner / RECIPE_FILE)
    loaded = load_recipe(recipe_path, overrides, require_output_dir=False)
    from clm_runner.models.loading import load_config
    from clm_runner.models.summary import describe_model, render_summary

    config = load_config(loaded.model)
    adapter = None
    if loaded.adapter is not None:
        from clm_runner.models.adapters import plan_adapter

        adapter = plan_adapter(loaded.adapter, config)
    summary = describe_model(config, seq_len=loaded.data.block_size, adapter=adapter)
    if as_json:
        document = summary.to_dict()
        if adapter is not None:
            document["adapter"] = {
                "description": adapter.describe(),
                "adapted_modules": adapter.adapted_modules,
            }
        print_json(document)
        return
    click.echo(render_summary(summary), nl=False)
    if adapter is not None:
        click.echo(adapter.describe())
        click.echo("adapted modules: " + ", ".join(adapter.adapted_modules))
