"""`clm-runner train`: parse the options and hand the run to clm_runner.train.run."""

from __future__ import annotations

import sys

import click

from clm_runner.cli.app import cli, quiet_option, recipe_options


@cli.command()
@recipe_options()
@click.option("--overwrite", is_flag=True, help="Train into a non-empty output dir that holds no checkpoint.")
@click.option("--no-resume", is_flag=True, help="Start from scratch even if the output dir has checkpoints.")
@click.option(
    "--resume-from",
    type=click.Path(),
    default=None,
    metavar="CHECKPOINT",
    help="Resume from this checkpoint. An earlier one of the run starts a branch: the later checkpoints and "
    "final files move to OUTPUT_DIR/previous-runs/ when training starts.",
)
@quiet_option()
def train(
    recipe_path: str,
    overrides: tuple[str, ...],
    overwrite: bool,
    no_resume: bool,
    resume_from: str | None,
    quiet: bool,
) -> None:
    """Fine-tune (or train from scratch) as the recipe says, then evaluate.

    A non-empty output dir is refused unless it holds checkpoints, which are resumed from.

    \b
    Examples:
      clm-runner train --recipe recipes/gpt2-wikitext.toml
      clm-runner train --recipe recipes/smoke.toml --set training.num_train_epochs=1
    """
    from clm_runner.config.load import load_recipe

    loaded = load_recipe(recipe_path, overrides)
    from clm_runner.train.run import run_training
    from clm_runner.train.setup import TrainOptions

    run_training(
        loaded,
        TrainOptions(
            overwrite=overwrite,
            resume=not no_resume,
            resume_from=resume_from,
            quiet=quiet,
            argv=tuple(sys.argv),
        ),
    )
