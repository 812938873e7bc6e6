"""Prepared splits, in one pass: sources -> tokenize -> blocks -> cache (each asked once), or a stream.

Each split is tokenized row by row with `tokenizer(text)` semantics (the tokenizer's default special tokens
per row) by the Rust backend in contiguous row shards across processes (clm_runner.data.tokenize),
concatenated in row order into one token stream (so the result never depends on the worker count), cut into
blocks with numpy (clm_runner.data.blocks) and cached (clm_runner.data.cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clm_runner.data import cache, sources, tokenize
from clm_runner.data.blocks import PreparedSplit, SplitStats, block_starts, log_text_column
from clm_runner.data.stream import streaming_split
from clm_runner.errors import DataError

if TYPE_CHECKING:
    import datasets

    from clm_runner.config.schema import Recipe

logger = logging.getLogger(__name__)


def prepare_splits(
    recipe: Recipe,
    tokenizer: Any,
    block_size: int,
    splits: Sequence[str],
    *,
    main_process_first: Callable[[str], ContextManager] | None = None,
    progress: bool = True,
    carve: bool = True,
) -> dict[str, PreparedSplit]:
    """Each requested split as token blocks, from the cache when it holds them, else built and cached.

    max_train_samples / max_eval_samples keep the first N blocks of train / of the other splits (as
    run_clm); `stats` and `stream` describe the whole split. With `main_process_first`, the build runs
    under it, so in a distributed run rank 0 builds and the others then read its cache. carve=False: the
    validation text is elsewhere, none is carved from train (sources.load_raw_splits).
    """
    data = recipe.data
    if data.mix:
        return _prepare_mix(recipe, tokenizer, block_size, splits, main_process_first, progress)
    encoder = tokenize.Encoder.from_tokenizer(tokenizer)
    if data.streaming:
        raw = sources.load_raw_splits(data, recipe.model, splits, progress=progress, carve=carve)
        encoder = encoder.checked(tokenizer)
        return {name: streaming_split(recipe, name, raw[name], encoder, block_size) for name in splits}

    guard = main_process_first("clm-runner tokenization and grouping") if main_process_first else None
    with guard if guard is not None else contextlib.nullcontext():
        return _prepare_cached(recipe, tokenizer, encoder, block_size, splits, progress=progress, carve=carve)


def _prepare_mix(
    recipe: Recipe,
    tokenizer: Any,
    block_size: int,
    splits: Sequence[str],
    main_process_first: Callable[[str], ContextManager] | None,
    progress: bool,
) -> dict[str, PreparedSplit]:
    """[[data.mix]]: each source prepared as its own recipe (its own cache entries), then mixed (data.mix).

    With [data]'s shared validation_file no source carves a validation split: each trains on all its rows.
    """
    from clm_runner.data import mix

    own_splits = [s for s in splits if not mix.shared_split(recipe, s)]
    per_source = {
        source.label: prepare_splits(
            mix.source_recipe(recipe, source),
            tokenizer,
            block_size,
            own_splits,
            main_process_first=main_process_first,
            progress=progress,
            carve=not mix.shared_split(recipe, "validation"),
        )
        for source in (recipe.data.mix if own_splits else ())  # a shared split alone needs no source
    }
    out: dict[str, PreparedSplit] = {}
    for split in splits:
        if mix.shared_split(recipe, split):
            shared = dataclasses.replace(recipe, data=mix.shared_data(recipe.data))
            out[split] = prepare_splits(
                shared,
                tokenizer,
                block_size,
                [split],
                main_process_first=main_process_first,
                progress=progress,
            )[split]
            continue
        parts = {name: prepared[split] for name, prepared in per_source.items()}
        out[split] = mix.mix_train(recipe, parts) if split == "train" else mix.combined(split, parts)
    return out


def _prepare_cached(
    recipe: Recipe,
    tokenizer: Any,
    encoder: tokenize.Encoder,
    block_size: int,
    splits: Sequence[str],
    *,
    progress: bool,
    carve: bool,
) -> dict[str, PreparedSplit]:
    data = recipe.data
    fingerprint = sources.data_fingerprint(data)
    tokenizer_id = tokenize.tokenizer_identity(tokenizer, encoder)
    raw: dict[str, Any] | None = None
    if fingerprint["source"] == "hub":
        # The hub dataset's identity includes the fingerprint of what was actually loaded.
        raw = sources.load_raw_splits(data, recipe.model, splits, progress=progress, carve=carve)
    keys = {
        name: cache.cache_key(
            recipe,
            cache.split_identity(data, fingerprint, name, raw.get(name) if raw else None, carving=carve),
            tokenizer_id,
            block_size,
        )
        for name in splits
    }
    root = cache.cache_root(recipe.model.cache_dir)
    out: dict[str, PreparedSplit] = {}
    missing: list[str] = []
    for name in splits:
        started = time.perf_counter()
        cached = cache.load_cached(cache.split_cache_dir(keys[name], root), name)
        if cached is not None and data.overwrite_cache and cached[3].get("created", 0) < cache.IMPORTED_AT:
            # Rebuild what earlier processes wrote, once: in a distributed run rank 0 rebuilds under
            # main_process_first and the other ranks then take its fresh cache.
            cached = None
        if cached is None:
            missing.append(name)
            continue
        out[name] = _finish(
            recipe, name, cached, cache.split_cache_dir(keys[name], root), from_cache=True, started=started
        )
    if missing:
        started = time.perf_counter()
        if raw is None:
            raw = sources.load_raw_splits(data, recipe.model, missing, progress=progress, carve=carve)
        encoder = encoder.checked(tokenizer)
        for name in missing:
            target = cache.split_cache_dir(keys[name], root)
            _build_split(recipe, name, raw[name], encoder, block_size, keys[name], target, progress=progress)
            cached = cache.load_cached(target, name)
            if cached is None:
                raise DataError(
                    f"The cache {target} could not be read back after writing it. Check the disk."
                )
            out[name] = _finish(recipe, name, cached, target, from_cache=False, started=started)
            started = time.perf_counter()
    return {name: out[name] for name in splits}


def _finish(
    recipe: Recipe,
    name: str,
    cached: tuple[Any, np.ndarray, np.ndarray, dict],
    path: Path,
    *,
    from_cache: bool,
    started: float,
) -> PreparedSplit:
    blocks, stream, starts, meta = cached
    if from_cache:
        log_text_column(name, meta.get("text_column"), recipe.data.text_column)
    limit = recipe.data.max_train_samples if name == "train" else recipe.data.max_eval_samples
    limited = limit is not None and limit < len(blocks)
    if limited:
        blocks = blocks.select(range(limit))
        starts = starts[:limit]
    blocks = blocks.with_format("torch")
    stats = SplitStats(**{**meta["stats"], "seconds": round(time.perf_counter() - started, 3)})
    return PreparedSplit(
        name=name,
        blocks=blocks,
        stream=stream,
        stats=stats,
        cache_path=path,
        from_cache=from_cache,
        starts=starts,
        block_size=int(meta["key"]["block_size"]),
        grouping=recipe.data.grouping,
        limited=limited,
    )


def _build_split(
    recipe: Recipe,
    name: str,
    raw: datasets.Dataset,
    encoder: tokenize.Encoder,
    block_size: int,
    key: dict,
    target: Path,
    *,
    progress: bool,
) -> None:
    """Tokenize, group and write one split into `target`, atomically (temp dir + rename)."""
    started = time.perf_counter()
    data = recipe.data
    column = sources.resolve_text_column(raw, data.text_column)
    log_text_column(name, column, data.text_column)
    workers = data.preprocessing_num_workers or tokenize.default_workers()
    target.parent.mkdir(parents=True, exist_ok=True)
    cache.remove_stale_temporaries(target.parent)
    temporary = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        row_lengths, null_rows = tokenize.tokenize_split(
            raw,
            column,
            encoder,
            workers,
            temporary / "stream.npy",
            desc=f"Tokenizing {name}",
            progress=progress,
        )
        stream = np.load(temporary / "stream.npy", mmap_mode="r")
        starts = block_starts(row_lengths, block_size, data.grouping, data.run_clm_preprocessing_num_workers)
        if null_rows:
            logger.warning(
                "Skipped %d of the %d rows of the %s split: their text is null (a missing value).",
                null_rows,
                len(raw),
                name,
            )
        if len(starts) == 0:
            raise DataError(
                f"The {name} split has {len(stream)} tokens, too few for one block of {block_size} tokens"
                + (" per 1000-row batch (data.grouping = 'run_clm')" if data.grouping == "run_clm" else "")
                + ". Give it more text, or lower data.block_size."
            )
        stats = SplitStats(
            rows=len(raw),
            tokens=len(stream),
            blocks=len(starts),
            dropped_tokens=len(stream) - len(starts) * block_size,
            seconds=0.0,
            null_rows=null_rows,
        )
        np.save(temporary / "starts.npy", starts)
        cache.write_blocks(
            temporary / "blocks.arrow", stream, starts, block_size, desc=f"Grouping {name}", progress=progress
        )
        del stream
        stats = dataclasses.replace(stats, seconds=round(time.perf_counter() - started, 3))
        meta = {
            "split": name,
            "key": key,
            "stats": dataclasses.asdict(stats),
            "text_column": column,
            "created": time.time(),
        }
        (temporary / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        cache.commit(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
