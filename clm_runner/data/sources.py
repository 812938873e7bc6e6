"""Raw data sources: a DataConfig turned into raw text splits (a hub dataset or local files), or a DataError.

With no validation source, validation is carved from train as run_clm carves it. Local files are read by
clm_runner.data.files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from clm_runner.data.columns import resolve_text_column
from clm_runner.errors import ClmError, DataError, HubUnreachableError
from clm_runner.models.hub import is_connection_failure, offline_reason, prepare_hub_access

if TYPE_CHECKING:
    import datasets

    from clm_runner.config.schema import DataConfig, ModelConfig
from clm_runner.data.files import (
    SAVE_TO_DISK,
    SUPPORTED_EXTENSIONS,
    dataset_dict_splits,
    file_specs,
    files_of,
    key_for,
    load_source,
    sha256,
    split_source,
)

__all__ = [
    "SAVE_TO_DISK",
    "SPLITS",
    "SUPPORTED_EXTENSIONS",
    "data_fingerprint",
    "load_raw_splits",
    "resolve_text_column",
]

SPLITS = ("train", "validation", "test")


def data_fingerprint(data: DataConfig) -> dict:
    """JSON-able identity of the data: every local file's path, size and sha256, or the hub coordinates.

    For a hub dataset this holds only what the recipe says; the loaded dataset's own fingerprint is added
    by whoever loads it (see clm_runner.data.cache).
    """
    if data.mix:
        from clm_runner.data.mix import shared_data, source_data

        from_sources = {}
        for source, weight in zip(data.mix, data.weights or [None] * len(data.mix), strict=True):
            from_sources[source.label] = {**data_fingerprint(source_data(data, source)), "weight": weight}
        record = {
            "source": "mix",
            "sources": from_sources,
            "seed": data.mix_seed,
            "sampling": data.mix_sampling,
        }
        if data.validation_file is not None or data.test_file is not None:
            record["shared"] = data_fingerprint(shared_data(data))
        return record
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
            for path in files_of(top):
                files.append(
                    {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": sha256(path)}
                )
        splits[split] = {"builder": source.builder, "files": files}
    return {"source": "files", "splits": splits}


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
    data: DataConfig,
    model: ModelConfig,
    splits: Sequence[str],
    *,
    progress: bool = True,
    carve: bool = True,
) -> dict[str, datasets.Dataset | datasets.IterableDataset]:
    """The raw text of each requested split (a subset of train, validation, test), as datasets.

    With no validation source, validation is carved from train exactly as run_clm's `train[:N%]` and
    `train[N%:]`, and train is always the remainder (so a train-only request never sees validation rows).
    carve=False: the validation text comes from elsewhere (a [[data.mix]] source beside [data]'s shared
    validation_file), so nothing is carved and train keeps every row.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"Unknown split {unknown[0]!r}: choose from {', '.join(SPLITS)}.")
    with datasets_progress(progress):
        if data.dataset_name is not None:
            loaded = _load_hub(data, model, splits, carve)
        else:
            loaded = _load_files(data, model, splits, carve)
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
    return f"{key_for(split)} = {spec}"


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
    dataset resolves (its builder only, no data is downloaded); data.text_column names a text column wherever
    the columns are known without reading rows (data.columns)."""
    if data.mix:
        from clm_runner.data.mix import shared_data, source_data

        for source in data.mix:
            try:
                check_data_sources(source_data(data, source), model)
            except ClmError as exc:  # say which source of the mix
                raise type(exc)(f"[[data.mix]] {source.label}: {exc}") from None
        if data.validation_file is not None or data.test_file is not None:
            check_data_sources(shared_data(data), model)
        return
    from clm_runner.data.columns import check_features, check_text_columns

    if data.dataset_name is None:
        check_text_columns(
            data, [split_source(split, spec) for split, spec in file_specs(data).items()], model
        )
        return
    import datasets

    name = data.dataset_name
    prepare_hub_access([name])
    kwargs = _hub_kwargs(data, model)
    kwargs.pop("streaming")
    with hub_dataset_errors(name), datasets_progress(False):
        builder = datasets.load_dataset_builder(name, data.dataset_config_name, **kwargs)
    check_features(builder.info.features, data.text_column)


def _load_hub(data: DataConfig, model: ModelConfig, splits: Sequence[str], carve: bool) -> dict[str, Any]:
    import datasets

    name = data.dataset_name
    assert name is not None
    prepare_hub_access([name])
    with hub_dataset_errors(name):
        loaded = datasets.load_dataset(name, data.dataset_config_name, **_hub_kwargs(data, model))
    available = list(loaded)
    out: dict[str, Any] = {}
    needs_carving = carve and "validation" not in loaded
    if needs_carving and ("train" in splits or "validation" in splits):
        if "train" not in loaded:
            raise DataError(
                f"Dataset {name!r} has no train split to carve validation from; its splits: "
                f"{', '.join(available)}."
            )
        train, validation = _carved(data, loaded["train"])
        loaded = dict(loaded, train=train, validation=validation)
    for split in splits:
        if split not in loaded:
            raise DataError(
                f"Dataset {name!r} has no {split} split; its splits: {', '.join(available)}. "
                "Choose another split."
            )
        out[split] = loaded[split]
    return out


def _carved(data: DataConfig, train: Any) -> tuple[Any, Any]:
    carve = carve_validation_stream if data.streaming else carve_validation
    return carve(train, data.validation_split_percentage, data.validation_split_seed)


def _load_files(data: DataConfig, model: ModelConfig, splits: Sequence[str], carve: bool) -> dict[str, Any]:
    specs = file_specs(data)
    sources = {split: split_source(split, spec) for split, spec in specs.items()}
    out: dict[str, Any] = {}
    # A save_to_disk DatasetDict given as train_file provides its validation/test splits too, as a hub
    # dataset would.
    dict_splits: dict[str, Any] = {}
    train_source = sources.get("train")
    if train_source is not None and train_source.builder == SAVE_TO_DISK:
        dict_splits = dataset_dict_splits(train_source.paths[0], data.streaming)

    def source_dataset(split: str) -> Any:
        if split in sources:
            return load_source(sources[split], data, model)
        if split in dict_splits:
            return dict_splits[split]
        return None

    carve = carve and "validation" not in sources and "validation" not in dict_splits
    if carve and ("train" in splits or "validation" in splits):
        if train_source is None:
            raise DataError(
                "No training data to carve a validation split from: set data.train_file, or set "
                "data.validation_file."
            )
        train, validation = _carved(data, source_dataset("train"))
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
