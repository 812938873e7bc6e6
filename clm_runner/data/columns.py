"""The text column of a split: which column holds the text, and the columns read before any row is loaded.

`resolve_text_column` picks the column when a split is prepared. `recipe check` and `train` run the same
check before any work on the columns a source's schema or header gives (a data.text_column that names none
of them, or text with no string column, is one line). Where only reading the rows tells the columns (JSON,
whose keys may first appear in any record) the check waits for that; a CSV header gives the names but not the
types, so its type check waits too.
"""

from __future__ import annotations

import csv
import io
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from clm_runner.data.files import SAVE_TO_DISK, SplitSource, load_source, open_decompressed
from clm_runner.errors import DataError

if TYPE_CHECKING:
    from clm_runner.config.schema import DataConfig, ModelConfig


def check_text_columns(data: DataConfig, sources: Iterable[SplitSource], model: ModelConfig) -> None:
    """DataError, as preparing the data would raise it, when a split's columns hold no usable text column."""
    for source in sources:
        check_features(peek_features(source, data, model), data.text_column)


def check_features(features: Any, configured: str | None) -> None:
    """The text-column check on a split's features; a list: the column names alone (a CSV header), whose types
    are known only once read; None: nothing known until the rows are read, no check."""
    if isinstance(features, list):
        if configured is not None and configured not in features:
            raise _not_a_column(configured, ", ".join(features))
    elif features is not None:
        resolve_text_column(types.SimpleNamespace(features=features), configured)


def peek_features(source: SplitSource, data: DataConfig, model: ModelConfig) -> Any | None:
    """The datasets.Features the split will have (CSV: the header's names, a list), or None."""
    import datasets

    path = source.paths[0]
    if source.builder == "text":
        return datasets.Features({"text": datasets.Value("string")})
    if source.builder == SAVE_TO_DISK:
        return load_source(source, data, model).features  # memory-mapped: no row is read
    try:
        if source.builder == "parquet":
            import pyarrow.parquet as pq

            return datasets.Features.from_arrow_schema(pq.read_schema(path))
        if source.builder == "arrow":
            import pyarrow as pa

            with pa.memory_map(str(path)) as handle:
                return datasets.Features.from_arrow_schema(pa.ipc.open_stream(handle).schema)
        if source.builder == "csv":
            return _csv_header(path)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):  # unreadable here: reading it will say why
        return None
    return None


def _csv_header(path: Any) -> list[str] | None:
    handle = open_decompressed(path)
    if handle is None:
        return None
    with handle, io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="") as text:
        names = next(csv.reader(text), None)
    if not names or "" in names or len(set(names)) < len(names):
        return None  # pandas renames empty and repeated names: the real ones are known only after reading
    return names


def resolve_text_column(dataset: Any, configured: str | None) -> str:
    """The column holding the text: `configured`, else "text", else the first string column."""
    features = dataset.features
    if features is None:  # a stream whose schema is unknown until read
        if configured is not None:
            return configured
        return "text"
    columns = list(features)
    if configured is not None:
        if configured not in features:
            raise _not_a_column(configured, _describe(features))
        if not _is_string_feature(features[configured]):
            raise DataError(
                f"data.text_column = {configured!r} is not a text column ({features[configured]}); "
                f"columns: {_describe(features)}."
            )
        return configured
    if "text" in features and _is_string_feature(features["text"]):
        return "text"
    for column in columns:
        if _is_string_feature(features[column]):
            return column
    raise DataError(
        f"The data has no text column; columns: {_describe(features) or '(none)'}. "
        'Put the text in a string column (ideally named "text") or set data.text_column.'
    )


def _is_string_feature(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _describe(features: Any) -> str:
    return ", ".join(f"{name} ({getattr(f, 'dtype', type(f).__name__)})" for name, f in features.items())


def _not_a_column(configured: str, columns: str) -> DataError:
    return DataError(
        f"data.text_column = {configured!r} is not a column of the data; columns: {columns}. "
        "Set data.text_column to one of them."
    )
