"""The teacher cache's coding of sampled ids: varint gaps, their decoding and their byte bound."""

from __future__ import annotations

import numpy as np
import pytest

from hf_capgap.cache.format import (
    REPEAT_BYTES,
    SAMPLED_POSITION_BYTES,
    decode_id_gaps,
    encode_id_gaps,
    sampled_bytes_bound,
)
from hf_capgap.utils.artifacts import ArtifactError


def random_positions(vocab: int, positions: int, most: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat distinct ascending ids per position (some positions empty) and the positions' sizes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, most + 1, size=positions)
    ids = [np.sort(rng.choice(vocab, size=size, replace=False)) for size in sizes]
    return np.concatenate(ids).astype(np.int64), sizes.astype(np.uint8)


@pytest.mark.parametrize("vocab", [64, 32_000, 152_064, 1 << 31])
def test_id_gaps_round_trip_at_any_vocabulary(vocab):
    ids, sizes = random_positions(vocab, positions=300, most=40)
    edges = np.array([0, vocab - 1, 0, 1, vocab - 2, vocab - 1], dtype=np.int64)  # first, last and adjacent ids
    ids, sizes = np.concatenate([ids, edges]), np.concatenate([sizes, [2, 2, 2]]).astype(np.uint8)
    codes = encode_id_gaps(ids, sizes)
    assert codes.dtype == np.uint8
    np.testing.assert_array_equal(decode_id_gaps(codes, sizes), ids)


def test_close_ids_take_one_byte_each_and_far_ones_more():
    """A gap (minus one) below 128 takes one byte, below 16,384 two, and so on: 7 bits per byte."""
    close = np.arange(100, 200, dtype=np.int64)  # the first id 100, then gaps of 0
    assert len(encode_id_gaps(close, np.array([100]))) == 100
    far = np.array([127, 128 + 127 + 128, 1 << 14, (1 << 21) + (1 << 14) + 1], dtype=np.int64)
    codes = encode_id_gaps(far, np.ones(4, dtype=np.uint8))  # each its own position: gap = the id
    assert len(codes) == 1 + 2 + 3 + 4
    np.testing.assert_array_equal(encode_id_gaps(np.array([300]), np.array([1])), [300 & 0x7F | 0x80, 300 >> 7])


def test_an_empty_signal_codes_to_no_bytes():
    empty = encode_id_gaps(np.zeros(0, dtype=np.int64), np.zeros(3, dtype=np.uint8))
    assert len(empty) == 0 and len(decode_id_gaps(empty, np.zeros(3, dtype=np.uint8))) == 0


def test_codes_that_disagree_with_the_sizes_are_refused():
    ids, sizes = random_positions(32_000, positions=20, most=10)
    codes = encode_id_gaps(ids, sizes)
    with pytest.raises(ArtifactError, match="corrupted shard"):
        decode_id_gaps(codes[:-1], sizes)
    with pytest.raises(ArtifactError, match="rebuild"):
        decode_id_gaps(codes, sizes + np.eye(len(sizes), dtype=np.uint8)[0])


@pytest.mark.parametrize(("draws", "vocab"), [(1, 64), (16, 32_000), (64, 32_000), (255, 152_064), (64, 200)])
def test_the_byte_bound_holds_for_the_widest_spread_of_ids(draws, vocab):
    """Evenly spread ids make every gap as long as it can be; with the most repeats the draws allow
    (each repeated id takes two draws), no position may exceed the bound."""
    for distinct in sorted({1, draws // 2, (draws + 1) // 2, draws, min(draws, vocab)}):
        if not 1 <= distinct <= min(draws, vocab):
            continue
        spread = np.linspace(0, vocab - 1, distinct).round().astype(np.int64)
        shifted = spread + (vocab - 1 - spread[-1])  # the first gap as long as the others allow
        for ids in (spread, shifted, np.unique(spread)):
            stored = len(encode_id_gaps(ids, np.array([len(ids)])))
            stored += REPEAT_BYTES * min(len(ids), draws - len(ids)) + SAMPLED_POSITION_BYTES
            assert stored <= sampled_bytes_bound(draws, vocab)
    assert sampled_bytes_bound(draws, vocab) >= SAMPLED_POSITION_BYTES + 1
