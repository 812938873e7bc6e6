"""`clm-runner model`: the architecture, exact parameter count and FLOPs per token (adapters included)."""

from __future__ import annotations

from pathlib import Path

import click

from clm_runner.cli.app import cli, recipe_options


@cli.command("model")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(),
    default=None,
    metavar="DIR",
    help="A run (or checkpoint) to describe.",
)
@recipe_options(required=False)
def model_command(run_dir: str | None, recipe_path: str | None, overrides: tuple[str, ...]) -> None:
    """Show the model's architecture, exact parameter count and FLOPs per token (no weights loaded).

    With an [adapter] section, the LoRA adapters appear in the module tree and only they count as trainable.

    \b
    Examples:
      clm-runner model --recipe recipes/gpt2-wikitext.toml
      clm-runner model --run runs/smoke-lora
    """
    from clm_runner.config.load import load_recipe
    from clm_runner.errors import OutputDirError

    if (run_dir is None) == (recipe_path is None):
        raise click.UsageError("Say which model: --recipe FILE, or --run DIR (a trained run or checkpoint).")
    if run_dir is not None:
        from clm_runner.rundir.policy import RECIPE_FILE, run_dir_of

        owner = run_dir_of(Path(run_dir))
        if owner is None:
            raise OutputDirError(
                f"--run {run_dir}: not a clm-runner run or checkpoint (no {RECIPE_FILE} there or above it)."
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
    click.echo(
        render_summary(describe_model(config, seq_len=loaded.data.block_size, adapter=adapter)), nl=False
    )
    if adapter is not None:
        click.echo(adapter.describe())
        click.echo("adapted modules: " + ", ".join(adapter.adapted_modules))
