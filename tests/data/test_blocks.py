"""Token blocks: block size rule, exact blocks against a plain-Python run_clm, workers, cache, limits."""

from __future__ import annotations

import json
import logging
import os
import time
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import EOS, byte_level_tokenizer
from run_clm_reference import reference_concat, reference_rows, reference_run_clm

from clm_runner.config.load import load_recipe
from clm_runner.data import cache, prepare, sources
from clm_runner.data import tokenize as tokenization
from clm_runner.data.blocks import PreparedSplit, resolve_block_size
from clm_runner.data.prepare import prepare_splits
from clm_runner.errors import DataError, RecipeError

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "jolly",
    "bakers",
    "under",
    "pale",
    "moonlight",
    "near",
    "old",
    "rivers",
    "ünïcode",
    "naïve",
    "café",
]


def make_lines(count: int, seed: int = 0) -> list[str]:
    """Lines of varying length (some blank), deterministic."""
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(count):
        if index % 17 == 5:
            lines.append("")
            continue
        size = int(rng.integers(1, 25))
        lines.append(" ".join(WORDS[int(w)] for w in rng.integers(0, len(WORDS), size)) + f" {index}")
    return lines


pytestmark = pytest.mark.usefixtures(
    "fresh_cache"
)  # a cache of each test's own: hits and misses are the point


def train_tokenizer(directory: Path, *, template: bool = False, model_max_length: int = 256):
    tokenizer = byte_level_tokenizer(
        make_lines(500, seed=99),
        special_tokens=(EOS, "<s>", "</s>"),
        template=("<s>", "</s>") if template else None,
        eos_token=EOS,
        bos_token=EOS,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def recipe_for(tmp_path: Path, *overrides: str):
    return load_recipe(
        None,
        [
            "model.model_type=gpt2",
            f"model.tokenizer_name={tmp_path / 'tok'}",
            f"model.cache_dir={tmp_path / 'hf'}",
            *overrides,
        ],
        require_output_dir=False,
    )


def split_files_recipe(tmp_path: Path, train: list[str] | str, valid: list[str], *overrides: str):
    """A recipe over train.txt (or the train_file value given) and valid.txt written from these lines."""
    if isinstance(train, list):
        write_lines(tmp_path / "train.txt", train)
        train = str(tmp_path / "train.txt")
    write_lines(tmp_path / "valid.txt", valid)
    return recipe_for(
        tmp_path, f"data.train_file={train}", f"data.validation_file={tmp_path / 'valid.txt'}", *overrides
    )


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# Independent reference: run_clm's preprocessing in plain Python lists (tests/run_clm_reference.py)


def as_lists(split: PreparedSplit) -> list[list[int]]:
    return [row.tolist() for row in split.blocks["input_ids"]]


# ---------------------------------------------------------------------------------------------------
# Block size


class FakeTokenizer(SimpleNamespace):
    pass


@pytest.mark.parametrize(
    ("requested", "model_max_length", "positions", "expected", "warning"),
    [
        (None, 512, 1024, 512, None),  # the tokenizer's length fits the model
        (None, int(1e30), 2048, 1024, "very large `model_max_length`"),  # no real limit: 1024
        (None, 4096, 256, 256, "block_size=256"),  # capped by the model's positions
        (None, 1024, None, 1024, None),  # a config without positions: run_clm assumes 1024
        (None, 5000, None, 1024, "block_size=1024"),
        (100, 128, 128, 100, None),  # given, within both limits
        (512, 128, 1024, 128, "The block_size passed (512)"),  # given, capped by model_max_length
    ],
    ids=["fits", "huge", "positions", "no-positions", "no-positions-huge", "given", "given-capped"],
)
def test_block_size_follows_run_clms_rule(requested, model_max_length, positions, expected, warning):
    warnings: list[str] = []
    config = SimpleNamespace() if positions is None else SimpleNamespace(max_position_embeddings=positions)
    size = resolve_block_size(
        requested, FakeTokenizer(model_max_length=model_max_length), config, warnings.append
    )
    assert size == expected
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0], warnings


