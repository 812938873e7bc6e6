"""Token blocks: raw text splits -> exact, cached blocks of block_size tokens (run_clm's preprocessing, fast).

Each split is tokenized row by row with `tokenizer(text)` semantics (the tokenizer's default special tokens
per row) by the Rust backend in contiguous row shards across processes (clm_runner.data.tokenize), concatenated in row order into one
token stream (so the result never depends on the worker count), then cut into blocks with numpy. The stream
(`.npy`) and the blocks (arrow, int32) are cached under `$CLM_RUNNER_CACHE` (default ~/.cache/clm-runner),
keyed on everything that decides the tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clm_runner.data import sources as data_sources
from clm_runner.data import tokenize as tokenization
from clm_runner.errors import DataError, RecipeError
from clm_runner.eval.text_counts import BlockContext

if TYPE_CHECKING:
    import datasets

    from clm_runner.config.schema import Recipe

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
"""2: block starts stored beside the blocks; null rows skipped."""
STALE_TEMPORARY_SECONDS = 24 * 3600
"""Leftovers of builds that crashed or were killed are removed after this long."""
_IMPORTED_AT = time.time()
RUN_CLM_BATCH_ROWS = 1000
"""run_clm's `datasets.map(batched=True)` batch: its grouping drops each batch's remainder."""


# ---------------------------------------------------------------------------------------------------
# Block size


def resolve_block_size(
    requested: int | None,
    tokenizer: Any,
    config: Any,
    warn: Callable[[str], None] = logger.warning,
) -> int:
    """run_clm's block size rule, and the one place that decides the block size.

    Unset: the tokenizer's model_max_length, or min(1024, max_position_embeddings) when that is larger
    than the model's positions (run_clm assumes 1024 positions for a config without the attribute).
    Set: capped at model_max_length. Either way never longer than the model's positions: run_clm lets such
    a block through and the model fails on it; here it is refused before any heavy work.
    """
    declared_positions = getattr(config, "max_position_embeddings", None)
    max_positions = declared_positions if declared_positions is not None else 1024
    model_max_length = tokenizer.model_max_length
    if requested is not None and declared_positions is not None and requested > declared_positions:
        raise RecipeError(
            f"data.block_size = {requested} is longer than the model's {declared_positions} positions "
            f"(max_position_embeddings): set data.block_size to {declared_positions} or less."
        )
    if requested is None:
        block_size = model_max_length
        if block_size > max_positions:
            fallback = min(1024, max_positions) if max_positions > 0 else 1024
            warn(
                f"The tokenizer picked seems to have a very large `model_max_length` ({model_max_length}). "
                f"Using block_size={fallback} instead. You can change that default value by setting "
                "data.block_size."
            )
            block_size = fallback
        return int(block_size)
    if requested > model_max_length:
        warn(
            f"The block_size passed ({requested}) is larger than the maximum length for the model "
            f"({model_max_length}). Using block_size={model_max_length}."
        )
    return int(min(requested, model_max_length))


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SplitStats:
    """What preparing one split produced (for the whole split, before max_*_samples)."""

    rows: int
    tokens: int
    blocks: int
    dropped_tokens: int
    """Tokens in no block: the final remainder (concat), or every batch's remainder (run_clm)."""
    seconds: float
    """Time this call spent on the split (building it, or opening the cache)."""
    null_rows: int = 0
    """Rows whose text is null (a missing value): skipped, as if they were not there."""


@dataclass(frozen=True)
class PreparedSplit:
    """One split ready for training or evaluation."""

    name: str
    blocks: datasets.Dataset | datasets.IterableDataset
    """Columns input_ids and labels (equal), torch format: rows come back as int64 tensors."""
    stream: np.ndarray | None
    """The split's whole 1-D token stream (memory-mapped from the cache); None when streaming."""
    stats: SplitStats | None
    """None when streaming."""
    cache_path: Path | None = None
    """The cache directory the split was read from (None when streaming)."""
    from_cache: bool = False
    """True when the cache already held the split and no text was tokenized."""
    starts: np.ndarray | None = None
    """Where each block (of `blocks`, after max_*_samples) starts in `stream`; None when streaming."""
    block_size: int = 0
    grouping: str = "concat"
    limited: bool = False
    """True when max_*_samples kept fewer blocks than the split has."""

    def eval_text(self) -> dict[str, Any]:
        """How evaluate_blocks finds each block's place in the token stream (for bytes and words)."""
        if self.stream is not None and self.starts is not None:
            return {"context": BlockContext(self.stream, self.starts, self.block_size)}
        # A stream's consecutive concat blocks are adjacent in the text (tokens carry over between them).
        return {"contiguous": self.grouping == "concat"}

    def scored_stream(self) -> np.ndarray:
        """The token stream the blocks cover (through the end of the last block kept by max_*_samples): the
        text a strided evaluation scores, so both methods score the same text."""
        if self.stream is None:
            raise DataError("a streamed split has no token stream to evaluate with strided windows")
        if not self.limited or self.starts is None or len(self.starts) == 0:
            return self.stream
        return self.stream[: int(self.starts[-1]) + self.block_size]


