"""A clean-room decoder of the `.esq` archive format, written from docs/FORMAT.md alone.

It uses only the Python standard library and never imports edgesqueeze: its purpose is to
show that the document is enough to read every file edgesqueeze writes
(tests/test_reference_decoder.py compares the two). It is slow and simple on purpose; the
section names in comments ("Byte layout", "Checks a reader must make", ...) are FORMAT.md's.

Public functions:

- ``read_archive(data) -> (version, meta, sections)``: the container, every check made;
  ``sections`` maps a name to ``(blob, info)``.
- ``decode_tensors(data) -> {name: (shape, values)}``: a checkpoint archive's tensors as
  flat Python lists (float32 values as Python floats, integers as ints, bools as bools).
- ``unpack_packed(data) -> bytes``: a packed file's inner ONNX/TFLite file.

Every failure raises ``ValueError`` with a message naming the field or section.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import struct
import zlib

# --- Byte layout --------------------------------------------------------------------------

MAGIC = b"\x89ESQ\r\n\x1a\n"
PREFIX = 20  # magic (8) + version (2) + flags (2) + header length (8)
CHECKSUM = 32  # SHA-256 after the payload
SUPPORTED_VERSIONS = (1, 2, 3)
FLAG_HEADER_DEFLATED = 0x0001
HEADER_LIMIT = 16 * 2**20  # "the reader's limit (16 MiB by default)"


def _err(msg: str) -> ValueError:
    return ValueError(msg)


def _is_int(x) -> bool:
    """An integer that is not a boolean ("booleans are not integers")."""
    return type(x) is int


# --- Header: strict JSON (check 6) ---------------------------------------------------------

def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _err(f"header: duplicate key {k!r}")
        obj[k] = v
    return obj


def _no_constant(name):
    raise _err(f"header: {name} is not allowed in JSON")


def _finite_float(s):
    v = float(s)
    if not math.isfinite(v):
        raise _err(f"header: number {s[:40]!r} overflows")
    return v


def _parse_header(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")  # strict UTF-8
    except UnicodeDecodeError as e:
        raise _err(f"header: not UTF-8 ({e})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                         parse_float=_finite_float)
    except RecursionError:
        raise _err("header: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise _err(f"header: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _err("header: not a JSON object")
    return obj


def _inflate_header(stored: bytes) -> bytes:
    """Versioning policy: inflate at most the limit plus one byte; refuse a damaged,
    truncated or over-long stream and anything after its end."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(stored, HEADER_LIMIT + 1)
    except zlib.error as e:
        raise _err(f"header: damaged deflate stream ({e})") from None
    if len(out) > HEADER_LIMIT:
        raise _err("header: inflates past the header limit")
    if not d.eof:
        raise _err("header: truncated deflate stream")
    if d.unused_data or d.unconsumed_tail:
        raise _err("header: trailing bytes after the deflate stream")
    return out


# --- The container (Byte layout, Header, Checks a reader must make) ------------------------