def test_block_size_longer_than_the_models_positions_is_refused_with_the_fix():
    """run_clm caps a block at model_max_length only: 100 tokens on a 64-position model passed, and failed
    at the first evaluation after the whole training. The one place that decides the size refuses it."""
    with pytest.raises(
        RecipeError, match=r"data.block_size = 100 is longer than the model's 64 positions.*64 or less"
    ):
        resolve_block_size(
            100, FakeTokenizer(model_max_length=128), SimpleNamespace(max_position_embeddings=64), print
        )


def test_clamp_block_size_lowers_to_model_max_length_first_as_run_clm_does():
    """data.clamp_block_size (what `recipe from-args` pins): run_clm lowers --block_size 2048 to GPT-2's
    model_max_length 1024 and trains; without the key the size is refused as written."""
    gpt2 = FakeTokenizer(model_max_length=1024), SimpleNamespace(max_position_embeddings=1024)
    warnings: list[str] = []
    assert resolve_block_size(2048, *gpt2, warnings.append, clamp=True) == 1024
    assert len(warnings) == 1 and "Using block_size=1024" in warnings[0]
    with pytest.raises(RecipeError, match="longer than the model's 1024 positions"):
        resolve_block_size(2048, *gpt2, print)
    # Lowered to model_max_length and still longer than the positions: refused either way (run_clm fails).
    with pytest.raises(RecipeError, match="= 128 is longer than the model's 64 positions"):
        resolve_block_size(
            500,
            FakeTokenizer(model_max_length=128),
            SimpleNamespace(max_position_embeddings=64),
            print,
            clamp=True,
        )
    assert resolve_block_size(100, *gpt2, print, clamp=True) == 100  # within both limits: as given


def test_block_size_default_warning_goes_to_logging(caplog):
    with caplog.at_level(logging.WARNING, logger="clm_runner.data"):
        resolve_block_size(
            None, FakeTokenizer(model_max_length=int(1e30)), SimpleNamespace(max_position_embeddings=1024)
        )
    assert "very large" in caplog.text


# ---------------------------------------------------------------------------------------------------
# Exact blocks


@pytest.mark.parametrize("grouping", ["concat", "run_clm"])
def test_blocks_match_plain_python_reference(tmp_path, tokenizer, grouping):
    tokenizer.save_pretrained(tmp_path / "tok")
    train_lines, valid_lines = make_lines(2600, seed=1), make_lines(300, seed=2)
    recipe = split_files_recipe(tmp_path, train_lines, valid_lines, f"data.grouping={grouping}")
    out = prepare_splits(recipe, tokenizer, 32, ["train", "validation"], progress=False)
    reference = reference_concat if grouping == "concat" else reference_run_clm
    for name, lines in (("train", train_lines), ("validation", valid_lines)):
        rows = reference_rows(tokenizer, [line + "\n" for line in lines])
        expected = reference(rows, 32)
        assert as_lists(out[name]) == expected
        assert out[name].stream.tolist() == list(chain(*rows))
        stats = out[name].stats
        assert (stats.rows, stats.tokens, stats.blocks) == (len(lines), len(out[name].stream), len(expected))
        assert stats.dropped_tokens == stats.tokens - 32 * len(expected)
    if grouping == "run_clm":
        # Each 1000-row batch drops its own remainder: more is dropped than concat's final remainder.
        assert out["train"].stats.dropped_tokens > out["train"].stats.tokens % 32


