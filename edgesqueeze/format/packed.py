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

Worked example: a file ``b"HEAD" + int8[0, 0, 3, 0, -2, 3] + b"TAIL"`` packs into a skeleton
``b"HEADTAIL"`` and one tensor at 4 with values ``[0, 0, 3, 0, -2, 3]``: codebook ``[-2, 3]``,
indices ``[1, 0, 1]``, gaps ``[2, 1, 0]``. docs/FORMAT.md specifies every byte.
"""

from __future__ import annotations

import hashlib
import lzma
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesqueeze.errors import FormatError
from edgesqueeze.format import codec, container

__all__ = ["PACKED_KEY", "SKELETON", "PackedTensor", "pack", "unpack", "restore", "check_digest",
           "is_packed", "packed_info"]

PACKED_KEY = "packed"  # meta key of a packed archive
SKELETON = "skeleton"
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


def _requant_candidate(data: bytes, t: PackedTensor, v: np.ndarray, taken, use_huffman: bool = True):
    """``(blob, info, {"requant": ...})`` coding ``t``'s float source instead of its integers,
    when requantizing it reproduces them exactly and its scales are in the file; else None."""
    if t.source is None or t.scales is None or v.dtype.kind not in "iu" or v.ndim < 1:
        return None
    src = np.asarray(t.source, dtype=np.float32)
    scales = np.ascontiguousarray(np.asarray(t.scales, dtype=np.float32).reshape(-1))
    if src.shape != v.shape or len(scales) != v.shape[0] or not (np.isfinite(scales).all() and (scales > 0).all()):
        return None
    if not np.array_equal(requantize(src, scales, t.offset, t.qmax), v.astype(np.float64)):
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
    return blob, info, {"requant": {"scale_at": scale_at, "qmax": int(t.qmax)}}


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
         meta: dict[str, Any] | None = None) -> tuple[bytes, list[dict[str, Any]]]:
    """Pack the file ``data`` (named ``name``, of format ``fmt``, e.g. ``"tflite-int8"``).

    ``tensors``: the file's weight tensors with their values (the caller reads them with
    onnx or LiteRT); each is found in ``data`` by its bytes and coded where that is smaller.
    A tensor not found, or not worth coding, simply stays in the skeleton: the result always
    decodes to ``data`` exactly (checked here before returning). ``meta``: more header
    entries (the artifact's metadata). Returns the archive bytes and one row per tensor
    (name, bytes before and after, non-zeros, whether it was coded)."""
    data = bytes(data)
    ordered = sorted(tensors, key=lambda t: -np.asarray(t.values).nbytes)  # big ones claim first
    coded, rows = _code_tensors(data, ordered, use_huffman=True)
    if any(codec.has_huffman(c[3]) for c in coded):  # see codec.has_huffman
        other = _code_tensors(data, ordered, use_huffman=False)
        size = sum(len(c[2]) for c in coded)
        if codec.without_huffman_pays(size, sum(len(c[2]) for c in other[0])):
            coded, rows = other
    head = {**(meta or {}), PACKED_KEY: {"name": name, "format": fmt, "bytes": len(data),
                                         "sha256": hashlib.sha256(data).hexdigest()}}
    coded = _fewer_sections(data, coded, head)
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


def _assemble(data: bytes, coded: list, head: dict[str, Any], *, tune: bool = False) -> bytes:
    """The archive of ``data`` with the ``coded`` tensors as sections, the rest its skeleton
    (``tune``: see :func:`_compress`)."""
    coded = sorted(coded, key=lambda c: c[0])
    pieces, pos = [], 0
    for at, n, *_ in coded:
        pieces.append(data[pos:at])
        pos = at + n
    pieces.append(data[pos:])
    skeleton, how = _compress(b"".join(pieces), tune=tune)
    sections = [(SKELETON, skeleton, {"enc": "skeleton", **how, "n": len(data) - sum(c[1] for c in coded)})]
    sections += [(f"t{i}", c[2], c[3]) for i, c in enumerate(coded)]
    return container.dumps(head, sections)


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
        blob = None
        try:
            blob, info, _ = codec.encode_shared(t.name, signed.reshape(v.shape), codebook_dtype="float16",
                                                use_huffman=use_huffman)
        except FormatError:  # more distinct values than a codebook holds: leave it raw
            pass
        extra: dict[str, Any] = {}
        rq = _requant_candidate(data, t, v, taken, use_huffman)
        if rq is not None and (blob is None or len(rq[0]) < len(blob)):
            blob, info, extra = rq
        if blob is None or len(blob) + 40 >= len(raw):
            continue
        info = {**info, "at": at, "dtype": v.dtype.name, "offset": int(t.offset), **extra}
        taken.append((at, at + len(raw)))
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
    ok = (isinstance(info.get("name"), str) and isinstance(info.get("format"), str)
          and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool)
          and 0 <= info["bytes"] < 1 << 34 and isinstance(info.get("sha256"), str) and len(info["sha256"]) == 64)
    if not ok:
        raise FormatError(f"meta.packed: needs name, format, bytes and sha256, got {info!r}")
    return info


def _dtype(name: str, info: dict) -> tuple[np.dtype, int]:
    """The little-endian numpy dtype a tensor section is stored as in the inner file, and its offset."""
    dtype = info.get("dtype")
    offset = info.get("offset", 0)
    if dtype not in _DTYPES or not isinstance(offset, int) or isinstance(offset, bool):
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


def _fill_requantized(dest: np.ndarray, name: str, t: codec.Coded, scales: np.ndarray,
                      offset: int, qmax: int) -> None:
    """Store ``requantize(t, scales, offset, qmax)`` into ``dest``, the same float32
    arithmetic as :func:`requantize` on the dense tensor, so the same integers, computed for
    the coded weights only. (Requantizing each (channel, codebook entry) pair once and
    gathering was slower: the gather needs an index per weight either way.) Clipping
    bounds every value, so the dtype is checked once, on the bounds."""
    _limits(name, dest.dtype, -qmax + offset, qmax + offset)
    if not np.isfinite(t.cb).all():
        raise FormatError(f"section {name}: its codebook holds NaN or infinity")
    n_ch = len(scales)
    inner = t.numel // n_ch
    # coded weights per output channel (positions are increasing): no division per weight
    counts = inner if t.pos is None else np.diff(np.searchsorted(t.pos, np.arange(n_ch + 1) * inner))
    q = t.cb.take(t.ix)
    np.divide(q, np.repeat(scales.astype(np.float32), counts), out=q)
    np.rint(q, out=q)
    np.clip(q, -qmax, qmax, out=q)
    if offset:
        q += np.float32(offset)
    _store(dest, t.pos, q.astype(dest.dtype), offset)  # a zero weight: rint(0 / scale) + offset


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
    if len(skeleton) != n or not ok:
        raise FormatError(f"section {SKELETON}: decompresses to {len(skeleton)} bytes, recorded {n}")
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
    cores (benchmarks/notes.md, session 22); ``parallel=False`` does it all on the calling
    thread."""
    archive = source if isinstance(source, container.Archive) else container.loads(source)
    info = packed_info(archive)
    if SKELETON not in archive.sections:
        raise FormatError("packed file without a skeleton section")
    sk = archive.sections[SKELETON][1]
    n_sk = sk.get("n") if isinstance(sk, dict) else None
    if not isinstance(n_sk, int) or isinstance(n_sk, bool) or not 0 <= n_sk <= info["bytes"]:
        raise FormatError(f"section {SKELETON}: bad size {n_sk!r}")
    tensors = {k: v for k, v in archive.sections.items() if k != SKELETON}
    spans = []  # (offset in the file, section, dtype, value offset, requantized?, elements)
    for k, (_, ti) in tensors.items():
        if not isinstance(ti, dict) or ti.get("enc") != "shared":
            raise FormatError(f"section {k}: not a coded tensor")
        at = ti.get("at")
        if not isinstance(at, int) or isinstance(at, bool) or at < 0:
            raise FormatError(f"section {k}: bad offset {at!r}")
        dtype, offset = _dtype(k, ti)
        spans.append((at, k, dtype, offset, "requant" in ti, codec.shape_numel(ti.get("shape"), k)))
    spans.sort(key=lambda sp: sp[0])
    pieces = []  # (output start, skeleton start, length) of every skeleton piece
    size, pos = 0, 0  # where the next piece goes in the output; how much skeleton is used
    for at, k, dtype, _, _, numel in spans:
        gap = at - size
        if gap < 0 or pos + gap > n_sk:
            raise FormatError(f"section {k}: at {at} overlaps the previous tensor or lies past the file")
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
        for at, k, dtype, offset, rq, numel in part:
            if not rq:  # requantized tensors are filled in once every other byte is in place
                _fill(np.frombuffer(out, dtype, numel, at), k, values[k], offset)
        return values

    def skeleton_and_fill(part: list) -> dict[str, codec.Coded]:
        skeleton, mv = _skeleton(archive, n_sk), memoryview(out)
        for start, at, n in pieces:
            mv[start:start + n] = skeleton[at:at + n]
        return fill(part)

    halves: tuple[list, list] = ([], [])  # the first goes with the skeleton, on another thread
    load = [2 * n_sk, 0]  # LZMA takes about as long per output byte as the tensors per 2 coded bytes
    for sp in sorted(spans, key=lambda sp: -len(tensors[sp[1]][0])):
        j = 0 if load[0] <= load[1] else 1
        halves[j].append(sp)
        load[j] += len(tensors[sp[1]][0])
    job = Background(skeleton_and_fill, halves[0], threaded=parallel)
    try:
        values = fill(halves[1])
    except BaseException:
        job.wait()  # no thread left running behind an error
        raise
    values.update(job.result())
    for at, k, dtype, offset, rq, numel in spans:
        if not rq:
            continue
        v = values[k]
        r = tensors[k][1]["requant"]
        scale_at, qmax = (r.get("scale_at"), r.get("qmax")) if isinstance(r, dict) else (None, None)
        n_ch = v.shape[0] if v.shape else 0
        ok = (isinstance(scale_at, int) and not isinstance(scale_at, bool) and isinstance(qmax, int)
              and not isinstance(qmax, bool) and 1 <= qmax <= 32767 and n_ch > 0
              and 0 <= scale_at and scale_at + 4 * n_ch <= len(out))
        if not ok:
            raise FormatError(f"section {k}: bad requant entry {r!r}")
        scales = np.frombuffer(out, "<f4", n_ch, scale_at).copy()
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise FormatError(f"section {k}: its scales at {scale_at} are not positive floats")
        _fill_requantized(np.frombuffer(out, dtype, numel, at), k, v, scales, offset, qmax)
    return out.tobytes(), info


def bits_per_nonzero(rows: Sequence[dict[str, Any]]) -> float | None:
    """Coded bits per non-zero weight over the coded tensors of :func:`pack`'s rows."""
    coded = [r for r in rows if r["coded_bytes"] is not None]
    nz = sum(r["nonzero"] for r in coded)
    return None if not nz else 8 * sum(r["coded_bytes"] for r in coded) / nz
