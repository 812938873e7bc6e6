"""Text generation from a saved run: seeding, greedy determinism, prompt prefix and option checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import EOS, byte_level_tokenizer, tiny_gpt2_config
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from clm_runner.errors import ClmError, ModelError
from clm_runner.models.generate import GenerationOptionError, generate_text

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the previous ones.",
    "Perplexity is the exponential of the mean cross-entropy in nats.",
    "Small models train fast on two CPU cores.",
] * 20


def _save_model(directory: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = tiny_gpt2_config(
        n_layer=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def byte_level_run(tmp_path_factory) -> Path:
    tokenizer = byte_level_tokenizer(CORPUS, vocab_size=320, eos_token=EOS, bos_token=EOS)
    return _save_model(tmp_path_factory.mktemp("byte-level-run"), tokenizer)


@pytest.fixture(scope="module")
def lossy_tokenizer_run(tmp_path_factory) -> Path:
    """Lowercasing word-level tokenizer: decode(encode(prompt)) differs from the prompt."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(CORPUS, trainer=trainers.WordLevelTrainer(special_tokens=["[UNK]", EOS]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token="[UNK]")
    return _save_model(tmp_path_factory.mktemp("lossy-run"), tokenizer)


PROMPT = "The quick brown"


def test_same_seed_repeats_and_different_seeds_differ(byte_level_run):
    first = generate_text(byte_level_run, PROMPT, max_new_tokens=20, seed=1, num_samples=3, device="cpu")
    again = generate_text(byte_level_run, PROMPT, max_new_tokens=20, seed=1, num_samples=3, device="cpu")
    other = generate_text(byte_level_run, PROMPT, max_new_tokens=20, seed=2, num_samples=3, device="cpu")
    assert first == again
    assert len(first) == len(other) == 3
    # Three 20-token samples from a random ~320-token model coincide with negligible probability.
    assert first != other
    assert len(set(first)) > 1  # the samples within one call differ too
    assert all(text.startswith(PROMPT) for text in first + other)
    # A sample may legitimately stop at once by drawing EOS; not all six can.
    assert any(len(text) > len(PROMPT) for text in first + other)


def test_seeded_call_leaves_the_global_random_state_alone(byte_level_run):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_text(byte_level_run, PROMPT, max_new_tokens=5, seed=7, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_greedy_is_deterministic_and_matches_argmax_decoding(byte_level_run):
    greedy = generate_text(byte_level_run, PROMPT, max_new_tokens=8, temperature=0, device="cpu")
    assert greedy == generate_text(
        byte_level_run, PROMPT, max_new_tokens=8, temperature=0, seed=99, device="cpu"
    )

    tokenizer = PreTrainedTokenizerFast.from_pretrained(byte_level_run)
    model = GPT2LMHeadModel.from_pretrained(byte_level_run).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
    assert greedy == [tokenizer.decode(ids, skip_special_tokens=True)]


@pytest.mark.parametrize("count", [1, 4])
def test_num_samples_is_the_number_of_texts(byte_level_run, count):
    texts = generate_text(byte_level_run, PROMPT, max_new_tokens=3, seed=0, num_samples=count, device="cpu")
    assert len(texts) == count


def test_prompt_is_kept_verbatim_when_the_tokenizer_cannot_reproduce_it(lossy_tokenizer_run):
    prompt = "The QUICK brown Zebra!"  # uppercase is folded, "zebra" and "!" are unknown words
    tokenizer = PreTrainedTokenizerFast.from_pretrained(lossy_tokenizer_run)
    assert tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True) != prompt
    texts = generate_text(lossy_tokenizer_run, prompt, max_new_tokens=6, seed=3, num_samples=2, device="cpu")
    assert all(text.startswith(prompt) for text in texts)
    continuation_words = texts[0][len(prompt) :].split()
    assert continuation_words and set(continuation_words) <= set(tokenizer.get_vocab())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        ({"top_p": 1.5}, "top_p must be in \\(0, 1\\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"num_samples": 2, "temperature": 0}, "greedy decoding has one answer"),
        ({"max_new_tokens": 64}, "exceeds the model's context of 64 tokens"),
    ],
)
def test_bad_options_are_user_errors(byte_level_run, options, message):
    with pytest.raises(GenerationOptionError, match=message) as caught:
        generate_text(byte_level_run, PROMPT, device="cpu", **options)
    assert isinstance(caught.value, ClmError)


def test_missing_or_non_model_directories_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        generate_text(tmp_path / "nowhere", PROMPT)
    with pytest.raises(ModelError, match="no config.json"):
        generate_text(tmp_path, PROMPT)


def test_a_model_dir_whose_tokenizer_is_missing_or_cannot_be_built_is_a_model_error(byte_level_run, tmp_path):
    """Without its tokenizer files transformers builds an empty tokenizer (generate printed the prompt alone,
    exit 0); a broken one raised a ValueError traceback."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(byte_level_run / name, bare / name)
    with pytest.raises(ModelError, match=r"holds no tokenizer \(tokenizer.json, .*\)"):
        generate_text(bare, PROMPT, device="cpu")
    (bare / "tokenizer.json").write_text("not json")
    with pytest.raises(ModelError, match=r"Can't load tokenizer '.*bare'"):
        generate_text(bare, PROMPT, device="cpu")
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizer"}')
    with pytest.raises(ModelError, match=r"Can't load tokenizer '.*bare': "):
        generate_text(bare, PROMPT, device="cpu")
