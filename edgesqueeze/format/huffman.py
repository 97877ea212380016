"""Canonical, length-limited Huffman coding, vectorised with numpy in both directions.

Written by hand because no maintained Python library does what Deep Compression needs: the
libraries on PyPI either code bytes (not arbitrary small alphabets), do not limit code
lengths, store trees instead of canonical lengths, or decode one symbol per Python step,
which is three orders of magnitude too slow for a model's worth of symbols. This module
needs numpy only, so the torch-free runtime can use it.

Lengths come from package-merge (optimal under the ``max_len`` limit); codes are canonical,
so a stream is described by its code lengths alone.

**Chunked streams.** Huffman decoding is serial within a stream: where symbol ``i+1``
starts depends on symbol ``i``. To decode without a per-symbol Python loop, the encoder
deals the ``n`` symbols round-robin into ``m = ceil(n / chunk)`` chunks (chunk ``c`` holds
symbols ``c, c+m, c+2m, ...``, at most ``chunk`` of them), codes each chunk separately and
records how many bits it used. The decoder walks *all chunks of all streams at once*: at
most ``chunk`` steps, each about six numpy operations over arrays of one cursor per chunk
(peek the next bits at every cursor, look up ``length << 16 | symbol`` in a table of
``2**longest`` entries, advance); one 64-bit load per cursor serves ``57 // longest``
steps. Step ``j`` yields symbols ``j*m .. j*m+m-1``, so the output comes out in order (no
transpose). Decoding a whole model is one :func:`decode_many` call: for a SqueezeNet-sized
model (840k symbols in 52 streams) about 4-5 ms on one core of a small VM, ~180 million
symbols/s; docs/FORMAT.md has the measurements. Since format version 3 the codec writes a
stream this way only where it beats raw DEFLATE (:mod:`edgesqueeze.format.deflate`,
inflated by zlib in C) and the archive would grow by more than 1/256 without it (a packed
file: more than 1/256 or 1 KiB, whichever is more): a small model's short streams, or a
uniform index alphabet.

Stream layout (``encode`` returns these bytes), with the default packed chunk index::

    chunk index                     how many bits each chunk but the last used; m = ceil(n / chunk)
      (none when m = 1)
      u16 LE base                   the fewest bits any of chunks 0 .. m-2 used
      u8     width                  0..16
      bits[ceil((m-1) * width / 8)] chunk c used base + value c bits: m-1 values of
                                    ``width`` bits each, MSB first, zero padded to a byte
    u8     bits[...]                chunk 0's codes, chunk 1's, ...: MSB first, no gaps,
                                    zero padded to a byte (fewer than 8 zero bits)

The last chunk's size is implied: its codes end in the stream's last byte. Chunk sizes
vary little around ``chunk`` times the mean code length, so ``width`` is 5 to 8 bits where
a plain u16 per chunk took 16 (about 0.2% of a model's coded bytes instead of 1.3%).
Archives of version 1 used ``index="u16"``: a u16 LE per chunk, the last one included.

Worked example::

    >>> lengths = code_lengths(np.array([5, 2, 1, 1]))          # symbol counts
    >>> lengths.tolist(), canonical_codes(lengths).tolist()    # 0, 10, 110, 111
    ([1, 2, 3, 3], [0, 2, 6, 7])
    >>> data, nbits = encode(np.array([0, 1, 0, 3, 2]), lengths)  # one chunk: 0 10 0 111 110
    >>> nbits, data.hex()                                      # no index; 01001111 10000000
    (10, '4f80')
    >>> decode(data, lengths, 5).tolist()
    [0, 1, 0, 3, 2]
    >>> encode(np.array([0, 1, 0, 3, 2]), lengths, chunk=2)[0].hex()
    '040001407b00'

With ``chunk=2`` there are three chunks: symbols 0 and 3 (``0 111``, 4 bits), 1 and 4
(``10 110``, 5 bits), and 2 (``0``). The index is base 4 (``04 00``), width 1 (``01``) and
the values 0, 1 (``01`` padded: ``40``); the codes ``0111 10110 0`` pad to ``7b 00``.

Kept as one module of about 550 lines (a tenth of them this description) on purpose: the
stream layout, the encoder and the vectorised decoder are one format, and a change to any of
them must be made to the others side by side.
"""

