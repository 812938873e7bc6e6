"""What a recipe's data becomes: rows, tokens, blocks per split and how each split starts (`clm-runner data`)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clm_runner.config.schema import Recipe
from clm_runner.data.blocks import SplitStats
from clm_runner.errors import OutputDirError

logger = logging.getLogger("clm_runner")

PREVIEW_CHARS = 200


@dataclass(frozen=True)
class DataSummary:
    block_size: int
    grouping: str
    stats: dict[str, SplitStats | None]
    """Per split; None for a streamed split (its size is unknown until read)."""
    previews: dict[str, str] = field(default_factory=dict)
    """The start of each split's first block, decoded."""
    saved_to: Path | None = None
    sources: dict[str, dict[str, SplitStats | None]] = field(default_factory=dict)
    """[[data.mix]]: per source (by name), its stats per split."""
    in_mix: dict[str, int] = field(default_factory=dict)
    """[[data.mix]]: training blocks taken from each source."""
    weights: dict[str, float] = field(default_factory=dict)
    """[[data.mix]]: each source's normalized weight (empty without weights)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `clm-runner data --json` (a streamed split's stats are null: unknown until read)."""

        def plain(stats: SplitStats | None) -> dict[str, Any] | None:
            return dataclasses.asdict(stats) if stats is not None else None

        return {
            "block_size": self.block_size,
            "grouping": self.grouping,
            "splits": {name: plain(stats) for name, stats in self.stats.items()},
            "sources": {
                source: {split: plain(stats) for split, stats in splits.items()}
                for source, splits in self.sources.items()
            },
            "in_mix": dict(self.in_mix),
            "weights": dict(self.weights),
            "previews": dict(self.previews),
            "saved_to": str(self.saved_to) if self.saved_to is not None else None,
        }


def available_splits(recipe: Recipe) -> list[str]:
    data = recipe.data
    if data.dataset_name is None and data.test_file is not None:
        return ["train", "validation", "test"]
    return ["train", "validation"]


def summarize_data(recipe: Recipe, *, save: str | None = None, quiet: bool = False) -> DataSummary:
    """Prepare (and cache) every split of the recipe's data; optionally write the blocks with save_to_disk."""
    from clm_runner.data.blocks import resolve_block_size
    from clm_runner.data.prepare import prepare_splits
    from clm_runner.logs import setup_logging
    from clm_runner.models.loading import load_config, load_tokenizer

    quiet = not setup_logging(quiet=quiet)
    if save is not None and Path(save).exists() and any(Path(save).iterdir()):
        raise OutputDirError(f"--save {save}: directory is not empty. Choose a new directory.")
    tokenizer = load_tokenizer(recipe.model)
    config = load_config(recipe.model)
    block_size = resolve_block_size(
        recipe.data.block_size, tokenizer, config, warn=logger.warning, clamp=recipe.data.clamp_block_size
    )
    prepared = prepare_splits(recipe, tokenizer, block_size, available_splits(recipe), progress=not quiet)

    previews = {}
    for name, split in prepared.items():
        first = next(iter(split.blocks), None)
        if first is not None:
            previews[name] = tokenizer.decode(list(first["input_ids"])[:PREVIEW_CHARS])[:PREVIEW_CHARS]
    saved_to = None
    if save is not None:
        from datasets import DatasetDict

        blocks = DatasetDict({name: split.blocks.with_format(None) for name, split in prepared.items()})
        blocks.save_to_disk(save)
        saved_to = Path(save)
    sources: dict[str, dict[str, SplitStats | None]] = {}
    for split_name, split in prepared.items():
        for source, part in split.parts.items():
            sources.setdefault(source, {})[split_name] = part.stats
    data = recipe.data
    return DataSummary(
        block_size=block_size,
        grouping=recipe.data.grouping,
        stats={name: split.stats for name, split in prepared.items()},
        previews=previews,
        saved_to=saved_to,
        sources=sources,
        in_mix=dict(prepared["train"].mix_counts) if "train" in prepared else {},
        weights=dict(zip((s.label for s in data.mix), data.weights, strict=True)) if data.weights else {},
    )
