"""Packed files: an ONNX or TFLite file whose weights are Deep-Compression-coded, restored
byte for byte on the device before the runtime sees it.

``model.int8.tflite.esq`` is an ``.esq`` archive (:mod:`edgesqueeze.format.container`: magic,
version, CRC-32 per section, SHA-256 of the file) that holds one ONNX or TFLite file:

- every weight tensor worth it is cut out of the file and coded the way the ``.esq``
  checkpoint codes a pruned, weight-shared layer (:func:`edgesqueeze.format.codec.encode_shared`:
  the positions of the non-zeros as Huffman-coded gaps, their values as Huffman-coded indices
  into a small codebook), one section per tensor;
- what is left (the graph, biases, scales, metadata) is one ``skeleton`` section, compressed
  with a standard-library codec (``lzma`` or ``zlib``, the smaller);
- the header's ``meta["packed"]`` records the file's name, format, size and SHA-256.

Decoding (:func:`unpack`) needs numpy and the standard library only: decompress the skeleton,
decode the tensors, put each tensor's bytes back at its offset, and check the size and the
SHA-256 against the recorded ones. The runtime then builds its session from those bytes in
memory. The format of the inner file does not matter to the decoder: it splices bytes.

A tensor section's info is the codec's (``shape``, codebook, streams) plus::

    at      offset of the tensor's first byte in the inner file
    dtype   how its values are stored there: "int8", "uint8", "int16", "int32" or "float32"
    offset  added to each decoded value before it is stored (128 for uint8 weights whose zero
            point is 128: they are coded as the signed values q - 128, so zero stays zero)
    requant optional: the section codes the float weights, the decoder requantizes them with
            the file's per-channel scales, and with ``requant.scales`` computes those too
    space_to_depth  optional block size ``B``: the section codes a conv weight ``[O, kh, kw, C]``
            (OHWI) that the file holds rearranged for a space-to-depth input,
            ``[O, ceil(kh/B), ceil(kw/B), B*B*C]`` (:func:`space_to_depth`): the zero taps
            the rearrangement adds cost nothing

A product section (``enc: "product"``, no content) is ``n`` float32 values at ``at``, a
scalar at ``a`` times ``n`` values at ``b`` of the restored file (a TFLite bias's scales).

Worked example: a file ``b"HEAD" + int8[0, 0, 3, 0, -2, 3] + b"TAIL"`` packs into a skeleton
``b"HEADTAIL"`` and one tensor at 4 with values ``[0, 0, 3, 0, -2, 3]``: codebook ``[-2, 3]``,
indices ``[1, 0, 1]``, gaps ``[2, 1, 0]``. docs/FORMAT.md specifies every byte.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import re
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesqueeze.errors import FormatError
from edgesqueeze.format import codec, container

__all__ = ["PACKED_KEY", "SKELETON", "PackedTensor", "pack", "unpack", "restore", "check_digest",
           "is_packed", "packed_info", "layout", "space_to_depth", "space_to_depth_shape"]

PACKED_KEY = "packed"  # meta key of a packed archive


def not_a_model_archive(packed: dict) -> str:
    """What to say of a packed file given where a model archive (or PyTorch model) is read."""
    return (f"a packed {packed.get('format', '?')} file ({packed.get('name', '?')}), not a model archive: run, "
            "verify, bench and inspect read it as it is, and 'edgesqueeze unpack' writes the plain file")
SKELETON = "skeleton"
PRODUCT = "product"  # a section's enc: float32 values the decoder multiplies out
TENSOR, REQUANT, SCALES = "tensor", "requant", "scales"  # the other kinds of span restore() fills
_F32 = np.dtype("<f4")
_F32_MAX = float(np.finfo(np.float32).max)
# restore()'s expected ns per compressed skeleton byte, coded tensor byte, output byte and
# requantized value (fitted on ImageNet SqueezeNet's packed files, benchmarks/notes.md, session 24)
_SPLIT_NS = (52.0, 6.6, 0.12, 2.9)
# below this much expected work restore() stays on one thread: starting and joining a second one
# cost the small models' files 0.1-0.3 ms of their 2-3 ms cold load (benchmarks/notes.md, session 46)
_MIN_PARALLEL_NS = 1e6
MIN_TENSOR_BYTES = 256  # smaller tensors stay in the skeleton (a section costs ~40 header bytes)
# Coded tensors up to this size (biases, scales, zero points) are tried back in the skeleton
# (pack). On ImageNet SqueezeNet's onnx-int8 file: 2 KiB, 4.3 KB smaller and 0.7 ms faster to
# decode; 16 KiB, 5.4 KB smaller but 1 ms slower (LZMA decodes ~40 MB/s, zlib's streams faster).
MAX_SKELETON_TRY = 2048
MAX_TRY_BYTES = 32 << 20  # skeleton bytes compressed in those tries, in all (LZMA -9e: ~10 MB/s)
_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "float32": np.float32}
MAX_DICT = 1 << 26  # LZMA2 dictionary, at most 64 MiB: the decoder allocates it


# LZMA literal-context settings (lc, lp, pb) the writer tries on the final skeleton: xz's
# default (text-like), 4-byte-aligned data (scales, biases, float weights), unaligned binary.
# LZMA2 chunks carry them, so the decoder needs only the dictionary size.
_LZMA_PROPS = ((3, 0, 2), (0, 2, 2), (0, 0, 0))


def _lzma_filters(dict_size: int, props: tuple[int, int, int] = _LZMA_PROPS[0]) -> list[dict[str, int]]:
    lc, lp, pb = props
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size,
             "lc": lc, "lp": lp, "pb": pb}]


@dataclass(frozen=True)
class PackedTensor:
    """A tensor to code: its values as the file stores them (little-endian ``dtype``), and
    ``offset`` for zero-point-shifted unsigned weights (uint8 with zero point 128: 128)."""

    name: str
    values: np.ndarray
    offset: int = 0
    # Optional: the float weights the integer values were quantized from and the per-channel
    # scales (float32, axis 0) the file stores beside them. Where
    # ``clip(rint(source / scale), -qmax, qmax) + offset`` gives ``values`` exactly, the tensor
    # is coded as its float codebook and requantized on the device (:func:`requantize`).
    source: np.ndarray | None = None
    scales: np.ndarray | None = None
    qmax: int = 127
    # Optional, with ``source``: the block size of a space-to-depth stem; ``source`` is then
    # the conv weight before the rearrangement (OHWI) and ``values`` hold it rearranged
    # (:func:`space_to_depth`); the section codes the weight before the rearrangement
    # (``source`` requantized, or ``values`` rearranged back when that is smaller).
    space_to_depth: int = 0


MAX_BLOCK = 8  # largest space-to-depth block a section may name


def space_to_depth_shape(shape: Sequence[int], block: int) -> list[int]:
    """The shape :func:`space_to_depth` gives an OHWI weight of ``shape``."""
    o, kh, kw, c = shape
    return [o, -(-kh // block), -(-kw // block), c * block * block]


def space_to_depth(w: np.ndarray, block: int) -> np.ndarray:
    """An OHWI conv weight ``[O, kh, kw, C]`` rearranged for a ``block`` x ``block``
    space-to-depth input (``torch.nn.PixelUnshuffle``'s channel order): ``[O, ceil(kh/B),
    ceil(kw/B), B*B*C]`` with ``out[o, a, b, c*B*B + dy*B + dx] = w[o, B*a + dy, B*b + dx, c]``,
    zero where ``B*a + dy >= kh`` or ``B*b + dx >= kw``."""
    o, kh, kw, c = w.shape
    _, ah, aw, _ = space_to_depth_shape(w.shape, block)
    padded = np.zeros((o, ah * block, aw * block, c), w.dtype)
    padded[:, :kh, :kw] = w
    return (padded.reshape(o, ah, block, aw, block, c).transpose(0, 1, 3, 5, 2, 4)
            .reshape(o, ah, aw, c * block * block))


def depth_to_space(w: np.ndarray, block: int, kh: int, kw: int) -> np.ndarray | None:
    """The ``[O, kh, kw, C]`` weight that :func:`space_to_depth` rearranges into ``w``, or
    None if there is none (``w``'s shape does not match, or a tap past the kernel is not 0)."""
    o, ah, aw, cc = w.shape
    c = cc // (block * block)
    if cc != c * block * block or space_to_depth_shape((o, kh, kw, c), block) != [o, ah, aw, cc]:
        return None
    padded = (w.reshape(o, ah, aw, c, block, block).transpose(0, 1, 4, 2, 5, 3)
              .reshape(o, ah * block, aw * block, c))
    out = np.ascontiguousarray(padded[:, :kh, :kw])
    return out if np.array_equal(space_to_depth(out, block), w) else None


def _s2d_shape(name: str, info: dict) -> list[int] | None:
    """The stored shape of a section with ``space_to_depth`` (checked), else None."""
    block = info.get("space_to_depth")
    if block is None:
        return None
    shape = info.get("shape")
    if (not _is_uint(block) or not 2 <= block <= MAX_BLOCK or not isinstance(shape, list) or len(shape) != 4
            or not all(_is_uint(d) and d > 0 for d in shape)):
        raise FormatError(f"section {name}: bad space_to_depth {block!r} for shape {shape!r}")
    return space_to_depth_shape(shape, block)


def _unspace(name: str, t: codec.Coded, info: dict) -> codec.Coded:
    """``t`` (decoded in its coded shape) as the file stores it, rearranged by
    :func:`space_to_depth`: the coded values' positions mapped, in increasing order."""
    shape = _s2d_shape(name, info)
    block = info["space_to_depth"]
    pos = np.arange(t.numel, dtype=np.int64) if t.pos is None else t.pos.astype(np.int64)
    o, y, x, c = np.unravel_index(pos, t.shape)
    _, ah, aw, cc = shape
    new = ((o * ah + y // block) * aw + x // block) * cc + c * block * block + (y % block) * block + x % block
    order = np.argsort(new, kind="stable")
    return codec.Coded(shape, math.prod(shape), t.cb, t.ix[order], new[order])


def requantize(values: np.ndarray, scales: np.ndarray, offset: int, qmax: int) -> np.ndarray:
    """``clip(rint(values / scale_c), -qmax, qmax) + offset`` per output channel (axis 0),
    in float32 as onnxruntime's quantizer divides; float32 result, integer-valued (exact:
    ``qmax + offset`` is far below 2**24)."""
    shape = (len(scales),) + (1,) * (values.ndim - 1)
    q = np.rint(values.astype(np.float32) / scales.astype(np.float32).reshape(shape))
    np.clip(q, -qmax, qmax, out=q)
    if offset:
        q += np.float32(offset)
    return q


# ------------------------------------------------------------------------------ encoding

def _signed(t: PackedTensor) -> np.ndarray | None:
    """The values to code as float32 (exact), or None when the tensor cannot be coded."""
    v = np.asarray(t.values)
    dtype = v.dtype.name
    if dtype not in _DTYPES:
        return None
    if dtype == "float32":
        if t.offset or not np.isfinite(v).all() or np.signbit(v[v == 0]).any():
            return None  # -0.0 would come back as +0.0: not the same bytes
        return v.astype(np.float32)
    signed = v.astype(np.int64) - t.offset
    if np.abs(signed).max(initial=0) > 2048:  # float16 codebooks hold integers up to 2048 exactly
        return None
    return signed.astype(np.float32)


def _find(data: bytes, raw: bytes, taken: list[tuple[int, int]]) -> int | None:
    """First offset of ``raw`` in ``data`` that overlaps no taken range."""
    start = 0
    while True:
        at = data.find(raw, start)
        if at < 0:
            return None
        end = at + len(raw)
        if not any(a < end and at < b for a, b in taken):
            return at
        start = at + 1


def _s2d_source(t: PackedTensor) -> bool:
    """Whether ``t`` names a space-to-depth block a section may hold, with a 4-d source."""
    return 2 <= int(t.space_to_depth) <= MAX_BLOCK and t.source is not None and np.ndim(t.source) == 4


def _requant_candidate(data: bytes, t: PackedTensor, v: np.ndarray, taken, use_huffman: bool = True):
    """``(blob, info, {"requant": ...})`` coding ``t``'s float source instead of its integers,
    when requantizing it reproduces them exactly and its scales are in the file; else None."""
    if t.source is None or t.scales is None or v.dtype.kind not in "iu" or v.ndim < 1:
        return None
    src = np.asarray(t.source, dtype=np.float32)
    scales = np.ascontiguousarray(np.asarray(t.scales, dtype=np.float32).reshape(-1))
    block = int(t.space_to_depth)
    if block and not _s2d_source(t):
        return None
    stored = space_to_depth(src, block) if block else src
    if stored.shape != v.shape or len(scales) != v.shape[0] or not (np.isfinite(scales).all() and (scales > 0).all()):
        return None
    if not np.array_equal(requantize(stored, scales, t.offset, t.qmax), v.astype(np.float64)):
        return None
    if not np.isfinite(src).all() or np.signbit(src[src == 0]).any():
        return None
    scale_at = _find(data, scales.astype("<f4").tobytes(), taken)
    if scale_at is None:
        return None
    try:
        blob, info, _ = codec.encode_shared(t.name, src, codebook_dtype="float16", use_huffman=use_huffman)
    except FormatError:
        return None
    requant: dict[str, Any] = {"scale_at": scale_at, "qmax": int(t.qmax)}
    rule = _scale_rule(src, scales, int(t.qmax))
    if rule is not None:
        requant["scales"] = rule
    return blob, info, {"requant": requant, **({"space_to_depth": block} if block else {})}


def _max_abs_scales(max_abs: np.ndarray, qmax: int, zero: float) -> np.ndarray:
    """The per-channel scales ``max_abs / qmax`` (float32 division), ``zero`` where a channel
    is all zeros: how symmetric per-channel quantizers (onnxruntime's, torch's, and so
    litert-torch's) set them."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = max_abs.astype(np.float32) / np.float32(qmax)
    return np.where(max_abs > 0, s, np.float32(zero)).astype(np.float32)


def _scale_rule(src: np.ndarray, scales: np.ndarray, qmax: int) -> dict[str, Any] | None:
    """``{"from": "max_abs"[, "zero": z]}`` when the scales follow from the weights
    (:func:`_max_abs_scales`, exactly), so the file need not store them; else None."""
    max_abs = np.abs(src.reshape(len(scales), -1)).max(1, initial=0)
    zeros = scales[max_abs == 0]
    if zeros.size and not (zeros == zeros[0]).all():
        return None
    rule: dict[str, Any] = {"from": "max_abs"}
    if zeros.size:
        rule["zero"] = float(zeros[0])
    derived = _max_abs_scales(max_abs, qmax, rule.get("zero", 1.0))
    return rule if np.array_equal(derived.view(np.uint32), scales.view(np.uint32)) else None


def _compress(data: bytes, *, tune: bool = False) -> tuple[bytes, dict[str, Any]]:
    """The smaller of zlib and raw LZMA2 (dictionary: the data's size rounded up to a power
    of two, at least 64 KiB: no more memory than the data needs on the device). ``tune``:
    LZMA2 with each of :data:`_LZMA_PROPS`, not only xz's default (3x the time; 0.5-3% smaller
    skeletons on ImageNet SqueezeNet's files)."""
    dict_size = min(MAX_DICT, max(1 << 16, 1 << max(0, len(data) - 1).bit_length()))
    candidates = [(zlib.compress(data, 9), {"codec": "zlib"})]
    for props in _LZMA_PROPS if tune else _LZMA_PROPS[:1]:
        candidates.append((lzma.compress(data, format=lzma.FORMAT_RAW, filters=_lzma_filters(dict_size, props)),
                           {"codec": "lzma", "dict": dict_size}))
    return min(candidates, key=lambda c: (len(c[0]), c[1]["codec"]))  # stable: the first of equals


def pack(data: bytes, tensors: Iterable[PackedTensor], *, name: str, fmt: str,
         meta: dict[str, Any] | None = None,
         scale_arrays: Sequence[np.ndarray] = ()) -> tuple[bytes, list[dict[str, Any]]]:
    """Pack the file ``data`` (named ``name``, of format ``fmt``, e.g. ``"tflite-int8"``).

    ``tensors``: the file's weight tensors with their values (the caller reads them with
    onnx or LiteRT); each is found in ``data`` by its bytes and coded where that is smaller.
    A tensor not found, or not worth coding, simply stays in the skeleton: the result always
    decodes to ``data`` exactly (checked here before returning). ``meta``: more header
    entries (the artifact's metadata). ``scale_arrays``: the file's per-channel float32
    quantization scales (weights', biases'); an array that is another one times a scalar
    the file also holds (a TFLite bias's scales: its input's scale times its weight's) is
    left for the decoder to multiply out (:func:`_products`). Returns the archive bytes and
    one row per tensor (name, bytes before and after, non-zeros, whether it was coded)."""
    data = bytes(data)
    ordered = sorted(tensors, key=lambda t: -np.asarray(t.values).nbytes)  # big ones claim first
    coded, rows = _code_tensors(data, ordered, use_huffman=True)
    if any(codec.has_huffman(c[3]) for c in coded):  # see codec.has_huffman
        other = _code_tensors(data, ordered, use_huffman=False)
        size = sum(len(c[2]) for c in coded)
        if codec.without_huffman_pays(size, sum(len(c[2]) for c in other[0]), floor=codec.PACKED_HUFFMAN_FLOOR):
            coded, rows = other
    head = {**(meta or {}), PACKED_KEY: {"name": name, "format": fmt, "bytes": len(data),
                                         "sha256": hashlib.sha256(data).hexdigest()}}
    coded = _fewer_sections(data, coded + _products(data, scale_arrays, coded), head)
    out = _assemble(data, coded, head, tune=True)
    if unpack(out) != data:  # never write a file that does not restore its input
        raise FormatError(f"{name}: packing did not round-trip (a bug); nothing written")
    return out, rows


def _fewer_sections(data: bytes, coded: list, head: dict[str, Any]) -> list:
    """``coded`` less the small tensors that cost more as sections than in the skeleton.

    A small tensor can cost more as a section (its codebook, its header entry) than its raw
    bytes do inside the LZMA-compressed skeleton (biases, scales, zero points), the more so
    beside others like it. Of the coded tensors of up to :data:`MAX_SKELETON_TRY` bytes,
    first all go back to the skeleton if that makes the archive smaller; then each in turn,
    smallest first, changes sides if that makes it smaller still. Each try compresses the
    whole skeleton again: the one-at-a-time pass is skipped when it would compress more
    than :data:`MAX_TRY_BYTES` in all. Fewer sections also decode faster: each costs tens
    of microseconds in Python. Rows of tensors left in the skeleton get ``coded_bytes``
    None."""
    small = sorted((c for c in coded if c[1] <= MAX_SKELETON_TRY), key=lambda c: (c[1], c[0]))
    if not small:
        return coded
    inside = {id(c) for c in small}  # tensors of ``small`` in the skeleton
    keep = [c for c in coded if id(c) not in inside]

    def assemble(inside: set[int]) -> bytes:
        return _assemble(data, keep + [c for c in small if id(c) not in inside], head)

    out, all_in = assemble(set()), assemble(inside)
    if len(all_in) < len(out):
        out = all_in
    else:
        inside = set()
    skeleton = len(data) - sum(c[1] for c in coded)
    if skeleton * len(small) <= MAX_TRY_BYTES:
        for c in small:
            trial = inside ^ {id(c)}
            smaller = assemble(trial)
            if len(smaller) < len(out):
                inside, out = trial, smaller
    for c in small:
        if id(c) in inside:
            c[4]["coded_bytes"] = None
    return keep + [c for c in small if id(c) not in inside]


def _cuts(c) -> list[tuple[int, int]]:
    """``(offset, length)`` of the bytes a coded entry takes out of the skeleton: its own,
    and its scales where the decoder derives them."""
    at, n, _, info, _ = c
    if _derives_scales(info):
        return [(at, n), (info["requant"]["scale_at"], 4 * info["shape"][0])]
    return [(at, n)]


def _assemble(data: bytes, coded: list, head: dict[str, Any], *, tune: bool = False) -> bytes:
    """The archive of ``data`` with the ``coded`` tensors (and products) as sections, the
    rest its skeleton (``tune``: see :func:`_compress`)."""
    coded = sorted(coded, key=lambda c: c[0])
    cuts = sorted(cut for c in coded for cut in _cuts(c))
    pieces, pos = [], 0
    for at, n in cuts:
        pieces.append(data[pos:at])
        pos = at + n
    pieces.append(data[pos:])
    skeleton, how = _compress(b"".join(pieces), tune=tune)
    sections = [(SKELETON, skeleton, {"enc": "skeleton", **how, "n": len(data) - sum(n for _, n in cuts)})]
    tensors = [c for c in coded if c[3].get("enc") != PRODUCT]
    products = [c for c in coded if c[3].get("enc") == PRODUCT]
    sections += [(f"t{i}", c[2], c[3]) for i, c in enumerate(tensors)]
    sections += [(f"p{i}", c[2], c[3]) for i, c in enumerate(products)]
    return container.dumps(head, sections)


def _scalar(x: np.ndarray, y: np.ndarray) -> np.float32 | None:
    """A float32 ``s`` with ``s * y == x`` bit for bit (float32 multiplication), or None."""
    s0 = np.float32(float(x[0]) / float(y[0]))
    for s in (s0, np.nextafter(s0, np.float32(np.inf)), np.nextafter(s0, np.float32(-np.inf))):
        if np.isfinite(s) and s != 0 and np.array_equal((s * y).view(np.uint32), x.view(np.uint32)):
            return s
    return None


def _products(data: bytes, arrays: Sequence[np.ndarray], coded: list) -> list:
    """Product entries ``(at, bytes, b"", info, row)``: each float32 array of ``arrays``
    found in ``data`` outside the ``coded`` entries' bytes that equals another array of the
    file times a float32 scalar the file holds too (a TFLite bias's per-channel scales are
    its input's scale times its weight's: 4 bytes a channel the skeleton need not hold).
    Sources never overlap a product's bytes, so products can be computed in any order once
    everything else is in place."""
    taken = [(a, a + n) for c in coded for a, n in _cuts(c)]
    vecs = []
    for arr in arrays:
        x = np.ascontiguousarray(np.asarray(arr, dtype=np.float32).reshape(-1))
        if x.size >= 2 and np.isfinite(x).all() and (x != 0).all():
            vecs.append(x)
    outs: list[tuple[int, int]] = []
    srcs: list[tuple[int, int]] = []
    found = []
    for i, x in enumerate(vecs):
        raw = x.astype("<f4").tobytes()
        at = _find(data, raw, taken + outs + srcs)
        if at is None:
            continue
        span = (at, at + len(raw))
        for j, y in enumerate(vecs):
            if j == i or y.size != x.size or np.array_equal(x, y):
                continue
            s = _scalar(x, y)
            if s is None:
                continue
            a = _find(data, np.array([s], "<f4").tobytes(), outs + [span])
            b = _find(data, y.astype("<f4").tobytes(), outs + [span])
            if a is None or b is None:
                continue
            outs.append(span)
            srcs += [(a, a + 4), (b, b + len(raw))]
            found.append((at, len(raw), b"", {"enc": PRODUCT, "at": at, "n": int(x.size), "a": a, "b": b},
                          {"name": f"product at {at}", "coded_bytes": 0}))
            break
    return found


def _code_tensors(data: bytes, ordered: list[PackedTensor], *, use_huffman: bool):
    """Code each tensor found in ``data`` where that is smaller: ``(coded, rows)`` with
    ``coded`` = ``(offset, raw length, blob, info, row)`` per coded tensor."""
    taken: list[tuple[int, int]] = []
    coded, rows = [], []
    for t in ordered:
        v = np.ascontiguousarray(np.asarray(t.values))
        raw = v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes()
        row = {"name": t.name, "dtype": v.dtype.name, "shape": list(v.shape), "bytes": len(raw),
               "nonzero": int(np.count_nonzero(v.astype(np.int64) - t.offset if v.dtype.kind in "iu" else v)),
               "coded_bytes": None}
        rows.append(row)
        signed = _signed(t) if len(raw) >= MIN_TENSOR_BYTES else None
        at = _find(data, raw, taken) if signed is not None else None
        if at is None:
            continue
        values, extra = signed.reshape(v.shape), {}
        if _s2d_source(t) and v.ndim == 4:
            block = int(t.space_to_depth)
            before = depth_to_space(values, block, *np.shape(t.source)[1:3])  # no zero taps to code
            if before is not None:
                values, extra = before, {"space_to_depth": block}
        blob = None
        try:
            blob, info, _ = codec.encode_shared(t.name, values, codebook_dtype="float16", use_huffman=use_huffman)
        except FormatError:  # more distinct values than a codebook holds: leave it raw
            pass
        rq = _requant_candidate(data, t, v, taken, use_huffman)
        if rq is not None and (blob is None or len(rq[0]) < len(blob)):
            blob, info, extra = rq
        if blob is None or len(blob) + 40 >= len(raw):
            continue
        info = {**info, "at": at, "dtype": v.dtype.name, "offset": int(t.offset), **extra}
        taken += [(a, a + n) for a, n in _cuts((at, len(raw), blob, info, row))]
        coded.append((at, len(raw), blob, info, row))
        row["coded_bytes"] = len(blob)
    return coded, rows


# ------------------------------------------------------------------------------ decoding

def is_packed(archive: container.Archive) -> bool:
    return isinstance(archive.meta.get(PACKED_KEY), dict)


def packed_info(archive: container.Archive) -> dict[str, Any]:
    """``meta["packed"]`` checked: name, format, bytes, sha256."""
    info = archive.meta.get(PACKED_KEY)
    if not isinstance(info, dict):
        raise FormatError("not a packed file: an .esq checkpoint archive (compressed weights of a torch "
                          "model); export it, or pack an .onnx/.tflite with `edgesqueeze export --pack`")
    ok = (isinstance(info.get("name"), str) and info["name"] and isinstance(info.get("format"), str)
          and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool)
          and 0 <= info["bytes"] < 1 << 34 and isinstance(info.get("sha256"), str)
          and re.fullmatch("[0-9a-f]{64}", info["sha256"]) is not None)
    if not ok:
        raise FormatError(f"meta.packed: needs name (non-empty), format, bytes (an integer, 0 to 2**34) and "
                          f"sha256 (64 lowercase hex digits), got {info!r}")
    if not plain_file_name(info["name"]):  # readers write the inner file under it (unpack's default -o)
        raise FormatError(f"meta.packed.name: {info['name']!r} is not a plain file name (one without /, \\ or "
                          "NUL, not . or .., at most 255 characters); a damaged or hand-made file")
    return info


def plain_file_name(name: str) -> bool:
    """Whether ``name`` can be a file's name in any folder: not empty, ``.`` or ``..``, at
    most 255 characters, without ``/``, ``\\`` or NUL (FORMAT.md, ``meta.packed.name``)."""
    return 0 < len(name) <= 255 and name not in (".", "..") and not any(c in name for c in "/\\\0")


def layout(archive: container.Archive) -> dict[str, Any]:
    """What a packed archive codes and how, from its header (for ``inspect``): coded tensor
    sections (and of them requantized ones and those whose scales are derived), products,
    and the skeleton's codec, stored and restored bytes."""
    sections = [info for name, (_, info) in archive.sections.items() if name != SKELETON and isinstance(info, dict)]
    tensors = [i for i in sections if i.get("enc") == "shared"]
    blob, sk = archive.sections.get(SKELETON, (b"", {}))
    return {"coded_tensors": len(tensors),
            "requantized": sum(isinstance(i.get("requant"), dict) for i in tensors),
            "derived_scales": sum(_derives_scales(i) for i in tensors),
            "space_to_depth": sum("space_to_depth" in i for i in tensors),
            "products": sum(i.get("enc") == PRODUCT for i in sections),
            "skeleton_codec": sk.get("codec") if isinstance(sk, dict) else None,
            "skeleton_bytes": len(blob), "skeleton_restored_bytes": sk.get("n") if isinstance(sk, dict) else None}


def _dtype(name: str, info: dict) -> tuple[np.dtype, int]:
    """The little-endian numpy dtype a tensor section is stored as in the inner file, and its offset."""
    dtype = info.get("dtype")
    offset = info.get("offset", 0)
    if (not isinstance(dtype, str) or dtype not in _DTYPES or not isinstance(offset, int)
            or isinstance(offset, bool) or not -(1 << 32) < offset < 1 << 32):
        raise FormatError(f"section {name}: bad dtype {dtype!r} or offset {offset!r}")
    if dtype == "float32" and offset:
        raise FormatError(f"section {name}: a float32 tensor has no offset")
    return np.dtype(_DTYPES[dtype]).newbyteorder("<"), offset


_LIMITS = {np.dtype(t).newbyteorder("<"): (int(np.iinfo(t).min), int(np.iinfo(t).max))
           for t in (np.int8, np.uint8, np.int16, np.int32)}


def _limits(name: str, dtype: np.dtype, lo: float, hi: float) -> None:
    """Refuse integers from ``lo`` to ``hi`` if ``dtype`` cannot hold them all."""
    dmin, dmax = _LIMITS[dtype]
    if lo < dmin or hi > dmax:
        raise FormatError(f"section {name}: values do not fit {dtype.name}")


def _table(name: str, values: np.ndarray, dtype: np.dtype, offset: int) -> np.ndarray:
    """``values`` (float32, integer-valued: a codebook, or requantized codebook entries)
    plus ``offset`` in the integer ``dtype``, refusing any value the dtype cannot hold
    exactly. The float32 arithmetic is exact: coded integers are at most 2048 in magnitude
    (float16 codebooks) and requantized ones at most ``qmax`` <= 32767."""
    v = values + np.float32(offset) if offset else values
    if v.size:
        if not np.array_equal(np.rint(v), v):  # a fraction, or NaN (never equal to itself)
            raise FormatError(f"section {name}: values do not fit {dtype.name}")
        _limits(name, dtype, float(v.min()), float(v.max()))  # infinities fail here
    return v.astype(dtype)


def _store(dest: np.ndarray, pos: np.ndarray | None, values: np.ndarray, zero) -> None:
    """``dest[pos] = values``, ``zero`` elsewhere (``pos`` None: ``dest[...] = values``).
    Scattering into unaligned memory (a tensor at an odd offset of the file) is slow, so
    there the values are scattered into an aligned array and copied once."""
    if pos is None:
        dest[...] = values
    elif dest.flags.aligned:
        dest[...] = zero
        dest[pos] = values
    else:
        flat = np.full(dest.size, zero, dest.dtype)
        flat[pos] = values
        dest[...] = flat


def _fill(dest: np.ndarray, name: str, t: codec.Coded, offset: int) -> None:
    """Store the tensor ``t`` (plus ``offset``) into ``dest``, a view of the output buffer
    in the file's dtype. Integer dtypes: the codebook is converted and checked once, then
    gathered straight into place."""
    if dest.dtype.kind == "f":
        lut, zero = t.cb, 0.0
    else:
        lut = _table(name, t.cb, dest.dtype, offset)
        _limits(name, dest.dtype, offset, offset)
        zero = offset  # a zero weight
    _store(dest, t.pos, lut.take(t.ix), zero)


def _requantize(out: np.ndarray, name: str, t: codec.Coded, r, at: int, dtype: np.dtype, offset: int,
                late: Sequence[tuple[int, int]] = ()) -> None:
    """Fill in a requantized tensor at ``at`` of ``out`` (``r``: its ``requant`` entry),
    deriving its scales first where ``r`` says so (and writing them at ``scale_at``), else
    reading them there: ``clip(rint(v / scale_c), -qmax, qmax) + offset``, the same float32
    arithmetic as :func:`requantize` on the dense tensor, so the same integers, computed for
    the coded weights only. (Requantizing each (channel, codebook entry) pair once and
    gathering was slower: the gather needs an index per weight either way.) Clipping
    bounds every value, so the dtype is checked once, on the bounds. ``late``: spans whose
    bytes are not final when scales are read (requantized tensors, products): stored
    scales must not lie on them."""
    scale_at, qmax = (r.get("scale_at"), r.get("qmax")) if isinstance(r, dict) else (None, None)
    n_ch = t.shape[0] if t.shape else 0
    if not (_is_uint(scale_at) and _is_uint(qmax) and 1 <= qmax <= 32767 and n_ch > 0
            and scale_at + 4 * n_ch <= len(out)):
        raise FormatError(f"section {name}: bad requant entry {r!r}")
    if not np.isfinite(t.cb).all():
        raise FormatError(f"section {name}: its codebook holds NaN or infinity")
    _limits(name, dtype, -qmax + offset, qmax + offset)
    counts = _channel_counts(t, n_ch)
    q = t.cb.take(t.ix)
    if "scales" in r:
        scales = _derived_scales(name, r["scales"], q, counts, qmax)
        out[scale_at:scale_at + 4 * n_ch] = scales.astype("<f4").view(np.uint8)
    else:
        end = scale_at + 4 * n_ch
        if any(a < end and scale_at < b for a, b in late):
            raise FormatError(f"section {name}: its scales at {scale_at} lie on a requantized tensor or a product")
        scales = np.frombuffer(out, "<f4", n_ch, scale_at).copy()
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise FormatError(f"section {name}: its scales at {scale_at} are not positive floats")
    with np.errstate(over="ignore"):  # a tiny scale (a hand-made file): inf, which the clip bounds
        np.divide(q, np.repeat(scales, counts), out=q)
    np.rint(q, out=q)
    np.clip(q, -qmax, qmax, out=q)
    if offset:
        q += np.float32(offset)
    dest = np.frombuffer(out, dtype, t.numel, at)
    _store(dest, t.pos, q.astype(dtype), offset)  # a zero weight: rint(0 / scale) + offset


def _skeleton(archive: container.Archive, n: int) -> bytes:
    """The skeleton section decompressed; ``n``: its recorded size, checked by :func:`restore`."""
    blob, sk = archive.sections[SKELETON]
    try:
        if sk.get("codec") == "zlib":
            d = zlib.decompressobj()
            skeleton = d.decompress(blob, n + 1)
            ok = d.eof and not d.unused_data
        elif sk.get("codec") == "lzma":
            size = sk.get("dict")
            if not isinstance(size, int) or isinstance(size, bool) or not 4096 <= size <= MAX_DICT:
                raise FormatError(f"section {SKELETON}: bad LZMA2 dictionary size {size!r}")
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(size))
            skeleton = d.decompress(blob, n + 1)
            ok = d.eof and not d.unused_data  # raw LZMA2 ends with its end marker
        else:
            raise FormatError(f"section {SKELETON}: unknown codec {sk.get('codec')!r}")
    except (zlib.error, lzma.LZMAError) as exc:
        raise FormatError(f"section {SKELETON}: does not decompress ({exc})") from None
    if len(skeleton) != n:
        raise FormatError(f"section {SKELETON}: decompresses to {len(skeleton)} bytes, recorded {n}")
    if not ok:  # "decompresses to 22026 bytes, recorded 22026" said of bytes after the stream's end
        why = f"{len(d.unused_data)} byte(s) after the end of its stream" if d.eof else "its stream does not end"
        raise FormatError(f"section {SKELETON}: {why}")
    return skeleton


class Background:
    """``fn(*args)`` on another thread (``threaded=False``: right here), for work that
    releases the GIL (``lzma``, ``zlib`` and ``hashlib`` on large buffers): :meth:`result`
    joins it and re-raises what it raised; :meth:`wait` only joins it."""

    def __init__(self, fn, *args, threaded: bool = True):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True) if threaded else None
        if self._thread is None:
            self._run(fn, args)
        else:
            self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def result(self):
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


