"""Symbol streams as raw DEFLATE (RFC 1951): written here, inflated by the standard library.

A shared tensor's cluster indices and gaps are streams of small symbols (at most 256
distinct values). :mod:`edgesqueeze.format.huffman` codes them in chunks that numpy can
decode in lockstep; this module codes the same symbols as one *dynamic-Huffman DEFLATE
block of literals*: one byte per symbol, no back-references, an end-of-block code. The
Huffman code is the same kind (canonical, optimal under a length limit: package-merge,
15 bits here, as DEFLATE allows); what differs is who decodes it. ``zlib`` (in every
Python, and in every language) inflates it in C, several times faster than the numpy
lockstep decoder, and the stream needs no chunk index. Its price is DEFLATE's block
header (the code lengths, run-length coded and themselves Huffman coded: 15-40 bytes),
which is why :mod:`edgesqueeze.format.codec` writes each stream in whichever form is
smaller (DEFLATE wins for all but short or uniformly distributed streams), and drops the
last Huffman streams of an archive when that costs little (``codec.has_huffman``).

The decoder accepts any raw DEFLATE stream that inflates to exactly the recorded number of
bytes (so other writers may use stored blocks or back-references); the symbols are those
bytes. Example::

    >>> data = encode(np.array([3, 3, 3, 1, 0, 3]))
    >>> decode(data, 6, 4, "s").tolist()
    [3, 3, 3, 1, 0, 3]
    >>> import zlib; list(zlib.decompress(data, -15))
    [3, 3, 3, 1, 0, 3]
"""

from __future__ import annotations

import zlib

import numpy as np

from edgesqueeze.errors import FormatError
from edgesqueeze.format import huffman

__all__ = ["MAX_ALPHABET", "decode", "encode", "encoded_size"]

MAX_ALPHABET = 256  # literals 0..255; symbol 256 ends the block
_MAX_LEN = 15  # DEFLATE's longest literal code
_EOB = 256
# order in which the code-length code's lengths are stored (RFC 1951, 3.2.7)
_CL_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)


def _lsb(value: int, n: int) -> list[int]:
    """``n`` bits of ``value``, least significant first (DEFLATE's header fields)."""
    return [(value >> i) & 1 for i in range(n)]


def _msb(code: int, n: int) -> list[int]:
    """A Huffman code's ``n`` bits, most significant first (as DEFLATE stores codes)."""
    return [(code >> (n - 1 - i)) & 1 for i in range(n)]


def _run_lengths(lengths: list[int]) -> list[tuple[int, int, int]]:
    """DEFLATE's run-length coding of a code-length sequence: ``(symbol, extra, extra bits)``
    with 16 = repeat the previous length 3-6 times, 17 = 3-10 zeros, 18 = 11-138 zeros."""
    out: list[tuple[int, int, int]] = []
    i, n = 0, len(lengths)
    while i < n:
        v, j = lengths[i], i
        while j < n and lengths[j] == v:
            j += 1
        run = j - i
        if v == 0:
            while run >= 11:
                k = min(run, 138)
                out.append((18, k - 11, 7))
                run -= k
            if run >= 3:
                out.append((17, run - 3, 3))
                run = 0
        else:
            out.append((v, 0, 0))
            run -= 1
            while run >= 3:
                k = min(run, 6)
                out.append((16, k - 3, 2))
                run -= k
        out += [(v, 0, 0)] * run
        i = j
    return out


def _checked(symbols: np.ndarray) -> np.ndarray:
    sym = np.asarray(symbols)
    if sym.ndim != 1 or sym.size == 0 or sym.dtype.kind not in "iu":
        raise FormatError(f"symbols must be a non-empty 1-D integer array, got {sym.dtype} {sym.shape}")
    if sym.min() < 0 or sym.max() >= MAX_ALPHABET:
        raise FormatError(f"DEFLATE literals are 0..255, got {sym.min()}..{sym.max()}")
    return sym.astype(np.intp)


def _block_code(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``(symbol counts with the end-of-block code, literal code lengths, header bits)``."""
    counts = np.bincount(sym, minlength=_EOB + 1)
    counts[_EOB] = 1
    lengths = huffman.code_lengths(counts, max_len=_MAX_LEN)
    # 257 literal/length code lengths (HLIT = 257), then one distance code of length 0 (no
    # distances: RFC 1951 3.2.7), run-length coded together as the RFC allows
    runs = _run_lengths([int(v) for v in lengths] + [0])
    cl_lengths = huffman.code_lengths(np.bincount([r[0] for r in runs], minlength=19), max_len=7)
    cl_codes = huffman.canonical_codes(cl_lengths)
    hclen = max([4] + [i + 1 for i, s in enumerate(_CL_ORDER) if cl_lengths[s]])
    head = [1] + _lsb(2, 2) + _lsb(0, 5) + _lsb(0, 5) + _lsb(hclen - 4, 4)  # BFINAL, BTYPE=dynamic
    for s in _CL_ORDER[:hclen]:
        head += _lsb(int(cl_lengths[s]), 3)
    for s, extra, nbits in runs:
        head += _msb(int(cl_codes[s]), int(cl_lengths[s])) + _lsb(extra, nbits)
    return counts, lengths, head


def encode(symbols: np.ndarray) -> bytes:
    """``symbols`` (integers in 0..255, at least one) as one final dynamic-Huffman DEFLATE
    block of literals, zero padded to a byte. Deterministic: optimal code lengths with ties
    broken by symbol (:func:`huffman.code_lengths`), run-length codes taken greedily."""
    sym = _checked(symbols)
    _, lengths, head = _block_code(sym)
    codes = huffman.canonical_codes(lengths).astype(np.int64)
    # the literals and the end-of-block code, each code MSB first (no per-symbol Python loop)
    allsym = np.append(sym, _EOB)
    ls = lengths[allsym].astype(np.int64)
    ends = np.cumsum(ls)
    shift = np.repeat(ends, ls) - 1 - np.arange(int(ends[-1]))
    body = (np.repeat(codes[allsym], ls) >> shift) & 1
    bits = np.concatenate([np.array(head, np.uint8), body.astype(np.uint8)])
    return np.packbits(bits, bitorder="little").tobytes()


def encoded_size(symbols: np.ndarray) -> int:
    """``len(encode(symbols))``, counted without coding (the header built, the body's bits
    summed from the symbol counts)."""
    counts, lengths, head = _block_code(_checked(symbols))
    return (len(head) + int(counts @ lengths.astype(np.int64)) + 7) // 8


def decode(data, n: int, alphabet: int, what: str) -> np.ndarray:
    """The ``n`` symbols (uint8) of a raw DEFLATE stream, each below ``alphabet``. Refuses,
    naming ``what``, a stream that does not inflate, inflates to another length, or has
    bytes after its last block."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data, n + 1)  # never more than one symbol too many
    except zlib.error as exc:
        raise FormatError(f"{what}: DEFLATE stream does not inflate ({exc})") from None
    if len(out) != n or not d.eof or d.unused_data:
        raise FormatError(f"{what}: DEFLATE stream inflates to {len(out)}{'+' if not d.eof else ''} "
                          f"symbols{' and has bytes after its end' if d.unused_data else ''}, "
                          f"recorded {n}")
    sym = np.frombuffer(out, np.uint8)
    if n and alphabet < 256 and int(sym.max()) >= alphabet:
        raise FormatError(f"{what}: symbol {int(sym.max())} is outside its alphabet of {alphabet}")
    return sym
