"""`clm-runner export`: a deployable model directory out of a run (an adapter merged into its base)."""

from __future__ import annotations

from pathlib import Path

import click

from clm_runner.cli.app import cli


@cli.command("export")
@click.argument("run", type=click.Path(), metavar="RUN")
@click.option("--output", "-o", required=True, type=click.Path(), metavar="DIR", help="A new directory.")
@click.option("--checkpoint", default=None, metavar="NAME", help="Export this checkpoint of RUN.")
@click.option("--merge", is_flag=True, help="Adapter runs: merge the adapter into its base (no PEFT needed).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Change the run's recipe, e.g. --set model.model_name_or_path=DIR (a local copy of the base).",
)
def export_command(
    run: str, output: str, checkpoint: str | None, merge: bool, overrides: tuple[str, ...]
) -> None:
    """Write RUN's model to a new directory that loads on its own.

    A full run: the final model, tokenizer and card, without optimizer or trainer state. An adapter run:
    its adapter files, or with --merge a standalone model (the adapter merged into its base) that
    AutoModelForCausalLM.from_pretrained loads with no PEFT installed.

    \b
    Examples:
      clm-runner export runs/smoke --output exported/smoke
      clm-runner export runs/smoke-lora --merge --output exported/smoke-lora-merged
      clm-runner export runs/smoke-lora --checkpoint checkpoint-37 --output exported/lora-step37
    """
    from clm_runner.logs import setup_logging
    from clm_runner.models.export import export_model
    from clm_runner.rundir.checkpoints import resolve_checkpoint

    setup_logging(quiet=True)
    source = resolve_checkpoint(Path(run), checkpoint) if checkpoint else Path(run)
    exported = export_model(source, Path(output), merge=merge, overrides=overrides)
    what = {"model": "model", "adapter": "adapter", "merged": "merged model"}[exported.kind]
    click.echo(f"Exported the {what} of {source} to {exported.output}: {', '.join(exported.files)}")