def test_run_clm_grouping_skips_a_batch_shorter_than_a_block(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    # 1000 long rows, then a final batch of 5 one-word rows: fewer tokens than one block.
    lines = make_lines(1000, seed=3) + ["fox"] * 5
    recipe = split_files_recipe(tmp_path, lines, make_lines(200, seed=4), "data.grouping=run_clm")
    out = prepare_splits(recipe, tokenizer, 64, ["train"], progress=False)
    rows = reference_rows(tokenizer, [line + "\n" for line in lines])
    assert sum(len(r) for r in rows[1000:]) < 64
    assert as_lists(out["train"]) == reference_run_clm(rows, 64) == reference_run_clm(rows[:1000], 64)


def test_blocks_follow_tokenizer_call_with_per_row_special_tokens(tmp_path):
    tokenizer = train_tokenizer(tmp_path / "tok", template=True)
    lines = make_lines(400, seed=5)
    write_lines(tmp_path / "train.txt", lines)
    recipe = recipe_for(
        tmp_path, f"data.train_file={tmp_path / 'train.txt'}", "data.validation_split_percentage=10"
    )
    out = prepare_splits(recipe, tokenizer, 16, ["train", "validation"], progress=False)
    rows = reference_rows(tokenizer, [line + "\n" for line in lines])
    assert rows[0][0] == tokenizer.convert_tokens_to_ids("<s>") and rows[0][
        -1
    ] == tokenizer.convert_tokens_to_ids("</s>")
    # run_clm's train[:10%] of 400 rows is the first 40.
    assert out["validation"].stream.tolist() == list(chain(*rows[:40]))
    assert as_lists(out["train"]) == reference_concat(rows[40:], 16)


def test_rows_are_int64_tensors_and_labels_equal_input_ids(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(300))
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.txt'}")
    split = prepare_splits(recipe, tokenizer, 8, ["train"], progress=False)["train"]
    row = split.blocks[0]
    assert set(row) == {"input_ids", "labels"}
    assert row["input_ids"].dtype == torch.int64 and row["input_ids"].shape == (8,)
    assert torch.equal(row["input_ids"], row["labels"])
    assert isinstance(split.stream, np.memmap) and split.stream.dtype == np.int32


def test_worker_count_never_changes_the_blocks(tmp_path, tokenizer, monkeypatch):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(3000, seed=6))
    monkeypatch.setattr(tokenization, "TOKENIZE_CHUNK_ROWS", 97)
    monkeypatch.setattr(tokenization, "MIN_ROWS_PER_WORKER", 1)
    pid_log = tmp_path / "pids"
    real_tokenize = tokenization.tokenize_rows

    def logging_tokenize(texts, encoder):
        with pid_log.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        return real_tokenize(texts, encoder)

    monkeypatch.setattr(tokenization, "tokenize_rows", logging_tokenize)
    results = {}
    for workers in (1, 2):
        monkeypatch.setenv("CLM_RUNNER_CACHE", str(tmp_path / f"cache-{workers}"))
        pid_log.write_text("")
        recipe = recipe_for(
            tmp_path,
            f"data.train_file={tmp_path / 'train.txt'}",
            f"data.preprocessing_num_workers={workers}",
            "data.grouping=run_clm",
        )
        results[workers] = prepare_splits(recipe, tokenizer, 24, ["train", "validation"], progress=False)
        worker_pids = set(pid_log.read_text().split()) - {str(os.getpid())}
        # One worker tokenizes in this process; two fork a pool per split.
        assert len(worker_pids) == 0 if workers == 1 else len(worker_pids) >= 2
    for name in ("train", "validation"):
        assert np.array_equal(results[1][name].stream, results[2][name].stream)
        assert as_lists(results[1][name]) == as_lists(results[2][name])


def test_max_samples_count_blocks(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(1000))
    base = [f"data.train_file={tmp_path / 'train.txt'}"]
    full = prepare_splits(recipe_for(tmp_path, *base), tokenizer, 16, ["train", "validation"], progress=False)
    limited = prepare_splits(
        recipe_for(tmp_path, *base, "data.max_train_samples=7", "data.max_eval_samples=3"),
        tokenizer,
        16,
        ["train", "validation"],
        progress=False,
    )
    assert len(full["train"].blocks) > 7 and len(full["validation"].blocks) > 3
    assert len(limited["train"].blocks) == 7 and len(limited["validation"].blocks) == 3
    assert as_lists(limited["train"]) == as_lists(full["train"])[:7]
    assert as_lists(limited["validation"]) == as_lists(full["validation"])[:3]
    # A limit above the block count keeps them all.
    larger = prepare_splits(
        recipe_for(tmp_path, *base, "data.max_train_samples=100000"), tokenizer, 16, ["train"], progress=False
    )
    assert len(larger["train"].blocks) == len(full["train"].blocks)


