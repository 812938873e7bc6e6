"""`clm-runner export`: a deployable model directory out of a run (an adapter merged into its base)."""

from __future__ import annotations

from pathlib import Path

import click

from clm_runner.cli.app import (
    checkpoint_option,
    cli,
    complete_set,
    model_location,
    one_run,
    output_option,
    quiet_option,
    run_option,
)


@cli.command("export")
@click.argument("run", type=click.Path(), required=False, metavar="[RUN]")
@run_option(help="The run to export (RUN is the same).")
@checkpoint_option()
@output_option("A new directory", metavar="DIR", required=True, stdout=False)
@click.option("--merge", is_flag=True, help="Adapter runs: merge the adapter into its base (no PEFT needed).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    shell_complete=complete_set,
    metavar="SECTION.KEY=VALUE",
    help="Change the run's recipe, e.g. --set model.model_name_or_path=DIR (a local copy of the base).",
)
@quiet_option()
def export_command(
    run: str | None,
    run_dir: str | None,
    checkpoint: str | None,
    output: str,
    merge: bool,
    overrides: tuple[str, ...],
    quiet: bool,
) -> None:
    """Write a run's model to a new directory that loads on its own.

    A full run: the final model, tokenizer and card, without optimizer or trainer state. An adapter run:
    its adapter files, or with --merge a standalone model (the adapter merged into its base) that
    AutoModelForCausalLM.from_pretrained loads with no PEFT installed.

    \b
    Examples:
      clm-runner export --run runs/smoke --output exported/smoke
      clm-runner export --run runs/smoke-lora --merge --output exported/smoke-lora-merged
      clm-runner export --run runs/smoke-lora --checkpoint checkpoint-37 --output exported/lora-step37
    """
    if output == "-":
        raise click.UsageError("--output - : an export is a directory of files; give a new directory.")
    from clm_runner.logs import setup_logging
    from clm_runner.models.export import export_model

    source = model_location(one_run(run, run_dir), checkpoint)
    setup_logging(quiet=quiet)
    exported = export_model(source, Path(output), merge=merge, overrides=overrides)
    what = {"model": "model", "adapter": "adapter", "merged": "merged model"}[exported.kind]
    click.echo(f"Exported the {what} of {source} to {exported.output}: {', '.join(exported.files)}")