def unpack(source: bytes | container.Archive) -> bytes:
    """The inner file's exact bytes, checked against the recorded size and SHA-256.

    Every problem is a :class:`FormatError` naming the section: a damaged archive (the
    container's checksums), a skeleton that does not decompress to its recorded size,
    tensors that overlap or run past the file, bytes whose SHA-256 is not the recorded one.
    :func:`restore` and :func:`check_digest` are its two halves, for a caller (the runtime's
    loader) that checks the digest while it does something else with the bytes."""
    data, info = restore(source)
    check_digest(data, info["sha256"])
    return data


def check_digest(data: bytes, sha256: str) -> None:
    """Refuse ``data`` unless its SHA-256 is the recorded ``sha256`` (hex)."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise FormatError(f"decoded bytes have SHA-256 {digest[:16]}..., the file recorded {sha256[:16]}...")


def restore(source: bytes | container.Archive, *, parallel: bool = True) -> tuple[bytes, dict[str, Any]]:
    """The inner file's bytes and ``meta["packed"]`` (:func:`packed_info`: name, format,
    size and the SHA-256 recorded for the bytes, **not yet compared**): the archive's own
    checksums, the layout and the size are checked (as by :func:`unpack`); the caller must
    call :func:`check_digest` with ``info["sha256"]`` before it trusts the bytes.

    The layout is worked out and checked first, from the header alone; then one buffer of
    the recorded size is filled in place: skeleton pieces copied, tensors cast straight into
    it (no per-tensor byte strings), requantized tensors last (their scales are in the
    file). The work is split in two about equal halves by coded bytes, one on another
    thread (the skeleton's LZMA, zlib's inflating and numpy's large copies release the
    GIL): ImageNet SqueezeNet's fp32 file decodes in about 4.6 ms instead of 6.3 on two
    cores (benchmarks/notes.md, session 22). A file with less than ``_MIN_PARALLEL_NS`` of
    expected work, and any with ``parallel=False``, is done all on the calling thread."""
    archive = source if isinstance(source, container.Archive) else container.loads(source)
    info = packed_info(archive)
    if SKELETON not in archive.sections:
        raise FormatError("packed file without a skeleton section")
    sk = archive.sections[SKELETON][1]
    if not isinstance(sk, dict) or sk.get("enc") != "skeleton":  # FORMAT.md: exactly this enc
        raise FormatError(f"section {SKELETON}: info.enc must be \"skeleton\", got "
                          f"{sk.get('enc') if isinstance(sk, dict) else sk!r}")
    n_sk = sk.get("n")
    if not isinstance(n_sk, int) or isinstance(n_sk, bool) or not 0 <= n_sk <= info["bytes"]:
        raise FormatError(f"section {SKELETON}: bad size {n_sk!r}")
    tensors, products = {}, {}
    # (offset in the file, section, dtype, value offset, kind, elements); kind: TENSOR,
    # REQUANT (integers computed from the decoded floats), SCALES (a requantized tensor's
    # scales, derived from its floats) or PRODUCT
    spans = []
    for k, (blob, ti) in archive.sections.items():
        if k == SKELETON:
            continue
        enc = ti.get("enc") if isinstance(ti, dict) else None
        at = ti.get("at") if isinstance(ti, dict) else None
        if enc not in ("shared", PRODUCT):
            raise FormatError(f"section {k}: not a coded tensor")
        if not _is_uint(at):
            raise FormatError(f"section {k}: bad offset {at!r}")
        if enc == PRODUCT:
            n, a, b = ti.get("n"), ti.get("a"), ti.get("b")
            if blob or not (_is_uint(n) and n > 0 and _is_uint(a) and _is_uint(b)):
                raise FormatError(f"section {k}: bad product entry")
            products[k] = (at, a, b, n)
            spans.append((at, k, _F32, 0, PRODUCT, n))
            continue
        tensors[k] = (blob, ti)
        dtype, offset = _dtype(k, ti)
        numel = codec.shape_numel(_s2d_shape(k, ti) or ti.get("shape"), k)  # the bytes the file holds
        rq = ti.get("requant")
        if rq is not None and dtype not in _LIMITS:  # a KeyError traceback in _limits
            raise FormatError(f"section {k}: requant on a {dtype.name} tensor; requantized tensors are integers "
                              "(int8, uint8, int16, int32)")
        spans.append((at, k, dtype, offset, TENSOR if rq is None else REQUANT, numel))
        if _derives_scales(ti):
            if not (_is_uint(rq.get("scale_at")) and ti["shape"]):
                raise FormatError(f"section {k}: bad requant entry {rq!r}")
            spans.append((rq["scale_at"], k, _F32, 0, SCALES, ti["shape"][0]))
    spans.sort(key=lambda sp: sp[0])
    pieces = []  # (output start, skeleton start, length) of every skeleton piece
    size, pos = 0, 0  # where the next piece goes in the output; how much skeleton is used
    for at, k, dtype, _, kind, numel in spans:
        gap = at - size
        if gap < 0 or pos + gap > n_sk:
            what = {SCALES: "its scales", PRODUCT: "its product"}.get(kind, "its tensor")
            raise FormatError(f"section {k}: {what} at {at} overlaps the previous span or lies past the file")
        pieces.append((size, pos, gap))
        pos += gap
        size = at + numel * dtype.itemsize
    pieces.append((size, pos, n_sk - pos))
    total = size + n_sk - pos
    if total != info["bytes"]:
        raise FormatError(f"the {SKELETON} section's {n_sk} bytes and the tensors make {total} bytes, "
                          f"the file recorded {info['bytes']}")
    out = np.empty(total, np.uint8)  # every byte is written below: no zero-filling

    def fill(part: list) -> dict[str, codec.Coded]:
        values = codec.decode_coded(container.Archive(
            meta={}, sections={sp[1]: tensors[sp[1]] for sp in part}, version=archive.version)) if part else {}
        for k in values:
            if "space_to_depth" in tensors[k][1]:
                values[k] = _unspace(k, values[k], tensors[k][1])
        for at, k, dtype, offset, kind, numel in part:
            if kind == TENSOR:
                _fill(np.frombuffer(out, dtype, numel, at), k, values[k], offset)
            elif kind == REQUANT and _derives_scales(tensors[k][1]):  # needs no other bytes: now
                _requantize(out, k, values[k], tensors[k][1]["requant"], at, dtype, offset)
        return values

    def skeleton_and_fill(part: list) -> dict[str, codec.Coded]:
        skeleton, mv = _skeleton(archive, n_sk), memoryview(out)
        for start, at, n in pieces:
            mv[start:start + n] = skeleton[at:at + n]
        return fill(part)

    # the work split in two by its expected time (_SPLIT_NS)
    halves: tuple[list, list] = ([], [])  # the first goes with the skeleton, on another thread
    lz, cb, ob, rq = _SPLIT_NS
    load = [lz * len(archive.sections[SKELETON][0]), 0.0]
    coded = [sp for sp in spans if sp[4] in (TENSOR, REQUANT)]
    work = {sp[1]: cb * len(tensors[sp[1]][0]) + ob * sp[5] * sp[2].itemsize
            + (rq * _coded_values(tensors[sp[1]][1], sp[5]) if sp[4] == REQUANT else 0.0) for sp in coded}
    for sp in sorted(coded, key=lambda sp: -work[sp[1]]):
        j = 0 if load[0] <= load[1] else 1
        halves[j].append(sp)
        load[j] += work[sp[1]]
    job = Background(skeleton_and_fill, halves[0], threaded=parallel and sum(load) >= _MIN_PARALLEL_NS)
    try:
        values = fill(halves[1])
    except BaseException:
        job.wait()  # no thread left running behind an error
        raise
    values.update(job.result())
    late = [(sp[0], sp[0] + sp[5] * sp[2].itemsize) for sp in spans if sp[4] in (REQUANT, PRODUCT)]
    for at, k, dtype, offset, kind, numel in spans:  # scales read from the file: the skeleton's, or derived
        if kind == REQUANT and not _derives_scales(tensors[k][1]):
            _requantize(out, k, values[k], tensors[k][1]["requant"], at, dtype, offset, late)
    if products:
        _multiply(out, products)
    return out.tobytes(), info


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _coded_values(info: dict, numel: int) -> int:
    """A tensor section's count of coded values as its header says (checked when decoded)."""
    n = info.get("n")
    return n if _is_uint(n) and n <= numel else numel