def test_split_without_a_whole_block_names_split_tokens_and_block_size(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    recipe = split_files_recipe(tmp_path, make_lines(200), ["a fox"])
    tokens = len(tokenizer("a fox\n")["input_ids"])
    with pytest.raises(DataError) as caught:
        prepare_splits(recipe, tokenizer, 64, ["validation"], progress=False)
    message = str(caught.value)
    assert "validation" in message and f"{tokens} tokens" in message and "64" in message


# ---------------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_does_not_tokenize_and_overwrite_cache_rebuilds(
    tmp_path, tokenizer, monkeypatch, fresh_cache
):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(800))
    args = [f"data.train_file={tmp_path / 'train.txt'}"]
    first = prepare_splits(
        recipe_for(tmp_path, *args), tokenizer, 16, ["train", "validation"], progress=False
    )
    assert not first["train"].from_cache
    assert first["train"].cache_path.parent.parent == fresh_cache

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("tokenized on a cache hit")

    real_tokenize_split, real_load_raw_splits = (
        tokenization.tokenize_split,
        sources.load_raw_splits,
    )
    monkeypatch.setattr(tokenization, "tokenize_split", refuse)
    monkeypatch.setattr(sources, "load_raw_splits", refuse)
    second = prepare_splits(
        recipe_for(tmp_path, *args), tokenizer, 16, ["train", "validation"], progress=False
    )
    assert calls == [] and second["train"].from_cache and second["validation"].from_cache
    for name in ("train", "validation"):
        assert as_lists(first[name]) == as_lists(second[name])
        assert np.array_equal(first[name].stream, second[name].stream)
        assert first[name].stats.blocks == second[name].stats.blocks

    overwrite = recipe_for(tmp_path, *args, "data.overwrite_cache=true")
    # A cache written since this process started (by rank 0 in a distributed run) is not rebuilt again.
    assert prepare_splits(overwrite, tokenizer, 16, ["train"], progress=False)["train"].from_cache
    # One written by an earlier process is.
    monkeypatch.setattr(cache, "IMPORTED_AT", time.time() + 1)
    with pytest.raises(AssertionError, match="tokenized on a cache hit"):
        prepare_splits(overwrite, tokenizer, 16, ["train"], progress=False)
    monkeypatch.setattr(tokenization, "tokenize_split", real_tokenize_split)
    monkeypatch.setattr(sources, "load_raw_splits", real_load_raw_splits)
    rebuilt = prepare_splits(overwrite, tokenizer, 16, ["train"], progress=False)
    assert not rebuilt["train"].from_cache and as_lists(rebuilt["train"]) == as_lists(first["train"])


def test_the_block_cache_follows_model_cache_dir(tmp_path, tokenizer, monkeypatch):
    """A cluster with a small $HOME quota: model.cache_dir on scratch space takes the blocks too, unless
    $CLM_RUNNER_CACHE names a place of its own."""
    tokenizer.save_pretrained(tmp_path / "tok")
    path = write_lines(tmp_path / "train.txt", make_lines(200))
    recipe = recipe_for(tmp_path, f"data.train_file={path}")  # model.cache_dir = tmp_path/hf
    monkeypatch.delenv("CLM_RUNNER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    split = prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)["train"]
    assert split.cache_path.parent == tmp_path / "hf" / "clm-runner" / "blocks"
    monkeypatch.setenv("CLM_RUNNER_CACHE", str(tmp_path / "mine"))
    split = prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)["train"]
    assert split.cache_path.parent == tmp_path / "mine" / "blocks"
    without = load_recipe(
        None,
        ["model.model_type=gpt2", f"model.tokenizer_name={tmp_path / 'tok'}", f"data.train_file={path}"],
        require_output_dir=False,
    )
    monkeypatch.delenv("CLM_RUNNER_CACHE")
    split = prepare_splits(without, tokenizer, 16, ["train"], progress=False)["train"]
    assert split.cache_path.parent == tmp_path / "home" / ".cache" / "clm-runner" / "blocks"


