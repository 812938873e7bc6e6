"""Checks that the committed smoke-test assets load offline, round-trip, and match their generator."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
from helpers import ASSETS, REPO

REPO_ROOT = REPO
SMOKE_DIR = ASSETS
TOKENIZER_DIR = SMOKE_DIR / "tokenizer"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_smoke_assets.py"
EXPECTED_VOCAB_SIZE = 2048
EOS_TOKEN = "<|endoftext|>"
# A top-level WikiText heading; section headings (` = = X = = `) do not match.
TITLE_LINE = re.compile(r"^ = ([^=].*) = $")


def _read_split(name: str) -> str:
    # strict decoding: any invalid byte fails the test here rather than later in training
    return (SMOKE_DIR / f"{name}.txt").read_bytes().decode("utf-8", errors="strict")


def _titles(text: str) -> list[str]:
    return [match.group(1) for line in text.split("\n") if (match := TITLE_LINE.match(line))]


def _paragraphs(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip() and not line.startswith(" = ")]


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_smoke_assets", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the script executes
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def test_tokenizer_loads_offline_with_expected_vocab_and_eos(tokenizer):
    assert len(tokenizer) == EXPECTED_VOCAB_SIZE
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) == tokenizer.eos_token_id
    assert 0 <= tokenizer.eos_token_id < EXPECTED_VOCAB_SIZE
    assert tokenizer.model_max_length == 1024


def test_tokenizer_round_trips_validation_text(tokenizer):
    text = _read_split("validation")
    ids = tokenizer(text, verbose=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < EXPECTED_VOCAB_SIZE


def test_transformers_wrapper_matches_raw_tokenizers_file(tokenizer):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    sample = _read_split("validation")[:5000]
    assert tokenizer(sample, add_special_tokens=False)["input_ids"] == raw.encode(sample).ids


def test_text_files_are_nonempty_wikitext_style_utf8():
    for name in ("train", "validation"):
        text = _read_split(name)
        assert text.strip(), name
        assert text.startswith(" = ")
        assert len(_titles(text)) > 10, name
        assert " = = " in text, name
    total_bytes = sum((SMOKE_DIR / f"{name}.txt").stat().st_size for name in ("train", "validation"))
    assert total_bytes < 400_000


def test_validation_articles_do_not_appear_in_train():
    train_text, validation_text = _read_split("train"), _read_split("validation")
    validation_titles = _titles(validation_text)
    assert len(validation_titles) == len(set(validation_titles))
    assert set(validation_titles).isdisjoint(_titles(train_text))
    train_paragraphs = set(_paragraphs(train_text))
    assert not [p for p in _paragraphs(validation_text) if p in train_paragraphs]


def test_build_script_reproduces_committed_assets(tmp_path):
    _load_build_script().build(tmp_path)
    for name in ("train.txt", "validation.txt", "harbour/train.txt", "harbour/validation.txt"):
        assert (tmp_path / name).read_bytes() == (SMOKE_DIR / name).read_bytes(), name
    # Compared as parsed JSON so a tokenizers upgrade that only reformats the file does not fail here.
    rebuilt = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    committed = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert rebuilt["model"]["vocab"] == committed["model"]["vocab"]
    assert rebuilt["model"]["merges"] == committed["model"]["merges"]
    assert rebuilt["added_tokens"] == committed["added_tokens"]