# ---------------------------------------------------------------------------------------------------
# Grouping


def run_clm_batch_edges(n_rows: int, workers: int | None = None) -> np.ndarray:
    """Row indices where run_clm's `group_texts` batches begin, plus n_rows at the end.

    datasets.map(batched=True, num_proc=N) cuts the rows into N contiguous shards (Dataset.shard with
    contiguous=True: the first n % N shards one row longer) and starts 1000-row batches at each shard's
    first row; N above the row count is lowered to it, as datasets does.
    """
    shards = max(1, min(workers or 1, n_rows))
    div, mod = divmod(n_rows, shards)
    edges: list[np.ndarray] = []
    for index in range(shards):
        start = div * index + min(index, mod)
        end = start + div + (1 if index < mod else 0)
        edges.append(np.arange(start, end, RUN_CLM_BATCH_ROWS, dtype=np.int64))
    return np.concatenate([*edges, np.array([n_rows], dtype=np.int64)])


def block_starts(
    row_lengths: np.ndarray, block_size: int, grouping: str, run_clm_workers: int | None = None
) -> np.ndarray:
    """Stream offsets at which each block starts, in order.

    concat: every block_size tokens of the whole stream, the final remainder dropped.
    run_clm: run_clm's `group_texts` over 1000-row batches: each batch cut into whole blocks, its remainder
    dropped (with `run_clm_workers`, the batches of run_clm run with --preprocessing_num_workers N). A
    batch shorter than one block gives no block: run_clm's newest version raises there instead, older
    ones skipped such a batch, and skipping keeps a valid split usable.
    """
    total = int(row_lengths.sum(dtype=np.int64))
    if grouping == "concat":
        return np.arange(total // block_size, dtype=np.int64) * block_size
    if grouping != "run_clm":
        raise DataError(f"data.grouping must be 'concat' or 'run_clm'; got {grouping!r}.")
    offsets = np.concatenate([[0], np.cumsum(row_lengths, dtype=np.int64)])
    batch_edges = offsets[run_clm_batch_edges(len(row_lengths), run_clm_workers)]
    batch_starts, batch_tokens = batch_edges[:-1], np.diff(batch_edges)
    per_batch = batch_tokens // block_size
    first = np.repeat(batch_starts, per_batch)
    index_in_batch = np.arange(int(per_batch.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(per_batch) - per_batch, per_batch
    )
    return first + index_in_batch * block_size


# ---------------------------------------------------------------------------------------------------
# Cache


def cache_root() -> Path:
    """$CLM_RUNNER_CACHE, else ~/.cache/clm-runner."""
    configured = os.environ.get("CLM_RUNNER_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "clm-runner"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def split_identity(data: Any, fingerprint: dict, split: str, raw: Any = None) -> dict[str, Any]:
    """The inputs of one split's text: its own files, or train's files plus how it was carved."""
    carve = None
    if data.validation_file is None and split in ("train", "validation"):
        carve = {"percentage": data.validation_split_percentage, "seed": data.validation_split_seed}
    if fingerprint["source"] == "hub":
        return {
            "hub": fingerprint,
            "loaded": getattr(raw, "_fingerprint", None),
            "split": split,
            "carve": carve,
        }
    files = fingerprint["splits"]
    own = files.get(split)
    if own is not None and not (split == "validation" and carve):
        return {"files": own, "split": split, "carve": carve if split == "train" else None}
    return {"files": files.get("train"), "derived": split, "carve": carve}


def cache_key(recipe: Recipe, split_inputs: dict, tokenizer_id: dict, block_size: int) -> dict[str, Any]:
    data = recipe.data
    return {
        "format": CACHE_FORMAT_VERSION,
        "inputs": split_inputs,
        "tokenizer": tokenizer_id,
        "block_size": block_size,
        "grouping": data.grouping,
        "run_clm_workers": data.run_clm_preprocessing_num_workers,
        "text_column": data.text_column,
        "keep_linebreaks": data.keep_linebreaks,
        "encoding_errors": data.encoding_errors,
    }


def _split_cache_dir(key: dict) -> Path:
    return cache_root() / "blocks" / _digest(key)[:40]


def _load_cached(path: Path, name: str) -> tuple[Any, np.ndarray, np.ndarray, dict] | None:
    import datasets

    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        stream = np.load(path / "stream.npy", mmap_mode="r")
        starts = np.load(path / "starts.npy", mmap_mode="r")
        blocks = datasets.Dataset.from_file(str(path / "blocks.arrow"))
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring the unreadable cache %s (%s); rebuilding it.", path, exc)
        return None
    stats = meta.get("stats", {})
    if len(blocks) != stats.get("blocks") or len(starts) != len(blocks) or len(stream) != stats.get("tokens"):
        logger.warning("Ignoring the inconsistent cache %s; rebuilding it.", path)
        return None
    return blocks, stream, starts, meta


def _write_blocks(
    path: Path, stream: np.ndarray, starts: np.ndarray, block_size: int, *, desc: str, progress: bool
) -> None:
    """blocks.arrow: an arrow stream file (what Dataset.from_file reads) with input_ids and labels."""
    import datasets
    import pyarrow as pa
    from tqdm.auto import tqdm

    value = datasets.Value(str(stream.dtype))
    features = datasets.Features(
        {
            "input_ids": datasets.List(value, length=block_size),
            "labels": datasets.List(value, length=block_size),
        }
    )
    schema = features.arrow_schema
    contiguous = len(starts) == 0 or np.array_equal(starts, np.arange(len(starts)) * block_size)
    rows_per_batch = max(1, (1 << 22) // block_size)  # ~4M tokens (16 MB of int32) per record batch
    windows = None if contiguous else np.lib.stride_tricks.sliding_window_view(stream, block_size)
    with (
        pa.OSFile(str(path), "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
        tqdm(total=len(starts), desc=desc, unit=" blocks", unit_scale=True, disable=not progress) as bar,
    ):
        for first in range(0, len(starts), rows_per_batch):
            last = min(first + rows_per_batch, len(starts))
            if contiguous:
                flat = np.ascontiguousarray(stream[first * block_size : last * block_size])
            else:
                flat = np.ascontiguousarray(windows[starts[first:last]]).reshape(-1)
            column = pa.FixedSizeListArray.from_arrays(pa.array(flat), block_size)
            writer.write_batch(pa.record_batch([column, column], schema=schema))
            bar.update(last - first)


def _build_split(
    recipe: Recipe,
    name: str,
    raw: datasets.Dataset,
    encoder: tokenization.Encoder,
    block_size: int,
    key: dict,
    target: Path,
    *,
    progress: bool,
) -> None:
    """Tokenize, group and write one split into `target`, atomically (temp dir + rename)."""
    started = time.perf_counter()
    data = recipe.data
    column = data_sources.resolve_text_column(raw, data.text_column)
    _log_text_column(name, column, data.text_column)
    workers = data.preprocessing_num_workers or tokenization.default_workers()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target.parent)
    temporary = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        row_lengths, null_rows = tokenization.tokenize_split(
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
        _write_blocks(
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
        _commit(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _log_text_column(split: str, column: str | None, configured: str | None) -> None:
    # A column named "text" is what anyone expects; any other one picked on its own is worth a line.
    if configured is None and column is not None and column != "text":
        logger.info(
            "The %s split's text is in column %r (data.text_column is unset; set it to choose another).",
            split,
            column,
        )


def _remove_stale_temporaries(root: Path) -> None:
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    for leftover in root.glob(".[to][ml][pd]-*"):  # .tmp-* and .old-*
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)


def _commit(temporary: Path, target: Path) -> None:
    """Move a finished build into place, retiring what was there (a stale, unreadable or concurrent build).

    Readers that already opened the retired files keep them: on POSIX an unlinked file lives on while mapped.
    """
    if target.exists():
        retired = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            os.rename(target, retired)
            shutil.rmtree(retired, ignore_errors=True)
    try:
        os.rename(temporary, target)
    except OSError:
        # Another process committed the same key in between: its build is as good as ours.
        if not (target / "meta.json").is_file():
            raise


# ---------------------------------------------------------------------------------------------------
# Streaming


def _stream_blocks(source: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of a raw stream; concat carries each batch's leftover tokens into the next (across shards)."""
    raw, column, encoder = source["raw"], source["column"], source["encoder"]
    block_size, grouping = source["block_size"], source["grouping"]
    carry = np.zeros(0, dtype=encoder.dtype)
    null_rows = 0
    for batch in raw.iter(batch_size=RUN_CLM_BATCH_ROWS):
        ids, _, nulls = tokenization.tokenize_rows(batch[column], encoder)
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


def _streaming_split(
    recipe: Recipe, name: str, raw: Any, encoder: tokenization.Encoder, block_size: int
) -> PreparedSplit:
    import datasets

    column = data_sources.resolve_text_column(raw, recipe.data.text_column)
    _log_text_column(name, column, recipe.data.text_column)
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


# ---------------------------------------------------------------------------------------------------
# Entry point


def prepare_splits(
    recipe: Recipe,
    tokenizer: Any,
    block_size: int,
    splits: Sequence[str],
    *,
    main_process_first: Callable[[str], ContextManager] | None = None,
    progress: bool = True,
) -> dict[str, PreparedSplit]:
    """Each requested split as token blocks, from the cache when it holds them, else built and cached.

    max_train_samples / max_eval_samples keep the first N blocks of train / of the other splits (as
    run_clm); `stats` and `stream` describe the whole split. With `main_process_first`, the build runs
    under it, so in a distributed run rank 0 builds and the others then read its cache.
    """
    data = recipe.data
    encoder = tokenization.Encoder.from_tokenizer(tokenizer)
    if data.streaming:
        raw = data_sources.load_raw_splits(data, recipe.model, splits, progress=progress)
        encoder = encoder.checked(tokenizer)
        return {name: _streaming_split(recipe, name, raw[name], encoder, block_size) for name in splits}

    guard = main_process_first("clm-runner tokenization and grouping") if main_process_first else None
    with guard if guard is not None else contextlib.nullcontext():
        return _prepare_cached(recipe, tokenizer, encoder, block_size, splits, progress=progress)


def _prepare_cached(
    recipe: Recipe,
    tokenizer: Any,
    encoder: tokenization.Encoder,
    block_size: int,
    splits: Sequence[str],
    *,
    progress: bool,
) -> dict[str, PreparedSplit]:
    data = recipe.data
    fingerprint = data_sources.data_fingerprint(data)
    tokenizer_id = tokenization.tokenizer_identity(tokenizer, encoder)
    raw: dict[str, Any] | None = None
    if fingerprint["source"] == "hub":
        # The hub dataset's identity includes the fingerprint of what was actually loaded.
        raw = data_sources.load_raw_splits(data, recipe.model, splits, progress=progress)
    keys = {
        name: cache_key(
            recipe,
            split_identity(data, fingerprint, name, raw.get(name) if raw else None),
            tokenizer_id,
            block_size,
        )
        for name in splits
    }
    out: dict[str, PreparedSplit] = {}
    missing: list[str] = []
    for name in splits:
        started = time.perf_counter()
        cached = _load_cached(_split_cache_dir(keys[name]), name)
        if cached is not None and data.overwrite_cache and cached[3].get("created", 0) < _IMPORTED_AT:
            # Rebuild what earlier processes wrote, once: in a distributed run rank 0 rebuilds under
            # main_process_first and the other ranks then take its fresh cache.
            cached = None
        if cached is None:
            missing.append(name)
            continue
        out[name] = _finish(
            recipe, name, cached, _split_cache_dir(keys[name]), from_cache=True, started=started
        )
    if missing:
        started = time.perf_counter()
        if raw is None:
            raw = data_sources.load_raw_splits(data, recipe.model, missing, progress=progress)
        encoder = encoder.checked(tokenizer)
        for name in missing:
            target = _split_cache_dir(keys[name])
            _build_split(recipe, name, raw[name], encoder, block_size, keys[name], target, progress=progress)
            cached = _load_cached(target, name)
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
        _log_text_column(name, meta.get("text_column"), recipe.data.text_column)
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
