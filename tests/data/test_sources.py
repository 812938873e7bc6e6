"""Raw data sources: every local file kind, hub failures, validation carving, text columns, bad input."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clm_runner.config.load import load_recipe
from clm_runner.data import files as data_files
from clm_runner.data.sources import (
    SUPPORTED_EXTENSIONS,
    data_fingerprint,
    load_raw_splits,
    resolve_text_column,
)
from clm_runner.errors import DataError, HubUnreachableError

pytestmark = pytest.mark.usefixtures("fresh_cache")


def recipe(tmp_path: Path, *overrides: str):
    return load_recipe(
        None,
        [
            "model.model_type=gpt2",
            "model.tokenizer_name=unused",
            f"model.cache_dir={tmp_path / 'hf'}",
            *overrides,
        ],
        require_output_dir=False,
    )


def load(tmp_path: Path, splits, *overrides: str):
    r = recipe(tmp_path, *overrides)
    return load_raw_splits(r.data, r.model, splits, progress=False)


def texts(dataset, column: str = "text") -> list[str]:
    return list(dataset[column])


def toml_list(*paths: Path) -> str:
    return "[" + ", ".join(repr(str(p)) for p in paths) + "]"


TRAIN = [f"training line {i} about foxes" for i in range(40)]
VALID = [f"validation record {i}" for i in range(7)]


# ---------------------------------------------------------------------------------------------------
# One test per source kind


def test_txt_keeps_linebreaks_by_default(tmp_path):
    (tmp_path / "train.txt").write_text("first line\nsecond\n\nlast without newline", encoding="utf-8")
    raw = load(
        tmp_path,
        ["train", "validation"],
        f"data.train_file={tmp_path / 'train.txt'}",
        "data.validation_split_percentage=50",
    )
    assert texts(raw["validation"]) + texts(raw["train"]) == [
        "first line\n",
        "second\n",
        "\n",
        "last without newline",
    ]


def test_txt_without_linebreaks(tmp_path):
    (tmp_path / "train.txt").write_text("a b\nc d\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("e\n", encoding="utf-8")
    raw = load(
        tmp_path,
        ["train", "validation"],
        f"data.train_file={tmp_path / 'train.txt'}",
        f"data.validation_file={tmp_path / 'valid.txt'}",
        "data.keep_linebreaks=false",
    )
    assert texts(raw["train"]) == ["a b", "c d"] and texts(raw["validation"]) == ["e"]


def test_csv_with_other_columns(tmp_path):
    rows = "id,text,score\n" + "".join(f'{i},"{t}, with comma",{i * 0.5}\n' for i, t in enumerate(TRAIN))
    (tmp_path / "train.csv").write_text(rows, encoding="utf-8")
    raw = load(
        tmp_path,
        ["train"],
        f"data.train_file={tmp_path / 'train.csv'}",
        "data.validation_split_percentage=10",
    )
    assert texts(raw["train"]) == [f"{t}, with comma" for t in TRAIN[4:]]
    assert resolve_text_column(raw["train"], None) == "text"


def test_json_array(tmp_path):
    (tmp_path / "valid.json").write_text(json.dumps([{"text": t, "n": i} for i, t in enumerate(VALID)]))
    (tmp_path / "train.txt").write_text("\n".join(TRAIN) + "\n")
    raw = load(
        tmp_path,
        ["validation"],
        f"data.train_file={tmp_path / 'train.txt'}",
        f"data.validation_file={tmp_path / 'valid.json'}",
    )
    assert texts(raw["validation"]) == VALID


def test_jsonl(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN))
    raw = load(tmp_path, ["train", "validation"], f"data.train_file={tmp_path / 'train.jsonl'}")
    assert texts(raw["validation"]) == TRAIN[:2] and texts(raw["train"]) == TRAIN[2:]


def test_parquet(tmp_path):
    pq.write_table(pa.table({"label": list(range(len(TRAIN))), "body": TRAIN}), tmp_path / "train.parquet")
    raw = load(tmp_path, ["train"], f"data.train_file={tmp_path / 'train.parquet'}")
    # No "text" column: the first string column.
    assert resolve_text_column(raw["train"], None) == "body"
    assert texts(raw["train"], "body") == TRAIN[2:]


def test_single_arrow_file(tmp_path):
    table = pa.table({"text": TRAIN})
    with (
        pa.OSFile(str(tmp_path / "train.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    raw = load(tmp_path, ["train", "validation"], f"data.train_file={tmp_path / 'train.arrow'}")
    assert texts(raw["train"]) == TRAIN[2:] and texts(raw["validation"]) == TRAIN[:2]


def test_save_to_disk_dataset_dir(tmp_path):
    datasets.Dataset.from_dict({"text": TRAIN}).save_to_disk(str(tmp_path / "saved"))
    raw = load(tmp_path, ["train", "validation"], f"data.train_file={tmp_path / 'saved'}")
    assert texts(raw["validation"]) + texts(raw["train"]) == TRAIN


def test_save_to_disk_dataset_dict_provides_its_splits(tmp_path):
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": TRAIN}),
            "validation": datasets.Dataset.from_dict({"text": VALID}),
            "test": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    raw = load(tmp_path, ["train", "validation", "test"], f"data.train_file={tmp_path / 'saved'}")
    assert (
        texts(raw["train"]) == TRAIN
        and texts(raw["validation"]) == VALID
        and texts(raw["test"]) == ["t1", "t2"]
    )


def glob_of_text_files(tmp_path: Path) -> str:
    (tmp_path / "parts").mkdir()
    for name, lines in (("b.txt", ["b1", "b2"]), ("a.txt", ["a1"]), ("c.txt", ["c1"])):
        (tmp_path / "parts" / name).write_text("\n".join(lines) + "\n")
    return str(tmp_path / "parts" / "*.txt")


def list_of_json_files(tmp_path: Path) -> str:
    (tmp_path / "z.jsonl").write_text(json.dumps({"text": "z"}) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a"}]))
    return toml_list(tmp_path / "z.jsonl", tmp_path / "a.json")


@pytest.mark.parametrize(
    ("train_file", "expected"),
    [(glob_of_text_files, ["a1", "b1", "b2", "c1"]), (list_of_json_files, ["z", "a"])],
    ids=["a glob expands sorted", "a list keeps its order"],
)
def test_train_file_globs_and_lists(tmp_path, train_file, expected):
    (tmp_path / "valid.txt").write_text("v\n")
    raw = load(
        tmp_path,
        ["train"],
        f"data.train_file={train_file(tmp_path)}",
        f"data.validation_file={tmp_path / 'valid.txt'}",
        "data.keep_linebreaks=false",
    )
    assert texts(raw["train"]) == expected


def test_train_and_validation_of_different_kinds(tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"content": t, "id": 1}) + "\n" for t in VALID))
    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "test.parquet")
    raw = load(
        tmp_path,
        ["train", "validation", "test"],
        f"data.train_file={tmp_path / 'train.txt'}",
        f"data.validation_file={tmp_path / 'valid.jsonl'}",
        f"data.test_file={tmp_path / 'test.parquet'}",
        "data.keep_linebreaks=false",
    )
    assert texts(raw["train"]) == TRAIN
    assert texts(raw["validation"], resolve_text_column(raw["validation"], None)) == VALID
    assert texts(raw["test"]) == ["p1", "p2"]


def test_streaming_returns_iterable_datasets_partitioning_train(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"{i}\n" for i in range(250)))
    raw = load(
        tmp_path,
        ["train", "validation"],
        f"data.train_file={tmp_path / 'train.txt'}",
        "data.streaming=true",
        "data.keep_linebreaks=false",
    )
    assert all(isinstance(d, datasets.IterableDataset) for d in raw.values())
    train = [int(row["text"]) for row in raw["train"]]
    validation = [int(row["text"]) for row in raw["validation"]]
    assert validation == [i for i in range(250) if i % 100 < 5]
    assert sorted(train + validation) == list(range(250))


# ---------------------------------------------------------------------------------------------------
# Validation carving


@pytest.mark.parametrize(
    ("rows", "percentage"), [(10, 15), (19, 5), (30, 5), (101, 33), (1999, 1), (7, 50), (41, 7)]
)
def test_carved_validation_row_counts_match_run_clm_slicing(tmp_path, rows, percentage):
    lines = [f"row {i}" for i in range(rows)]
    path = tmp_path / "train.txt"
    path.write_text("".join(line + "\n" for line in lines))
    raw = load(
        tmp_path,
        ["train", "validation"],
        f"data.train_file={path}",
        f"data.validation_split_percentage={percentage}",
        "data.keep_linebreaks=false",
    )
    # run_clm's own calls, for the independent counts.
    expected_validation = datasets.load_dataset(
        "text",
        data_files={"train": str(path)},
        split=f"train[:{percentage}%]",
        cache_dir=str(tmp_path / "hf2"),
    )
    expected_train = datasets.load_dataset(
        "text",
        data_files={"train": str(path)},
        split=f"train[{percentage}%:]",
        cache_dir=str(tmp_path / "hf2"),
    )
    assert texts(raw["validation"]) == texts(expected_validation)
    assert texts(raw["train"]) == texts(expected_train)


def test_seeded_validation_is_a_random_subset_of_the_same_size(tmp_path):
    lines = [f"row {i}" for i in range(200)]
    (tmp_path / "train.txt").write_text("".join(line + "\n" for line in lines))
    args = [
        f"data.train_file={tmp_path / 'train.txt'}",
        "data.keep_linebreaks=false",
        "data.validation_split_percentage=10",
    ]
    first = load(tmp_path, ["train", "validation"], *args, "data.validation_split_seed=3")
    again = load(tmp_path, ["train", "validation"], *args, "data.validation_split_seed=3")
    other = load(tmp_path, ["train", "validation"], *args, "data.validation_split_seed=4")
    validation, train = texts(first["validation"]), texts(first["train"])
    assert len(validation) == 20 and len(train) == 180
    assert sorted(validation + train, key=lambda s: int(s.split()[1])) == lines
    assert validation != lines[:20]
    # File order is kept inside each part.
    assert validation == sorted(validation, key=lambda s: int(s.split()[1]))
    assert texts(again["validation"]) == validation and texts(other["validation"]) != validation


def test_train_only_request_still_excludes_validation_rows(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"r{i}\n" for i in range(100)))
    raw = load(tmp_path, ["train"], f"data.train_file={tmp_path / 'train.txt'}", "data.keep_linebreaks=false")
    assert list(raw) == ["train"] and texts(raw["train"]) == [f"r{i}" for i in range(5, 100)]


# ---------------------------------------------------------------------------------------------------
# Text column


def test_configured_text_column_and_its_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"title": f"t{i}", "body": f"b{i}", "n": i}) + "\n" for i in range(30))
    )
    raw = load(tmp_path, ["train"], f"data.train_file={tmp_path / 'train.jsonl'}", "data.text_column=body")
    assert resolve_text_column(raw["train"], "body") == "body"
    assert resolve_text_column(raw["train"], None) == "title"
    with pytest.raises(
        DataError, match=r"'content' is not a column.*title \(string\), body \(string\), n \(int64\)"
    ):
        resolve_text_column(raw["train"], "content")
    with pytest.raises(DataError, match="'n' is not a text column"):
        resolve_text_column(raw["train"], "n")


def test_no_text_column_lists_the_columns(tmp_path):
    pq.write_table(pa.table({"a": [1, 2, 3], "b": [0.5, 1.5, 2.5]}), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"no text column; columns: a \(int64\), b \(float64\)"):
        load(tmp_path, ["train"], f"data.train_file={tmp_path / 'train.parquet'}")


def columns_file(tmp_path: Path, kind: str) -> Path:
    """A train file of `kind` with columns title (string), body (string), n (int64)."""
    table = pa.table({"title": [f"t{i}" for i in range(30)], "body": TRAIN[:30], "n": list(range(30))})
    path = tmp_path / f"train.{kind}"
    if kind == "parquet":
        pq.write_table(table, path)
    elif kind == "csv":
        table.to_pandas().to_csv(path, index=False)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    elif kind == "arrow":
        datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    else:  # a save_to_disk directory
        datasets.Dataset(table).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow", "saved", "jsonl"])
@pytest.mark.parametrize("column", [None, "body", "nope", "n"])
def test_the_text_column_is_checked_before_loading_where_the_columns_are_known(tmp_path, kind, column):
    """check_data_sources (what `recipe check` and `train` run first) refuses exactly what loading the data
    refuses, with the same line, wherever the columns are known without reading rows; JSON (keys may first
    appear in any record) and a CSV column's type (the header has none) are left to loading."""
    from clm_runner.data.sources import check_data_sources

    overrides = [f"data.train_file={columns_file(tmp_path, kind)}"]  # validation carved from it
    if column is not None:
        overrides.append(f"data.text_column={column}")
    r = recipe(tmp_path, *overrides)
    early = None
    try:
        check_data_sources(r.data, r.model)
    except DataError as exc:
        early = str(exc)
    late = None
    try:
        raw = load_raw_splits(r.data, r.model, ["train"], progress=False)
        resolve_text_column(raw["train"], column)
    except DataError as exc:
        late = str(exc)
    assert (late is None) == (column in (None, "body"))
    if kind == "jsonl" or (kind == "csv" and column == "n"):
        assert early is None  # left to loading
    elif kind == "csv" and late is not None:  # the header names the columns, without their types
        assert early == late.replace(" (large_string)", "").replace(" (int64)", "")
    else:
        assert early == late