def _derives_scales(info: dict) -> bool:
    rq = info.get("requant")
    return isinstance(rq, dict) and "scales" in rq


def _channel_counts(t: codec.Coded, n_ch: int) -> np.ndarray:
    """Coded weights per output channel (axis 0; positions are increasing)."""
    inner = t.numel // n_ch
    if t.pos is None:
        return np.full(n_ch, inner, np.int64)
    return np.diff(np.searchsorted(t.pos, np.arange(n_ch + 1) * inner))


def _derived_scales(name: str, rule, q: np.ndarray, counts: np.ndarray, qmax: int) -> np.ndarray:
    """A requantized tensor's scales from its decoded floats ``q`` (every coded value, in
    order; ``counts`` per channel), as ``requant.scales`` says: ``max |v| / qmax`` per
    channel in float32, ``zero`` for an all-zero channel."""
    zero = rule.get("zero") if isinstance(rule, dict) else None
    if not isinstance(rule, dict) or rule.get("from") != "max_abs" or (zero is not None and not (
            isinstance(zero, (int, float)) and not isinstance(zero, bool)
            and 0 < zero <= _F32_MAX and float(np.float32(zero)) == zero)):
        raise FormatError(f"section {name}: bad scales rule {rule!r}")
    zero = None if zero is None else float(zero)
    max_abs = np.zeros(len(counts), np.float32)
    some = counts > 0
    if some.any():
        starts = (np.cumsum(counts) - counts)[some]
        max_abs[some] = np.maximum(np.maximum.reduceat(q, starts), -np.minimum.reduceat(q, starts))
    if zero is None and (max_abs == 0).any():
        raise FormatError(f"section {name}: an all-zero channel and no scale for it in the scales rule")
    return _max_abs_scales(max_abs, qmax, 1.0 if zero is None else zero)


