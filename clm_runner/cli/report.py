"""`clm-runner report`: tabulate and plot runs."""

from __future__ import annotations

import click

from clm_runner.cli.app import cli


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(), metavar="RUN [RUN ...]")
def report(runs: tuple[str, ...]) -> None:
    """Plot loss, perplexity and learning rate of runs; print a summary table.

    Writes report.png into the first run's directory; several runs are overlaid.

    \b
    Examples:
      clm-runner report runs/smoke
      clm-runner train --recipe recipes/smoke.toml --set training.learning_rate=3e-3 --set training.output_dir=runs/smoke-lr3e-3
      clm-runner report runs/smoke runs/smoke-lr3e-3
    """
    from pathlib import Path

    from clm_runner.rundir.report import load_run, plot_runs, render_table, summarize

    histories = [load_run(Path(r)) for r in runs]
    click.echo(render_table(summarize(histories)))
    out = plot_runs(histories, Path(runs[0]) / "report.png")
    click.echo(f"\nWrote {out}")
