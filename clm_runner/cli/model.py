"""`clm-runner model`: the architecture, exact parameter count and FLOPs per token."""

from __future__ import annotations

import click

from clm_runner.cli.app import cli, recipe_options


@cli.command("model")
@recipe_options()
def model_command(recipe_path: str, overrides: tuple[str, ...]) -> None:
    """Show the model's architecture, exact parameter count and FLOPs per token (no weights loaded).

    \b
    Example:
      clm-runner model --recipe recipes/gpt2-wikitext.toml
    """
    from clm_runner.config.load import load_recipe

    loaded = load_recipe(recipe_path, overrides, require_output_dir=False)
    from clm_runner.models.loading import load_config
    from clm_runner.models.summary import describe_model, render_summary

    config = load_config(loaded.model)
    click.echo(render_summary(describe_model(config, seq_len=loaded.data.block_size)))