def test_cache_key_follows_content_block_size_and_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    lines = make_lines(500)
    path = write_lines(tmp_path / "train.txt", lines)
    args = [f"data.train_file={path}"]
    first = prepare_splits(recipe_for(tmp_path, *args), tokenizer, 16, ["train"], progress=False)["train"]
    assert prepare_splits(recipe_for(tmp_path, *args), tokenizer, 16, ["train"], progress=False)[
        "train"
    ].from_cache
    other_size = prepare_splits(recipe_for(tmp_path, *args), tokenizer, 8, ["train"], progress=False)["train"]
    assert not other_size.from_cache and len(other_size.blocks) == len(first.stream) // 8
    other_grouping = prepare_splits(
        recipe_for(tmp_path, *args, "data.grouping=run_clm"), tokenizer, 16, ["train"], progress=False
    )
    assert not other_grouping["train"].from_cache

    # Same size, different bytes: a content change, not a metadata change.
    original = path.read_text()
    path.write_text(original.replace("fox", "dog"))
    assert path.stat().st_size == len(original.encode())
    changed = prepare_splits(recipe_for(tmp_path, *args), tokenizer, 16, ["train"], progress=False)["train"]
    assert not changed.from_cache and changed.cache_path != first.cache_path

    template = train_tokenizer(tmp_path / "tok2", template=True)
    with_template = prepare_splits(recipe_for(tmp_path, *args), template, 16, ["train"], progress=False)[
        "train"
    ]
    assert not with_template.from_cache and len(with_template.stream) > len(changed.stream)


def test_a_crashed_build_leaves_nothing_that_is_trusted(tmp_path, tokenizer, monkeypatch, fresh_cache):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(500))
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.txt'}")
    real_write = cache.write_blocks

    def crash(path, *args, **kwargs):
        real_write(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "write_blocks", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)
    leftovers = list((fresh_cache / "blocks").iterdir())
    assert leftovers == []
    monkeypatch.setattr(cache, "write_blocks", real_write)
    split = prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)["train"]
    assert not split.from_cache and split.stats.blocks == len(split.blocks) > 0


def test_main_process_first_wraps_the_build(tmp_path, tokenizer):
    import contextlib

    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(300))
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.txt'}")
    events = []

    @contextlib.contextmanager
    def main_first(desc):
        events.append(("enter", desc))
        yield
        events.append(("exit", desc))

    real_build = prepare._build_split

    def recording_build(*args, **kwargs):
        events.append(("build",))
        return real_build(*args, **kwargs)

    blocks_build = pytest.MonkeyPatch()
    blocks_build.setattr(prepare, "_build_split", recording_build)
    try:
        prepare_splits(recipe, tokenizer, 16, ["train"], main_process_first=main_first, progress=False)
    finally:
        blocks_build.undo()
    assert [e[0] for e in events] == ["enter", "build", "exit"] and isinstance(events[0][1], str)


def test_progress_false_prints_nothing(tmp_path, tokenizer, capfd):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(300))
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.txt'}")
    capfd.readouterr()
    prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_true_shows_each_phase(tmp_path, tokenizer, capfd):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(300))
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.txt'}")
    prepare_splits(recipe, tokenizer, 16, ["train"], progress=True)
    err = capfd.readouterr().err
    assert "Tokenizing train" in err and "Grouping train" in err and "rows/s" in err


# ---------------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("grouping", ["concat", "run_clm"])
def test_streaming_blocks_carry_over_batches_and_shards(tmp_path, tokenizer, grouping):
    tokenizer.save_pretrained(tmp_path / "tok")
    part_a, part_b = make_lines(1300, seed=7), make_lines(900, seed=8)
    write_lines(tmp_path / "a.txt", part_a)
    write_lines(tmp_path / "b.txt", part_b)
    recipe = split_files_recipe(
        tmp_path,
        f"[{str(tmp_path / 'a.txt')!r}, {str(tmp_path / 'b.txt')!r}]",
        make_lines(100, seed=9),
        "data.streaming=true",
        f"data.grouping={grouping}",
    )
    split = prepare_splits(recipe, tokenizer, 40, ["train"], progress=False)["train"]
    assert split.stream is None and split.stats is None
    got = [row["input_ids"].tolist() for row in split.blocks]
    rows = reference_rows(tokenizer, [line + "\n" for line in part_a + part_b])
    if grouping == "concat":
        # No token lost at the 1000-row batch edges nor at the a.txt/b.txt edge.
        assert got == reference_concat(rows, 40)
    else:
        assert got == reference_run_clm(rows, 40)
    first = next(iter(split.blocks))
    assert first["input_ids"].dtype == torch.int64 and torch.equal(first["input_ids"], first["labels"])


