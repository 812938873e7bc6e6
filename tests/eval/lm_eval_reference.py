"""lm-evaluation-harness itself as the reference of `eval --documents`: its HFLM on a local model, offline, and the
`wikitext` task's per-document counts and aggregation (lm-eval's own functions, nothing re-implemented)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from helpers import ASSETS, tiny_gpt2_config

MAX_LENGTH = 32
"""The test models' positions: most test documents are several windows long."""


def save_model(directory: Path, *, seed: int = 0, bos_tokenizer: bool = False) -> Path:
    """A seeded random 2-layer GPT-2 of MAX_LENGTH positions with the smoke tokenizer (or, with `bos_tokenizer`,
    one that puts <|endoftext|> before every text, as Llama's tokenizers put their BOS)."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(tiny_gpt2_config(n_layer=2, n_positions=MAX_LENGTH)).save_pretrained(directory)
    if not bos_tokenizer:
        for file in (ASSETS / "tokenizer").iterdir():
            shutil.copy(file, directory / file.name)
        return directory
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = AutoTokenizer.from_pretrained(ASSETS / "tokenizer").backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eos, eos_token=eos).save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class Reference:
    """What lm-eval's `wikitext` task reports for some documents, and what lay under it."""

    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    tokens: int
    words: int
    bytes: int
    token_counts: list[int]


def lm_eval_figures(
    model_dir: Path,
    scored: Sequence[str],
    original: Sequence[str] | None = None,
    *,
    batch_size: int = 3,
    max_length: int | None = None,
) -> Reference:
    """HFLM.loglikelihood_rolling of each text in `scored`, aggregated as the wikitext task does with words and
    bytes counted on `original` (default: the scored texts)."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    original = list(scored if original is None else original)
    options = {"max_length": max_length} if max_length is not None else {}
    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=batch_size, dtype="float32", **options)
    requests = [
        Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=0, doc_id=i)
        for i, text in enumerate(scored)
    ]
    loglikelihoods = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    per_document = [
        process_results({"page": page}, [ll]) for page, ll in zip(original, loglikelihoods, strict=True)
    ]
    token_counts = [len(lm.tok_encode(text)) for text in scored]
    return Reference(
        word_perplexity=weighted_perplexity([d["word_perplexity"] for d in per_document]),
        byte_perplexity=weighted_perplexity([d["byte_perplexity"] for d in per_document]),
        bits_per_byte=bits_per_byte([d["bits_per_byte"] for d in per_document]),
        tokens=sum(token_counts),
        words=sum(d["word_perplexity"][1] for d in per_document),
        bytes=sum(d["byte_perplexity"][1] for d in per_document),
        token_counts=token_counts,
    )
