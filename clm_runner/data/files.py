"""Local data files: what a train_file-like value names, which datasets builder reads it, reading one split.

Every check that can be made before any data is read is made here (missing files, unsupported or mixed
kinds, empty files, invalid UTF-8), each a DataError naming the recipe key, the file and the fix.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm_runner.errors import DataError

if TYPE_CHECKING:
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


def key_for(split: str) -> str:
    """The recipe key naming a split's files, for messages."""
    return f"data.{split}_file"


def expand_paths(split: str, spec: str | list[str]) -> tuple[Path, ...]:
    """The files a train_file-like value names: globs expanded (sorted), lists kept in order."""
    items = [spec] if isinstance(spec, str) else list(spec)
    key = key_for(split)
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
    key = key_for(split)
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
            f"{key_for(split)} mixes kinds of files ({listing}). One split must be one kind: convert them "
            "to one format (train and validation may differ)."
        )
    if kinds == [SAVE_TO_DISK] and len(paths) > 1:
        raise DataError(f"{key_for(split)}: give one save_to_disk directory, not {len(paths)}.")
    for path in paths:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{key_for(split)}: {path} is empty. Put text in it or point at another file.")
    return SplitSource(split=split, spec=spec, paths=paths, builder=kinds[0])


def files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Text checks


def check_utf8(source: SplitSource) -> list[Path]:
    """The files of a text-format split that are not valid UTF-8 (compressed ones are read decompressed)."""
    if source.builder not in TEXT_BUILDERS:
        return []
    return [path for path in source.paths if _first_utf8_error(path) is not None]


def open_decompressed(path: Path) -> Any:
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
    handle = open_decompressed(path)
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
        f"{key_for(split)}: {path} is not valid UTF-8 ({where}). Re-encode it as UTF-8 "
        '(for example `iconv -f latin1 -t utf-8`), or set data.encoding_errors = "replace" to substitute '
        "U+FFFD for the bad bytes."
    )


def dataset_dict_splits(path: Path, streaming: bool) -> dict[str, Any]:
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


def load_source(source: SplitSource, data: DataConfig, model: ModelConfig) -> Any:
    import datasets

    key = key_for(source.split)
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
        paths = [_utf8_repaired_copy(p, model.cache_dir) if p in bad else p for p in paths]

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


def _utf8_repaired_copy(path: Path, model_cache_dir: str | None) -> Path:
    """A UTF-8-clean copy of `path` (bad bytes replaced by U+FFFD), kept in the clm-runner cache by content."""
    from clm_runner.data.cache import cache_root

    digest = sha256(path)
    name = path.name
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    target = cache_root(model_cache_dir) / "utf8-repaired" / digest / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open_decompressed(path) as handle:
            temporary.write_text(handle.read().decode("utf-8", errors="replace"), encoding="utf-8")
        os.replace(temporary, target)
    return target
