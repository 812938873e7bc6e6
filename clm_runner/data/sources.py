"""Raw data sources: turn a DataConfig into raw text splits (hub datasets or local files), or a DataError."""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm_runner.errors import DataError, HubUnreachableError
from clm_runner.models.hub import is_connection_failure, offline_reason, prepare_hub_access

if TYPE_CHECKING:
    import datasets

    from clm_runner.config.schema import DataConfig, ModelConfig


SUPPORTED_EXTENSIONS = (".txt", ".csv", ".json", ".jsonl", ".parquet", ".arrow")
SPLITS = ("train", "validation", "test")
# datasets decompresses these transparently for the line/record formats.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
BUILDER_BY_EXTENSION = {
    ".txt": "text",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
SAVE_TO_DISK = "save_to_disk"
# Text formats whose bytes we decode ourselves to find non-UTF-8 input before datasets hides it.
TEXT_BUILDERS = ("text", "csv", "json")
_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class SplitSource:
    """The local files feeding one split: what the user wrote, the files it expands to, their builder."""

    split: str
    spec: str | list[str]
    paths: tuple[Path, ...]
    builder: str
    """A datasets builder name ("text", "csv", "json", "parquet", "arrow") or SAVE_TO_DISK."""


# ---------------------------------------------------------------------------------------------------
# Local files


def file_specs(data: DataConfig) -> dict[str, str | list[str]]:
    """split -> train_file / validation_file / test_file as written in the recipe (unset ones left out)."""
    specs = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
    return {split: spec for split, spec in specs.items() if spec is not None}


def _key_for(split: str) -> str:
    """The recipe key naming a split's files, for messages."""
    return f"data.{split}_file"


def expand_paths(split: str, spec: str | list[str]) -> tuple[Path, ...]:
    """The files a train_file-like value names: globs expanded (sorted), lists kept in order."""
    items = [spec] if isinstance(spec, str) else list(spec)
    key = _key_for(split)
    if not items:
        raise DataError(f"{key} is an empty list: name at least one file.")
    paths: list[Path] = []
    for item in items:
        expanded = os.path.expanduser(item)
        if any(ch in expanded for ch in _GLOB_CHARS):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise DataError(
                    f"{key}: the pattern {item!r} matches no file. Check the path and the pattern."
                )
            paths.extend(Path(m) for m in matches)
        else:
            path = Path(expanded)
            if not path.exists():
                raise DataError(
                    f"{key}: {item} does not exist (relative paths are taken from {os.getcwd()}). "
                    "Fix the path in the recipe or with --set."
                )
            paths.append(path)
    return tuple(paths)


def _extension(path: Path) -> str:
    """The data extension of a file name, past any compression suffix ("a.jsonl.gz" -> ".jsonl")."""
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return os.path.splitext(name)[1]


def _is_save_to_disk_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def builder_for(split: str, path: Path) -> str:
    key = _key_for(split)
    if path.is_dir():
        if _is_save_to_disk_dir(path):
            return SAVE_TO_DISK
        raise DataError(
            f"{key}: {path} is a directory but not a `save_to_disk` dataset (no dataset_dict.json or "
            f"state.json). Point at its files instead, for example {path}/*.txt."
        )
    extension = _extension(path)
    if extension not in BUILDER_BY_EXTENSION:
        raise DataError(
            f"{key}: {path} has an unsupported extension {extension or '(none)'!r}. Supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)} (optionally compressed: {', '.join(COMPRESSION_SUFFIXES)}), "
            "or a directory written by Dataset.save_to_disk. Rename or convert the file."
        )
    if extension in (".parquet", ".arrow") and extension != path.suffix.lower():
        raise DataError(
            f"{key}: {path} is a compressed {extension} file; datasets reads those only uncompressed. "
            "Decompress it."
        )
    return BUILDER_BY_EXTENSION[extension]


def split_source(split: str, spec: str | list[str]) -> SplitSource:
    paths = expand_paths(split, spec)
    builders = {path: builder_for(split, path) for path in paths}
    kinds = sorted(set(builders.values()))
    if len(kinds) > 1:
        listing = ", ".join(f"{p} ({b})" for p, b in builders.items())
        raise DataError(
            f"{_key_for(split)} mixes kinds of files ({listing}). One split must be one kind: convert them "
            "to one format (train and validation may differ)."
        )
    if kinds == [SAVE_TO_DISK] and len(paths) > 1:
        raise DataError(f"{_key_for(split)}: give one save_to_disk directory, not {len(paths)}.")
    for path in paths:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{_key_for(split)}: {path} is empty. Put text in it or point at another file.")
    return SplitSource(split=split, spec=spec, paths=paths, builder=kinds[0])


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(data: DataConfig) -> dict:
    """JSON-able identity of the data: every local file's path, size and sha256, or the hub coordinates.

    For a hub dataset this holds only what the recipe says; the loaded dataset's own fingerprint is added
    by whoever loads it (see clm_runner.data.blocks).
    """
    if data.dataset_name is not None:
        return {
            "source": "hub",
            "name": data.dataset_name,
            "config": data.dataset_config_name,
            "revision": data.dataset_revision,
        }
    splits: dict[str, Any] = {}
    for split, spec in file_specs(data).items():
        source = split_source(split, spec)
        files = []
        for top in source.paths:
            for path in _files_of(top):
                files.append(
                    {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": _sha256(path)}
                )
        splits[split] = {"builder": source.builder, "files": files}
    return {"source": "files", "splits": splits}


# ---------------------------------------------------------------------------------------------------
# Text checks


def check_utf8(source: SplitSource) -> list[Path]:
    """The files of a text-format split that are not valid UTF-8 (compressed ones are read decompressed)."""
    if source.builder not in TEXT_BUILDERS:
        return []
    return [path for path in source.paths if _first_utf8_error(path) is not None]


def _open_decompressed(path: Path) -> Any:
    """A binary file object of the file's data, or None for a compression the standard library lacks."""
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    suffix = path.suffix.lower()
    if suffix in openers:
        return openers[suffix](path, "rb")
    if suffix in COMPRESSION_SUFFIXES:
        return None
    return path.open("rb")


def _first_utf8_error(path: Path) -> str | None:
    """Where the first invalid UTF-8 byte is ("byte 1234: invalid start byte"), or None when it is clean."""
    handle = _open_decompressed(path)
    if handle is None:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    with handle:
        while chunk := handle.read(1 << 24):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return f"byte {offset + exc.start}: {exc.reason}"
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            return f"byte {offset + exc.start}: {exc.reason} (truncated at the end)"
    return None


def _utf8_error_message(split: str, path: Path) -> str:
    where = _first_utf8_error(path) or "somewhere"
    return (
        f"{_key_for(split)}: {path} is not valid UTF-8 ({where}). Re-encode it as UTF-8 "
        '(for example `iconv -f latin1 -t utf-8`), or set data.encoding_errors = "replace" to substitute '
        "U+FFFD for the bad bytes."
    )


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
            raise DataError(
                f"data.text_column = {configured!r} is not a column of the data; columns: {_describe(features)}. "
                "Set data.text_column to one of them."
            )
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


def check_has_text(dataset: Any, column: str, what: str) -> None:
    """DataError when a (non-streaming) split has no rows, or only blank ones."""
    import pyarrow.compute as pc

    if len(dataset) == 0:
        fix = "Give it some text."
        if "carved from" in what:
            fix = "Raise data.validation_split_percentage, or set data.validation_file."
        raise DataError(f"{what} has no rows. {fix}")
    table = dataset.with_format("arrow")
    step = 1 << 16
    for start in range(0, len(dataset), step):
        values = table[start : start + step][column]
        stripped = pc.utf8_trim_whitespace(values.fill_null(""))
        if pc.any(pc.greater(pc.utf8_length(stripped), 0)).as_py():
            return
    raise DataError(f"{what} holds only blank text ({len(dataset)} rows). Give it some text.")


# ---------------------------------------------------------------------------------------------------
# Loading


@contextlib.contextmanager
def datasets_progress(enabled: bool) -> Iterator[None]:
    """datasets' own progress bars on or off for a while, restored afterwards."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if enabled == was_enabled:
        yield
        return
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def load_raw_splits(
    data: DataConfig, model: ModelConfig, splits: Sequence[str], *, progress: bool = True
) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
    """The raw text of each requested split (a subset of train, validation, test), as datasets.

    With no validation source, validation is carved from train exactly as run_clm's `train[:N%]` and
    `train[N%:]`, and train is always the remainder (so a train-only request never sees validation rows).
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"Unknown split {unknown[0]!r}: choose from {', '.join(SPLITS)}.")
    with datasets_progress(progress):
        if data.dataset_name is not None:
            loaded = _load_hub(data, model, splits)
        else:
            loaded = _load_files(data, model, splits)
    if not data.streaming:
        for split, dataset in loaded.items():
            column = resolve_text_column(dataset, data.text_column)
            check_has_text(dataset, column, f"The {split} split ({_origin(data, split)})")
    return loaded


def _origin(data: DataConfig, split: str) -> str:
    if data.dataset_name is not None:
        return f"hub dataset {data.dataset_name!r}"
    spec = file_specs(data).get(split)
    if spec is None and split in ("train", "validation"):
        return f"carved from data.train_file {file_specs(data).get('train')}"
    return f"{_key_for(split)} = {spec}"


def carve_validation(
    train: datasets.Dataset, percentage: int, seed: int | None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation) with run_clm's row counts: validation gets datasets' `train[:N%]` rows.

    With a seed, a random N% of rows (same count) becomes validation; both parts keep the file order so
    documents spread over consecutive lines stay whole in the token stream.
    """
    import datasets
    import numpy as np

    total = len(train)
    (instruction,) = datasets.ReadInstruction.from_spec(f"train[:{percentage}%]").to_absolute(
        {"train": total}
    )
    boundary = instruction.to
    if seed is None:
        return train.select(range(boundary, total)), train.select(range(boundary))
    order = np.random.default_rng(seed).permutation(total)
    validation_rows = np.sort(order[:boundary])
    train_rows = np.sort(order[boundary:])
    return train.select(train_rows), train.select(validation_rows)


def carve_validation_stream(
    train: datasets.IterableDataset, percentage: int, seed: int | None
) -> tuple[datasets.IterableDataset, datasets.IterableDataset]:
    """A stream's (train, validation): of every 100 rows, the first N go to validation (as run_clm).

    run_clm keeps `i % 100 > N` for train, silently dropping row N of every hundred; train here keeps
    `i % 100 >= N`, so the two streams partition the rows.
    """
    if seed is not None:
        train = train.shuffle(seed=seed, buffer_size=10_000)

    def keep_train(_: Any, index: int) -> bool:
        return index % 100 >= percentage

    def keep_validation(_: Any, index: int) -> bool:
        return index % 100 < percentage

    return (
        train.filter(keep_train, with_indices=True),
        train.filter(keep_validation, with_indices=True),
    )


def _hub_kwargs(data: DataConfig, model: ModelConfig) -> dict[str, Any]:
    import inspect

    import datasets

    kwargs: dict[str, Any] = {
        "revision": data.dataset_revision,
        "cache_dir": model.cache_dir,
        "token": model.token,
        "streaming": data.streaming,
    }
    # datasets 4+ dropped dataset scripts and rejects trust_remote_code; older versions need it.
    if "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
        kwargs["trust_remote_code"] = model.trust_remote_code
    return kwargs


def hub_unreachable_message(name: str) -> str:
    return (
        f"Can't reach the Hugging Face Hub to fetch dataset {name!r} ({offline_reason()}). "
        "Use local files (data.train_file=...) or recipes/smoke.toml."
    )


@contextlib.contextmanager
def hub_dataset_errors(name: str) -> Iterator[None]:
    """An unreachable Hub, an unknown dataset or a missing config as one clear error."""
    try:
        yield
    except Exception as exc:
        if is_connection_failure(exc):
            raise HubUnreachableError(hub_unreachable_message(name)) from None
        if type(exc).__name__ in ("DatasetNotFoundError", "FileNotFoundError"):
            raise DataError(
                f"Dataset {name!r} was not found on the Hub ({exc}). Check data.dataset_name and "
                "data.dataset_config_name."
            ) from None
        if isinstance(exc, ValueError) and "config" in str(exc).lower():
            raise DataError(f"Dataset {name!r}: {exc}. Set data.dataset_config_name.") from None
        raise


def check_data_sources(data: DataConfig, model: ModelConfig) -> None:
    """Before any heavy work: every local file the recipe names exists and is readable as its kind; a hub
    dataset resolves (its builder only, no data is downloaded)."""
    if data.dataset_name is None:
        for split, spec in file_specs(data).items():
            split_source(split, spec)
        return
    import datasets

    name = data.dataset_name
    prepare_hub_access([name])
    kwargs = _hub_kwargs(data, model)
    kwargs.pop("streaming")
    with hub_dataset_errors(name), datasets_progress(False):
        datasets.load_dataset_builder(name, data.dataset_config_name, **kwargs)


def _load_hub(data: DataConfig, model: ModelConfig, splits: Sequence[str]) -> dict[str, Any]:
    import datasets

    name = data.dataset_name
    assert name is not None
    prepare_hub_access([name])
    with hub_dataset_errors(name):
        loaded = datasets.load_dataset(name, data.dataset_config_name, **_hub_kwargs(data, model))
    available = list(loaded)
    out: dict[str, Any] = {}
    needs_carving = "validation" not in loaded
    if needs_carving and ("train" in splits or "validation" in splits):
        if "train" not in loaded:
            raise DataError(
                f"Dataset {name!r} has no train split to carve validation from; its splits: "
                f"{', '.join(available)}."
            )
        if data.streaming:
            train, validation = carve_validation_stream(
                loaded["train"], data.validation_split_percentage, data.validation_split_seed
            )
        else:
            train, validation = carve_validation(
                loaded["train"], data.validation_split_percentage, data.validation_split_seed
            )
        loaded = dict(loaded, train=train, validation=validation)
    for split in splits:
        if split not in loaded:
            raise DataError(
                f"Dataset {name!r} has no {split} split; its splits: {', '.join(available)}. "
                "Choose another split."
            )
        out[split] = loaded[split]
    return out


def _load_files(data: DataConfig, model: ModelConfig, splits: Sequence[str]) -> dict[str, Any]:
    specs = file_specs(data)
    sources = {split: split_source(split, spec) for split, spec in specs.items()}
    out: dict[str, Any] = {}
    # A save_to_disk DatasetDict given as train_file provides its validation/test splits too, as a hub
    # dataset would.
    dict_splits: dict[str, Any] = {}
    train_source = sources.get("train")
    if train_source is not None and train_source.builder == SAVE_TO_DISK:
        dict_splits = _maybe_dataset_dict(train_source.paths[0], data.streaming)

    def source_dataset(split: str) -> Any:
        if split in sources:
            return _load_source(sources[split], data, model)
        if split in dict_splits:
            return dict_splits[split]
        return None

    carve = "validation" not in sources and "validation" not in dict_splits
    if carve and ("train" in splits or "validation" in splits):
        if train_source is None:
            raise DataError(
                "No training data to carve a validation split from: set data.train_file, or set "
                "data.validation_file."
            )
        train = source_dataset("train")
        if data.streaming:
            train, validation = carve_validation_stream(
                train, data.validation_split_percentage, data.validation_split_seed
            )
        else:
            train, validation = carve_validation(
                train, data.validation_split_percentage, data.validation_split_seed
            )
        out.update({"train": train, "validation": validation})
    for split in splits:
        if split in out:
            continue
        dataset = source_dataset(split)
        if dataset is None:
            hint = {
                "train": "set data.train_file",
                "test": "set data.test_file",
                "validation": "set data.validation_file",
            }[split]
            raise DataError(f"There is no {split} split in this recipe's data: {hint}.")
        out[split] = dataset
    return {split: out[split] for split in splits}


def _maybe_dataset_dict(path: Path, streaming: bool) -> dict[str, Any]:
    if not (path / "dataset_dict.json").is_file():
        return {}
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    import datasets

    loaded = datasets.load_from_disk(str(path))
    return {
        name: (loaded[name].to_iterable_dataset() if streaming else loaded[name])
        for name in splits
        if name != "train"
    }


def _load_source(source: SplitSource, data: DataConfig, model: ModelConfig) -> Any:
    import datasets

    key = _key_for(source.split)
    if source.builder == SAVE_TO_DISK:
        path = source.paths[0]
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            names = list(loaded)
            if source.split in loaded:
                chosen = loaded[source.split]
            elif len(names) == 1:
                chosen = loaded[names[0]]
            else:
                raise DataError(
                    f"{key}: {path} holds splits {', '.join(names)} but no {source.split!r}. Point at a "
                    "directory with one split, or rename the split."
                )
        else:
            chosen = loaded
        return chosen.to_iterable_dataset() if data.streaming else chosen

    replace = data.encoding_errors == "replace"
    bad = check_utf8(source)
    if bad and not replace:
        raise DataError(_utf8_error_message(source.split, bad[0]))
    paths = list(source.paths)
    if bad and source.builder == "json":
        # pyarrow's JSON reader keeps invalid bytes in strings instead of replacing them: feed it a
        # repaired copy.
        paths = [_utf8_repaired_copy(p) if p in bad else p for p in paths]

    if source.builder == "arrow" and not data.streaming:
        parts = [datasets.Dataset.from_file(str(p)) for p in paths]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    kwargs: dict[str, Any] = {}
    if source.builder == "text":
        kwargs["keep_linebreaks"] = data.keep_linebreaks
        kwargs["encoding_errors"] = data.encoding_errors
    elif source.builder == "csv":
        kwargs["encoding_errors"] = data.encoding_errors
    try:
        return datasets.load_dataset(
            source.builder,
            data_files={source.split: [str(p) for p in paths]},
            split=source.split,
            cache_dir=model.cache_dir,
            streaming=data.streaming,
            **kwargs,
        )
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(_utf8_error_message(source.split, paths[0])) from None
        files = ", ".join(str(p) for p in paths)
        raise DataError(
            f"{key}: could not read {files} as {source.builder} ({type(cause).__name__}: {cause}). "
            "Check the file's format."
        ) from None


def _root_cause(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _utf8_repaired_copy(path: Path) -> Path:
    """A UTF-8-clean copy of `path` (bad bytes replaced by U+FFFD), kept in the clm-runner cache by content."""
    from clm_runner.data.blocks import cache_root

    digest = _sha256(path)
    name = path.name
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    target = cache_root() / "utf8-repaired" / digest / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with _open_decompressed(path) as handle:
            temporary.write_text(handle.read().decode("utf-8", errors="replace"), encoding="utf-8")
        os.replace(temporary, target)
    return target