# ---------------------------------------------------------------------------------------------------
# Bad input: one DataError each, naming the file and the fix


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data.train_file: .*nope.txt does not exist.*Fix the path"):
        load(tmp_path, ["train"], f"data.train_file={tmp_path / 'nope.txt'}")


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"data.validation_file: .*gone does not exist"):
        (tmp_path / "train.txt").write_text("x\n")
        load(
            tmp_path,
            ["validation"],
            f"data.train_file={tmp_path / 'train.txt'}",
            f"data.validation_file={tmp_path / 'gone'}",
        )


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"pattern .*\*\.txt' matches no file"):
        load(tmp_path, ["train"], f"data.train_file={tmp_path / 'none' / '*.txt'}")


def test_unsupported_extension_lists_supported_ones(tmp_path):
    (tmp_path / "train.docx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError) as caught:
        load(tmp_path, ["train"], f"data.train_file={tmp_path / 'train.docx'}")
    message = str(caught.value)
    assert "train.docx" in message and "'.docx'" in message
    assert all(ext in message for ext in SUPPORTED_EXTENSIONS)


def test_plain_directory_is_not_a_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder is a directory but not a `save_to_disk` dataset.*\*\.txt"):
        load(tmp_path, ["train"], f"data.train_file={tmp_path / 'folder'}")


def test_mixed_kinds_in_one_split(tmp_path):
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "b.csv").write_text("text\nb\n")
    with pytest.raises(DataError, match="mixes kinds of files"):
        load(tmp_path, ["train"], f"data.train_file={toml_list(tmp_path / 'a.txt', tmp_path / 'b.csv')}")