def _multiply(out: np.ndarray, products: dict[str, tuple[int, int, int, int]]) -> None:
    """Fill in the product sections ``{name: (at, a, b, n)}``: ``at`` gets ``n`` float32
    values ``a * b[i]``, reading the scalar at ``a`` and the ``n`` values at ``b`` from the
    output, which must lie in it and outside every product's own bytes."""
    outs = [(at, at + 4 * n) for at, _, _, n in products.values()]
    for k, (at, a, b, n) in products.items():
        srcs = ((a, a + 4), (b, b + 4 * n))
        if any(hi > len(out) or any(lo < e and s < hi for s, e in outs) for lo, hi in srcs):
            raise FormatError(f"section {k}: its factors at {a} and {b} lie past the file or on a product")
        with np.errstate(all="ignore"):  # IEEE results whatever the bytes (a damaged file: the digest refuses it)
            x = np.frombuffer(out, "<f4", 1, a)[0] * np.frombuffer(out, "<f4", n, b)
        out[at:at + 4 * n] = x.astype("<f4").view(np.uint8)


def bits_per_nonzero(rows: Sequence[dict[str, Any]]) -> float | None:
    """Coded bits per non-zero weight over the coded tensors of :func:`pack`'s rows."""
    coded = [r for r in rows if r["coded_bytes"] is not None]
    nz = sum(r["nonzero"] for r in coded)
    return None if not nz else 8 * sum(r["coded_bytes"] for r in coded) / nz
