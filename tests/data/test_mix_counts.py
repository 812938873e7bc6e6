"""[[data.mix]]: the exact proportional mix (counts, shares, the seeded choice of blocks), unit by unit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clm_runner.data.mix import mix_counts, pick_blocks

CASES = [
    ([580, 197], [0.7, 0.3]),
    ([2321, 791], [0.5, 0.5]),
    ([100, 100, 100], [1 / 3, 1 / 3, 1 / 3]),
    ([1000, 7, 50], [0.2, 0.05, 0.75]),
    ([10, 10_000], [0.999, 0.001]),
]


@pytest.mark.parametrize(("available", "weights"), CASES)
@pytest.mark.parametrize("sampling", ["undersample", "oversample"])
def test_every_share_is_within_one_block_of_its_weight(available, weights, sampling) -> None:
    counts = mix_counts(available, weights, sampling)
    total = sum(counts)
    assert total > 0
    for count, weight in zip(counts, weights, strict=True):
        # Largest-remainder rounding of weight x total: each count is within one block of its exact share.
        assert abs(count - weight * total) < 1
        assert abs(count / total - weight) < 1 / total
    if sampling == "undersample":
        assert all(c <= n for c, n in zip(counts, available, strict=True))  # no block used twice
        # ... and the largest such mix: one more block in all would need a source beyond its blocks.
        assert any(math.floor((total + 1) * w) > n for n, w in zip(available, weights, strict=True)) or any(
            c == n for c, n in zip(counts, available, strict=True)
        )
    else:
        assert all(c >= n for c, n in zip(counts, available, strict=True))  # every block used at least once


def test_without_weights_every_block_of_every_source() -> None:
    assert mix_counts([5, 9], None, "undersample") == [5, 9]


def test_the_picked_blocks_depend_only_on_the_seed() -> None:
    def pick(seed: int) -> np.ndarray:
        return pick_blocks(100, 250, np.random.default_rng(seed))

    assert (pick(1) == pick(1)).all()
    assert not (pick(1) == pick(2)).all()
    picked = pick(1)
    assert len(picked) == 250
    # Oversampling repeats whole passes over the source, then part of one more: no block more than once extra.
    counts = np.bincount(picked, minlength=100)
    assert set(counts) <= {2, 3} and counts.sum() == 250
    subset = pick_blocks(100, 30, np.random.default_rng(0))
    assert len(set(subset)) == 30  # undersampling never repeats a block


def test_boundaries_are_exact_not_off_by_one_float_block() -> None:
    # 700 / 0.7 is 999.99... in floats: the mix must still be 1,000 blocks, 700 + 300, no block repeated.
    assert mix_counts([700, 300], [0.7, 0.3], "oversample") == [700, 300]
    assert mix_counts([700, 300], [0.7, 0.3], "undersample") == [700, 300]
    assert mix_counts([21, 98], [21, 98], "undersample") == [21, 98]


@pytest.mark.parametrize("limit", [1, 10, 99, 500])
def test_a_limit_keeps_the_proportions(limit: int) -> None:
    """data.max_train_samples on a mix: `limit` blocks, each share still within 1/limit of its weight."""
    counts = mix_counts([580, 197], [0.7, 0.3], "undersample", limit)
    assert sum(counts) == limit
    assert all(abs(c / limit - w) < 1 / limit for c, w in zip(counts, (0.7, 0.3), strict=True))
    assert mix_counts([580, 197], [0.7, 0.3], "undersample", 10_000) == mix_counts(
        [580, 197], [0.7, 0.3], "undersample"
    )