def read_archive(data: bytes):
    """Returns ``(version, meta, sections)``, ``sections`` = {name: (blob, info)} in order."""
    data = bytes(data)
    size = len(data)
    # 1. at least the prefix
    if size < PREFIX:
        raise _err(f"file: {size} bytes, shorter than the {PREFIX}-byte prefix")
    # 2. magic (damaged newlines around "ESQ" mean a text-mode transfer)
    if data[:8] != MAGIC:
        if b"ESQ" in data[:8]:
            raise _err("magic: damaged newline bytes (text-mode transfer?)")
        raise _err("magic: not an .esq file")
    version, flags, hlen = struct.unpack_from("<HHQ", data, 8)
    # 3. version
    if version not in SUPPORTED_VERSIONS:
        raise _err(f"version: {version} is not supported (reads {list(SUPPORTED_VERSIONS)})")
    # 4. flags: only bit 0 is defined (see "Byte layout" and "Versioning policy")
    if flags & ~FLAG_HEADER_DEFLATED:
        raise _err(f"flags: unknown bits 0x{flags:04x}")
    # 5. header length: compared with size - 52, never computing 20 + H first
    if hlen > HEADER_LIMIT:
        raise _err(f"header length: {hlen} exceeds the limit {HEADER_LIMIT}")
    if hlen > size - (PREFIX + CHECKSUM):
        raise _err(f"header length: {hlen} runs past the end of a {size}-byte file")
    payload_start = PREFIX + hlen
    plen = size - (PREFIX + CHECKSUM) - hlen  # P = size - 52 - H
    raw = data[PREFIX:payload_start]
    if flags & FLAG_HEADER_DEFLATED:
        raw = _inflate_header(raw)
    # 6. strict JSON object
    header = _parse_header(raw)
    # 7. schema: exact keys, types, values
    if set(header) != {"format", "version", "meta", "sections"}:
        raise _err(f"header: keys {sorted(header)} are not format/meta/sections/version")
    if header["format"] != "esq":
        raise _err("header: format is not 'esq'")
    if not _is_int(header["version"]) or header["version"] != version:
        raise _err(f"header: version {header['version']!r} differs from the prefix's {version}")
    if not isinstance(header["meta"], dict):
        raise _err("header: meta is not an object")
    if not isinstance(header["sections"], list):
        raise _err("header: sections is not an array")
    entries = header["sections"]
    for i, s in enumerate(entries):
        if not isinstance(s, dict):
            raise _err(f"section {i}: not an object")
        if set(s) != {"name", "offset", "length", "crc32", "info"}:
            raise _err(f"section {i}: keys {sorted(s)} are not crc32/info/length/name/offset")
        name = s["name"]
        if not isinstance(name, str) or not name or len(name) > 1024:
            raise _err(f"section {i}: bad name")
        for key in ("offset", "length"):
            if not _is_int(s[key]) or s[key] < 0:
                raise _err(f"section {name!r}: {key} is not a non-negative integer")
        if not _is_int(s["crc32"]) or not 0 <= s["crc32"] < 2**32:
            raise _err(f"section {name!r}: bad crc32")
        if not isinstance(s["info"], dict):
            raise _err(f"section {name!r}: info is not an object")
    # 8. unique names, contiguous sections, no holes / overlaps / trailing bytes
    seen = set()
    end = 0
    for s in entries:
        name = s["name"]
        if name in seen:
            raise _err(f"section {name!r}: duplicate name")
        seen.add(name)
        if s["offset"] < end:
            raise _err(f"section {name!r}: overlaps or out of order")
        if s["offset"] > end:
            raise _err(f"section {name!r}: a hole before it")
        if s["length"] > plen - s["offset"]:
            raise _err(f"section {name!r}: runs past the payload")
        end = s["offset"] + s["length"]
    if end != plen:
        raise _err(f"payload: {plen - end} trailing bytes after the last section")
    # 9. CRC-32 of every section
    sections = {}
    for s in entries:
        a = payload_start + s["offset"]
        blob = data[a:a + s["length"]]
        if zlib.crc32(blob) != s["crc32"]:
            raise _err(f"section {s['name']!r}: CRC-32 mismatch (damaged)")
        sections[s["name"]] = (blob, s["info"])
    # 10. SHA-256 of the whole file
    if hashlib.sha256(data[:size - CHECKSUM]).digest() != data[size - CHECKSUM:]:
        raise _err("checksum: SHA-256 of the file does not match")
    return version, header["meta"], sections


# --- Bit reading ---------------------------------------------------------------------------

class _Bits:
    """MSB-first bit reader over a bytes object."""

    def __init__(self, data: bytes):
        self.data = data
        self.nbits = 8 * len(data)
        self.pos = 0

    def read(self, k: int) -> int:
        if self.pos + k > self.nbits:
            raise _err("bitstream: read past the end")
        v = 0
        d, p = self.data, self.pos
        for q in range(p, p + k):
            v = (v << 1) | ((d[q >> 3] >> (7 - (q & 7))) & 1)
        self.pos = p + k
        return v

    def rest_is_zero(self) -> bool:
        """The bits after the position (padding) are all zero."""
        p = self.pos
        if p >= self.nbits:
            return True
        if self.data[p >> 3] & ((1 << (8 - (p & 7))) - 1):
            return False
        return not any(self.data[(p >> 3) + 1:])


# --- Huffman streams ----------------------------------------------------------------------

MAX_CODE_LEN = 24  # "at most 24 bits"


def _canonical_decoder(lengths):
    """Canonical code from code lengths: sort used symbols by (length, symbol); the first
    code is 0, each next is previous + 1 shifted left by the growth in length.
    Returns ({(length, code): symbol}, longest)."""
    used = sorted((ln, sym) for sym, ln in enumerate(lengths) if ln)
    if not used:
        return {}, 0
    if used[-1][0] > MAX_CODE_LEN:
        raise _err("huffman: code length over 24")
    # Kraft sum at most 1
    if sum(1 << (MAX_CODE_LEN - ln) for ln, _ in used) > 1 << MAX_CODE_LEN:
        raise _err("huffman: code lengths oversubscribe (Kraft sum > 1)")
    table = {}
    code = 0
    prev = used[0][0]
    for i, (ln, sym) in enumerate(used):
        if i:
            code = (code + 1) << (ln - prev)
        prev = ln
        table[(ln, code)] = sym
    return table, used[-1][0]


