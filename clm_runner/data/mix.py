"""[[data.mix]]: several corpora, each prepared (and cached) as its own source, their training blocks mixed by weight.

Mixing is an exact proportional block mix, not `datasets.interleave_datasets`' sampling: interleave draws each
example's source at random, so the shares it realises are the weights only in expectation (off by about
sqrt(N) blocks); here source i contributes round(p_i x N) blocks, the largest-remainder rounding of its
normalized weight p_i, so every share is within 1 / N of its weight, in every run. Which blocks of a source
are taken is drawn with data.mix_seed; the Trainer's sampler then shuffles the mixed blocks each epoch, as it
shuffles a single source's. N is the largest mix that uses no block twice ("undersample"), or the smallest
that uses every block of every source, repeating the smaller ones ("oversample").

A source's cache entry is keyed by its own text, tokenizer and block size (clm_runner.data.cache); the mix
itself is an index selection over those cached blocks, recomputed from the weights and the seed every time,
so a change of weight or seed can never pick up a stale mix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from clm_runner.data.blocks import PreparedSplit, SplitStats

if TYPE_CHECKING:
    from clm_runner.config.schema import DataConfig, MixSource, Recipe


def source_recipe(recipe: Recipe, source: MixSource) -> Recipe:
    """The recipe of one source: [data] with the source's keys, as if it were the only corpus."""
    return dataclasses.replace(recipe, data=source_data(recipe.data, source))


def source_data(data: DataConfig, source: MixSource) -> DataConfig:
    """[data] for one source of a mix, as if it were the only corpus.

    [data]'s validation_file and test_file are not the source's: they are prepared once, on their own
    (shared_data), and a dataset_name source may not have files of its own.
    """
    return dataclasses.replace(
        data,
        mix=(),
        dataset_name=source.dataset_name,
        dataset_config_name=source.dataset_config_name,
        dataset_revision=source.dataset_revision,
        train_file=source.train_file,
        validation_file=source.validation_file,
        test_file=None,
        text_column=source.text_column,
        max_train_samples=None,  # applies to the mix (mix_counts)
    )


def shared_data(data: DataConfig) -> DataConfig:
    """[data] for a split every source shares ([data]'s validation_file or test_file): that file alone."""
    return dataclasses.replace(
        data,
        mix=(),
        dataset_name=None,
        dataset_config_name=None,
        dataset_revision=None,
        train_file=None,
        text_column=None,
    )


def shared_split(recipe: Recipe, split: str) -> bool:
    """Whether every source has the same `split` ([data]'s validation_file or test_file), prepared once."""
    data = recipe.data
    if split == "validation":
        return data.validation_file is not None
    if split == "test":
        return data.test_file is not None
    return False


def mix_counts(
    available: Sequence[int], weights: Sequence[float] | None, sampling: str, limit: int | None = None
) -> list[int]:
    """Blocks to take from each source: all of them without weights, else the exact proportional mix of
    `limit` blocks at most (data.max_train_samples)."""
    if weights is None:
        return list(available)
    # Exact rational arithmetic: the weights as written (0.7 is 7/10), so 700 blocks at 0.7 make 1,000 and
    # not 999.99...; a float division would be off by one block at such boundaries.
    written = [Fraction(repr(float(w))) for w in weights]
    shares = [w / sum(written) for w in written]
    if sampling == "undersample":
        total = min(math.floor(n / p) for n, p in zip(available, shares, strict=True))
    else:
        total = max(math.ceil(n / p) for n, p in zip(available, shares, strict=True))
    if limit is not None:
        total = min(total, limit)
    exact = [p * total for p in shares]
    counts = [math.floor(x) for x in exact]
    # Largest remainders first (ties: the earlier source), so the counts add up to `total` exactly.
    order = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def pick_blocks(available: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` block indices of a source of `available`, in the source's order: a random subset, or every block
    as many times as fits and a random subset of one more pass when count > available. (Order is the
    sampler's job: it shuffles the mix each epoch, as it shuffles one source's blocks.)"""
    passes, rest = divmod(count, available)
    picked = [np.arange(available)] * passes
    picked.append(np.sort(rng.permutation(available)[:rest]))
    return np.concatenate(picked).astype(np.int64)


def mix_train(recipe: Recipe, parts: dict[str, PreparedSplit]) -> PreparedSplit:
    """The training split of a mix: each source's share of blocks, concatenated (the sampler shuffles)."""
    import datasets

    data = recipe.data
    names = list(parts)
    available = [len(parts[name].blocks) for name in names]
    # Unweighted: every block of every source, which is weights in proportion to the sources' sizes (so that
    # max_train_samples keeps those proportions too).
    weights = data.weights or [float(n) for n in available]
    counts = mix_counts(available, weights, data.mix_sampling, data.max_train_samples)
    limited = counts != mix_counts(available, weights, data.mix_sampling)
    rng = np.random.default_rng(data.mix_seed)
    chosen = [
        parts[name].blocks.with_format(None).select(pick_blocks(n, count, rng))
        for name, n, count in zip(names, available, counts, strict=True)
    ]
    blocks = datasets.concatenate_datasets(chosen)
    return combined(
        "train", parts, blocks.with_format("torch"), dict(zip(names, counts, strict=True)), limited
    )


def combined(
    name: str,
    parts: dict[str, PreparedSplit],
    blocks: Any = None,
    counts: dict[str, int] | None = None,
    limited: bool = False,
) -> PreparedSplit:
    """One split made of per-source parts (`parts`); `blocks` default: the parts' blocks one after another."""
    import datasets

    if blocks is None:
        blocks = datasets.concatenate_datasets([p.blocks.with_format(None) for p in parts.values()])
        blocks = blocks.with_format("torch")
    stats = [p.stats for p in parts.values() if p.stats is not None]
    total = SplitStats(
        rows=sum(s.rows for s in stats),
        tokens=sum(s.tokens for s in stats),
        # The training split's blocks are the mix's (what the Trainer sees); the sources' own are in `parts`.
        blocks=sum(counts.values()) if counts else sum(s.blocks for s in stats),
        dropped_tokens=sum(s.dropped_tokens for s in stats),
        seconds=round(sum(s.seconds for s in stats), 3),
        null_rows=sum(s.null_rows for s in stats),
    )
    first = next(iter(parts.values()))
    return PreparedSplit(
        name=name,
        blocks=blocks,
        stream=None,
        stats=total,
        from_cache=all(p.from_cache for p in parts.values()),
        block_size=first.block_size,
        grouping=first.grouping,
        limited=limited,
        parts=parts,
        mix_counts=counts or {},
    )
