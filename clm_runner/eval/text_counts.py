"""UTF-8 bytes and whitespace words of the text a set of scored token spans stands for (bits per byte, word
perplexity), counted the same way for blocks and strided windows.

Decoding a span on its own is not the same as cutting it out of the decoded whole: with byte-level BPE a
character can be split over two tokens, so a span edge between them decodes to U+FFFD (3 bytes) instead of
the character's bytes, and a word cut in two would be counted once per span. So every span is decoded in
its place in the token stream, with the tokens before it (`left`) and after it (`right`):

- the text "finished" by a token sequence is the part of its decode that more tokens can no longer change:
  the common prefix of decode(ids) and decode(ids + the next few tokens). A character belongs to the span
  of the token that completes it; a word, to the span of the token that starts it.
- a span's count is count(finished(left + span)) - count(finished(left)): both share the same left edge,
  so whatever that edge breaks cancels.

Summed over spans that tile a text (strided windows) this telescopes to the count of the whole text,
exactly; over blocks, whose first tokens are not scored, it counts what the scored tokens finish. Edge
effects of a decoder (a split UTF-8 character: at most 3 more byte tokens; a stripped leading space, a
dropped "##": one token) reach fewer tokens than `LEFT_CONTEXT_TOKENS` and `RIGHT_CONTEXT_TOKENS`.
Decoding skips special tokens and does no "clean up" of spaces, so the count is of the text itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clm_runner.data.blocks import BlockContext
from clm_runner.errors import ModelError

LEFT_CONTEXT_TOKENS = 16
RIGHT_CONTEXT_TOKENS = 4
"""A UTF-8 character is at most 4 bytes: at most 3 more byte tokens finish one a span cuts."""


@dataclass(frozen=True)
class TextSpan:
    """Scored token ids and the stream tokens around them (empty where the stream ends or is unknown)."""

    left: np.ndarray
    span: np.ndarray
    right: np.ndarray


def context_span(context: BlockContext, index: int) -> TextSpan:
    """Block `index`'s scored tokens (all but its first) with the stream tokens around them."""
    start = int(context.starts[index])
    first_scored, end = start + 1, start + context.block_size
    return TextSpan(
        left=np.asarray(context.stream[max(0, first_scored - LEFT_CONTEXT_TOKENS) : first_scored]),
        span=np.asarray(context.stream[first_scored:end]),
        right=np.asarray(context.stream[end : end + RIGHT_CONTEXT_TOKENS]),
    )


def block_span(
    row: np.ndarray, previous: np.ndarray | None = None, following: np.ndarray | None = None
) -> TextSpan:
    """A block's scored tokens, with its neighbours in the stream when they are known to be adjacent."""
    left = row[:1] if previous is None else np.concatenate([previous[-(LEFT_CONTEXT_TOKENS - 1) :], row[:1]])
    right = row[:0] if following is None else following[:RIGHT_CONTEXT_TOKENS]
    return TextSpan(left=left, span=row[1:], right=right)


class TextCounter:
    """Counts bytes and words of TextSpans with one tokenizer's decoder."""

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The Rust decoder of a fast tokenizer decodes a batch in parallel; transformers' batch_decode
            # loops in Python and adds nothing when clean-up is off.
            self._decode_batch = lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True)
        elif hasattr(tokenizer, "decode_batch"):  # a bare `tokenizers.Tokenizer`
            self._decode_batch = lambda seqs: tokenizer.decode_batch(seqs, skip_special_tokens=True)
        elif hasattr(tokenizer, "batch_decode"):
            self._decode_batch = lambda seqs: tokenizer.batch_decode(
                seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        else:
            raise ModelError(
                f"the tokenizer {type(tokenizer).__name__} cannot decode token ids: "
                "pass a Hugging Face tokenizer to count bytes and words"
            )

    def counts(self, spans: Sequence[TextSpan]) -> tuple[int, int]:
        """Total (bytes, words) of the text the spans finish (a single span may count negative words)."""
        sequences: list[list[int]] = []
        for item in spans:
            left, span, right = (np.asarray(a).tolist() for a in (item.left, item.span, item.right))
            # finished(left) = common prefix of decode(left) and decode(left + span[:k]); likewise for
            # left + span with the tokens to its right.
            sequences += [left, left + span[:RIGHT_CONTEXT_TOKENS], left + span, left + span + right]
        texts = self._decode_batch(sequences)
        n_bytes = n_words = 0
        for i in range(0, len(texts), 4):
            before = os.path.commonprefix([texts[i], texts[i + 1]])
            after = os.path.commonprefix([texts[i + 2], texts[i + 3]])
            n_bytes += len(after.encode("utf-8")) - len(before.encode("utf-8"))
            n_words += len(after.split()) - len(before.split())
        return n_bytes, n_words