def _decode_symbol(bits: _Bits, table, longest, limit_pos):
    code = 0
    for ln in range(1, longest + 1):
        if bits.pos >= limit_pos:
            break
        code = (code << 1) | bits.read(1)
        sym = table.get((ln, code))
        if sym is not None:
            return sym
    raise _err("huffman: invalid code or chunk overrun")


def decode_huffman_stream(stream: bytes, lengths, count: int, chunk: int, version: int):
    """A chunked Huffman stream ("Huffman streams"): ``count`` symbols dealt round-robin into
    ``m = ceil(count / chunk)`` chunks, a chunk index (version 1: u16 bits per chunk, all m;
    version 2+: packed base/width/values for chunks 0..m-2), then the codes."""
    table, longest = _canonical_decoder(lengths)
    if count == 0:
        # m = 0: no index and no codes (the doc does not say; an empty stream is assumed)
        if stream:
            raise _err("huffman: bytes in a stream of no symbols")
        return []
    if not table:
        raise _err("huffman: no code for a non-empty stream")
    m = -(-count // chunk)
    sizes = [count // m + (1 if c < count % m else 0) for c in range(m)]  # symbols per chunk
    # The chunk index
    if version == 1:
        if len(stream) < 2 * m:
            raise _err("huffman: stream shorter than its chunk index")
        chunk_bits = list(struct.unpack_from(f"<{m}H", stream, 0))
        codes = stream[2 * m:]
        total = sum(chunk_bits)
        # the last chunk's codes end in the stream's last byte
        if -(-total // 8) != len(codes):
            raise _err("huffman: stream size does not match its chunk index")
    elif m == 1:
        chunk_bits = [None]
        codes = stream
    else:
        if len(stream) < 3:
            raise _err("huffman: stream shorter than its chunk index")
        base, width = struct.unpack_from("<HB", stream, 0)
        if width > 16:
            raise _err(f"huffman: index width {width} > 16")
        ilen = -(-((m - 1) * width) // 8)
        if len(stream) < 3 + ilen:
            raise _err("huffman: stream shorter than its chunk index")
        ib = _Bits(stream[3:3 + ilen])
        chunk_bits = [base + ib.read(width) for _ in range(m - 1)] + [None]
        if not ib.rest_is_zero():
            raise _err("huffman: non-zero padding in the chunk index")
        codes = stream[3 + ilen:]
    nbits = 8 * len(codes)
    # The last chunk's size (v2+): whatever is left; its codes must end in the last byte.
    if chunk_bits[-1] is None:
        known = sum(chunk_bits[:-1])
        if known > nbits:
            raise _err("huffman: chunk index runs past the stream")
        last = nbits - known  # includes < 8 padding bits
        chunk_bits[-1] = last
        last_exact = False
    else:
        last_exact = True
    # Decode chunk by chunk
    out = [0] * count
    bits = _Bits(codes)
    for c in range(m):
        start = bits.pos
        cb = chunk_bits[c]
        exact = last_exact or c < m - 1
        # each chunk holds between 1 and `longest` bits per symbol
        if exact and not sizes[c] <= cb <= sizes[c] * longest:
            raise _err(f"huffman: chunk {c} size {cb} bits out of range")
        limit = start + cb
        for j in range(sizes[c]):
            out[c + j * m] = _decode_symbol(bits, table, longest, limit)
        used = bits.pos - start
        if exact:
            if used != cb:
                raise _err(f"huffman: chunk {c} uses {used} bits, index says {cb}")
        else:
            if not sizes[c] <= used <= sizes[c] * longest:
                raise _err(f"huffman: chunk {c} size {used} bits out of range")
    # the padding: fewer than 8 bits, all zero
    if nbits - bits.pos >= 8:
        raise _err("huffman: codes do not end in the stream's last byte")
    if not bits.rest_is_zero():
        raise _err("huffman: non-zero padding bits")
    return out


# --- Stream codings (info.z) ---------------------------------------------------------------

def _decode_deflate_stream(stream: bytes, count: int, alphabet: int):
    """Coding 1: raw DEFLATE inflating to exactly ``count`` bytes, one symbol each; nothing may
    follow the final block."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(stream, count + 1)
    except zlib.error as e:
        raise _err(f"deflate stream: damaged ({e})") from None
    if len(out) != count or not d.eof:
        raise _err(f"deflate stream: does not inflate to exactly {count} bytes")
    if d.unused_data or d.unconsumed_tail:
        raise _err("deflate stream: bytes after its final block")
    if count and max(out) >= alphabet:
        raise _err("deflate stream: symbol outside its alphabet")
    return list(out)


def _decode_bits_stream(stream: bytes, count: int, alphabet: int):
    """Coding 2: one bit per symbol, MSB first, zero padded; alphabet of at most 2."""
    if alphabet > 2:
        raise _err("bits stream: alphabet larger than 2")
    if len(stream) != -(-count // 8):
        raise _err("bits stream: wrong size")
    b = _Bits(stream)
    out = [b.read(1) for _ in range(count)]
    if not b.rest_is_zero():
        raise _err("bits stream: non-zero padding")
    if count and alphabet < 2 and max(out) >= alphabet:
        raise _err("bits stream: symbol outside its alphabet")
    return out


def _decode_stream(coding, stream, lengths, count, alphabet, chunk, version):
    if coding == 0:
        return decode_huffman_stream(stream, lengths, count, chunk, version)
    if coding == 1:
        return _decode_deflate_stream(stream, count, alphabet)
    if coding == 2:
        return _decode_bits_stream(stream, count, alphabet)
    raise _err(f"stream coding {coding} is not a coding")


# --- Shared tensor sections ----------------------------------------------------------------

def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _check_shape(shape, where):
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _err(f"{where}: bad shape {shape!r}")
    if _numel(shape) > 2**31:
        raise _err(f"{where}: shape too large")  # nothing is allocated from a declared size
    return shape


def decode_shared(name: str, blob: bytes, info: dict, version: int):
    """A shared tensor section -> (shape, flat list of float values, row-major).
    Values are float32 (codebook f32) or float16 widened; zeros are +0.0."""
    where = f"section {name!r}"

    def need(key, ok):
        if key not in info or not ok(info[key]):
            raise _err(f"{where}: bad info.{key} {info.get(key)!r}")
        return info[key]

    if info.get("enc") != "shared":
        raise _err(f"{where}: enc is not 'shared'")
    shape = _check_shape(info.get("shape"), where)
    numel = _numel(shape)
    axis = info.get("axis", "missing")
    if axis is not None and not (_is_int(axis) and 0 <= axis < len(shape)):
        raise _err(f"{where}: bad info.axis {axis!r}")
    k = need("k", lambda v: _is_int(v) and v >= 0)
    cb = need("cb", lambda v: v in ("f32", "f16"))
    n = need("n", lambda v: _is_int(v) and 0 <= v <= numel)
    w = need("w", lambda v: _is_int(v) and 0 <= v <= 8)
    sizes = need("sizes", lambda v: isinstance(v, list) and len(v) == 5
                 and all(_is_int(x) and x >= 0 for x in v))
    chunk = info.get("c", 256)
    if not (_is_int(chunk) and 1 <= chunk <= 4096):
        raise _err(f"{where}: bad info.c {chunk!r}")
    if "z" in info and version < 3:
        raise _err(f"{where}: info.z in a version-{version} file")
    z = info.get("z", 0)
    if not (_is_int(z) and 0 <= z < 16 and (z & 3) != 3 and (z >> 2) != 3):
        raise _err(f"{where}: bad info.z {z!r}")
    zi, zg = z & 3, z >> 2
    if w == 0:
        if zg != 0:
            raise _err(f"{where}: a gap coding in a dense section")
        if "ng" in info and info["ng"] != 0:  # doc: ng only "when w > 0"
            raise _err(f"{where}: info.ng in a dense section")
        ng = 0
        if n != numel:
            raise _err(f"{where}: dense section codes {n} of {numel} positions")
    else:
        ng = need("ng", lambda v: _is_int(v) and v >= 0)
    if sum(sizes) != len(blob):
        raise _err(f"{where}: info.sizes sum to {sum(sizes)}, section has {len(blob)} bytes")
    parts = []
    pos = 0
    for s in sizes:
        parts.append(blob[pos:pos + s])
        pos += s
    ks_b, cb_b, len_b, idx_b, gap_b = parts

    # ks: with an axis, one u16 per slice; else one codebook of k entries
    if axis is None:
        if ks_b:
            raise _err(f"{where}: ks part without an axis")
        ks = [k]
    else:
        if len(ks_b) != 2 * shape[axis]:
            raise _err(f"{where}: ks part is not a u16 per slice")
        ks = list(struct.unpack(f"<{shape[axis]}H", ks_b))
        if sum(ks) != k:
            raise _err(f"{where}: ks sum to {sum(ks)}, info.k is {k}")
    # codebook: f32 or f16 little-endian, each codebook sorted ascending
    esize = 4 if cb == "f32" else 2
    if len(cb_b) != esize * k:
        raise _err(f"{where}: codebook part is not {k} {cb} values")
    codebook = list(struct.unpack(f"<{k}{'f' if cb == 'f32' else 'e'}", cb_b))
    starts = []
    acc = 0
    for kk in ks:
        starts.append(acc)
        acc += kk
    # lengths: 4-bit nibbles, high first, idx alphabet then gap alphabet, for Huffman streams
    alpha_i = max(max(ks), 1)
    alpha_g = 2**w if w else 0
    n_nib = (alpha_i if zi == 0 else 0) + (alpha_g if zg == 0 else 0)
    if len(len_b) != -(-n_nib // 2):
        raise _err(f"{where}: lengths part is not {n_nib} nibbles")
    nib = _Bits(len_b)
    lens_i = [nib.read(4) for _ in range(alpha_i)] if zi == 0 else None
    lens_g = [nib.read(4) for _ in range(alpha_g)] if (zg == 0 and w) else None
    if not nib.rest_is_zero():
        raise _err(f"{where}: non-zero padding in the lengths part")
    # the two streams
    idx = _decode_stream(zi, idx_b, lens_i, n, alpha_i, chunk, version)
    if w:
        gaps = _decode_stream(zg, gap_b, lens_g, ng, alpha_g, chunk, version)
    else:
        if gap_b:
            raise _err(f"{where}: gap part in a dense section")
        gaps = []

    # positions: dense = all; sparse = running sum of (symbol + [symbol != E]) - 1 at non-fillers
    if w == 0:
        positions = range(numel)
    else:
        filler = 2**w - 1
        positions = []
        run = 0
        for g in gaps:
            run += g + (g != filler)
            if g != filler:
                positions.append(run - 1)
        if len(positions) != n:
            raise _err(f"{where}: {len(positions)} non-fillers in the gap stream, info.n is {n}")
        if positions and positions[-1] >= numel:
            raise _err(f"{where}: a gap lands outside the tensor")
        # (positions are strictly increasing by construction)
    # slice of each position along `axis` (row-major)
    if axis is not None:
        inner = _numel(shape[axis + 1:])
        dim = shape[axis]
    values = [0.0] * numel
    for p, i in zip(positions, idx):
        s = 0 if axis is None else (p // inner) % dim
        if i >= ks[s]:
            raise _err(f"{where}: index {i} outside slice {s}'s codebook of {ks[s]}")
        values[p] = codebook[starts[s] + i]
    return shape, values


# --- The raw section -----------------------------------------------------------------------

RAW_DTYPES = {  # name -> (struct code, size)
    "float32": ("f", 4), "float16": ("e", 2), "float64": ("d", 8), "int64": ("q", 8),
    "int32": ("i", 4), "int8": ("b", 1), "uint8": ("B", 1), "bool": ("?", 1),
}


def decode_raw(name: str, blob: bytes, info: dict):
    where = f"section {name!r}"
    if info.get("enc") != "raw":
        raise _err(f"{where}: enc is not 'raw'")
    tensors = info.get("tensors")
    if not isinstance(tensors, list):
        raise _err(f"{where}: bad tensors list")
    out = {}
    pos = 0
    for t in tensors:
        if not isinstance(t, list) or len(t) not in (3, 4) or not isinstance(t[0], str):
            raise _err(f"{where}: bad tensor entry {t!r}")
        tname, dtype, shape = t[0], t[1], t[2]
        stored = dtype
        if len(t) == 4:  # [name, "float32", shape, "float16"]: float32 stored as float16
            if dtype != "float32" or t[3] != "float16":
                raise _err(f"{where}: bad tensor entry {t!r}")
            stored = "float16"
        if dtype not in RAW_DTYPES:
            raise _err(f"{where}: bad dtype {dtype!r} of {tname!r}")
        _check_shape(shape, where)
        code, esize = RAW_DTYPES[stored]
        count = _numel(shape)
        if count * esize > len(blob) - pos:
            raise _err(f"{where}: tensor {tname!r} runs past the section")
        if stored == "bool" and any(b > 1 for b in blob[pos:pos + count]):
            raise _err(f"{where}: bool tensor {tname!r} holds a byte other than 0/1")
        vals = list(struct.unpack_from(f"<{count}{code}", blob, pos))
        pos += count * esize
        if tname in out:
            raise _err(f"{where}: duplicate tensor {tname!r}")
        out[tname] = (shape, vals)
    if pos != len(blob):
        raise _err(f"{where}: {len(blob) - pos} bytes after its tensors")
    return out


# --- Checkpoint archives ("How edgesqueeze stores a Deep Compression model") ---------------

def decode_tensors(data: bytes):
    """Every tensor of a checkpoint archive: {name: (shape, flat list of values)}."""
    version, meta, sections = read_archive(data)
    out = {}
    for name, (blob, info) in sections.items():
        enc = info.get("enc")
        if enc == "shared":
            tensors = {name: decode_shared(name, blob, info, version)}
        elif enc == "raw":
            tensors = decode_raw(name, blob, info)
        else:
            raise _err(f"section {name!r}: unknown enc {enc!r}")
        for t, v in tensors.items():
            if t in out:
                raise _err(f"tensor {t!r} appears twice")
            out[t] = v
    return out


# --- Packed files --------------------------------------------------------------------------

PACKED_DTYPES = {  # dtype -> (struct code, size, min, max)
    "int8": ("b", 1, -128, 127), "uint8": ("B", 1, 0, 255), "int16": ("h", 2, -2**15, 2**15 - 1),
    "int32": ("i", 4, -2**31, 2**31 - 1), "float32": ("f", 4, None, None),
}


def _check_packed_meta(meta):
    p = meta.get("packed")
    if not isinstance(p, dict):
        raise _err("meta.packed: missing (not a packed file)")
    if not isinstance(p.get("name"), str) or not p["name"]:
        raise _err("meta.packed.name: missing")
    if p["name"] in (".", "..") or len(p["name"]) > 255 or any(c in p["name"] for c in "/\\\0"):
        raise _err("meta.packed.name: not a plain file name")
    if not isinstance(p.get("format"), str):  # any string (edgesqueeze writes onnx, onnx-int8, ...)
        raise _err(f"meta.packed.format: {p.get('format')!r}")
    if not _is_int(p.get("bytes")) or not 0 <= p["bytes"] < 2**34:
        raise _err("meta.packed.bytes: not an integer with 0 <= bytes < 2**34")
    sha = p.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise _err("meta.packed.sha256: not 64 lowercase hex digits")
    return p


def _decompress_skeleton(blob: bytes, info: dict) -> bytes:
    """Step 2: ask for at most n + 1 bytes; exactly n, ending at the section's end."""
    n = info.get("n")
    if not _is_int(n) or n < 0:
        raise _err("skeleton: bad info.n")
    codec = info.get("codec")
    if codec == "zlib":
        d = zlib.decompressobj()  # RFC 1950 zlib stream
        err = zlib.error
    elif codec == "lzma":
        dic = info.get("dict")
        if not _is_int(dic) or not 4096 <= dic <= 64 * 2**20:
            raise _err("skeleton: bad info.dict")
        d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW,
                                  filters=[{"id": lzma.FILTER_LZMA2, "dict_size": dic}])
        err = lzma.LZMAError
    else:
        raise _err(f"skeleton: unknown codec {codec!r}")
    try:
        out = d.decompress(blob, n + 1)
    except err as e:
        raise _err(f"skeleton: damaged stream ({e})") from None
    if len(out) != n or not d.eof:
        raise _err(f"skeleton: does not decompress to exactly {n} bytes")
    if d.unused_data or getattr(d, "unconsumed_tail", b""):
        raise _err("skeleton: bytes after the end of its stream")
    return out


def _to_bytes(name, values, dtype, offset):
    """Step 3: v + offset must be an integer in the dtype's range (float32: as decoded)."""
    code, _, lo, hi = PACKED_DTYPES[dtype]
    if dtype == "float32":
        return struct.pack(f"<{len(values)}f", *values)
    ints = []
    for v in values:
        x = v + offset
        if not math.isfinite(x) or x != int(x) or not lo <= x <= hi:
            raise _err(f"section {name!r}: value {x} is not a {dtype}")
        ints.append(int(x))
    return struct.pack(f"<{len(ints)}{code}", *ints)


def _f32(x: float) -> float:
    """Round a Python float to float32, to nearest even. The double result of one float32
    division or multiplication rounded once more to float32 is the correctly rounded float32
    result (a double holds more than 2 * 24 + 2 bits), so this emulates float32 arithmetic."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # past float32's range: rounds to infinity
        return math.copysign(math.inf, x)


def _is_f32(x) -> bool:
    """A JSON number (integer or float, not a boolean) that is exactly a finite float32 value."""
    return type(x) in (int, float) and math.isfinite(x) and _f32(float(x)) == x


def _check_requant(name, info):
    """Requantized tensors (optional ``requant``) and Derived scales (``requant.scales``)."""
    rq = info.get("requant")
    if rq is None:
        return None
    if (not isinstance(rq, dict) or not _is_int(rq.get("scale_at")) or rq["scale_at"] < 0
            or not _is_int(rq.get("qmax")) or not 1 <= rq["qmax"] <= 32767):
        raise _err(f"section {name!r}: bad requant entry {rq!r}")
    dtype, offset = info.get("dtype"), info.get("offset", 0)
    lo, hi = PACKED_DTYPES[dtype][2:] if dtype in PACKED_DTYPES else (None, None)
    if lo is None or not lo <= -rq["qmax"] + offset <= rq["qmax"] + offset <= hi:
        # "-Q + offset and Q + offset inside the dtype's range" (an integer dtype)
        raise _err(f"section {name!r}: requant qmax {rq['qmax']} with offset {offset} does not fit {dtype}")
    if "scales" in rq:  # present, even as null: derived scales
        rule = rq["scales"]
        if not isinstance(rule, dict) or rule.get("from") != "max_abs":
            raise _err(f"section {name!r}: bad scales rule {rule!r}")
        # Z: a positive float32 value, as a JSON float or integer; other keys are ignored
        if "zero" in rule and not (_is_f32(rule["zero"]) and rule["zero"] > 0):
            raise _err(f"section {name!r}: bad scales rule {rule!r}")
    return rq


def _space_to_depth(name, info, shape, values):
    """Space-to-depth weights (optional ``space_to_depth``): the decoded ``[O, kh, kw, C]``
    tensor rearranged to ``[O, ceil(kh/B), ceil(kw/B), B*B*C]``, zeros where no tap lands."""
    block = info.get("space_to_depth")
    if block is None:
        return shape, values
    if not _is_int(block) or not 2 <= block <= 8 or len(shape) != 4 or min(shape) < 1:
        raise _err(f"section {name!r}: bad space_to_depth {block!r} for shape {shape!r}")
    o_n, kh, kw, c_n = shape
    ah, aw, cc = -(-kh // block), -(-kw // block), c_n * block * block
    out = [0.0] * (o_n * ah * aw * cc)
    i = 0
    for o in range(o_n):
        for y in range(kh):
            for x in range(kw):
                for c in range(c_n):
                    a, dy, b, dx = y // block, y % block, x // block, x % block
                    out[((o * ah + a) * aw + b) * cc + c * block * block + dy * block + dx] = values[i]
                    i += 1
    return [o_n, ah, aw, cc], out


def unpack_packed(data: bytes) -> bytes:
    """A packed file's inner ONNX/TFLite file ("Packed files", "Decoding" steps 1-7)."""
    # 1. the archive with all its checks, and meta.packed
    version, meta, sections = read_archive(data)
    packed = _check_packed_meta(meta)
    if "skeleton" not in sections:
        raise _err("section 'skeleton': missing")
    blob, info = sections["skeleton"]
    if info.get("enc") != "skeleton":
        raise _err("section 'skeleton': enc is not 'skeleton'")
    # 2. the skeleton
    skeleton = _decompress_skeleton(blob, info)
    # 3. every other section: a shared tensor (plus at / dtype / offset, optional requant)
    #    or a product (empty content; enc, at, n, a, b)
    tensors, products = [], []
    spans = []  # (offset, size, what) cut out of the skeleton (step 4)
    for name, (blob_t, info_t) in sections.items():
        if name == "skeleton":
            continue
        enc = info_t.get("enc")
        if enc == "product":
            at, n, a, b = (info_t.get(k) for k in ("at", "n", "a", "b"))
            if blob_t or not all(_is_int(x) and x >= 0 for x in (at, n, a, b)) or n < 1:
                raise _err(f"section {name!r}: bad product entry")
            products.append((name, at, n, a, b))
            spans.append((at, 4 * n, name))
            continue
        if enc != "shared":
            raise _err(f"section {name!r}: enc is neither 'shared' nor 'product'")
        at, dtype, offset = info_t.get("at"), info_t.get("dtype"), info_t.get("offset", 0)  # absent: 0
        if not _is_int(at) or at < 0:
            raise _err(f"section {name!r}: bad info.at")
        if dtype not in PACKED_DTYPES:
            raise _err(f"section {name!r}: bad info.dtype {dtype!r}")
        if not _is_int(offset) or not -2**32 < offset < 2**32 or (dtype == "float32" and offset != 0):
            raise _err(f"section {name!r}: bad info.offset {offset!r}")
        requant = _check_requant(name, info_t)
        shape, values = decode_shared(name, blob_t, info_t, version)
        shape, values = _space_to_depth(name, info_t, shape, values)
        nbytes = _numel(shape) * PACKED_DTYPES[dtype][1]
        if requant is not None:
            if not shape or shape[0] < 1:
                raise _err(f"section {name!r}: requantized tensor without channels")
            if any(not math.isfinite(v) for v in values):  # "the codebook must be finite"
                raise _err(f"section {name!r}: non-finite codebook value")
            if "scales" in requant:  # derived scales: their block is a span too
                spans.append((requant["scale_at"], 4 * shape[0], name + " scales"))
        raw = None if requant else _to_bytes(name, values, dtype, offset)
        tensors.append((name, at, nbytes, raw, shape, values, dtype, offset, requant))
        spans.append((at, nbytes, name))
    # 4. walk the spans in offset order: skeleton bytes up to each, then room for it
    spans.sort(key=lambda t: t[0])
    out = bytearray()
    pos = 0
    for at, size, name in spans:
        take = at - len(out)
        if take < 0:
            raise _err(f"{name}: overlaps the previous span")
        if take > len(skeleton) - pos:
            raise _err(f"{name}: lies past the skeleton")
        out += skeleton[pos:pos + take]
        pos += take
        out += bytes(size)
    out += skeleton[pos:]
    if len(out) != packed["bytes"]:
        raise _err(f"result: {len(out)} bytes, meta.packed.bytes is {packed['bytes']}")
    for name, at, nbytes, raw, *_ in tensors:
        if raw is not None:
            out[at:at + nbytes] = raw
    # 5. requantized tensors: derived scales first, then q = clip(rint(v / scale[c]), -Q, Q)
    requantized = [t for t in tensors if t[-1] is not None]
    for name, at, nbytes, raw, shape, values, dtype, offset, rq in requantized:
        if "scales" not in rq:
            continue
        C, per, Q = shape[0], _numel(shape[1:]), rq["qmax"]
        scales = []
        for c in range(C):
            m = max((abs(v) for v in values[c * per:(c + 1) * per]), default=0.0)
            if m > 0:
                scales.append(_f32(m / Q))
            elif "zero" in rq["scales"]:
                scales.append(rq["scales"]["zero"])
            else:
                raise _err(f"section {name!r}: all-zero channel {c} and no scale for it")
        out[rq["scale_at"]:rq["scale_at"] + 4 * C] = struct.pack(f"<{C}f", *scales)
    # stored scales must lie outside every requantized tensor's and product's bytes
    late = [(t[1], t[1] + t[2]) for t in requantized] + [(at, at + 4 * n) for _, at, n, _, _ in products]
    for name, at, nbytes, raw, shape, values, dtype, offset, rq in requantized:
        C, per, S, Q = shape[0], _numel(shape[1:]), rq["scale_at"], rq["qmax"]
        if S > len(out) or 4 * C > len(out) - S:
            raise _err(f"section {name!r}: scales run past the file")
        if "scales" not in rq and any(p0 < S + 4 * C and S < p1 for p0, p1 in late):
            raise _err(f"section {name!r}: its stored scales lie on a requantized tensor or a product")
        scales = struct.unpack_from(f"<{C}f", out, S)
        if any(not (math.isfinite(x) and x > 0) for x in scales):
            raise _err(f"section {name!r}: a scale is not positive and finite")
        q = []
        for j, v in enumerate(values):
            x = _f32(v / scales[j // per])  # float32 division
            q.append(float(-Q if x < -Q else Q if x > Q else round(x)))  # round half to even
        out[at:at + nbytes] = _to_bytes(name, q, dtype, offset)
    # 6. products: A * B[i] in float32, factors inside the file and outside every product
    prod_spans = [(at, at + 4 * n) for _, at, n, _, _ in products]

    def clear(lo, size):
        return size <= len(out) - lo and all(lo + size <= p0 or lo >= p1 for p0, p1 in prod_spans)

    for name, at, n, a, b in products:
        if not (clear(a, 4) and clear(b, 4 * n)):
            raise _err(f"section {name!r}: a factor lies past the file or on a product")
        A = struct.unpack_from("<f", out, a)[0]
        B = struct.unpack_from(f"<{n}f", out, b)
        out[at:at + 4 * n] = struct.pack(f"<{n}f", *(_f32(A * x) for x in B))
    # 7. SHA-256 of the result
    if hashlib.sha256(out).hexdigest() != packed["sha256"]:
        raise _err("result: SHA-256 differs from meta.packed.sha256")
    return bytes(out)