def test_empty_file(tmp_path):
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(DataError, match=r"train.txt is empty"):
        load(tmp_path, ["train"], f"data.train_file={tmp_path / 'train.txt'}")


def test_blank_only_split(tmp_path):
    (tmp_path / "train.txt").write_text("real text\n" * 30)
    (tmp_path / "valid.txt").write_text("\n  \n\t\n\n")
    with pytest.raises(
        DataError, match=r"validation split \(data.validation_file = .*valid.txt\) holds only blank text"
    ):
        load(
            tmp_path,
            ["validation"],
            f"data.train_file={tmp_path / 'train.txt'}",
            f"data.validation_file={tmp_path / 'valid.txt'}",
        )


def test_empty_carved_validation(tmp_path):
    (tmp_path / "train.txt").write_text("only\nthree\nrows\n")
    with pytest.raises(DataError, match=r"validation split .* has no rows.*data.validation_split_percentage"):
        load(tmp_path, ["validation"], f"data.train_file={tmp_path / 'train.txt'}")


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_non_utf8_names_the_file_and_replace_accepts_it(tmp_path, suffix):
    body = {
        ".txt": b"good line\ncaf\xe9 latin-1\n",
        ".csv": b"text\ngood line\ncaf\xe9 latin-1\n",
        ".jsonl": b'{"text": "good line"}\n{"text": "caf\xe9 latin-1"}\n',
    }[suffix]
    path = tmp_path / f"train{suffix}"
    path.write_bytes(body)
    (tmp_path / "valid.txt").write_text("v\n")
    args = [
        f"data.train_file={path}",
        f"data.validation_file={tmp_path / 'valid.txt'}",
        "data.keep_linebreaks=false",
    ]
    with pytest.raises(DataError) as caught:
        load(tmp_path, ["train"], *args)
    message = str(caught.value)
    assert f"train{suffix} is not valid UTF-8" in message and "byte " in message
    assert 'data.encoding_errors = "replace"' in message
    raw = load(tmp_path, ["train"], *args, "data.encoding_errors=replace")
    assert texts(raw["train"]) == ["good line", "caf\ufffd latin-1"]


