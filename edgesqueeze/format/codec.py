"""Encode a weight-shared, pruned state_dict into `.esq` sections, and back, bit-exactly.

numpy and the standard library only: a state_dict here is a ``{name: numpy array}`` mapping
(:func:`edgesqueeze.checkpoint.esq_dumps` and :func:`~edgesqueeze.checkpoint.esq_loads` convert
torch tensors), so the torch-free runtime and any tool can read an archive.

A *shared* tensor is one whose non-zero values come from small codebooks (at most
:data:`MAX_CODEBOOK` distinct values, for the whole tensor or for each slice along one
axis): exactly what pruning plus k-means weight sharing produce, and what the released
Deep Compression SqueezeNet already is. Each shared tensor becomes one section::

    ks         per-slice codebook sizes, u16 each (only with an axis)
    codebook   the values, float16 or float32 (float16 only when every value survives it)
    lengths    Huffman code lengths of the index and gap alphabets, 4 bits each
    idx        the codebook index of every coded position, row-major
    gap        the relative positions ("gaps") of the non-zero weights

Each of the two symbol streams is coded the smallest way (info "z", format version 3): a
chunked Huffman stream (:mod:`~edgesqueeze.format.huffman`, its code lengths in
``lengths``), raw DEFLATE (:mod:`~edgesqueeze.format.deflate`: zlib inflates it in C,
several times faster than numpy's lockstep Huffman decoder), or one bit per symbol for a
two-symbol alphabet; an archive drops its last Huffman streams when that costs at most
1/256 of it, a packed file when it costs at most 1/256 or 1 KiB (:func:`has_huffman`).

Two modes, the smaller kept per layer. *Sparse*: only non-zeros are coded, their positions
as gaps (Han et al. 2016, section 3): the number of zeros before each non-zero, in a fixed
width of ``w`` bits. The largest symbol ``E = 2**w - 1`` is the filler: it advances ``E``
positions and places no weight, so a wider gap costs extra gap symbols but no index
symbols; ``w`` is chosen by coding the gaps at every width and keeping the smallest.
*Dense* (``w = 0``): 0.0 joins the codebook and every position is coded, no gaps; it wins
for nearly dense layers, where a gap stream would cost at least a bit per weight.

Every other tensor (biases, BatchNorm statistics, a weight with too many distinct values)
is stored raw, little-endian, in one ``raw`` section with a table of names, dtypes and
shapes. Decoding restores the exact bits of every tensor.

Example: ``[0, 0, 0.5, 0, -0.25, 0.5]`` has codebook ``[-0.25, 0.5]``, indices ``[1, 0, 1]``
and gaps ``[2, 1, 0]``; at ``w = 1`` (``E = 1``) the gaps become ``[1, 1, 0, 1, 0, 0]``
(two fillers, then gap 0; one filler, then gap 0; gap 0).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from edgesqueeze.format import container, deflate, huffman
from edgesqueeze.errors import FormatError

MAX_CODEBOOK = 256
# How a shared section's streams are coded: its info's "z" holds one 2-bit code per stream,
# the cluster indices' in bits 0-1, the gaps' in bits 2-3 (absent: 0, both Huffman).
Z_HUFFMAN, Z_DEFLATE, Z_BITS = 0, 1, 2  # chunked Huffman (huffman.py), raw DEFLATE, one bit each
Z_SHIFT = 2  # the gap stream's code is z >> Z_SHIFT
HUFFMAN_SHARE = 256  # an archive drops its Huffman streams if that costs at most 1/256 of it
# ... and a packed file (the deployable, decoded at every load) if it costs at most 1 KiB: numpy's
# lockstep pass takes ~2-3 ms whatever the streams' size, two to three times a small model's plain
# load (the digits and MNIST files: 1.3-1.9% larger, decoding 4 ms -> 1-2 ms; notes, session 46)
PACKED_HUFFMAN_FLOOR = 1024
MAX_CODE_LEN = 12  # 4-bit length fields; 12 keeps the decoder's tables small and fast
MAX_GAP_WIDTH = 8
RAW_SECTION = "raw"
CHUNK = huffman.DEFAULT_CHUNK  # symbols per Huffman chunk; a section's info "c" overrides it
LARGE_CHUNK = 128  # for models with at least LARGE_MODEL non-zero shared weights
LARGE_MODEL = 1 << 18

# The dtypes a raw section stores, by name (numpy's; torch's are the same names). bfloat16
# is listed so that it is refused by name: numpy has no such dtype, so its owner refuses it.
_NP_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": None,
    "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}
STORABLE_DTYPES = tuple(name for name, dt in _NP_DTYPES.items() if dt is not None)


@dataclass
class LayerStats:
    """What one tensor cost, for reports."""

    name: str
    kind: str  # "shared" | "raw"
    numel: int
    nonzero: int
    bytes: int
    codebook_bytes: int = 0
    idx_bytes: int = 0
    gap_bytes: int = 0
    idx_entropy_bits: float = 0.0
    gap_entropy_bits: float = 0.0
    k: int = 0
    gap_width: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Gaps


def gaps_from_positions(pos: np.ndarray, width: int) -> np.ndarray:
    """Gap symbols (with fillers) for sorted flat positions of the non-zeros."""
    esc = (1 << width) - 1
    raw = np.diff(pos, prepend=-1) - 1  # zeros before each non-zero
    n_fill = raw // esc
    rem = raw - n_fill * esc
    # each non-zero emits n_fill fillers then its remainder
    out_len = n_fill + 1
    out = np.full(int(out_len.sum()), esc, dtype=np.int64)
    out[np.cumsum(out_len) - 1] = rem
    return out


def positions_from_gaps(gaps: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`gaps_from_positions` (vectorised)."""
    esc = (1 << width) - 1
    if esc == 1:  # every symbol, weight (0) or filler (1), advances one position
        return np.flatnonzero(gaps == 0)
    g = gaps.astype(np.int64)
    real = gaps != esc
    if real.all():  # no fillers (the common case): no mask to apply
        g += 1
        np.cumsum(g, out=g)
        g -= 1
        return g
    g += real  # a weight's symbol advances past it; a filler only by esc
    np.cumsum(g, out=g)
    pos = g[real]
    pos -= 1
    return pos


