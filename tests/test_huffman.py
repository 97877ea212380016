"""Canonical Huffman: hand-known codes, optimality, length limits, round trips, damage."""

from __future__ import annotations

import doctest
import heapq
import itertools
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesqueeze.format import huffman
from edgesqueeze.format.huffman import (
    MAX_ALPHABET,
    canonical_codes,
    code_lengths,
    decode,
    decode_many,
    encode,
    entropy_bits,
)
from edgesqueeze.errors import FormatError

SETTINGS = settings(max_examples=200, deadline=None)


def kraft(lengths) -> float:
    lengths = np.asarray(lengths, np.int64)
    return float(np.sum(2.0 ** -lengths[lengths > 0]))


def huffman_cost(counts) -> int:
    """Total bits of an unlimited Huffman code, by the textbook heap merge."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) <= 1:
        return sum(heap)
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def cost(counts, lengths) -> int:
    return int(np.dot(np.asarray(counts, np.int64), np.asarray(lengths, np.int64)))


def sample(rng, n, alphabet, skew):
    """Geometric-like symbols: what cluster indices and sparse gaps look like."""
    p = np.exp(-skew * np.arange(alphabet))
    return rng.choice(alphabet, size=n, p=p / p.sum())


# ------------------------------------------------------------------- code lengths

def test_hand_known_code():
    lengths = code_lengths(np.array([5, 2, 1, 1]))
    assert lengths.tolist() == [1, 2, 3, 3]
    assert lengths.dtype == np.uint8
    assert canonical_codes(lengths).tolist() == [0b0, 0b10, 0b110, 0b111]
    data, nbits = encode(np.array([0, 1, 0, 3, 2]), lengths)
    assert nbits == 10
    assert data == bytes([0b01001111, 0b10000000])  # one chunk: no index, then the codes
    assert encode(np.array([0, 1, 0, 3, 2]), lengths, index="u16")[0] == bytes([10, 0, 0b01001111, 0b10000000])


def test_hand_known_packed_index():
    # chunk 2: three chunks, symbols (0, 3), (1, 4), (2): 0 111 | 10 110 | 0 = 4, 5, 1 bits.
    # Index: base 4 (u16), width 1, values 0 1 (padded 01000000); the last chunk is implied.
    lengths = [1, 2, 3, 3]
    data, nbits = encode(np.array([0, 1, 0, 3, 2]), lengths, chunk=2)
    assert nbits == 10
    assert data == bytes([4, 0, 1, 0b01000000, 0b01111011, 0b00000000])
    assert decode(data, lengths, 5, chunk=2).tolist() == [0, 1, 0, 3, 2]
    assert encode(np.array([0, 1, 0, 3, 2]), lengths, chunk=2, index="u16")[0] == bytes(
        [4, 0, 5, 0, 1, 0, 0b01111011, 0b00000000])
    # equal chunks: width 0, no value bytes
    data, _ = encode(np.array([0, 0, 0, 0, 0]), [1, 1], chunk=2)
    assert data == bytes([2, 0, 0, 0b00000000])


def test_canonical_codes_follow_lengths_then_symbol_order():
    assert canonical_codes([2, 1, 3, 3]).tolist() == [0b10, 0b0, 0b110, 0b111]
    assert canonical_codes([3, 0, 3, 2, 2, 2]).tolist() == [0b110, 0, 0b111, 0b00, 0b01, 0b10]


def test_edge_cases():
    assert code_lengths(np.array([], np.int64)).tolist() == []
    assert code_lengths(np.array([0, 0, 0])).tolist() == [0, 0, 0]
    assert code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]  # a lone symbol costs 1 bit
    assert code_lengths(np.array([0, 3, 0, 3])).tolist() == [0, 1, 0, 1]
    assert code_lengths(np.ones(16, np.int64), max_len=4).tolist() == [4] * 16  # exactly 2**max_len
    with pytest.raises(FormatError, match="cannot have codes of at most 4 bits"):
        code_lengths(np.ones(17, np.int64), max_len=4)
    with pytest.raises(FormatError, match="non-negative"):
        code_lengths(np.array([1, -1]))
    with pytest.raises(FormatError, match="integer"):
        code_lengths(np.array([0.5, 1.0]))
    with pytest.raises(FormatError, match="max_len"):
        code_lengths(np.array([1, 1]), max_len=0)
    with pytest.raises(FormatError, match="exceeds"):
        code_lengths(np.ones(MAX_ALPHABET + 1, np.int64))


@SETTINGS
@given(st.lists(st.integers(0, 10**6), min_size=2, max_size=300))
def test_unlimited_lengths_are_optimal_and_complete(counts):
    counts = np.array(counts, np.int64)
    lengths = code_lengths(counts, max_len=24)
    used = counts > 0
    assert ((lengths > 0) == used).all()
    assert cost(counts, lengths) == (huffman_cost(counts) if used.sum() > 1 else counts.sum())
    if used.sum() > 1:
        assert kraft(lengths) == 1.0  # a complete prefix code


def brute_force_cost(counts, max_len):
    """Cheapest prefix code with lengths 1..max_len, by trying every assignment."""
    best = None
    for ls in itertools.product(range(1, max_len + 1), repeat=len(counts)):
        if kraft(ls) <= 1:
            c = cost(counts, ls)
            best = c if best is None else min(best, c)
    return best


@SETTINGS
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=6), st.integers(3, 4))
def test_limited_lengths_are_optimal(counts, max_len):
    lengths = code_lengths(np.array(counts), max_len=max_len)
    assert lengths.max() <= max_len
    assert kraft(lengths) == 1.0
    assert cost(counts, lengths) == brute_force_cost(counts, max_len)


def test_length_limit_with_fibonacci_counts():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, np.int64)
    assert code_lengths(counts, max_len=24).max() == 24  # the limit binds: Huffman wants 29
    for max_len in (5, 8, 12, 16, 24):
        lengths = code_lengths(counts, max_len=max_len)
        assert lengths.max() <= max_len
        assert kraft(lengths) == 1.0
        # never worse than a flat 5-bit code; with room to spare, close to unlimited Huffman
        assert cost(counts, lengths) <= cost(counts, np.full(30, 5))
        if max_len >= 12:
            assert cost(counts, lengths) <= 1.01 * huffman_cost(counts)
        symbols = np.repeat(np.arange(30), np.minimum(counts, 50))
        data, _ = encode(symbols, lengths)
        assert np.array_equal(decode(data, lengths, symbols.size), symbols)


def test_code_lengths_are_deterministic_with_ties():
    counts = np.array([3, 1, 1, 1, 1, 3, 0, 2])
    assert code_lengths(counts).tolist() == code_lengths(counts.copy()).tolist()
    # equal counts: the lower symbol number sorts as lighter and gets the longer code
    assert code_lengths(counts).tolist() == [2, 4, 4, 3, 3, 2, 0, 3]
    assert cost(counts, [2, 4, 4, 3, 3, 2, 0, 3]) == huffman_cost(counts)


# ------------------------------------------------------------------- round trips

@SETTINGS
@given(
    st.integers(1, 300),  # alphabet
    st.integers(0, 3000),  # symbols
    st.floats(0.0, 2.0),  # skew
    st.sampled_from([1, 3, 64, 256]),  # chunk
    st.sampled_from(huffman.INDEXES),
    st.integers(0, 2**32 - 1),
)
def test_round_trip(alphabet, n, skew, chunk, index, seed):
    rng = np.random.default_rng(seed)
    symbols = sample(rng, n, alphabet, skew)
    counts = np.bincount(symbols, minlength=alphabet)
    max_len = max(int(np.ceil(np.log2(max(np.count_nonzero(counts), 1)))), 8)
    lengths = code_lengths(counts, max_len=max_len)
    data, nbits = encode(symbols, lengths, chunk=chunk, index=index)
    assert nbits == cost(counts, lengths)
    m = -(-n // chunk)
    if index == "u16":
        index_bytes = 2 * m
    else:  # nothing for one chunk; else base, width and m - 1 values of width bits
        index_bytes = 0 if m <= 1 else 3 + -(-(m - 1) * data[2] // 8)
        assert m <= 1 or data[2] <= 16
    assert len(data) == index_bytes + -(-nbits // 8)
    assert huffman.encoded_size(symbols, lengths, chunk=chunk, index=index) == len(data)  # sized without coding
    out = decode(data, lengths, n, chunk=chunk, index=index)
    assert out.dtype == np.uint16
    assert np.array_equal(out, symbols)
    assert encode(symbols, lengths, chunk=chunk, index=index) == (data, nbits)  # deterministic


def test_single_symbol_and_empty_streams():
    lengths = code_lengths(np.array([0, 0, 9]))
    data, nbits = encode(np.full(9, 2), lengths)
    assert nbits == 9
    assert decode(data, lengths, 9).tolist() == [2] * 9
    assert encode(np.array([], np.int64), lengths) == (b"", 0)
    assert huffman.encoded_size(np.full(9, 2), lengths) == len(data) and huffman.encoded_size([], lengths) == 0
    assert decode(b"", lengths, 0).tolist() == []
    assert decode(b"", [], 0).tolist() == []
    with pytest.raises(FormatError, match="0 symbols but 1 bytes"):
        decode(b"\x00", lengths, 0)


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 70), st.integers(0, 900), st.floats(0, 1.5)), max_size=8),
       st.sampled_from([2, 17, 256]), st.sampled_from(huffman.INDEXES), st.integers(0, 2**32 - 1))
def test_decode_many_equals_decode(specs, chunk, index, seed):
    rng = np.random.default_rng(seed)
    streams, expected = [], []
    for alphabet, n, skew in specs:
        symbols = sample(rng, n, alphabet, skew)
        lengths = code_lengths(np.bincount(symbols, minlength=alphabet), max_len=12)
        streams.append((encode(symbols, lengths, chunk=chunk, index=index)[0], lengths, n))
        expected.append(symbols)
    many = decode_many(streams, chunk=chunk, index=index)
    assert len(many) == len(streams)
    for out, (data, lengths, n), symbols in zip(many, streams, expected):
        assert np.array_equal(out, symbols)
        assert np.array_equal(decode(data, lengths, n, chunk=chunk, index=index), out)


@pytest.mark.parametrize("top", [8, 11, 12, 15, 16, 20])
def test_longest_codes_at_every_window_stride(top):
    # The decoder loads 64-bit windows every byte or every second byte, depending on the
    # longest code (every second when that costs no extra loads, e.g. 12, 15, 16, 20 bits).
    rng = np.random.default_rng(top)
    counts = np.maximum(1, (2.0 ** np.arange(top + 3, 0, -1)).astype(np.int64))  # skewed
    lengths = code_lengths(counts, max_len=top)
    assert int(lengths.max()) == top
    streams, expected = [], []
    for n in (1, 255, 256, 257, 3000):
        symbols = rng.choice(counts.size, size=n, p=counts / counts.sum())
        symbols[: min(n, 5)] = counts.size - 1  # the longest codes, at the start of chunks
        streams.append((encode(symbols, lengths)[0], lengths, n))
        expected.append(symbols)
    for out, symbols in zip(decode_many(streams), expected):
        assert out.tolist() == symbols.tolist()


def test_streams_can_share_a_code():
    lengths = code_lengths(np.array([4, 3, 2, 1]))
    a, b = np.array([0, 1, 2, 3, 0]), np.array([3, 3, 0])
    out = decode_many([(encode(a, lengths)[0], lengths, 5),
                       (encode(b, lengths)[0], lengths.tolist(), 3)])
    assert out[0].tolist() == a.tolist() and out[1].tolist() == b.tolist()


@pytest.mark.parametrize("alphabet,skew", [(16, 0.4), (64, 0.08), (256, 0.02)])
def test_size_is_close_to_entropy(alphabet, skew):
    rng = np.random.default_rng(0)
    symbols = sample(rng, 200_000, alphabet, skew)
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
    data, nbits = encode(symbols, lengths)
    ideal = entropy_bits(symbols)
    assert ideal <= nbits <= 1.03 * ideal
    assert 8 * len(data) <= 1.05 * ideal  # with the chunk index


def test_entropy_bits():
    assert entropy_bits(np.array([0, 0, 1, 1])) == 4.0
    assert entropy_bits(np.array([5, 5, 5])) == 0.0
    assert entropy_bits(np.array([], np.int64)) == 0.0
    assert entropy_bits(np.array([0, 1, 2, 3] * 2)) == 16.0


# ------------------------------------------------------------------- refusals and damage

def test_encode_refuses_bad_input():
    lengths = code_lengths(np.array([1, 1, 0]))
    with pytest.raises(FormatError, match="no code"):
        encode(np.array([0, 2]), lengths)
    with pytest.raises(FormatError, match=r"0\.\.2"):
        encode(np.array([0, 3]), lengths)
    with pytest.raises(FormatError, match=r"0\.\.2"):
        encode(np.array([-1]), lengths)
    with pytest.raises(FormatError, match="integer"):
        encode(np.array([0.0]), lengths)
    with pytest.raises(FormatError, match="chunk"):
        encode(np.array([0]), lengths, chunk=0)
    with pytest.raises(FormatError, match="over-subscribed"):
        encode(np.array([0]), [1, 1, 1])
    with pytest.raises(FormatError, match="code lengths must be in"):
        encode(np.array([0]), [25, 1])


def make_stream(n=1000, alphabet=40, seed=1, chunk=64, index="packed"):
    rng = np.random.default_rng(seed)
    symbols = sample(rng, n, alphabet, 0.1)
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet), max_len=10)
    return encode(symbols, lengths, chunk=chunk, index=index)[0], lengths, symbols


@pytest.mark.parametrize("index", huffman.INDEXES)
def test_truncated_or_extended_streams_are_refused(index):
    data, lengths, symbols = make_stream(index=index)
    for cut in range(len(data)):
        with pytest.raises(FormatError, match="stream 0"):
            decode(data[:cut], lengths, symbols.size, chunk=64, index=index)
    for extra in (b"\x00", b"\x80", bytes(9)):
        with pytest.raises(FormatError, match="stream 0"):
            decode(data + extra, lengths, symbols.size, chunk=64, index=index)
    with pytest.raises(FormatError):
        decode(data, lengths, symbols.size + 1, chunk=64, index=index)
    with pytest.raises(FormatError):
        decode(data, lengths, symbols.size, chunk=256, index=index)  # the wrong chunk size
    with pytest.raises(FormatError):
        decode(data, lengths, symbols.size, chunk=64, index=({"packed", "u16"} - {index}).pop())


@pytest.mark.parametrize("index", huffman.INDEXES)
def test_every_bit_flip_is_refused_or_decodes_to_same_length(index):
    # A flipped code bit can turn into another valid symbol: only the container's CRC can
    # notice that. The decoder must never crash, hang, or return the wrong number of symbols.
    data, lengths, symbols = make_stream(n=300, index=index)
    refused = 0
    for bit in range(8 * len(data)):
        bad = bytearray(data)
        bad[bit // 8] ^= 0x80 >> (bit % 8)
        try:
            out = decode(bytes(bad), lengths, symbols.size, chunk=64, index=index)
        except FormatError:
            refused += 1
        else:
            assert out.shape == symbols.shape
    assert refused > len(data) // 2  # many flips break the chunk accounting (~15-28%)


def test_invalid_code_in_incomplete_code_is_refused():
    lengths = [1, 2, 0]  # codes 0 and 10; 11 is not a code
    for index in huffman.INDEXES:
        data, _ = encode(np.array([0, 1, 0]), lengths, index=index)  # 0 10 0
        assert decode(data, lengths, 3, index=index).tolist() == [0, 1, 0]
        bad = data[:-1] + bytes([0b01100000])  # 0 11 0: invalid code
        with pytest.raises(FormatError, match="stream 0: corrupt Huffman data in chunk 0"):
            decode(bad, lengths, 3, index=index)


@pytest.mark.parametrize("index", huffman.INDEXES)
def test_stall_at_chunk_end_is_detected(index):
    # Stream 0 claims 5 symbols in 8 bits, but 4 codes fill them; the 5th would be read from
    # stream 1's bits, which are invalid in stream 0's code. The decoder must not return it.
    a = (bytes([8, 0]) if index == "u16" else b"") + bytes([0b10101010])  # 10 10 10 10
    b, _ = encode(np.ones(8, np.int64), [1, 1], index=index)  # 11111111
    with pytest.raises(FormatError, match="stream 0: corrupt Huffman data"):
        decode_many([(a, [1, 2], 5), (b, [1, 1], 8)], index=index)


@pytest.mark.parametrize("index", huffman.INDEXES)
def test_tampered_chunk_index_is_refused(index):
    data, lengths, _ = make_stream(n=200, index=index)
    for value in (0, 1, 65535):
        bad = bytes([value & 0xFF, value >> 8]) + data[2:]
        with pytest.raises(FormatError, match="stream 0"):
            decode(bad, lengths, 200, chunk=64, index=index)
    data2, lengths2 = encode(np.array([0, 1, 1]), [1, 1], index=index)[0], [1, 1]  # one chunk
    with pytest.raises(FormatError, match="stream 0: padding bits after the last code are not zero"):
        decode(data2[:-1] + bytes([data2[-1] | 1]), lengths2, 3, index=index)


@pytest.mark.parametrize("index", huffman.INDEXES)
def test_absurd_symbol_count_is_refused_before_allocating(index):
    # A packed index of width 0 is 3 bytes for any number of chunks: the symbol count alone
    # must not size the decoder's per-chunk arrays (2**31 symbols: 8M chunks).
    data = bytes([8, 0, 0]) + bytes(5) if index == "packed" else bytes(16)
    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        with pytest.raises(FormatError, match="cannot hold 2147483648 symbols|too short for the index"):
            decode(data, [1, 1], 2**31, index=index)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_tampered_packed_index_is_refused():
    data, lengths, symbols = make_stream(n=200)  # 4 chunks: base, width, 3 values
    assert decode(data, lengths, 200, chunk=64).tolist() == symbols.tolist()
    width = data[2]
    with pytest.raises(FormatError, match="stream 0: chunk index width 17 exceeds 16 bits"):
        decode(data[:2] + bytes([17]) + data[3:], lengths, 200, chunk=64)
    for w in {0, width - 1, width + 1} - {width}:  # the values shift: chunk sizes break
        with pytest.raises(FormatError, match="stream 0"):
            decode(data[:2] + bytes([w]) + data[3:], lengths, 200, chunk=64)
    used = 3 * width
    assert used % 8, "the test needs padding bits in the index"
    end = 3 + -(-used // 8)
    bad = data[:end - 1] + bytes([data[end - 1] | 1]) + data[end:]
    with pytest.raises(FormatError, match="stream 0: padding bits of the chunk index are not zero"):
        decode(bad, lengths, 200, chunk=64)
    with pytest.raises(FormatError, match="index must be one of packed, u16"):
        decode(data, lengths, 200, chunk=64, index="u8")


@pytest.mark.parametrize("bad", [
    ("not bytes", [1, 1], 1),
    (b"\x01\x00\x00", [1, 1], -1),
    (b"\x01\x00\x00", [1, 1], 1.5),
    (b"\x01\x00\x00", [[1, 1]], 1),
    (b"\x01\x00\x00", ["a", "b"], 1),
    (b"\x01\x00\x00", [0, 0], 1),
    (b"\x01\x00",),
    (b"\x01\x00\x00", [[1], [1, 2]], 1),
    (b"\x01\x00\x00", {"a": 1}, 1),
    (b"\x01\x00\x00", [True, True], 1),
    (b"\x01\x00\x00", np.array([2**63, 1], np.uint64), 1),
    (b"\x01\x00\x00", [1, 1, 1], 1),
    (b"\x01\x00\x00", [25, 1], 1),
])
def test_decode_many_refuses_malformed_items(bad):
    with pytest.raises(FormatError):
        decode_many([bad])


def test_docstring_examples():
    assert doctest.testmod(huffman).failed == 0


def test_decoding_is_vectorised():
    # 400k symbols in 20 streams: a per-symbol Python loop would take seconds, this ~5 ms
    rng = np.random.default_rng(0)
    streams = []
    for _ in range(20):
        symbols = sample(rng, 20_000, 64, 0.05)
        lengths = code_lengths(np.bincount(symbols, minlength=64), max_len=12)
        streams.append((encode(symbols, lengths)[0], lengths, symbols.size))
    start = time.perf_counter()
    decode_many(streams)
    assert time.perf_counter() - start < 0.5