def test_requested_split_that_cannot_exist(tmp_path):
    (tmp_path / "train.txt").write_text("x\n" * 30)
    with pytest.raises(DataError, match="no test split.*set data.test_file"):
        load(tmp_path, ["test"], f"data.train_file={tmp_path / 'train.txt'}")
    (tmp_path / "valid.txt").write_text("v\n")
    with pytest.raises(DataError, match="no train split.*set data.train_file"):
        load(tmp_path, ["train"], f"data.validation_file={tmp_path / 'valid.txt'}")
    with pytest.raises(DataError, match="Unknown split 'dev'"):
        load(tmp_path, ["dev"], f"data.train_file={tmp_path / 'train.txt'}")


# ---------------------------------------------------------------------------------------------------
# Hub


def test_hub_offline_fails_fast_with_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(HubUnreachableError) as caught:
        load(tmp_path, ["train"], "data.dataset_name=wikitext", "data.dataset_config_name=wikitext-2-raw-v1")
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert "\n" not in message
    assert "dataset 'wikitext'" in message and "HF_HUB_OFFLINE=1 is set" in message
    assert "data.train_file" in message and "recipes/smoke.toml" in message


def dataset_repo(root: Path) -> Path:
    """A dataset laid out as on the Hub: parquet files per split and configs declared in the README's YAML."""
    repo = root / "corpus"
    for config, rows in (("small", TRAIN), ("big", TRAIN * 2)):
        (repo / config).mkdir(parents=True)
        pq.write_table(pa.table({"text": rows}), repo / config / "train-00000.parquet")
        pq.write_table(pa.table({"text": [f"{config} test"]}), repo / config / "test-00000.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {config}\n  data_files:\n"
            f"  - split: train\n    path: {config}/train-*.parquet\n"
            f"  - split: test\n    path: {config}/test-*.parquet\n"
            for config in ("small", "big")
        )
        + "---\n# corpus\n"
    )
    return repo