def _pack_nibbles(lengths: np.ndarray) -> bytes:
    v = np.asarray(lengths, dtype=np.uint8)
    if v.size % 2:
        v = np.append(v, 0)
    return ((v[0::2] << 4) | v[1::2]).astype(np.uint8).tobytes()


def _unpack_nibbles(data: bytes, n: int) -> np.ndarray:
    if not n:  # no Huffman stream (the common case in format 3)
        return np.zeros(0, np.uint8)
    b = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(b.size * 2, dtype=np.uint8)
    out[0::2], out[1::2] = b >> 4, b & 15
    return out[:n]


def _unpack_bits(data, n: int, alphabet: int, what: str) -> np.ndarray:
    """``n`` symbols of 0 or 1 stored one bit each, MSB first, zero padded to a byte; each
    below ``alphabet`` (1 or 2)."""
    if len(data) != (n + 7) // 8:
        raise FormatError(f"{what}: {len(data)} bytes cannot hold exactly {n} one-bit symbols")
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    if bits[n:].any():
        raise FormatError(f"{what}: padding bits after the last symbol are not zero")
    if alphabet < 2 and bits.any():
        raise FormatError(f"{what}: symbol 1 is outside its alphabet of {alphabet}")
    return bits[:n]


def _stream_choice(symbols: np.ndarray, alphabet: int, lengths: np.ndarray, chunk: int,
                   use_huffman: bool = True) -> tuple[int, int]:
    """How one non-empty stream is coded, and its bytes: ``(Z_DEFLATE | Z_BITS | Z_HUFFMAN,
    size)``, the smallest, counting the Huffman form's code-length table (one nibble per
    symbol of ``lengths``). Sized, not coded (:func:`_stream_bytes` codes the choice). DEFLATE
    (deflate.py) is inflated by zlib in C and needs no table (its header holds the code); a
    two-symbol alphabet can be stored as one bit per symbol (what its Huffman code costs,
    without the chunk index). ``use_huffman=False``: the smallest other form (see
    :func:`has_huffman` for why an archive may want that)."""
    huff = huffman.encoded_size(symbols, lengths, chunk=chunk)
    options = [(Z_DEFLATE, deflate.encoded_size(symbols))] if alphabet <= deflate.MAX_ALPHABET else []
    if alphabet <= 2:
        options.append((Z_BITS, (symbols.size + 7) // 8))
    if not options:
        return Z_HUFFMAN, huff
    mode, size = min(options, key=lambda o: (o[1], o[0]))
    if use_huffman and huff + (lengths.size + 1) // 2 < size:
        return Z_HUFFMAN, huff
    return mode, size


def _stream_bytes(symbols: np.ndarray, mode: int, lengths: np.ndarray, chunk: int) -> bytes:
    """The stream coded as :func:`_stream_choice` chose."""
    if not symbols.size:
        return b""
    if mode == Z_DEFLATE:
        return deflate.encode(symbols)
    if mode == Z_BITS:
        return np.packbits(symbols.astype(np.uint8)).tobytes()
    return huffman.encode(symbols, lengths, chunk=chunk)[0]


def has_huffman(info: dict) -> bool:
    """Whether a shared section's info codes a stream as chunked Huffman. numpy decodes all
    Huffman streams of an archive in one lockstep pass of up to ``chunk`` steps, however few
    and short they are (a few ms), while DEFLATE is inflated in C: so when an archive's
    smallest form has Huffman streams, writers code those tensors again without them and keep
    that when the archive grows by at most 1/HUFFMAN_SHARE."""
    z = info.get("z", 0)
    return info.get("enc") == "shared" and ((z & 3) == Z_HUFFMAN or (info.get("w", 0) > 0 and z >> Z_SHIFT == Z_HUFFMAN))


def without_huffman_pays(size: int, size_without: int, floor: int = 0) -> bool:
    """Whether an archive of ``size`` coded bytes with Huffman streams should be written in
    its ``size_without``-byte form without them (:func:`has_huffman`): at most 1/HUFFMAN_SHARE
    larger, or at most ``floor`` bytes larger (packed files: :data:`PACKED_HUFFMAN_FLOOR`)."""
    return size_without <= size + max(size // HUFFMAN_SHARE, floor)


def _lengths(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    counts = np.bincount(symbols, minlength=alphabet)[:alphabet]
    return huffman.code_lengths(counts, max_len=MAX_CODE_LEN)


# ---------------------------------------------------------------------------------------
# One tensor


def _slice_ids(pos: np.ndarray, shape: list[int], axis: int | None) -> np.ndarray:
    """Index along ``axis`` of each flat (row-major) position; all zeros without an axis."""
    if axis is None:
        return np.zeros(pos.size, dtype=np.int64)
    inner = math.prod(shape[axis + 1:])
    return (pos // inner) % shape[axis]


def _group(vals: np.ndarray, sid: np.ndarray, n_slices: int):
    """Per-slice sorted codebooks and each value's index within its slice's codebook.

    Returns ``(codebook concatenated over slices, sizes per slice, local indices)``.
    """
    # one slice: a stable sort of the values is the same order, in 2/3 of lexsort's time
    order = np.argsort(vals, kind="stable") if n_slices == 1 else np.lexsort((vals, sid))
    sv, ss = vals[order], sid[order]
    new = np.ones(sv.size, dtype=bool)
    new[1:] = (sv[1:] != sv[:-1]) | (ss[1:] != ss[:-1])
    first = np.cumsum(new) - 1
    ks = np.bincount(ss[new], minlength=n_slices)
    offsets = np.concatenate([[0], np.cumsum(ks)[:-1]]).astype(np.int64)
    local = np.empty(sv.size, dtype=np.int64)
    local[order] = first - offsets[ss]
    return sv[new].astype(np.float32), ks, local


def _n_unique(values: np.ndarray) -> int:
    return int(np.unique(values).size)


def _fits(flat: np.ndarray, shape: list[int], axis: int | None, with_zero: bool) -> bool:
    vals = flat if with_zero else flat[flat != 0]
    if axis is None:
        return _n_unique(vals) <= MAX_CODEBOOK
    pos = np.arange(flat.size) if with_zero else np.flatnonzero(flat != 0)
    sid = _slice_ids(pos, shape, axis)
    _, ks, _ = _group(vals, sid, shape[axis])
    return int(ks.max(initial=0)) <= MAX_CODEBOOK


class _Plan(NamedTuple):
    """One candidate coding of a tensor (:func:`_plan`), sized before anything is coded."""

    size: int
    shape: list[int]
    axis: int | None
    n: int  # coded positions: the non-zeros, or all (dense)
    codebook: np.ndarray
    ks: np.ndarray
    cb_dtype: type
    chunk: int
    idx: np.ndarray
    idx_len: np.ndarray  # code lengths, stored only for a Huffman stream
    idx_mode: int
    w: int  # gap width (0: dense, no gap stream)
    gaps: np.ndarray | None
    gap_len: np.ndarray
    gap_mode: int


def _plan(flat, shape, axis, dense, cb_dtype, chunk, use_huffman=True) -> _Plan:
    pos = np.arange(flat.size) if dense else np.flatnonzero(flat != 0)
    n_slices = 1 if axis is None else shape[axis]
    codebook, ks, idx = _group(flat[pos], _slice_ids(pos, shape, axis), n_slices)
    alphabet = max(1, int(ks.max(initial=0)))
    idx_len = _lengths(idx, alphabet)
    w, gaps, gap_len = 0, None, np.zeros(0, np.uint8)
    if not dense:
        best = None
        for width in range(1, MAX_GAP_WIDTH + 1):
            g = gaps_from_positions(pos, width)
            lengths = _lengths(g, 1 << width)
            cost = huffman.encoded_size(g, lengths, chunk=chunk) + (1 << width) // 2
            if best is None or cost < best[0]:
                best = (cost, width, lengths, g)
        _, w, gap_len, gaps = best
    # Each stream in the form :func:`_stream_choice` picks (an empty one stays Huffman, b"")
    idx_mode, idx_size = _stream_choice(idx, alphabet, idx_len, chunk, use_huffman) if idx.size else (Z_HUFFMAN, 0)
    gap_mode, gap_size = (_stream_choice(gaps, gap_len.size, gap_len, chunk, use_huffman)
                          if gaps is not None and gaps.size else (Z_HUFFMAN, 0))
    n_lengths = (idx_len.size if idx_mode == Z_HUFFMAN else 0) + (gap_len.size if gap_mode == Z_HUFFMAN else 0)
    size = (0 if axis is None else 2 * ks.size) + codebook.size * np.dtype(cb_dtype).itemsize \
        + (n_lengths + 1) // 2 + idx_size + gap_size
    return _Plan(size, list(shape), axis, int(pos.size), codebook, ks, cb_dtype, chunk, idx, idx_len, idx_mode,
                 w, gaps, gap_len, gap_mode)


def _coded(plan: _Plan) -> tuple[bytes, dict]:
    """The section bytes and info of a plan."""
    idx_data = _stream_bytes(plan.idx, plan.idx_mode, plan.idx_len, plan.chunk)
    gap_data = _stream_bytes(plan.gaps, plan.gap_mode, plan.gap_len, plan.chunk) if plan.gaps is not None else b""
    idx_len = plan.idx_len if plan.idx_mode == Z_HUFFMAN else plan.idx_len[:0]
    gap_len = plan.gap_len if plan.gap_mode == Z_HUFFMAN else plan.gap_len[:0]
    z = plan.idx_mode | plan.gap_mode << Z_SHIFT  # "z" records the choices
    ks_bytes = b"" if plan.axis is None else plan.ks.astype("<u2").tobytes()
    cb_bytes = plan.codebook.astype(plan.cb_dtype).tobytes()
    len_bytes = _pack_nibbles(np.concatenate([idx_len, gap_len]))
    sizes = [len(ks_bytes), len(cb_bytes), len(len_bytes), len(idx_data), len(gap_data)]
    info = {"enc": "shared", "shape": plan.shape, "axis": plan.axis, "k": int(plan.codebook.size),
            "cb": "f16" if plan.cb_dtype is np.float16 else "f32", "n": plan.n, "w": plan.w, "sizes": sizes}
    if z:
        info["z"] = z
    if plan.gaps is not None:
        info["ng"] = int(plan.gaps.size)
    if plan.chunk != CHUNK:
        info["c"] = plan.chunk
    blob = ks_bytes + cb_bytes + len_bytes + idx_data + gap_data
    if len(blob) != plan.size:  # the sizes that chose this coding must be its own
        raise FormatError(f"shared section sized {plan.size} bytes but coded in {len(blob)} (a bug)")
    return blob, info


def encode_shared(name: str, t: np.ndarray, *, codebook_dtype: str = "float32",
                  chunk: int = CHUNK, use_huffman: bool = True) -> tuple[bytes, dict, LayerStats]:
    """Encode one tensor whose non-zero values form small codebooks (whole, or per slice).

    Candidates: sparse (gap stream) or dense (0.0 in the codebook, no gaps, which wins for
    layers that are nearly dense), each with one codebook or one per slice along an axis
    (a layer rescaled per input channel, like the released SqueezeNet's conv1, has one
    small codebook per channel). The smallest encoding is kept: each is sized first, and
    only that one is coded.
    """
    best, flat, nz = _best_plan(name, t, codebook_dtype, chunk, use_huffman)
    blob, info = _coded(best)
    idx, gaps = best.idx, best.gaps
    s = info["sizes"]
    stats = LayerStats(
        name=name, kind="shared", numel=flat.size, nonzero=int(nz.size), bytes=len(blob),
        codebook_bytes=s[0] + s[1], idx_bytes=s[3], gap_bytes=s[4],
        idx_entropy_bits=huffman.entropy_bits(idx), gap_entropy_bits=0.0 if gaps is None else huffman.entropy_bits(gaps),
        k=info["k"], gap_width=info["w"], extra={"axis": info["axis"], "table_bytes": s[2]},
    )
    return blob, info, stats


def shared_size(name: str, t: np.ndarray, *, codebook_dtype: str = "float32", chunk: int = CHUNK,
                use_huffman: bool = True) -> int:
    """``len(encode_shared(name, t, ...)[0])``, without coding the tensor: what a writer
    choosing among codebook sizes needs (post-training compression sizes every candidate)."""
    return _best_plan(name, t, codebook_dtype, chunk, use_huffman)[0].size


def _best_plan(name: str, t: np.ndarray, codebook_dtype: str, chunk: int,
               use_huffman: bool) -> tuple[_Plan, np.ndarray, np.ndarray]:
    """The smallest candidate coding of ``t`` (see :func:`encode_shared`), its flat values and
    its non-zeros."""
    t = np.asarray(t)
    if t.dtype != np.float32:
        raise FormatError(f"layer {name}: shared encoding needs float32, got {t.dtype}")
    flat = t.reshape(-1)
    if not np.isfinite(flat).all():
        raise FormatError(f"layer {name}: has NaN or infinite weights")
    shape = list(t.shape)
    nz = flat[flat != 0]
    cb_dtype = np.float32
    if codebook_dtype == "float16" and _exact_in_float16(nz):
        cb_dtype = np.float16  # float16 only where it changes no weight
    best = None
    for dense in (False, True):
        # Per-slice codebooks cost codebook bytes: only when one codebook cannot hold them.
        axes = [None] if _fits(flat, shape, None, with_zero=dense) else list(range(len(shape)))
        for axis in axes:
            if axis is not None and not _fits(flat, shape, axis, with_zero=dense):
                continue
            cand = _plan(flat, shape, axis, dense, cb_dtype, chunk, use_huffman)
            if best is None or cand.size < best.size:
                best = cand
    if best is None:
        raise FormatError(f"layer {name}: more than {MAX_CODEBOOK} distinct values even per slice; cluster it first")
    return best, flat, nz


def _exact_in_float16(arr: np.ndarray) -> bool:
    """Every value of a float32 array survives a round trip through float16 (NaN never does)."""
    with np.errstate(over="ignore"):  # values beyond float16's range become inf: not equal
        return bool(np.array_equal(arr.astype(np.float16).astype(np.float32), arr))


def encode_raw(name: str, t: np.ndarray) -> tuple[bytes, dict, LayerStats]:
    """A tensor's little-endian bytes. A float32 tensor whose every value is exactly a
    float16 (biases rounded by ``cluster.bias_dtype: float16``, all-zero tensors) is stored
    as float16, half the bytes, and widened back on decoding: the bits are the same."""
    arr = np.asarray(t)  # tobytes() is row-major whatever the strides; 0-d stays 0-d
    dtype = arr.dtype.name
    if dtype not in _NP_DTYPES or _NP_DTYPES[dtype] is None:
        raise FormatError(f"tensor {name}: dtype {dtype} cannot be stored")
    stored = dtype
    if dtype == "float32" and arr.size and _exact_in_float16(arr):
        stored = "float16"
    blob = arr.astype(np.dtype(_NP_DTYPES[stored]).newbyteorder("<"), copy=False).tobytes()
    info = {"enc": "raw", "shape": list(arr.shape), "dtype": dtype}
    if stored != dtype:
        info["stored"] = stored
    nz = int(np.count_nonzero(arr)) if arr.size else 0
    return blob, info, LayerStats(name=name, kind="raw", numel=arr.size, nonzero=nz, bytes=len(blob))


# ---------------------------------------------------------------------------------------
# Whole state_dicts


def encode_state_dict(
    state_dict: dict[str, np.ndarray], *, shared: str | list[str] = "auto", codebook_dtype: str = "float32",
    chunk: int | None = None,
) -> tuple[list[tuple[str, bytes, dict]], list[LayerStats]]:
    """Sections for every tensor, in state_dict order.

    ``shared="auto"`` encodes every float32 tensor of 2+ dimensions with at most
    :data:`MAX_CODEBOOK` distinct non-zero values as shared; a list names them explicitly
    (and a listed tensor with too many values is an error).

    ``chunk``: symbols per Huffman chunk (the decoder takes that many steps). By default
    :data:`CHUNK` (256), or :data:`LARGE_CHUNK` (128) for a model of at least
    :data:`LARGE_MODEL` non-zero candidate weights: halving the steps made the ImageNet
    SqueezeNet decode ~1 ms (10%) faster for 0.4% more bytes, while for a small model the
    index would weigh more and the decode is short anyway (docs/FORMAT.md).
    """
    if chunk is None:
        weights = sum(int(np.count_nonzero(t)) for t in state_dict.values()
                      if t.dtype == np.float32 and t.ndim >= 2)
        chunk = LARGE_CHUNK if weights >= LARGE_MODEL else CHUNK
    sections, stats = _encode_sections(state_dict, shared, codebook_dtype, chunk)
    redo = {name for name, _, info in sections if has_huffman(info)}
    if redo:  # see has_huffman. Only these tensors can change: without Huffman every other
        # candidate of a tensor can only grow, so a winner without Huffman streams stays
        again = {n: encode_shared(n, state_dict[n], codebook_dtype=codebook_dtype, chunk=chunk, use_huffman=False)
                 for n in redo}
        size = sum(len(b) for _, b, _ in sections)
        if without_huffman_pays(size, size + sum(len(again[n][0]) - len(b) for n, b, _ in sections if n in redo)):
            sections = [(n, *again[n][:2]) if n in redo else (n, b, i) for n, b, i in sections]
            stats = [again[st.name][2] if st.name in redo else st for st in stats]
    return sections, stats


def _encode_sections(state_dict, shared, codebook_dtype, chunk):
    sections, stats, raw = [], [], []
    explicit = None if shared == "auto" else set(shared)
    if explicit:
        unknown = sorted(explicit - set(state_dict))
        if unknown:
            raise FormatError(f"layer {unknown[0]}: not in the model's state_dict")
    for name, t in state_dict.items():
        want = (name in explicit) if explicit is not None else (t.dtype == np.float32 and t.ndim >= 2)
        blob = None
        if want:
            try:
                blob, info, st = encode_shared(name, t, codebook_dtype=codebook_dtype, chunk=chunk)
            except FormatError:
                if explicit is not None:
                    raise
            if explicit is None and blob is not None and len(blob) >= t.size * t.itemsize:
                blob = None  # sharing would not pay (e.g. per-slice codebooks of unique values)
        if blob is None:
            blob, info, st = encode_raw(name, t)
            raw.append((name, blob, info))
        else:
            sections.append((name, blob, info))
        stats.append(st)
    if raw:
        # One section for all raw tensors (biases, BN statistics): a section costs ~90 bytes
        # of header, as much as a layer's bias.
        table = [[name, info["dtype"], info["shape"], *([info["stored"]] if "stored" in info else [])]
                 for name, _, info in raw]
        sections.append((RAW_SECTION, b"".join(blob for _, blob, _ in raw), {"enc": "raw", "tensors": table}))
    return sections, stats


def shape_numel(shape: Any, name: str) -> int:
    """Elements of a section's ``shape`` (checked: a list of non-negative ints, at most 2**31 in all)."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape):
        raise FormatError(f"section {name}: bad shape {shape!r}")
    n = math.prod(shape)
    if n > 2**31:
        raise FormatError(f"section {name}: shape {shape} is absurdly large")
    return n


def _need(info: dict, key: str, name: str, kind=int, lo: int = 0, hi: int = 2**40):
    v = info.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and not lo <= v <= hi):
        raise FormatError(f"section {name}: field '{key}' is missing or out of range ({v!r})")
    return v


def _decode_raw(section: str, blob: bytes, info: dict) -> dict[str, np.ndarray]:
    table = info.get("tensors")
    if not isinstance(table, list):
        raise FormatError(f"section {section}: 'tensors' must be a list of [name, dtype, shape(, stored)]")
    out, pos = {}, 0
    for entry in table:
        if not (isinstance(entry, list) and len(entry) in (3, 4) and isinstance(entry[0], str)):
            raise FormatError(f"section {section}: bad tensor entry {entry!r}")
        name, dtype, shape = entry[:3]
        if name in out:
            raise FormatError(f"section {section}: tensor {name} is listed twice")
        stored = entry[3] if len(entry) == 4 else dtype
        if not isinstance(dtype, str) or dtype not in _NP_DTYPES or _NP_DTYPES[dtype] is None:
            raise FormatError(f"section {section}: tensor {name} has unknown dtype {dtype!r}")
        if stored != dtype and (dtype, stored) != ("float32", "float16") or not isinstance(stored, str):
            raise FormatError(f"section {section}: tensor {name}: a {dtype} tensor cannot be stored as {stored!r} "
                              "(only float32 as float16)")
        np_dtype = np.dtype(_NP_DTYPES[stored]).newbyteorder("<")
        size = shape_numel(shape, f"{section}/{name}") * np_dtype.itemsize
        if size > len(blob) - pos:
            raise FormatError(f"section {section}: tensor {name} needs {size} bytes, {len(blob) - pos} are left")
        arr = np.frombuffer(blob, dtype=np_dtype, count=size // np_dtype.itemsize, offset=pos)
        if dtype == "bool" and (arr.view(np.uint8) > 1).any():
            raise FormatError(f"section {section}: tensor {name} is bool but holds bytes other than 0 and 1")
        arr = arr.astype(np.dtype(_NP_DTYPES[dtype]))  # native order; float16 -> float32 is exact
        out[name] = arr.reshape(shape)
        pos += size
    if pos != len(blob):
        raise FormatError(f"section {section}: {len(blob) - pos} bytes left after its tensors")
    return out


class Coded(NamedTuple):
    """One shared tensor, decoded but not yet made dense: ``flat[pos] = cb[ix]``, zeros
    elsewhere (``pos`` None: every position, in order). Callers that store the values in
    another dtype (the packed decoder) convert the small codebook once and gather from it,
    instead of converting every weight. (A named tuple: a packed file makes one per tensor
    on every load, and a frozen dataclass costs several times more to build.)"""

    shape: list[int]
    numel: int
    cb: np.ndarray  # float32: the codebook, per-slice codebooks concatenated
    ix: np.ndarray  # index into ``cb`` of every coded value
    pos: np.ndarray | None  # flat (row-major) positions of the coded values; None: all

    def dense(self) -> np.ndarray:
        values = self.cb.take(self.ix)
        if self.pos is None:
            return values.reshape(self.shape)
        flat = np.zeros(self.numel, dtype=np.float32)
        flat[self.pos] = values
        return flat.reshape(self.shape)


def decode_sections(archive: container.Archive) -> dict[str, np.ndarray]:
    """Tensors of an archive, bit-exact, with all Huffman streams decoded in one batch.

    Version-1 archives carry a u16 per chunk in their streams' chunk index, later versions
    the packed index (see :mod:`edgesqueeze.format.huffman`)."""
    return {name: t.dense() if isinstance(t, Coded) else t for name, t in decode_coded(archive).items()}


def decode_coded(archive: container.Archive) -> dict[str, np.ndarray | Coded]:
    """Like :func:`decode_sections`, with every shared tensor left as a :class:`Coded`
    (checked: indices within their codebooks, positions within the tensor)."""
    index = "u16" if archive.version == 1 else "packed"
    out: dict[str, np.ndarray | Coded] = {}
    pending = []
    streams, stream_names, chunks = [], [], []
    decoded: dict[tuple[str, str], np.ndarray] = {}
    for name, (blob, info) in archive.sections.items():
        if not isinstance(info, dict) or info.get("enc") not in ("shared", "raw"):
            raise FormatError(f"section {name}: unknown encoding {info.get('enc') if isinstance(info, dict) else info!r}")
        if info["enc"] == "raw":
            raw = _decode_raw(name, blob, info)
            again = sorted(raw.keys() & (out.keys() | {p[0] for p in pending}))
            if again:
                raise FormatError(f"section {name}: tensor {again[0]} is in another section too")
            out.update(raw)
            continue
        if name in out:
            raise FormatError(f"section {name}: tensor {name} is in a raw section too")
        numel = shape_numel(info.get("shape"), name)
        shape = info["shape"]
        axis = info.get("axis")
        if axis is not None and not (isinstance(axis, int) and not isinstance(axis, bool) and 0 <= axis < len(shape)):
            raise FormatError(f"section {name}: bad axis {axis!r}")
        n_slices = 1 if axis is None else shape[axis]
        k = _need(info, "k", name, lo=0, hi=MAX_CODEBOOK * max(1, n_slices))
        n = _need(info, "n", name, hi=numel)
        w = _need(info, "w", name, hi=MAX_GAP_WIDTH)
        chunk = _need(info, "c", name, lo=1, hi=4096) if "c" in info else CHUNK
        sizes = info.get("sizes")
        if not (isinstance(sizes, list) and len(sizes) == 5 and all(isinstance(v, int) and v >= 0 for v in sizes)
                and sum(sizes) == len(blob)):
            raise FormatError(f"section {name}: sizes {sizes!r} do not add up to its {len(blob)} bytes")
        off = list(itertools.accumulate(sizes, initial=0))
        view = memoryview(blob)  # slices without copies
        if axis is None:
            if sizes[0]:  # no slices, no codebook sizes: bytes there would be read by no one
                raise FormatError(f"section {name}: {sizes[0]} bytes of codebook sizes without an axis")
            ks = None  # one codebook of k values
            alphabet = max(1, k)
        else:
            if sizes[0] != 2 * n_slices:
                raise FormatError(f"section {name}: {sizes[0]} bytes of codebook sizes for {n_slices} slices")
            ks = np.frombuffer(view[:sizes[0]], dtype="<u2").astype(np.int64)
            if int(ks.sum()) != k or int(ks.max(initial=0)) > MAX_CODEBOOK:
                raise FormatError(f"section {name}: per-slice codebook sizes do not add up to {k}")
            alphabet = max(1, int(ks.max(initial=0)))
        cb_item = {"f16": 2, "f32": 4}.get(info.get("cb")) if isinstance(info.get("cb"), str) else None
        if cb_item is None or sizes[1] != k * cb_item:
            raise FormatError(f"section {name}: codebook of {k} '{info.get('cb')}' values cannot take {sizes[1]} bytes")
        dense = w == 0
        if dense and n != numel:
            raise FormatError(f"section {name}: dense encoding must code all {numel} positions, codes {n}")
        n_gap = 0 if dense else 1 << w
        z = info.get("z", 0)
        ok = isinstance(z, int) and not isinstance(z, bool) and 0 <= z < 1 << 2 * Z_SHIFT
        modes = (z & 3, z >> Z_SHIFT) if ok else (-1, -1)
        if (not ok or Z_BITS + 1 in modes or (z and archive.version < 3)
                or (modes[1] and dense) or (modes[0] == Z_BITS and alphabet > 2)
                or (modes[1] == Z_BITS and n_gap > 2)):
            raise FormatError(f"section {name}: bad stream coding z={z!r}")
        huff_idx, huff_gap = alphabet * (modes[0] == Z_HUFFMAN), n_gap * (modes[1] == Z_HUFFMAN)
        if sizes[2] != (huff_idx + huff_gap + 1) // 2:
            raise FormatError(f"section {name}: code-length table has {sizes[2]} bytes")
        cb = np.frombuffer(view[off[1]:off[2]], dtype="<f2" if cb_item == 2 else "<f4").astype(np.float32, copy=False)
        lens = _unpack_nibbles(view[off[2]:off[3]], huff_idx + huff_gap)
        parts = [("cluster indices", view[off[3]:off[4]], alphabet, n, modes[0])]
        if not dense:
            parts.append(("gaps", view[off[4]:off[5]], n_gap, _need(info, "ng", name, lo=n, hi=n + numel), modes[1]))
        for what, data, size, count, mode in parts:
            if mode == Z_DEFLATE:  # inflated by zlib now
                decoded[(name, what)] = deflate.decode(data, count, size, f"section {name} ({what})")
            elif mode == Z_BITS:
                decoded[(name, what)] = _unpack_bits(data, count, size, f"section {name} ({what})")
            else:  # chunked Huffman: all such streams decoded in one batch below
                streams.append((data, lens[:size], count))
                lens = lens[size:]
                stream_names.append((name, what))
                chunks.append(chunk)
        pending.append((name, shape, numel, cb, k, ks, axis, n, w))
    try:
        batch = huffman.decode_many(streams, chunk=chunks, index=index) if streams else []
    except FormatError as exc:  # name the section, not the stream number
        m = re.match(r"stream (\d+): (.*)", str(exc), re.S)
        if not m or int(m.group(1)) >= len(stream_names):
            raise
        raise FormatError("section {} ({}): {}".format(*stream_names[int(m.group(1))], m.group(2))) from None
    decoded.update(zip(stream_names, batch))
    for name, shape, numel, cb, k, ks, axis, n, w in pending:  # k: this section's, not the last read
        idx = decoded[(name, "cluster indices")]
        pos = None
        if w:
            pos = positions_from_gaps(decoded[(name, "gaps")], w)
            if pos.size != n or (n and pos[-1] >= numel):
                raise FormatError(f"section {name}: gaps place {pos.size} weights, up to position "
                                  f"{int(pos[-1]) if pos.size else -1}, in a tensor of {numel}")
        if axis is None:  # one codebook of k values, the alphabet its indices were decoded in
            if n and not k:
                raise FormatError(f"section {name}: cluster index beyond its codebook")
            ix = idx
        else:
            sid = _slice_ids(np.arange(numel) if pos is None else pos, shape, axis)
            idx = idx.astype(np.int64)
            if n and (idx >= ks[sid]).any():
                raise FormatError(f"section {name}: cluster index beyond its codebook")
            offsets = np.cumsum(ks) - ks
            ix = offsets[sid] + idx
        out[name] = Coded(shape=shape, numel=numel, cb=cb, ix=ix, pos=pos)
    return out


def dumps_model(state_dict: dict[str, np.ndarray], meta: dict, **kwargs) -> tuple[bytes, list[LayerStats]]:
    sections, stats = encode_state_dict(state_dict, **kwargs)
    return container.dumps(meta, sections), stats


def loads_model(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    archive = container.loads(data)
    return decode_sections(archive), archive.meta
