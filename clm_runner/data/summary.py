"""`clm-runner data`: prepare a recipe's blocks (filling the cache) and show what training will see."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from clm_runner.cli.tables import render_table
from clm_runner.config.schema import Recipe
from clm_runner.errors import OutputDirError

logger = logging.getLogger("clm_runner")

PREVIEW_CHARS = 200


def available_splits(recipe: Recipe) -> list[str]:
    data = recipe.data
    if data.dataset_name is None and data.test_file is not None:
        return ["train", "validation", "test"]
    return ["train", "validation"]


def run_data(recipe: Recipe, *, save: str | None = None, quiet: bool = False) -> dict:
    from clm_runner.data.blocks import prepare_splits, resolve_block_size
    from clm_runner.logs import setup_logging
    from clm_runner.models.loading import load_config, load_tokenizer

    setup_logging(quiet=quiet)
    if save is not None and Path(save).exists() and any(Path(save).iterdir()):
        raise OutputDirError(f"--save {save}: directory is not empty. Choose a new directory.")
    tokenizer = load_tokenizer(recipe.model)
    config = load_config(recipe.model)
    block_size = resolve_block_size(recipe.data.block_size, tokenizer, config, warn=logger.warning)
    prepared = prepare_splits(recipe, tokenizer, block_size, available_splits(recipe), progress=not quiet)

    click.echo(f"block_size: {block_size}   grouping: {recipe.data.grouping}")
    headers = ["split", "rows", "tokens", "blocks", "dropped", "tokens/s"]
    rows = []
    for name, split in prepared.items():
        s = split.stats
        if s is None:
            rows.append([name, "stream", "-", "-", "-", "-"])
            continue
        rate = s.tokens / s.seconds if s.seconds > 0 else float("inf")
        rows.append(
            [name, f"{s.rows:,}", f"{s.tokens:,}", f"{s.blocks:,}", f"{s.dropped_tokens:,}", f"{rate:,.0f}"]
        )
    click.echo(render_table(headers, rows))

    for name, split in prepared.items():
        first = next(iter(split.blocks), None)
        if first is None:
            continue
        text = tokenizer.decode(list(first["input_ids"])[:PREVIEW_CHARS])
        click.echo(f"\nfirst {name} block starts: {text[:PREVIEW_CHARS]!r}")

    if save is not None:
        from datasets import DatasetDict

        blocks = DatasetDict({name: split.blocks.with_format(None) for name, split in prepared.items()})
        blocks.save_to_disk(save)
        click.echo(f"\nSaved blocks to {save} (load with datasets.load_from_disk).")
    return {name: split.stats for name, split in prepared.items()}
