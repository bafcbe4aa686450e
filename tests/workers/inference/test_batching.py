"""Padding-aware batches: every item once, at most max_items a batch, less padding than equal cuts."""
from __future__ import annotations

import random

import pytest

from workers.inference.batching import padded_batches


def _tokens(lengths, batches):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_every_item_once_sorted_and_capped():
    rng = random.Random(0)
    lengths = [rng.randint(20, 200) for _ in range(333)]
    batches = padded_batches(lengths, 32)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 32 for b in batches)
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_a_long_tail_gets_its_own_batch_instead_of_padding_a_full_one():
    lengths = [50] * 31 + [180]  # equal cuts of 32: one batch padded to 180 (72% padding)
    batches = padded_batches(lengths, 32, batch_cost=64)
    assert sorted(map(len, batches)) == [1, 31]
    assert _tokens(lengths, batches) < _tokens(lengths, [list(range(32))])


def test_equal_lengths_fill_whole_batches():
    assert sorted(map(len, padded_batches([70] * 100, 32))) == [4, 32, 32, 32]


def test_never_more_tokens_than_equal_cuts_plus_their_batch_cost():
    rng = random.Random(1)
    lengths = [int(rng.lognormvariate(4.2, 0.3)) for _ in range(400)]
    order = sorted(range(400), key=lambda i: lengths[i])
    equal = [order[b:b + 32] for b in range(0, 400, 32)]
    got = padded_batches(lengths, 32, batch_cost=64)
    assert _tokens(lengths, got) + 64 * len(got) <= _tokens(lengths, equal) + 64 * len(equal)


def test_no_items_and_bad_sizes():
    assert padded_batches([], 8) == []
    with pytest.raises(ValueError, match="max_items"):
        padded_batches([1, 2], 0)
