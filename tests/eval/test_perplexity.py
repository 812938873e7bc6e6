"""Perplexity math checked against independent per-block and per-window computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import EOS, byte_level_tokenizer, tiny_gpt2_config
from tolerances import FORWARD_RTOL

from clm_runner.errors import DataError, EvalError
from clm_runner.eval.perplexity import (
    PerplexityResult,
    StridedWindows,
    evaluate_blocks,
    evaluate_strided,
)
from clm_runner.eval.text_counts import BlockContext

# Prose with multi-byte characters (accents, dashes, CJK, emoji) and non-ASCII whitespace (no-break
# space U+00A0, ideographic space U+3000), so a small byte-level vocabulary splits characters over
# several tokens and span edges fall inside characters and words.
FIXTURE_PARAGRAPHS = [
    "The lighthouse keeper wrote every evening in a narrow notebook with a green cover. "
    "He noted the wind, the height of the swell, the ships that passed and the birds that did not.",
    "On Tuesdays the supply boat came from the mainland with flour, lamp oil, letters and newspapers "
    "that were already a week old; he read them anyway, slowly, from the first page to the last.",
    "Café au lait, crème brûlée and a naïve façade: the cook’s menu was written in a French he had "
    "learned from tins and labels — résumé, déjà vu, über, jalapeño.",
    "Numbers mattered to him: 1,024 steps to the lamp room, 3.5 metres of tide, 17 gulls on the rail, "
    "and 42 candles stored for the winter in case the generator failed again.",
    "A visiting scholar left a card that read 東京大学 and a short poem: 古池や 蛙飛び込む 水の音. "
    "He pinned it above the stove, next to a postcard from Zürich and a map of the Øresund.",
    "Some nights the fog was so thick that the beam seemed to stop a few metres from the glass. "
    "He would stand outside and listen for engines instead, counting the seconds between horns.",
    "His niece sent messages full of little pictures 🙂🌊⚓ and questions about whether he was lonely. "
    "He answered that the sea was company enough, which was true on most days and false on a few.",
    "In spring the keeper painted the railings white\u00a0again, scraped the salt from the windows\u3000"
    "and oiled the hinges of the heavy iron door that led to the gallery.",
    "The log for the year closed with a list: two storms, one rescue, no wrecks, a new radio, "
    "and a cat that arrived on the supply boat and refused to leave.",
    "Every tenth line of the notebook was a weather forecast he made himself, and he scored it the "
    "next day: right, wrong, or half right, which he counted as wrong to keep himself honest.",
]
FIXTURE_TEXT = "\n\n".join(FIXTURE_PARAGRAPHS * 3)

N_POSITIONS = 64


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer(FIXTURE_PARAGRAPHS, eos_token=EOS)


@pytest.fixture(scope="module")
def stream(tokenizer) -> np.ndarray:
    ids = np.asarray(tokenizer(FIXTURE_TEXT)["input_ids"], dtype=np.int64)
    # The byte-level vocabulary is small enough that characters really are split over tokens.
    single_tokens = [tokenizer.decode([t]) for t in ids[:400]]
    assert any("\ufffd" in text for text in single_tokens)
    return ids


@pytest.fixture(scope="module")
def model(tokenizer, stream):
    """A tiny GPT-2 trained for a few steps, so its predictions (and accuracy) are not uniform noise."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = tiny_gpt2_config(
        n_layer=2,
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    lm = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    training_blocks = torch.as_tensor(stream[: (len(stream) // 32) * 32].reshape(-1, 32))
    for _ in range(40):
        loss = lm(input_ids=training_blocks, labels=training_blocks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lm.eval()
    return lm


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(
        np.asarray(ids).tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def _counts(result: PerplexityResult) -> tuple:
    """The integer totals of a result: exact, whatever the batching or sharding."""
    return (result.tokens, result.correct, result.n_bytes, result.n_words, result.samples)


def _relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b))


def _naive_blocks(model, blocks: np.ndarray) -> tuple[float, int, int]:
    """Full logits of each whole block, log-softmax, gather each next token's NLL."""
    nll_sum, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for block in blocks:
            ids = torch.as_tensor(block)[None]
            log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            predicted, targets = log_probs[:-1], ids[0, 1:]
            nll_sum += -predicted.gather(1, targets[:, None]).sum().item()
            count += len(targets)
            correct += int((predicted.argmax(-1) == targets).sum())
    return nll_sum, count, correct


def _naive_strided(
    model, stream: np.ndarray, context: int, stride: int
) -> tuple[float, int, int, int, np.ndarray]:
    """One window at a time with full logits; -100 labels hide targets an earlier window scored."""
    times_scored = np.zeros(len(stream), dtype=np.int64)
    nll_sum, count, correct, n_windows = 0.0, 0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(stream) - 1, stride):
            n_windows += 1
            end = min(begin + context, len(stream) - 1)
            logits = model(torch.as_tensor(stream[begin:end])[None]).logits[0]
            labels = torch.as_tensor(stream[begin + 1 : end + 1]).clone()
            already_scored = torch.as_tensor(times_scored[begin + 1 : end + 1] > 0)
            labels[already_scored] = -100
            valid = labels != -100
            n_valid = int(valid.sum())
            times_scored[begin + 1 : end + 1][~already_scored.numpy()] += 1
            if n_valid:
                mean_nll = F.cross_entropy(logits, labels, ignore_index=-100).item()
                nll_sum += mean_nll * n_valid
                count += n_valid
                correct += int((logits.argmax(-1)[valid] == labels[valid]).sum())
            if end == len(stream) - 1:
                break
    return nll_sum, count, correct, n_windows, times_scored


def test_blocks_match_independent_per_block_computation(model, stream):
    blocks = stream[: 9 * 16].reshape(9, 16)
    result = evaluate_blocks(model, blocks, batch_size=4)
    nll_sum, count, correct = _naive_blocks(model, blocks)
    assert result.tokens == count == 9 * 15
    assert result.samples == 9
    assert result.context == 16 and result.stride is None and result.method == "blocks"
    assert _relative_difference(result.nll_sum, nll_sum) < FORWARD_RTOL
    assert _relative_difference(result.eval_loss, nll_sum / count) < FORWARD_RTOL
    assert correct > 0
    assert result.correct == correct


def test_blocks_accept_a_dataset_with_extra_columns(model, stream):
    from datasets import Dataset

    blocks = stream[: 7 * 16].reshape(7, 16)
    dataset = Dataset.from_dict(
        {
            "input_ids": blocks.tolist(),
            "attention_mask": np.ones_like(blocks).tolist(),
            "labels": blocks.tolist(),
        }
    )
    from_dataset = evaluate_blocks(model, dataset, batch_size=3)
    from_array = evaluate_blocks(model, blocks, batch_size=3)
    assert from_dataset == from_array


@pytest.mark.parametrize(
    ("context", "stride", "n_tokens"),
    [
        (16, 8, 201),  # overlapping windows, stride divides the length
        (16, 16, 161),  # stride == context: disjoint input blocks
        (16, 5, 203),  # stride does not divide the length
        (16, 7, 100),  # last window shorter than the context
        (32, 8, 20),  # stream shorter than the context: one window
        (16, 16, 17),  # exactly one full window
        (16, 1, 40),  # one new token per window
        (N_POSITIONS, 24, 300),  # context == the model's positions
        (8, 3, 2),  # the smallest stream
    ],
)
def test_strided_matches_independent_window_loop(model, stream, context, stride, n_tokens):
    tokens = stream[:n_tokens]
    result = evaluate_strided(model, tokens, context=context, stride=stride, batch_size=3)
    nll_sum, count, correct, n_windows, times_scored = _naive_strided(model, tokens, context, stride)
    assert times_scored[0] == 0 and (times_scored[1:] == 1).all()
    assert result.tokens == count == n_tokens - 1
    assert _relative_difference(result.nll_sum, nll_sum) < FORWARD_RTOL
    assert result.correct == correct
    assert result.samples == n_windows
    assert (result.method, result.context, result.stride) == ("strided", context, stride)


def test_strided_equals_hf_guide_loop_with_max_length_context_plus_one(model, stream):
    """The guide's loop verbatim (labels, model-computed mean loss), token-weighted, max_length = L + 1."""
    tokens = torch.as_tensor(stream[:150])[None]
    context, stride = 20, 6
    max_length = context + 1
    nll_sum, n_loss_tokens, prev_end_loc = 0.0, 0, 0
    with torch.no_grad():
        for begin_loc in range(0, tokens.size(1), stride):
            end_loc = min(begin_loc + max_length, tokens.size(1))
            trg_len = end_loc - prev_end_loc
            input_ids = tokens[:, begin_loc:end_loc]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = model(input_ids, labels=target_ids).loss
            scored = int((target_ids[:, 1:] != -100).sum())  # the model shifts labels left by one
            nll_sum += loss.item() * scored
            n_loss_tokens += scored
            prev_end_loc = end_loc
            if end_loc == tokens.size(1):
                break
    result = evaluate_strided(model, stream[:150], context=context, stride=stride, batch_size=4)
    assert result.tokens == n_loss_tokens == 149
    assert _relative_difference(result.nll_sum, nll_sum) < FORWARD_RTOL


def test_stride_equal_to_context_is_blocks_sharing_one_token_with_the_previous_window(model, stream):
    context = 12
    tokens = stream[: 10 * context + 1]
    # Block k is the window's `context` input tokens plus the next one; consecutive blocks overlap by one.
    overlapping_blocks = np.stack([tokens[k * context : k * context + context + 1] for k in range(10)])
    strided = evaluate_strided(model, tokens, context=context, stride=context, batch_size=4)
    blocks = evaluate_blocks(model, overlapping_blocks, batch_size=4)
    assert strided.tokens == blocks.tokens == len(tokens) - 1
    assert _relative_difference(strided.nll_sum, blocks.nll_sum) < FORWARD_RTOL
    assert strided.correct == blocks.correct


def test_windows_tile_the_stream_for_many_settings():
    for n_tokens in range(2, 60):
        for context in range(1, 14):
            for stride in range(1, context + 1):
                windows = StridedWindows(n_tokens=n_tokens, context=context, stride=stride)
                all_windows = [windows.window(k) for k in range(windows.count)]
                assert all_windows[-1].scored_end == n_tokens
                next_unscored = 1
                for k, window in enumerate(all_windows):
                    assert window.input_start == k * stride
                    assert 0 < window.input_end - window.input_start <= context
                    # Scored targets are the next unscored ones, each predicted from inside the window.
                    assert window.scored_start == next_unscored
                    assert window.input_start < window.scored_start < window.scored_end
                    assert window.scored_end == window.input_end + 1
                    next_unscored = window.scored_end


def test_only_scored_positions_reach_the_lm_head(model, stream):
    head_rows: list[int] = []
    hook = model.lm_head.register_forward_hook(
        lambda module, args, output: head_rows.append(args[0].shape[1])
    )
    try:
        evaluate_strided(model, stream[:200], context=16, stride=4, batch_size=8)
    finally:
        hook.remove()
    # First window: all 16 positions; the others: the 4 new targets (the last window may have fewer).
    assert head_rows[0] == 16
    assert set(head_rows[1:-1]) == {4}
    assert head_rows[-1] <= 4


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_results_do_not_depend_on_batch_size(model, tokenizer, stream, batch_size):
    tokens = stream[:230]
    reference_strided = evaluate_strided(
        model, tokens, context=16, stride=6, batch_size=7, tokenizer=tokenizer
    )
    strided = evaluate_strided(
        model, tokens, context=16, stride=6, batch_size=batch_size, tokenizer=tokenizer
    )
    blocks = tokens[: 14 * 16].reshape(14, 16)
    reference_blocks = evaluate_blocks(model, blocks, batch_size=7, tokenizer=tokenizer)
    batched_blocks = evaluate_blocks(model, blocks, batch_size=batch_size, tokenizer=tokenizer)
    for result, reference in [(strided, reference_strided), (batched_blocks, reference_blocks)]:
        # Rows in batches of another shape: the same float32 forward, rounded in another order.
        assert _relative_difference(result.nll_sum, reference.nll_sum) < FORWARD_RTOL
        assert _counts(result) == _counts(reference)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_add_up_to_the_unsharded_result(model, tokenizer, stream, world):
    tokens = stream[:260]
    blocks = tokens[: 13 * 20].reshape(13, 20)
    runs = [
        lambda shard: evaluate_strided(
            model, tokens, context=20, stride=7, batch_size=2, tokenizer=tokenizer, shard=shard
        ),
        lambda shard: evaluate_blocks(model, blocks, batch_size=2, tokenizer=tokenizer, shard=shard),
    ]
    for run in runs:
        whole = run((0, 1))
        shards = [run((rank, world)) for rank in range(world)]
        merged = PerplexityResult.merge(shards)
        reduced = PerplexityResult.from_tensor(sum(s.as_tensor() for s in shards), like=shards[0])
        # The three ways of adding the shards add the same float64 numbers in the same order.
        assert merged == reduced == sum(shards[1:], shards[0])
        for total in (merged, reduced):
            # A shard's batches hold other rows than the unsharded run's: the same float32 forward passes
            # in batches of another composition, rounded in another order (see tolerances.FORWARD_RTOL).
            assert _relative_difference(total.nll_sum, whole.nll_sum) < FORWARD_RTOL
            assert _counts(total) == _counts(whole)
        assert all(s.samples > 0 for s in shards)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte, inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {char: byte for byte, char in chars.items()}


def _token_bytes(tokenizer, ids) -> list[bytes]:
    """The raw bytes of each token of a byte-level BPE (special tokens: none), without decoding."""
    to_byte = _byte_level_alphabet()
    special = set(tokenizer.all_special_ids)
    return [
        b"" if i in special else bytes(to_byte[c] for c in tokenizer.convert_ids_to_tokens(int(i)))
        for i in ids
    ]


def _finished_by_scored_tokens(tokenizer, stream, scored: np.ndarray) -> tuple[int, int]:
    """Bytes of the characters whose last byte is in a scored token, and words whose first character is."""
    token_bytes = _token_bytes(tokenizer, stream)
    owner = np.repeat(np.arange(len(stream)), [len(b) for b in token_bytes])  # byte -> its token
    text = b"".join(token_bytes).decode("utf-8")
    n_bytes = n_words = 0
    offset, previous_is_space = 0, True
    for char in text:
        width = len(char.encode("utf-8"))
        last_byte_token = owner[offset + width - 1]
        if scored[last_byte_token]:
            n_bytes += width
            if previous_is_space and not char.isspace():
                n_words += 1
        previous_is_space = char.isspace()
        offset += width
    return n_bytes, n_words


def _size_splitting_characters_at_both_block_edges(tokenizer, stream) -> int:
    """A block size at which, in the first 300 tokens, a character is split between a block's first two
    tokens (left edge) and another between a block's last token and the next block's first (right edge)."""
    token_bytes = _token_bytes(tokenizer, stream[:300])

    def continues(i: int) -> bool:  # token i starts inside a character begun by token i - 1
        return bool(token_bytes[i]) and (token_bytes[i][0] & 0xC0) == 0x80

    for size in range(8, 20):
        left = any(continues(k * size + 1) for k in range(300 // size))
        right = any(continues(k * size) for k in range(1, 300 // size))
        if left and right:
            return size
    raise AssertionError("the fixture text no longer splits characters at block edges")


def test_blocks_count_what_their_scored_tokens_finish_across_block_edges(model, tokenizer, stream):
    """Blocks used to be decoded one by one: a character split across a block edge became U+FFFD (3 bytes)
    and a word split across one was counted twice. Decoded in their place in the stream, each character
    belongs to the block whose scored token completes it, each word to the one whose token starts it."""
    size = _size_splitting_characters_at_both_block_edges(tokenizer, stream)
    n_blocks = 300 // size
    blocks = stream[: n_blocks * size].reshape(n_blocks, size)
    context = BlockContext(stream, np.arange(n_blocks) * size, size)
    result = evaluate_blocks(model, blocks, batch_size=6, tokenizer=tokenizer, context=context)
    scored = np.zeros(len(stream), dtype=bool)
    for k in range(n_blocks):
        scored[k * size + 1 : (k + 1) * size] = True  # every token of a block but its first
    expected = _finished_by_scored_tokens(tokenizer, stream, scored)
    assert (result.n_bytes, result.n_words) == expected
    # The hazard is real on this data: decoding each block alone miscounts both.
    alone = [_decode(tokenizer, block[1:]) for block in blocks]
    assert sum(len(text.encode("utf-8")) for text in alone) != expected[0]
    assert sum(len(text.split()) for text in alone) != expected[1]
    # A stream of the same (adjacent) blocks, read once with one block of look-ahead, counts the same.
    streamed = evaluate_blocks(model, iter(list(blocks)), batch_size=6, tokenizer=tokenizer, contiguous=True)
    assert (streamed.n_bytes, streamed.n_words) == expected
    assert streamed.tokens == result.tokens and streamed.correct == result.correct
    assert result.bits_per_byte == result.nll_sum / (math.log(2) * expected[0])


@pytest.mark.parametrize(("context", "stride"), [(16, 3), (16, 16), (10, 7)])
def test_strided_bytes_and_words_match_decoding_the_whole_scored_text(
    model, tokenizer, stream, context, stride
):
    tokens = stream[:400]
    result = evaluate_strided(
        model, tokens, context=context, stride=stride, batch_size=4, tokenizer=tokenizer
    )
    scored_text = _decode(tokenizer, tokens[1:])
    n_bytes, n_words = len(scored_text.encode("utf-8")), len(scored_text.split())
    assert (result.n_bytes, result.n_words) == (n_bytes, n_words)
    # The same float64 expressions as PerplexityResult's: equal to the last bit.
    assert result.bits_per_byte == result.nll_sum / (math.log(2) * n_bytes)
    assert result.word_perplexity == math.exp(result.nll_sum / n_words)
    # The hazard is real on this data: decoding each window's scored span on its own miscounts both.
    windows = StridedWindows(n_tokens=len(tokens), context=context, stride=stride)
    span_texts = [
        _decode(tokenizer, tokens[w.scored_start : w.scored_end])
        for w in map(windows.window, range(windows.count))
    ]
    assert sum(len(text.encode("utf-8")) for text in span_texts) != n_bytes
    assert sum(len(text.split()) for text in span_texts) != n_words


def test_without_tokenizer_bytes_and_words_are_unknown(model, stream):
    result = evaluate_strided(model, stream[:50], context=16, stride=8, batch_size=2)
    metrics = result.to_metrics()
    assert result.n_bytes is None and result.n_words is None
    assert metrics["bits_per_byte"] is None and metrics["word_perplexity"] is None
    reduced = PerplexityResult.from_tensor(result.as_tensor() + result.as_tensor(), like=result)
    assert reduced.n_bytes is None and reduced.tokens == 2 * result.tokens


def test_metrics_names_and_values(model, tokenizer, stream):
    strided = evaluate_strided(model, stream[:100], context=16, stride=8, batch_size=2, tokenizer=tokenizer)
    metrics = strided.to_metrics()
    assert metrics["eval_loss"] == strided.nll_sum / strided.tokens
    assert metrics["perplexity"] == math.exp(metrics["eval_loss"])
    assert metrics["eval_accuracy"] == strided.correct / strided.tokens
    assert (metrics["eval_tokens"], metrics["eval_samples"]) == (99, strided.samples)
    assert (metrics["method"], metrics["context"], metrics["stride"]) == ("strided", 16, 8)
    blocks = evaluate_blocks(model, stream[:64].reshape(4, 16), batch_size=2).to_metrics()
    assert (blocks["method"], blocks["block_size"], blocks["stride"]) == ("blocks", 16, None)
    assert "context" not in blocks


def test_overflowing_loss_gives_infinite_perplexity():
    result = PerplexityResult(
        nll_sum=1e6,
        tokens=10,
        correct=0,
        n_bytes=3,
        n_words=1,
        method="blocks",
        context=8,
        stride=None,
        samples=1,
    )
    metrics = result.to_metrics()
    assert metrics["perplexity"] == float("inf")
    assert metrics["word_perplexity"] == float("inf")
    assert metrics["eval_loss"] == 1e5


def test_merging_different_settings_is_refused():
    common = dict(nll_sum=1.0, tokens=1, correct=0, n_bytes=None, n_words=None, samples=1)
    blocks = PerplexityResult(method="blocks", context=8, stride=None, **common)
    strided = PerplexityResult(method="strided", context=8, stride=4, **common)
    with pytest.raises(ValueError, match="different settings"):
        blocks + strided


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(context=16, stride=17), EvalError, "stride"),
        (dict(context=16, stride=0), EvalError, "stride"),
        (dict(context=N_POSITIONS + 1, stride=8), EvalError, f"set context to {N_POSITIONS} or less"),
        (dict(context=0, stride=1), EvalError, "context"),
    ],
)
def test_strided_settings_are_validated(model, stream, kwargs, error, message):
    with pytest.raises(error, match=message):
        evaluate_strided(model, stream[:50], batch_size=2, **kwargs)


def test_unusable_streams_and_blocks_are_data_errors(model, stream):
    with pytest.raises(DataError, match="at least 2 tokens"):
        evaluate_strided(model, stream[:1], context=8, stride=4, batch_size=2)
    with pytest.raises(DataError, match="1-D"):
        evaluate_strided(model, stream[:64].reshape(4, 16), context=8, stride=4, batch_size=2)
    with pytest.raises(DataError, match="no blocks"):
        evaluate_blocks(model, np.zeros((0, 16), dtype=np.int64), batch_size=2)
    too_long = stream[: 2 * (N_POSITIONS + 1)].reshape(2, N_POSITIONS + 1)
    with pytest.raises(DataError, match=f"block_size to {N_POSITIONS} or less"):
        evaluate_blocks(model, too_long, batch_size=2)


def test_model_mode_is_restored_and_no_gradients_are_kept(model, stream):
    model.train()
    try:
        evaluate_blocks(model, stream[:32].reshape(2, 16), batch_size=2)
        assert model.training
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())


def test_progress_reports_samples_done(model, stream):
    seen: list[int] = []
    result = evaluate_strided(model, stream[:100], context=16, stride=8, batch_size=3, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == result.samples


# ---------------------------------------------------------------------------------------------------
# Accumulation: float64 totals over a million targets

VOCAB = 8
PATTERNS = [  # (logits row, target): a confident hit, a uniform guess, a confident miss
    ([6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 0),
    ([0.0] * VOCAB, 3),
    ([9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0], 7),
]
COUNTS = (333_331, 333_333, 333_336)  # 10**6 targets


def synthetic_batch(rows: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, float]:
    """Logits [rows, columns, VOCAB] and targets of the PATTERNS in COUNTS (shuffled), and their exact total NLL.

    The total is the sum, in exact rational arithmetic, of each pattern's per-token NLL as the scoring computes
    it (float32 cross-entropy of that one row) times its count; each pattern is also checked against the
    closed form logsumexp - logit in float64.
    """
    from fractions import Fraction

    order = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(PATTERNS)), COUNTS))
    assert order.size == rows * columns
    table = torch.tensor([row for row, _ in PATTERNS], dtype=torch.float32)
    targets = np.array([target for _, target in PATTERNS])[order].reshape(rows, columns)
    logits = table[torch.as_tensor(order)].reshape(rows, columns, VOCAB)
    total = Fraction(0)
    for (row, target), count in zip(PATTERNS, COUNTS, strict=True):
        one = F.cross_entropy(torch.tensor([row]), torch.tensor([target]), reduction="none").item()
        # float32's logsumexp near 9 nats is good to a few ulp of 9 (1e-6), whatever the NLL's size
        assert one == pytest.approx(math.log(sum(math.exp(v) for v in row)) - row[target], abs=1e-5)
        total += Fraction(one) * count
    return logits, targets, float(total)


@pytest.mark.parametrize("batches", [1, 1000], ids=["one-batch", "1000-batches"])
def test_nll_is_accumulated_in_float64_over_a_million_targets(batches: int) -> None:
    """The per-token NLLs of one batch, and the batch totals, are summed in float64: a float32 sum of 10**6
    NLLs (about 5e6 nats) is off by more than 1e-9 relative."""
    from tolerances import FLOAT64_SUM_RTOL

    from clm_runner.eval.scoring import Totals

    logits, targets, exact = synthetic_batch(batches, 10**6 // batches)
    totals = Totals(with_text=False)
    for index in range(batches):
        totals.add_logits(logits[index : index + 1], targets[index : index + 1])
    assert totals.tokens == 10**6
    assert totals.nll_sum == pytest.approx(exact, rel=FLOAT64_SUM_RTOL)
    result = totals.result(method="blocks", context=1, stride=None)
    assert result.eval_loss == pytest.approx(exact / 10**6, rel=FLOAT64_SUM_RTOL)


def test_shard_totals_add_up_in_float64() -> None:
    """Shards merged (PerplexityResult.__add__) and all-reduced (as_tensor / from_tensor) keep float64."""
    from tolerances import FLOAT64_SUM_RTOL

    _, _, exact = synthetic_batch(1, 10**6)
    shards = [
        PerplexityResult(
            nll_sum=exact / 1000 + k * 1e-3,
            tokens=1000,
            correct=0,
            n_bytes=None,
            n_words=None,
            method="blocks",
            context=1,
            stride=None,
            samples=1,
        )
        for k in range(1000)
    ]
    expected = math.fsum(shard.nll_sum for shard in shards)
    merged = PerplexityResult.merge(shards)
    assert merged.nll_sum == pytest.approx(expected, rel=FLOAT64_SUM_RTOL) and merged.tokens == 10**6
    # An all-reduce SUM adds the shards' tensors in their own dtype.
    summed = torch.stack([shard.as_tensor() for shard in shards]).sum(dim=0)
    rebuilt = PerplexityResult.from_tensor(summed, like=shards[0])
    assert rebuilt.nll_sum == pytest.approx(expected, rel=FLOAT64_SUM_RTOL) and rebuilt.tokens == 10**6
