"""`clm-runner report`: tabulate and plot runs."""

from __future__ import annotations

import click

from clm_runner.cli.app import cli, json_option, output_option, print_json, run_option


@cli.command()
@click.argument("runs", nargs=-1, type=click.Path(), metavar="[RUN ...]")
@run_option(multiple=True, help="A run's output dir (repeatable; RUN arguments are the same).")
@output_option("Where to write the plot, a PNG (default: report.png in the first run's dir)")
@json_option()
def report(runs: tuple[str, ...], run_dir: tuple[str, ...], output: str | None, as_json: bool) -> None:
    """Plot loss, perplexity and learning rate of runs; print a summary table.

    Several runs are overlaid in one plot.

    \b
    Examples:
      clm-runner report --run runs/smoke
      clm-runner train --recipe recipes/smoke.toml --set training.learning_rate=3e-3 --set training.output_dir=runs/smoke-lr3e-3
      clm-runner report --run runs/smoke --run runs/smoke-lr3e-3 --output smoke-vs-lr3e-3.png
    """
    import sys
    from pathlib import Path

    from clm_runner.rundir.report import load_run, plot_runs, render_table, summarize

    named = list(dict.fromkeys([*runs, *run_dir]))  # RUN arguments and --run are one list
    if not named:
        raise click.UsageError("Say which runs: --run DIR (repeatable), or RUN arguments.")
    if as_json and output == "-":
        raise click.UsageError("--json and --output - both print to standard output; choose one.")
    histories = [load_run(Path(r)) for r in named]
    rows = summarize(histories)
    to_stdout = output == "-"
    if to_stdout:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="clm-runner-report-") as scratch:
            plot = plot_runs(histories, Path(scratch) / "report.png")
            sys.stdout.buffer.write(plot.read_bytes())
            sys.stdout.buffer.flush()
        click.echo(render_table(rows), err=True, nl=False)
        return
    out = plot_runs(histories, Path(output) if output else Path(named[0]) / "report.png")
    if as_json:
        print_json({"runs": rows, "plot": str(out)})
        return
    click.echo(render_table(rows))
    click.echo(f"\nWrote {out}")
