"""A byte-level BPE tokenizer like GPT-2's, trained on your own text (for training a model from scratch).

The smoke recipe's tokenizer (scripts/build_smoke_assets.py), the benchmarks' and the tests' tiny ones are
all built here, so they differ only in their vocabulary size and their text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"


def train_byte_level_bpe(
    *,
    vocab_size: int,
    texts: Iterable[str] | None = None,
    files: Sequence[str | Path] | None = None,
    special_tokens: Sequence[str] = (EOS,),
    byte_level_post_processor: bool = False,
) -> Any:
    """A `tokenizers.Tokenizer`: byte-level pre-tokenizer and decoder (every byte is in the alphabet, so no
    text is unknown), BPE merges learned from `texts` or `files` up to `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if (texts is None) == (files is None):
        raise ValueError("give texts or files to train the tokenizer on, not both")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if byte_level_post_processor:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if files is not None:
        backend.train([str(f) for f in files], trainer)
    else:
        backend.train_from_iterator(texts, trainer)
    return backend


def as_transformers_tokenizer(backend: Any, **special: Any) -> Any:
    """The tokenizer wrapped for transformers (`eos_token=...`, `model_max_length=...`, ...)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)
