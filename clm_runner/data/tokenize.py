"""Tokenization: rows of text -> one token stream, by the Rust tokenizer in contiguous row shards.

`tokenizer(text)` semantics per row (the tokenizer's default special tokens), without what run_clm
throws away (attention masks, offsets). Shards of rows go to worker processes and come back in row
order, so the stream never depends on the worker count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

TOKENIZE_CHUNK_ROWS = 4096
"""Rows per tokenization task; smaller tasks balance workers and update the progress bar more often."""
MIN_ROWS_PER_WORKER = 20_000
"""Below this many rows per worker, starting processes costs more than it saves."""
PROBE_TEXT = "Hello world!\n  Tokenizers: ünïcode, 123 <|endoftext|> ok"
INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class Encoder:
    """A picklable, side-effect-free stand-in for `tokenizer(texts)["input_ids"]`.

    Fast tokenizers: a private copy of the Rust backend, without truncation or padding (transformers resets
    both on every call anyway), encoding with `encode_batch_fast` (no offsets or masks built). Others: the
    tokenizer itself.
    """

    backend_json: str | None
    split_special_tokens: bool
    python_tokenizer: Any = None
    dtype: str = "int32"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Encoder:
        """The encoder for `tokenizer`; cheap (no vocabulary is parsed), so a cache hit stays fast."""
        dtype = "int64" if len(tokenizer) > INT32_MAX else "int32"
        backend = (
            getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        )
        if backend is None:
            return cls(backend_json=None, split_special_tokens=False, python_tokenizer=tokenizer, dtype=dtype)
        backend_json = backend.to_str()
        if backend.truncation is not None or backend.padding is not None:
            # transformers sets these per call; left over from an earlier call they would cut or pad rows.
            # A private copy, serialized by the same code, keeps the JSON (and the cache key) unchanged.
            from tokenizers import Tokenizer

            private = Tokenizer.from_str(backend_json)
            private.no_truncation()
            private.no_padding()
            backend_json = private.to_str()
        return cls(
            backend_json=backend_json,
            split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
            dtype=dtype,
        )

    def checked(self, tokenizer: Any) -> Encoder:
        """This encoder if its Rust backend reproduces `tokenizer(texts)` on probe texts, else the exact slow one.

        Anything a tokenizer class does in Python on top of its backend (special tokens, text rewriting)
        would otherwise change the ids silently.
        """
        if self.backend_json is None:
            return self
        probe = [PROBE_TEXT, "", " a\n"]
        expected = [list(ids) for ids in tokenizer(probe)["input_ids"]]
        ids, lengths, _ = tokenize_rows(probe, self)
        got = [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])]
        if got == expected:
            return self
        logger.warning(
            "The tokenizer's Python call differs from its Rust backend; tokenizing through the "
            "tokenizer's Python call (slower)."
        )
        return dataclasses.replace(self, backend_json=None, python_tokenizer=tokenizer)

    def backend(self) -> Any:
        cached = _BACKENDS.get(self.backend_json)
        if cached is None:
            from tokenizers import Tokenizer

            cached = Tokenizer.from_str(self.backend_json)
            cached.encode_special_tokens = self.split_special_tokens
            _BACKENDS.clear()
            _BACKENDS[self.backend_json] = cached
        return cached


_BACKENDS: dict[str | None, Any] = {}


def tokenize_rows(texts: Sequence[str | None], encoder: Encoder) -> tuple[np.ndarray, np.ndarray, int]:
    """(all ids concatenated in row order, ids per row, null rows skipped) for a batch of rows.

    A null row (None: a missing value in a csv, json or parquet column) is skipped, as if it were not there:
    tokenizing it as "" would add the tokenizer's special tokens (a stray BOS) for text that does not exist.
    Its row is in neither the ids nor the lengths; the count says how many there were.
    """
    n_null = sum(text is None for text in texts)
    if n_null:
        texts = [text for text in texts if text is not None]
    if encoder.backend_json is not None:
        encodings = encoder.backend().encode_batch_fast(texts, add_special_tokens=True)
        rows = [encoding.ids for encoding in encodings]
    else:
        rows = encoder.python_tokenizer(texts, return_attention_mask=False)["input_ids"]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    # One list, then one array: several times faster than np.fromiter over a generator of ints.
    ids = np.array(list(chain.from_iterable(rows)), dtype=encoder.dtype)
    return ids, lengths, n_null


def tokenizer_identity(tokenizer: Any, encoder: Encoder) -> dict[str, Any]:
    """Everything about the tokenizer that decides the ids: backend JSON, special tokens, call behaviour."""
    if encoder.backend_json is not None:
        vocabulary = hashlib.sha256(encoder.backend_json.encode()).hexdigest()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        vocabulary = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    added = {
        str(index): str(token) for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
    }
    return {
        "class": type(tokenizer).__name__,
        "vocabulary_sha256": vocabulary,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added_tokens": added,
        "split_special_tokens": encoder.split_special_tokens,
        "probe_ids": [list(map(int, ids)) for ids in tokenizer([PROBE_TEXT, ""])["input_ids"]],
        "dtype": encoder.dtype,
    }


# Worker state, set once per worker process (inherited on fork, sent once on spawn).
_WORKER: dict[str, Any] = {}


def _init_worker(dataset: Any, column: str, encoder: Encoder) -> None:
    _WORKER.update(dataset=dataset, column=column, encoder=encoder)


def _tokenize_range(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    start, stop = bounds
    texts = _WORKER["dataset"][start:stop][_WORKER["column"]]
    return tokenize_rows(texts, _WORKER["encoder"])


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class NpyStreamWriter:
    """A 1-D `.npy` file written piece by piece, its length unknown until closed (keeps memory flat)."""

    HEADER_BYTES = 128  # a version 1.0 header padded to this size fits any 1-D shape

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._file = path.open("wb")
        self._file.write(b"\0" * self.HEADER_BYTES)

    def write(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.count += len(values)

    def close(self) -> None:
        header = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (self.count,)})
        prefix = b"\x93NUMPY\x01\x00"
        body_length = self.HEADER_BYTES - len(prefix) - 2
        body = header.encode("latin1").ljust(body_length - 1) + b"\n"
        self._file.seek(0)
        self._file.write(prefix + body_length.to_bytes(2, "little") + body)
        self._file.close()


def tokenize_split(
    dataset: datasets.Dataset,
    column: str,
    encoder: Encoder,
    workers: int,
    stream_path: Path,
    *,
    desc: str,
    progress: bool,
) -> tuple[np.ndarray, int]:
    """Tokenize a whole split into the `.npy` token stream at `stream_path`.

    Returns the tokens of each (non-null) row and the number of null rows skipped. Rows go to workers in
    contiguous chunks and come back in order, so the stream is identical for every worker count.
    """
    from tqdm.auto import tqdm

    total = len(dataset)
    ranges = [
        (start, min(start + TOKENIZE_CHUNK_ROWS, total)) for start in range(0, total, TOKENIZE_CHUNK_ROWS)
    ]
    workers = max(1, min(workers, len(ranges), -(-total // MIN_ROWS_PER_WORKER)))
    length_parts: list[np.ndarray] = []
    n_null = 0
    writer = NpyStreamWriter(stream_path, np.dtype(encoder.dtype))
    with tqdm(
        total=total, desc=desc, unit=" rows", unit_scale=True, disable=not progress, dynamic_ncols=True
    ) as bar:
        if workers == 1:
            _init_worker(dataset, column, encoder)
            results: Iterator[tuple[np.ndarray, np.ndarray, int]] = map(_tokenize_range, ranges)
            pool = None
        else:
            import multiprocessing

            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            # One single-threaded tokenizer per worker process: the Rust thread pool on top would
            # oversubscribe the cores (and warns after fork).
            with _env("TOKENIZERS_PARALLELISM", "false"):
                pool = context.Pool(workers, initializer=_init_worker, initargs=(dataset, column, encoder))
            results = pool.imap(_tokenize_range, ranges, chunksize=1)
        try:
            for (start, stop), (ids, lengths, nulls) in zip(ranges, results, strict=True):
                writer.write(ids)
                length_parts.append(lengths.astype(np.int32))
                n_null += nulls
                bar.update(stop - start)
        finally:
            writer.close()
            _WORKER.clear()
            if pool is not None:
                pool.terminate()
                pool.join()
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, dtype=np.int32)
    return lengths, n_null