def test_streaming_max_train_samples_takes_blocks(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(600))
    recipe = recipe_for(
        tmp_path,
        f"data.train_file={tmp_path / 'train.txt'}",
        "data.streaming=true",
        "data.max_train_samples=5",
    )
    split = prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)["train"]
    assert len(list(split.blocks)) == 5


def test_tokenizer_whose_python_call_differs_from_its_backend_is_followed_exactly(
    tmp_path, tokenizer, caplog
):
    from transformers import PreTrainedTokenizerFast

    class ShoutingTokenizer(PreTrainedTokenizerFast):
        """Upper-cases text in Python before the backend sees it: the backend alone would be wrong."""

        def __call__(self, text, *args, **kwargs):
            text = [t.upper() for t in text] if isinstance(text, list) else text.upper()
            return super().__call__(text, *args, **kwargs)

    tokenizer.save_pretrained(tmp_path / "tok")
    shouting = ShoutingTokenizer.from_pretrained(tmp_path / "tok")
    lines = make_lines(300, seed=11)
    write_lines(tmp_path / "train.txt", lines)
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.txt'}")
    with caplog.at_level(logging.WARNING, logger="clm_runner.data"):
        split = prepare_splits(recipe, shouting, 16, ["train"], progress=False)["train"]
    assert "differs from its Rust backend" in caplog.text
    rows = reference_rows(shouting, [line + "\n" for line in lines[15:]])
    assert rows != reference_rows(tokenizer, [line + "\n" for line in lines[15:]])
    assert as_lists(split) == reference_concat(rows, 16)


@pytest.mark.parametrize("pieces", [[], [[]], [[1, 2, 3]], [[5], [], list(range(100_000))]])
def test_npy_stream_writer_writes_a_loadable_array(tmp_path, pieces):
    path = tmp_path / "stream.npy"
    writer = tokenization.NpyStreamWriter(path, np.dtype("int32"))
    for piece in pieces:
        writer.write(np.array(piece, dtype=np.int64))
    writer.close()
    expected = np.array(list(chain(*pieces)), dtype=np.int32)
    for loaded in (np.load(path), np.load(path, mmap_mode="r")):
        assert loaded.dtype == np.int32 and np.array_equal(loaded, expected)


@pytest.mark.parametrize("damage", ["truncate_arrow", "drop_stream", "wrong_meta"])
def test_a_damaged_cache_is_rebuilt(tmp_path, tokenizer, damage):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_lines(tmp_path / "train.txt", make_lines(500))
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.txt'}")
    first = prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)["train"]
    expected = as_lists(first)
    path = first.cache_path
    del first
    if damage == "truncate_arrow":
        data = (path / "blocks.arrow").read_bytes()
        (path / "blocks.arrow").write_bytes(data[: len(data) // 2])
    elif damage == "drop_stream":
        (path / "stream.npy").unlink()
    else:
        meta = json.loads((path / "meta.json").read_text())
        meta["stats"]["blocks"] += 1
        (path / "meta.json").write_text(json.dumps(meta))
    again = prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)["train"]
    assert not again.from_cache and as_lists(again) == expected
    assert prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)["train"].from_cache


def test_truncation_left_on_the_backend_neither_cuts_rows_nor_changes_the_key(
    tmp_path, tokenizer, monkeypatch
):
    tokenizer.save_pretrained(tmp_path / "tok")
    lines = [" ".join(make_lines(40, seed=12))]  # one long row
    write_lines(tmp_path / "train.txt", lines * 30)
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.txt'}")
    from transformers import AutoTokenizer

    clean = prepare_splits(
        recipe, AutoTokenizer.from_pretrained(tmp_path / "tok"), 16, ["train"], progress=False
    )["train"]
    truncating = AutoTokenizer.from_pretrained(tmp_path / "tok")
    truncating.backend_tokenizer.enable_truncation(max_length=8)
    truncating.backend_tokenizer.enable_padding(length=8)
    again = prepare_splits(recipe, truncating, 16, ["train"], progress=False)["train"]
    assert again.from_cache and again.cache_path.name == clean.cache_path.name  # the same key
    # Built afresh (an empty cache) by the truncating tokenizer: no row is cut, none padded.
    monkeypatch.setenv("CLM_RUNNER_CACHE", str(tmp_path / "fresh-cache"))
    fresh = prepare_splits(recipe, truncating, 16, ["train"], progress=False)["train"]
    assert not fresh.from_cache and fresh.cache_path.name == clean.cache_path.name
    rows = reference_rows(tokenizer, [lines[0] + "\n"] * 28)
    assert len(rows[0]) > 8 and as_lists(fresh) == as_lists(clean) == reference_concat(rows, 16)