def test_a_dataset_without_validation_split_is_carved(tmp_path):
    """Loaded by the real datasets.load_dataset through data.dataset_name / dataset_config_name."""
    repo = dataset_repo(tmp_path)
    raw = load(
        tmp_path,
        ["train", "validation", "test"],
        f"data.dataset_name={repo}",
        "data.dataset_config_name=small",
    )
    assert texts(raw["validation"]) == TRAIN[:2] and texts(raw["train"]) == TRAIN[2:]
    assert texts(raw["test"]) == ["small test"]  # the config was honoured
    big = load(tmp_path, ["train"], f"data.dataset_name={repo}", "data.dataset_config_name=big")
    assert len(big["train"]) == 2 * len(TRAIN) - round(2 * len(TRAIN) * 0.05)
    with pytest.raises(DataError, match="dataset_config_name"):
        load(tmp_path, ["train"], f"data.dataset_name={repo}", "data.dataset_config_name=medium")


# ---------------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_names_every_file_with_size_and_content_hash(tmp_path):
    (tmp_path / "parts").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "parts" / name).write_text(f"content of {name}\n")
    datasets.Dataset.from_dict({"text": VALID}).save_to_disk(str(tmp_path / "saved"))
    r = recipe(
        tmp_path,
        f"data.train_file={tmp_path / 'parts' / '*.txt'}",
        f"data.validation_file={tmp_path / 'saved'}",
    )
    fingerprint = data_fingerprint(r.data)
    json.dumps(fingerprint)
    train = fingerprint["splits"]["train"]["files"]
    assert [Path(f["path"]).name for f in train] == ["a.txt", "b.txt"]
    for entry in train:
        content = Path(entry["path"]).read_bytes()
        assert entry["size"] == len(content) and entry["sha256"] == hashlib.sha256(content).hexdigest()
    saved = fingerprint["splits"]["validation"]
    assert saved["builder"] == data_files.SAVE_TO_DISK
    assert {Path(f["path"]).name for f in saved["files"]} >= {"state.json", "dataset_info.json"}

    (tmp_path / "parts" / "a.txt").write_text("CONTENT of a.txt\n")  # same size, other bytes
    assert data_fingerprint(r.data) != fingerprint


