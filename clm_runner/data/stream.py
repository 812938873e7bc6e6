"""Streamed splits (data.streaming): blocks grouped on the fly, with carry-over across batches and shards."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from clm_runner.data import sources, tokenize
from clm_runner.data.blocks import RUN_CLM_BATCH_ROWS, PreparedSplit, log_text_column

if TYPE_CHECKING:
    from clm_runner.config.schema import Recipe

logger = logging.getLogger(__name__)


def _stream_blocks(source: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of a raw stream; concat carries each batch's leftover tokens into the next (across shards)."""
    raw, column, encoder = source["raw"], source["column"], source["encoder"]
    block_size, grouping = source["block_size"], source["grouping"]
    carry = np.zeros(0, dtype=encoder.dtype)
    null_rows = 0
    for batch in raw.iter(batch_size=RUN_CLM_BATCH_ROWS):
        ids, _, nulls = tokenize.tokenize_rows(batch[column], encoder)
        null_rows += nulls
        if grouping == "concat":
            ids = np.concatenate([carry, ids])
        whole = len(ids) // block_size
        for index in range(whole):
            block = ids[index * block_size : (index + 1) * block_size]
            yield {"input_ids": block, "labels": block}
        if grouping == "concat":
            carry = ids[whole * block_size :]
    if null_rows:
        logger.warning(
            "Skipped %d rows of a streamed split: their text is null (a missing value).", null_rows
        )


def streaming_split(
    recipe: Recipe, name: str, raw: Any, encoder: tokenize.Encoder, block_size: int
) -> PreparedSplit:
    import datasets

    column = sources.resolve_text_column(raw, recipe.data.text_column)
    log_text_column(name, column, recipe.data.text_column)
    value = datasets.Value(encoder.dtype)
    features = datasets.Features(
        {
            "input_ids": datasets.List(value, length=block_size),
            "labels": datasets.List(value, length=block_size),
        }
    )
    source = {
        "raw": raw,
        "column": column,
        "encoder": encoder,
        "block_size": block_size,
        "grouping": recipe.data.grouping,
    }
    blocks = datasets.IterableDataset.from_generator(
        _stream_blocks, features=features, gen_kwargs={"source": source}
    ).with_format("torch")
    limit = recipe.data.max_train_samples if name == "train" else recipe.data.max_eval_samples
    if limit is not None:
        blocks = blocks.take(limit)
    return PreparedSplit(
        name=name,
        blocks=blocks,
        stream=None,
        stats=None,
        block_size=block_size,
        grouping=recipe.data.grouping,
    )