from __future__ import annotations

import operator
import struct
import sys
from collections.abc import Sequence

import numpy as np

from edgesqueeze.errors import FormatError

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_INDEX",
    "INDEXES",
    "MAX_ALPHABET",
    "MAX_LEN",
    "canonical_codes",
    "code_lengths",
    "decode",
    "decode_many",
    "encode",
    "encoded_size",
    "entropy_bits",
]

DEFAULT_CHUNK = 256  # symbols per chunk: the decoder takes `chunk` steps; see docs/FORMAT.md
INDEXES = ("packed", "u16")  # chunk index layouts: archive version 2+, version 1
DEFAULT_INDEX = "packed"
MAX_LEN = 24  # longest code we accept; the decoder's table has 2**(longest code) entries
MAX_ALPHABET = 1 << 16  # decoded symbols are uint16
_MAX_CHUNK_BITS = 0xFFFF  # chunk_bits is a u16
_LITTLE = sys.byteorder == "little"  # where the symbol half of a uint32 table entry lies
_INDEX_HEAD = struct.Struct("<HB")  # packed index: base, width
_MAX_BATCH_BYTES = 1 << 28  # the decoder holds 8 bytes of windows per input byte


def code_lengths(counts: np.ndarray, max_len: int = 16) -> np.ndarray:
    """Optimal code lengths for symbol ``counts``, no code longer than ``max_len`` bits.

    Package-merge (Larmore & Hirschberg 1990), so the result is optimal under the limit and
    equals plain Huffman when the limit does not bind. Unused symbols get length 0; a lone
    used symbol gets length 1. Ties are broken by symbol number, so it is deterministic.

    >>> code_lengths(np.array([5, 2, 1, 1])).tolist()
    [1, 2, 3, 3]
    >>> code_lengths(np.array([8, 5, 3, 2, 1, 1]), max_len=3).tolist()   # Huffman: 1..5
    [2, 2, 3, 3, 3, 3]
    """
    counts = _array(counts, "counts")
    if counts.ndim != 1 or not (counts.dtype.kind in "iu" or counts.size == 0):
        raise FormatError(f"counts must be a 1-D integer array, got {counts.dtype} {counts.shape}")
    if counts.size > MAX_ALPHABET:
        raise FormatError(f"alphabet of {counts.size} symbols exceeds {MAX_ALPHABET}")
    if counts.size and counts.min() < 0:
        raise FormatError("counts must be non-negative")
    max_len = operator.index(max_len)
    if not 1 <= max_len <= MAX_LEN:
        raise FormatError(f"max_len must be in 1..{MAX_LEN}, got {max_len}")
    lengths = np.zeros(counts.size, np.uint8)
    used = np.flatnonzero(counts)
    n = used.size
    if n <= 1:
        lengths[used] = 1
        return lengths
    if n > 1 << max_len:
        raise FormatError(f"{n} symbols cannot have codes of at most {max_len} bits")
    order = used[np.argsort(counts[used], kind="stable")]  # lightest first, ties by symbol
    leaves = counts[order].astype(np.int64)
    # Lists from the deepest level (leaves only) up to level 1; remember which entries are
    # packages. Leaves sort before packages of equal weight.
    is_package = []
    level = leaves
    for _ in range(max_len - 1):
        m = level.size // 2 * 2
        merged = np.concatenate([leaves, level[0:m:2] + level[1:m:2]])
        idx = np.argsort(merged, kind="stable")
        is_package.append(idx >= n)
        level = merged[idx]
    # Select the 2n-2 cheapest items at level 1, then walk down: each selected package
    # selects its two parts one level deeper. Selected leaves are always a prefix of the
    # sorted leaves, and each selection of a leaf adds one bit to its length.
    depth = np.zeros(n, np.int64)
    take = 2 * n - 2
    for flags in reversed(is_package):
        packages = int(np.count_nonzero(flags[:take]))
        depth[: take - packages] += 1
        take = 2 * packages
    depth[:take] += 1
    lengths[order] = depth
    return lengths