# ---------------------------------------------------------------------------------------------------
# run_clm with worker processes, null rows


@pytest.mark.parametrize("workers", [2, 3, 7])
def test_run_clm_grouping_reproduces_run_clm_run_with_worker_processes(tmp_path, tokenizer, workers):
    """datasets.map(num_proc=N) cuts the rows into N contiguous shards and restarts the 1000-row batches in
    each: run_clm's dropped remainders, and so its blocks, depend on --preprocessing_num_workers."""
    import datasets

    tokenizer.save_pretrained(tmp_path / "tok")
    lines = make_lines(2500, seed=21)
    recipe = split_files_recipe(
        tmp_path,
        lines,
        make_lines(50, seed=22),
        "data.grouping=run_clm",
        f"data.run_clm_preprocessing_num_workers={workers}",
    )
    ours = as_lists(prepare_splits(recipe, tokenizer, 24, ["train"], progress=False)["train"])

    # run_clm's own calls: tokenize, then group_texts with datasets.map(batched=True, num_proc=N).
    raw = datasets.Dataset.from_dict({"text": [line + "\n" for line in lines]})
    tokenized = raw.map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"], num_proc=workers
    )

    def group_texts(examples):
        ids = list(chain(*examples["input_ids"]))
        total = len(ids) // 24 * 24
        return {"input_ids": [ids[i : i + 24] for i in range(0, total, 24)]}

    grouped = tokenized.map(
        group_texts, batched=True, num_proc=workers, remove_columns=tokenized.column_names
    )
    assert ours == grouped["input_ids"]
    single = reference_run_clm(reference_rows(tokenizer, [line + "\n" for line in lines]), 24)
    assert ours != single  # the worker count really changes run_clm's blocks on this data


def test_null_text_rows_are_skipped_and_counted(tmp_path, caplog):
    """A null row used to become "" and, with a tokenizer that adds BOS/EOS, a stray pair of special tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = train_tokenizer(tmp_path / "tok", template=True)
    texts = [line + "\n" for line in make_lines(300, seed=23)]
    with_nulls = [None if i % 10 == 3 else text for i, text in enumerate(texts)]
    pq.write_table(pa.table({"text": with_nulls}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": texts[:40]}), tmp_path / "valid.parquet")
    recipe = recipe_for(
        tmp_path,
        f"data.train_file={tmp_path / 'train.parquet'}",
        f"data.validation_file={tmp_path / 'valid.parquet'}",
    )
    with caplog.at_level(logging.WARNING, logger="clm_runner.data"):
        split = prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)["train"]
    rows = reference_rows(tokenizer, [t for t in with_nulls if t is not None])
    assert split.stream.tolist() == list(chain(*rows))  # no tokens at all for a null row
    assert split.stats.null_rows == 30 and split.stats.rows == 300
    assert "Skipped 30 of the 300 rows of the train split: their text is null" in caplog.text


def test_the_text_column_picked_when_none_is_set_is_logged(tmp_path, tokenizer, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer.save_pretrained(tmp_path / "tok")
    pq.write_table(pa.table({"id": list(range(300)), "body": make_lines(300)}), tmp_path / "train.parquet")
    recipe = recipe_for(tmp_path, f"data.train_file={tmp_path / 'train.parquet'}")
    for _ in ("built", "from the cache"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="clm_runner.data"):
            prepare_splits(recipe, tokenizer, 16, ["train"], progress=False)
        assert "The train split's text is in column 'body' (data.text_column is unset" in caplog.text