def test_hub_fingerprint_holds_the_coordinates():
    r = load_recipe(
        None,
        [
            "model.model_type=gpt2",
            "model.tokenizer_name=t",
            "data.dataset_name=wikitext",
            "data.dataset_config_name=c",
            "data.dataset_revision=abc",
        ],
        require_output_dir=False,
    )
    assert data_fingerprint(r.data) == {"source": "hub", "name": "wikitext", "config": "c", "revision": "abc"}


def test_compressed_text_files(tmp_path):
    import gzip

    with gzip.open(tmp_path / "train.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(t + "\n" for t in TRAIN))
    with gzip.open(tmp_path / "valid.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps({"text": t}) + "\n" for t in VALID))
    raw = load(
        tmp_path,
        ["train", "validation"],
        f"data.train_file={tmp_path / 'train.txt.gz'}",
        f"data.validation_file={tmp_path / 'valid.jsonl.gz'}",
        "data.keep_linebreaks=false",
    )
    assert texts(raw["train"]) == TRAIN and texts(raw["validation"]) == VALID


def test_compressed_non_utf8_is_named(tmp_path):
    import gzip

    with gzip.open(tmp_path / "train.txt.gz", "wb") as handle:
        handle.write(b"fine\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"train.txt.gz is not valid UTF-8 \(byte 5: invalid start byte\)"):
        load(tmp_path, ["train"], f"data.train_file={tmp_path / 'train.txt.gz'}")


def test_hub_network_failure_is_hub_unreachable(tmp_path, monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)

    def no_network(*args, **kwargs):
        try:
            raise OSError("[Errno 101] Network is unreachable")
        except OSError as exc:
            raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (ConnectError)") from exc

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(HubUnreachableError) as caught:
        load(tmp_path, ["train"], "data.dataset_name=someone/corpus")
    assert str(caught.value).startswith(
        "Can't reach the Hugging Face Hub to fetch dataset 'someone/corpus' (no network)."
    )