def _array(value, what: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged lists and the like
        raise FormatError(f"{what} must be a 1-D integer array: {exc}") from None


def _check_lengths(lengths) -> np.ndarray:
    """Validate a code-length table (it may come from a file) and return it as uint8."""
    arr = _array(lengths, "code lengths")
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise FormatError(f"code lengths must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.size > MAX_ALPHABET:
        raise FormatError(f"alphabet of {arr.size} symbols exceeds {MAX_ALPHABET}")
    if arr.size and (arr.min() < 0 or arr.max() > MAX_LEN):
        raise FormatError(f"code lengths must be in 0..{MAX_LEN}, got {arr.min()}..{arr.max()}")
    arr = arr.astype(np.uint8)
    if arr.any():
        top = int(arr.max())
        used = arr[arr > 0].astype(np.int64)
        if int(np.sum(np.int64(1) << (top - used))) > 1 << top:
            raise FormatError("code lengths are over-subscribed (Kraft sum > 1): not a prefix code")
    return arr


def _canonical(lengths: np.ndarray):
    """(symbols in canonical order, their lengths, their codes, longest length)."""
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]  # by length, then symbol
    ls = lengths[order].astype(np.int64)
    top = int(ls[-1]) if ls.size else 0
    # Kraft partial sums in units of 2**-top: code_i = sum_{j<i} 2**(l_i - l_j), exactly.
    width = np.int64(1) << (top - ls)
    start = np.cumsum(width) - width
    return order, ls, start >> (top - ls), top


def canonical_codes(lengths) -> np.ndarray:
    """Canonical codes (as in DEFLATE) for a length table; unused symbols get 0.

    Shorter codes come first, equal lengths in symbol order, each code the previous plus one
    (shifted left when the length grows). So only the lengths need storing.

    >>> canonical_codes([2, 1, 3, 3]).tolist()      # 10, 0, 110, 111
    [2, 0, 6, 7]
    """
    lengths = _check_lengths(lengths)
    order, _, codes, _ = _canonical(lengths)
    out = np.zeros(lengths.size, np.uint32)
    out[order] = codes
    return out


def _check_index(index) -> None:
    if index not in INDEXES:
        raise FormatError(f"index must be one of {', '.join(INDEXES)}, got {index!r}")


def _check_chunk(chunk) -> int:
    chunk = operator.index(chunk)
    if not 1 <= chunk <= 4096:
        raise FormatError(f"chunk must be in 1..4096 symbols, got {chunk}")
    return chunk


def encode(symbols: np.ndarray, lengths, *, chunk: int = DEFAULT_CHUNK,
           index: str = DEFAULT_INDEX) -> tuple[bytes, int]:
    """Code ``symbols`` with the canonical code of ``lengths``; return (stream bytes, nbits).

    ``nbits`` counts the Huffman bits only; the stream also holds the chunk index (see the
    module docstring; ``index="u16"`` writes version 1's). No per-symbol Python loop: every
    code is expanded to its bits with ``np.repeat`` and packed MSB-first with ``np.packbits``.
    """
    lengths = _check_lengths(lengths)
    chunk = _check_chunk(chunk)
    _check_index(index)
    sym = _array(symbols, "symbols")
    if sym.size == 0:
        return b"", 0
    if sym.ndim != 1 or sym.dtype.kind not in "iu":
        raise FormatError(f"symbols must be a 1-D integer array, got {sym.dtype} {sym.shape}")
    if sym.min() < 0 or sym.max() >= lengths.size:
        raise FormatError(f"symbols must be in 0..{lengths.size - 1}, got {sym.min()}..{sym.max()}")
    if chunk * int(lengths.max()) > _MAX_CHUNK_BITS:
        raise FormatError(f"chunk {chunk} x longest code {lengths.max()} bits exceeds "
                          f"{_MAX_CHUNK_BITS} bits (the chunk index is u16)")
    sym = sym.astype(np.intp)
    ls = lengths[sym].astype(np.int64)
    if not ls.all():
        bad = int(sym[np.argmin(ls)])
        raise FormatError(f"symbol {bad} occurs but has no code (length 0)")
    n = sym.size
    m = -(-n // chunk)  # chunks; chunk c holds symbols c, c+m, c+2m, ...
    rows = -(-n // m)
    chunk_bits = _chunk_bits(ls, m)
    grid = np.arange(rows * m).reshape(rows, m).T.reshape(-1)
    order = grid[grid < n]  # symbol numbers, chunk after chunk
    ls = ls[order]
    codes = canonical_codes(lengths).astype(np.int64)[sym[order]]
    ends = np.cumsum(ls)
    nbits = int(ends[-1])
    # bit p belongs to the symbol covering it; it is bit (end - 1 - p) of that code
    shift = np.repeat(ends, ls) - 1 - np.arange(nbits)
    bits = (np.repeat(codes, ls) >> shift) & 1
    return _pack_index(chunk_bits, index) + np.packbits(bits.astype(np.uint8)).tobytes(), nbits


def encoded_size(symbols: np.ndarray, lengths, *, chunk: int = DEFAULT_CHUNK,
                 index: str = DEFAULT_INDEX) -> int:
    """``len(encode(symbols, lengths, chunk=chunk, index=index)[0])``, counted without coding:
    the bits of each chunk are summed, not expanded (what a writer choosing among codings of
    the same data needs; the gap width of a shared tensor is chosen among eight)."""
    lengths = _check_lengths(lengths)
    chunk = _check_chunk(chunk)
    _check_index(index)
    sym = _array(symbols, "symbols").astype(np.intp)
    if sym.size == 0:
        return 0
    ls = lengths[sym].astype(np.int64)
    chunk_bits = _chunk_bits(ls, -(-sym.size // chunk))
    return _index_size(chunk_bits, index) + (int(chunk_bits.sum()) + 7) // 8


def _chunk_bits(ls: np.ndarray, m: int) -> np.ndarray:
    """The bits of each of ``m`` chunks, given each symbol's code length in stream order:
    chunk c holds symbols c, c+m, c+2m, ... (column c of the symbols laid out m to a row)."""
    grid = np.zeros(-(-ls.size // m) * m, np.int64)
    grid[:ls.size] = ls
    return grid.reshape(-1, m).sum(axis=0)


def _index_size(chunk_bits: np.ndarray, index: str) -> int:
    """``len(_pack_index(chunk_bits, index))``."""
    if index == "u16":
        return 2 * chunk_bits.size
    known = chunk_bits[:-1]
    if not known.size:
        return 0
    width = int(known.max() - known.min()).bit_length()
    return _INDEX_HEAD.size + (known.size * width + 7) // 8


def _pack_index(chunk_bits: np.ndarray, index: str) -> bytes:
    if index == "u16":
        return chunk_bits.astype("<u2").tobytes()
    known = chunk_bits[:-1]  # the last chunk's size is implied by the stream's length
    if not known.size:
        return b""
    base = int(known.min())
    values = known - base
    width = int(values.max()).bit_length()
    planes = (values[:, None] >> np.arange(width - 1, -1, -1)) & 1  # MSB first
    return _INDEX_HEAD.pack(base, width) + np.packbits(planes.astype(np.uint8).reshape(-1)).tobytes()


_MAX_TABLE = 1 << 24  # decoder table entries for one batch (64 MiB): refuse more


def _tables(codes: list[np.ndarray], names: list[int]):
    """Check the code-length tables of a batch and build all decoder tables in one pass.

    Returns (table, longest code per stream, where each stream's part of ``table`` starts).
    A stream's part has ``2**longest`` entries indexed by the next ``longest`` bits, each
    ``length << 16 | symbol``. Bit patterns that start no code (incomplete codes) hold 0:
    length 0, so the decoder's cursor stalls there, which :func:`decode_many` detects.
    """
    sizes = np.array([c.size for c in codes])
    first = np.cumsum(sizes) - sizes
    sid = np.repeat(np.arange(sizes.size), sizes)
    L = np.concatenate(codes, dtype=np.int64, casting="unsafe")  # huge uint64 -> negative
    bad = np.flatnonzero((L < 0) | (L > MAX_LEN))
    if bad.size:
        raise FormatError(f"stream {names[sid[bad[0]]]}: code lengths must be in 0..{MAX_LEN}, "
                          f"got {L[bad[0]]}")
    tops = np.maximum.reduceat(L, first)
    for s in np.flatnonzero(tops == 0):
        raise FormatError(f"stream {names[s]}: has symbols to decode but all its code lengths are 0")
    used = np.flatnonzero(L)
    width = np.zeros_like(L)
    width[used] = np.int64(1) << (tops[sid[used]] - L[used])
    room = np.int64(1) << tops
    filled = np.add.reduceat(width, first)
    for s in np.flatnonzero(filled > room):
        raise FormatError(f"stream {names[s]}: code lengths are over-subscribed (Kraft sum > 1): "
                          "not a prefix code")
    if room.sum() > _MAX_TABLE:
        raise FormatError(f"codes need {room.sum()} decoder table entries, more than {_MAX_TABLE}")
    # Canonical order: by stream, then length, then symbol (lexsort is stable). The codes
    # of a stream then tile its table from 0; incomplete codes get a 0 filler at the end.
    order = used[np.lexsort((L[used], sid[used]))]
    values = (L[order] << 16 | (order - first[sid[order]])).astype(np.uint32)
    ends = np.cumsum(np.bincount(sid[used], minlength=sizes.size))
    values = np.insert(values, ends, 0)
    widths = np.insert(width[order], ends, room - filled)
    return np.repeat(values, widths), tops, np.cumsum(room) - room


def _windows(buf: np.ndarray, step: int = 1) -> np.ndarray:
    """The 64 bits starting at every ``step``-th byte of ``buf``, big-endian, as native
    uint64: a bit string read 64 bits at a time from any byte (``buf`` ends in >= 7 spare
    bytes so that every window is whole)."""
    return np.ndarray(((buf.size - 8) // step + 1,), ">u8", buf, 0, (step,)).astype(np.uint64)


def _unpack_index(heads: list[tuple[memoryview, int, int]], ms: np.ndarray) -> np.ndarray:
    """Chunk sizes in bits from packed indexes ``(bytes, base, width)``, one per chunk of
    every stream, in order; 0 for each stream's last chunk, whose size the index omits.
    Vectorised like the decoder: one 64-bit big-endian load per value."""
    counts = ms - 1
    out = np.zeros(int(ms.sum()), np.int64)
    if not counts.any():
        return out
    parts = [h[0][_INDEX_HEAD.size:] for h in heads]
    lens = np.array([len(p) for p in parts])
    buf = np.frombuffer(b"".join(parts) + bytes(8), np.uint8)
    W = _windows(buf)
    k0 = np.cumsum(counts) - counts
    j = np.arange(int(counts.sum())) - np.repeat(k0, counts)
    width = np.repeat(np.array([h[2] for h in heads], np.int64), counts)
    off = np.repeat(8 * (np.cumsum(lens) - lens), counts) + j * width
    value = (W[off >> 3] << (off & 7).astype(np.uint64)) >> np.uint64(1) >> (63 - width).astype(np.uint64)
    col0 = np.cumsum(ms) - ms
    out[np.repeat(col0, counts) + j] = value.astype(np.int64) + np.repeat(np.array([h[1] for h in heads]), counts)
    return out


def decode(data: bytes, lengths, n_symbols: int, *, chunk: int = DEFAULT_CHUNK,
           index: str = DEFAULT_INDEX) -> np.ndarray:
    """Decode one stream made by :func:`encode`; returns ``n_symbols`` uint16 symbols."""
    return decode_many([(data, lengths, n_symbols)], chunk=chunk, index=index)[0]


def decode_many(streams: Sequence[tuple[bytes, object, int]], *, chunk: int | Sequence[int] = DEFAULT_CHUNK,
                index: str = DEFAULT_INDEX) -> list[np.ndarray]:
    """Decode many ``(data, lengths, n_symbols)`` streams in one vectorised pass.

    All chunks of all streams advance together (see the module docstring). Sizes are checked
    before anything is allocated; after decoding, every chunk must have used exactly its
    recorded bits through valid codes. Damage raises :class:`FormatError` naming the stream.
    Returns one uint16 array per stream. ``chunk`` is one size for all streams or one per
    stream.

    >>> a = encode(np.array([1, 1, 0]), [1, 1]); b = encode(np.array([2]), [1, 2, 2])
    >>> [s.tolist() for s in decode_many([(a[0], [1, 1], 3), (b[0], [1, 2, 2], 1)])]
    [[1, 1, 0], [2]]
    """
    chunks = [_check_chunk(chunk)] * len(streams) if not isinstance(chunk, Sequence) else [
        _check_chunk(c) for c in chunk]
    if len(chunks) != len(streams):
        raise FormatError(f"{len(chunks)} chunk sizes for {len(streams)} streams")
    _check_index(index)
    packed = index == "packed"
    live, ns, ms, codes, heads, bodies = [], [], [], [], [], []
    for i, item in enumerate(streams):
        try:
            data, lengths, n = item
            data = memoryview(data).cast("B")
            n = operator.index(n)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"stream {i}: expected (bytes, code lengths, symbol count): "
                              f"{exc}") from None
        lengths = _array(lengths, f"stream {i}: code lengths")
        if (lengths.ndim != 1 or not (lengths.dtype.kind in "iu" or lengths.size == 0)
                or lengths.size > MAX_ALPHABET):
            raise FormatError(f"stream {i}: code lengths must be a 1-D integer array of at most "
                              f"{MAX_ALPHABET} entries, got {lengths.dtype} {lengths.shape}")
        if n <= 0:
            if n < 0 or len(data):
                raise FormatError(f"stream {i}: {n} symbols but {len(data)} bytes")
            continue
        if not lengths.size:
            raise FormatError(f"stream {i}: {n} symbols but the code has no symbols")
        m = -(-n // chunks[i])
        head = (0, 0)  # packed index: base, width
        if not packed:
            size = 2 * m
        elif m == 1:
            size = 0
        elif len(data) < _INDEX_HEAD.size:
            size = _INDEX_HEAD.size
        else:
            head = _INDEX_HEAD.unpack_from(data)
            if head[1] > 16:
                raise FormatError(f"stream {i}: chunk index width {head[1]} exceeds 16 bits")
            used = (m - 1) * head[1]
            size = _INDEX_HEAD.size + (used + 7) // 8
            if used % 8 and size <= len(data) and data[size - 1] & ((1 << (8 - used % 8)) - 1):
                raise FormatError(f"stream {i}: padding bits of the chunk index are not zero")
        if size > len(data):
            raise FormatError(f"stream {i}: {len(data)} bytes, too short for the index of {m} chunks")
        if 8 * (len(data) - size) < n:  # every code has a bit: bounds what n can allocate
            raise FormatError(f"stream {i}: {len(data) - size} bytes of codes cannot hold {n} symbols")
        live.append(i)
        ns.append(n)
        ms.append(m)
        codes.append(lengths)
        heads.append((data[:size], *head))
        bodies.append(data[size:])
    out_list = [np.zeros(0, np.uint16) for _ in streams]
    if not live:
        return out_list
    table, tops, base = _tables(codes, live)

    # Every chunk's size in bits, checked at once before allocating anything that depends on
    # it. A packed index leaves the last chunk open: it gets the rest of its stream's bytes,
    # which must hold its codes and fewer than 8 bits of padding (checked after decoding).
    ns, ms = np.array(ns), np.array(ms)
    col0 = np.cumsum(ms) - ms
    sizes = np.array([len(b) for b in bodies])
    lane = np.arange(int(ms.sum())) - np.repeat(col0, ms)
    count = (np.repeat(ns, ms) - lane + np.repeat(ms, ms) - 1) // np.repeat(ms, ms)
    top = np.repeat(tops, ms)
    if packed:
        bits = _unpack_index(heads, ms)  # 0 for the open chunks
        is_open = np.zeros(bits.size, bool)
        is_open[col0 + ms - 1] = True
        bits[is_open] = 8 * sizes - np.add.reduceat(bits, col0)  # the rest of each stream
    else:
        bits = np.frombuffer(b"".join(h[0] for h in heads), "<u2").astype(np.int64)
        is_open = np.zeros(bits.size, bool)
    bad = np.flatnonzero((bits < count) | (bits > count * top + 7 * is_open))
    if bad.size:
        c = int(bad[0])
        s = int(np.searchsorted(col0, c, "right")) - 1
        if is_open[c]:
            raise FormatError(f"stream {live[s]}: {sizes[s]} bytes of codes leave {bits[c]} bits for "
                              f"the last chunk's {count[c]} symbols of 1..{tops[s]} bits")
        raise FormatError(f"stream {live[s]}: chunk {lane[c]} declares {bits[c]} bits for "
                          f"{count[c]} symbols of 1..{tops[s]} bits")
    nbits = np.add.reduceat(bits, col0)
    index_size = [len(h[0]) for h in heads]
    for s in np.flatnonzero(sizes != (nbits + 7) // 8):
        raise FormatError(f"stream {live[s]}: {index_size[s] + sizes[s]} bytes but its chunk index "
                          f"declares {index_size[s]} + {(nbits[s] + 7) // 8} ({nbits[s]} bits)")
    for s, body in enumerate(bodies):
        if not packed and nbits[s] % 8 and body[-1] & ((1 << (8 - nbits[s] % 8)) - 1):
            raise FormatError(f"stream {live[s]}: padding bits after the last code are not zero")
    if sizes.sum() > _MAX_BATCH_BYTES:
        raise FormatError(f"streams too large for one batch (> {_MAX_BATCH_BYTES} bytes)")
    rows = (ns + ms - 1) // ms
    rows_max, top_max, n_cols = int(rows.max()), int(tops.max()), int(ms.sum())
    end = np.cumsum(bits) + np.repeat(8 * (np.cumsum(sizes) - sizes) - (np.cumsum(nbits) - nbits), ms)
    cur = (end - bits).astype(np.uint64)
    ends = end.astype(np.uint64)
    rs = np.repeat(64 - tops, ms).astype(np.uint64)
    base = np.repeat(base, ms).astype(np.uint64)

    # W[i] = the 64 bits starting at byte g * i, big-endian (g = 1 or 2 bytes). A cursor at
    # bit p loads the window W[p >> sh] << (p & (8g - 1)), sh = log2(8g): at least
    # 65 - 8g valid bits, enough for k = (65 - 8g) // top codes, so one load serves k
    # symbols; each peeks as window >> (64 - top) and shifts its code out. g = 2 halves W
    # (the decoder's largest array) and is taken when it costs no loads: for codes of up
    # to 12 bits, k is 4 either way. A cursor never moves more than rows * top bits past
    # its chunk's start, so padding by that much keeps every load in range: garbage read
    # past a short chunk is never used.
    g = 2 if 49 // top_max == 57 // top_max else 1
    k = (65 - 8 * g) // top_max
    pad = -(-(rows_max + k) * top_max // 8) + 8
    buf = np.frombuffer(b"".join(bodies) + bytes(pad), np.uint8)
    W = _windows(buf, g)
    sh, low = np.uint64(2 + g), np.uint64(8 * g - 1)
    # Chunk c of a stream holds `rows` or `rows - 1` symbols (the first r chunks hold
    # `rows`). Keep each chunk's cursor after its last symbol (must be its end) and after
    # the one before (must be short of it): an invalid code has length 0, so the cursor
    # stalls on it and cannot pass both checks.
    last, before = np.empty_like(cur), np.empty_like(cur)
    marks: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for n, c0, m, r_s in zip(ns.tolist(), col0.tolist(), ms.tolist(), rows.tolist()):
        r = n - (r_s - 1) * m
        full, short = np.arange(c0, c0 + r), np.arange(c0 + r, c0 + m)
        for j, target, cols in ((r_s - 1, last, full), (r_s - 2, before, full),
                                (r_s - 2, last, short), (r_s - 3, before, short)):
            if cols.size:
                marks.setdefault(j, []).append((target, cols))
    for target, cols in marks.pop(-1, []):
        target[cols] = cur[cols]
    out = np.empty((rows_max, n_cols), np.uint32)  # row j: symbol j of every chunk
    byte, win, t = np.empty_like(cur), np.empty_like(cur), np.empty_like(cur)
    step = np.empty(n_cols, np.uint64)  # uint64 like cur and win: no casts in the loop
    for j0 in range(0, rows_max, k):
        np.right_shift(cur, sh, out=byte)
        W.take(byte.view(np.int64), out=win, mode="wrap")  # in range by construction; fast mode
        np.bitwise_and(cur, low, out=byte)
        np.left_shift(win, byte, out=win)
        for j in range(j0, min(j0 + k, rows_max)):
            np.right_shift(win, rs, out=t)
            np.add(t, base, out=t)
            e = out[j]
            table.take(t.view(np.int64), out=e, mode="wrap")
            np.right_shift(e, 16, out=step)
            np.add(cur, step, out=cur)
            np.left_shift(win, step, out=win)
            for target, cols in marks.get(j, ()):
                target[cols] = cur[cols]
    bad = (last != ends) | (before >= ends)
    if packed:  # an open chunk ends in its stream's last byte, before only zero bits
        pad = (ends - last)[is_open]
        tail = buf[((ends[is_open] - 1) >> 3).astype(np.intp)]
        bad[is_open] = ((last > ends) | (before >= last))[is_open] | (pad > 7) | (
            tail & ((np.uint64(1) << np.minimum(pad, 7)) - 1) != 0)
        for c in np.flatnonzero(bad & is_open)[:1]:
            s = int(np.searchsorted(col0, c, "right")) - 1
            if last[c] <= ends[c] and before[c] < last[c]:
                raise FormatError(f"stream {live[s]}: padding bits after the last code are not zero"
                                  if pad[s] <= 7 else f"stream {live[s]}: {pad[s] // 8} bytes "
                                  "after the last code")
    bad = np.flatnonzero(bad)
    if bad.size:
        c = int(bad[0])
        s = int(np.searchsorted(col0, c, "right")) - 1
        raise FormatError(f"stream {live[s]}: corrupt Huffman data in chunk {lane[c]} "
                          "(an invalid code, or codes that do not fill the chunk's recorded bits)")
    # The low 16 bits of an entry are the symbol (a uint16 view of them copies faster than
    # a cast of the entries); row-major order is symbol order.
    sym = out.view(np.uint16)[:, 0::2] if _LITTLE else out.view(np.uint16)[:, 1::2]
    for i, n, c0, m, r_s in zip(live, ns.tolist(), col0.tolist(), ms.tolist(), rows.tolist()):
        out_list[i] = sym[:r_s, c0:c0 + m].reshape(-1)[:n]  # reshape copies
    return out_list


def entropy_bits(symbols: np.ndarray) -> float:
    """Zeroth-order entropy of ``symbols`` times their count: the ideal coded size in bits.

    >>> entropy_bits(np.array([0, 0, 1, 1]))
    4.0
    """
    sym = np.asarray(symbols).reshape(-1)
    if sym.size == 0:
        return 0.0
    _, counts = np.unique(sym, return_counts=True)
    p = counts / sym.size
    return float(-(counts * np.log2(p)).sum()) + 0.0

