"""`clm-runner data`: prepare a recipe's data and print what training will see."""

from __future__ import annotations

import click

from clm_runner.cli.app import cli, json_option, print_json, quiet_option, recipe_options


@cli.command()
@recipe_options()
@click.option(
    "--save", type=click.Path(), default=None, metavar="DIR", help="Write the blocks with save_to_disk."
)
@json_option()
@quiet_option()
def data(recipe_path: str, overrides: tuple[str, ...], save: str | None, as_json: bool, quiet: bool) -> None:
    """Prepare (and cache) the recipe's data; print rows, tokens and blocks per split.

    \b
    Examples:
      clm-runner data --recipe recipes/smoke.toml --save /tmp/smoke-blocks
      clm-runner data --recipe recipes/smoke.toml --json
    """
    from clm_runner.config.load import load_recipe
    from clm_runner.data.summary import summarize_data

    loaded = load_recipe(recipe_path, overrides, require_output_dir=False)
    summary = summarize_data(loaded, save=save, quiet=quiet)
    if as_json:
        print_json(summary.to_dict())
        return
    from clm_runner.cli.tables import render_table

    click.echo(f"block_size: {summary.block_size}   grouping: {summary.grouping}")
    headers = ["split", "rows", "tokens", "blocks", "dropped", "null rows", "tokens/s"]
    rows = []
    for name, s in summary.stats.items():
        if s is None:
            rows.append([name, "stream", "-", "-", "-", "-", "-"])
            continue
        rate = s.tokens / s.seconds if s.seconds > 0 else float("inf")
        rows.append(
            [
                name,
                f"{s.rows:,}",
                f"{s.tokens:,}",
                f"{s.blocks:,}",
                f"{s.dropped_tokens:,}",
                f"{s.null_rows:,}",
                f"{rate:,.0f}",
            ]
        )
    click.echo(render_table(headers, rows))
    if summary.sources:
        click.echo("\n" + render_sources(summary))
    for name, text in summary.previews.items():
        click.echo(f"\nfirst {name} block starts: {text!r}")
    if summary.saved_to is not None:
        click.echo(f"\nSaved blocks to {summary.saved_to} (load with datasets.load_from_disk).")


def render_sources(summary) -> str:
    """[[data.mix]]: each source's rows, tokens and blocks per split, and its realised share of the training
    blocks (against its weight)."""
    from clm_runner.cli.tables import render_table

    total = sum(summary.in_mix.values())
    headers = ["source", "split", "rows", "tokens", "blocks", "in mix", "share", "weight"]
    rows = []
    for source, splits in summary.sources.items():
        for split, s in splits.items():
            taken = summary.in_mix.get(source) if split == "train" else None
            weight = summary.weights.get(source) if split == "train" else None
            rows.append(
                [
                    source,
                    split,
                    f"{s.rows:,}" if s else "-",
                    f"{s.tokens:,}" if s else "-",
                    f"{s.blocks:,}" if s else "-",
                    f"{taken:,}" if taken is not None else "",
                    f"{taken / total:.4f}" if taken is not None and total else "",
                    f"{weight:.4f}" if weight is not None else "",
                ]
            )
    return render_table(headers, rows, left_columns=2)
