"""The preprocessing cache: where a split's blocks live on disk and the key that says they are still good.

A split is cached as its 1-D token stream (`stream.npy`), its blocks (`blocks.arrow`, int32 rows of input_ids
and labels), where each block starts in the stream (`starts.npy`) and `meta.json`, under
`$CLM_RUNNER_CACHE` (else model.cache_dir/clm-runner, else ~/.cache/clm-runner; see cache_root), in a directory named by a hash of everything that decides
the tokens: the data's content (or hub revision), the tokenizer, the block size and the grouping settings.
A build is written under a temporary name and renamed, so a reader never sees half a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from clm_runner.config.schema import Recipe

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
"""2: block starts stored beside the blocks; null rows skipped."""
STALE_TEMPORARY_SECONDS = 24 * 3600
"""Leftovers of builds that crashed or were killed are removed after this long."""
IMPORTED_AT = time.time()
"""data.overwrite_cache rebuilds caches written before this process started, once."""


def cache_root(model_cache_dir: str | None = None) -> Path:
    """$CLM_RUNNER_CACHE; else `clm-runner/` inside model.cache_dir when the recipe sets it (where its hub
    downloads go: a cluster's scratch space when $HOME's quota is small); else ~/.cache/clm-runner."""
    configured = os.environ.get("CLM_RUNNER_CACHE")
    if configured:
        return Path(configured).expanduser()
    if model_cache_dir:
        return Path(model_cache_dir).expanduser() / "clm-runner"
    return Path.home() / ".cache" / "clm-runner"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def split_identity(
    data: Any, fingerprint: dict, split: str, raw: Any = None, *, carving: bool = True
) -> dict[str, Any]:
    """The inputs of one split's text: its own files, or train's files plus how it was carved (carving=False:
    nothing is carved, as sources.load_raw_splits(carve=False))."""
    carve = None
    if carving and data.validation_file is None and split in ("train", "validation"):
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


def split_cache_dir(key: dict, root: Path) -> Path:
    return root / "blocks" / _digest(key)[:40]


def load_cached(path: Path, name: str) -> tuple[Any, np.ndarray, np.ndarray, dict] | None:
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


def write_blocks(
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


def remove_stale_temporaries(root: Path) -> None:
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    for leftover in root.glob(".[to][ml][pd]-*"):  # .tmp-* and .old-*
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)


def commit(temporary: Path, target: Path) -> None:
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
