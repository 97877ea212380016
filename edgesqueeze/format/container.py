"""The ``.esq`` archive: named binary sections, a JSON header, versioned and checksummed.

Written by hand because no maintained format fits: safetensors holds tensors only (our
sections are Huffman bitstreams with per-section metadata) and has neither a format version
nor checksums, and a Huffman bitstream has no redundancy to notice damage with. The layout
borrows safetensors' habits (one-page spec, strict JSON header, contiguous payload with no
holes, every length checked before use) and adds a version, a CRC-32 per section and a
SHA-256 of the whole file. The full specification is docs/FORMAT.md. numpy-free and
torch-free, so the device runtime can read archives.

Layout (all integers little-endian)::

    magic   8 bytes  89 45 53 51 0D 0A 1A 0A  ("\\x89ESQ\\r\\n\\x1a\\n", PNG-style)
    version u16      3 (versions 1 and 2 are read too; see VERSION)
    flags   u16      bit 0: the header is raw-deflate compressed; other bits must be 0
    hlen    u64      length of the header as stored
    header  hlen     UTF-8 JSON object (sorted keys, no whitespace, no NaN), deflated if bit 0
    payload ...      the sections, back to back, in header order
    sha256  32 bytes of everything before it

Worked example::

    >>> blob = dumps({"model": "demo"}, [("w", b"\\x01\\x02", {"shape": [2]})])
    >>> len(blob), blob[:4]
    (169, b'\\x89ESQ')
    >>> arc = loads(blob)
    >>> arc.meta, arc.sections["w"]
    ({'model': 'demo'}, (b'\\x01\\x02', {'shape': [2]}))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgesqueeze._io import write_bytes_atomic
from edgesqueeze.errors import FormatError

__all__ = ["FLAG_DEFLATE", "MAGIC", "MAX_HEADER", "SUPPORTED_VERSIONS", "VERSION", "Archive", "dumps", "loads",
           "read_esq", "write_esq"]

MAGIC = b"\x89ESQ\r\n\x1a\n"
# 3: the container is unchanged; a shared section of codec may code a stream as raw
#    DEFLATE (its info's "z"; deflate.py), which a version-2 reader would misread.
# 2: the Huffman streams of codec's shared sections carry the packed chunk index
#    (huffman.py), which a version-1 reader would misread. 1: u16 index.
VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
MAX_HEADER = 16 << 20  # 16 MiB
MAX_NAME = 1024
FLAG_DEFLATE = 0x0001  # header stored as raw deflate (RFC 1951); ~4x smaller on model headers
_KNOWN_FLAGS = FLAG_DEFLATE
_PREFIX = struct.Struct("<8sHHQ")  # magic, version, flags, header length: 20 bytes
_DIGEST = 32
_HEADER_KEYS = {"format", "version", "meta", "sections"}
_SECTION_KEYS = {"name", "offset", "length", "crc32", "info"}


@dataclass(frozen=True)
class Archive:
    """A decoded archive: ``meta`` and, in file order, ``sections[name] = (data, info)``."""

    meta: dict
    sections: dict[str, tuple[bytes, dict]] = field(default_factory=dict)
    version: int = VERSION


# ---------------------------------------------------------------------------- writing

def _check_json(value: Any, where: str) -> None:
    """Refuse what JSON would silently change (non-string keys) or cannot hold (NaN, objects)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise FormatError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise FormatError(f"{where}: {value} is not allowed in JSON")
    elif not (value is None or isinstance(value, (str, int, bool))):
        raise FormatError(f"{where}: {type(value).__name__} is not JSON (convert numpy scalars "
                          "with int()/float(), arrays with .tolist())")


def _deflate(text: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY)
    return packer.compress(text) + packer.flush()


def dumps(meta: dict, sections: Iterable[tuple[str, bytes, dict]], *,
          deflate_header: bool = True) -> bytes:
    """Serialise an archive to bytes. Deterministic: the same inputs give the same bytes.

    ``deflate_header`` stores the JSON header raw-deflated (flag bit 0): per-layer tables
    of small models are a third of a 16 KB archive as plain JSON and about a quarter of that
    deflated. zlib's level-9 output is stable across zlib releases; a Python linked against
    zlib-ng may emit different (equally valid) header bytes.
    """
    if not isinstance(meta, dict):
        raise FormatError(f"meta must be a dict, got {type(meta).__name__}")
    _check_json(meta, "meta")
    entries, blobs, names, offset = [], [], set(), 0
    for i, item in enumerate(sections):
        try:
            name, data, info = item
            data = memoryview(data).cast("B")
        except (TypeError, ValueError) as exc:
            raise FormatError(f"section {i}: expected (name, bytes, info dict): {exc}") from None
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise FormatError(f"section {i}: name must be a non-empty string of at most "
                              f"{MAX_NAME} characters, got {name!r}")
        if name in names:
            raise FormatError(f"section {name!r}: duplicate name")
        names.add(name)
        if not isinstance(info, dict):
            raise FormatError(f"section {name!r}: info must be a dict, got {type(info).__name__}")
        _check_json(info, f"section {name!r} info")
        entries.append({"name": name, "offset": offset, "length": len(data),
                        "crc32": zlib.crc32(data), "info": info})
        blobs.append(data)
        offset += len(data)
    header = {"format": "esq", "version": VERSION, "meta": meta, "sections": entries}
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:  # e.g. a lone surrogate in a string
        raise FormatError(f"header cannot be written as UTF-8 JSON: {exc}") from None
    flags = 0
    if deflate_header:
        text, flags = _deflate(text), FLAG_DEFLATE
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, flags, len(text)), text, *blobs])
    return body + hashlib.sha256(body).digest()


def write_esq(path: str | os.PathLike, meta: dict, sections: Iterable[tuple[str, bytes, dict]], *,
              deflate_header: bool = True) -> int:
    """Write an archive atomically (readers see the old file or the new one); return its size."""
    blob = dumps(meta, sections, deflate_header=deflate_header)
    write_bytes_atomic(path, blob)
    return len(blob)


# ---------------------------------------------------------------------------- reading

def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # name the first repeated key
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise FormatError(f"header: duplicate key {key!r}")
            seen.add(key)
    return obj


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise FormatError(f"header: number {text[:40]} is not finite")
    return value


def _constant(text: str):
    raise FormatError(f"header: {text} is not allowed (strict JSON)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inflate(raw: memoryview, max_header: int) -> bytes:
    """Inflate a deflated header without ever holding more than ``max_header + 1`` bytes."""
    unpacker = zlib.decompressobj(-15)
    try:
        text = unpacker.decompress(raw, max_header + 1)
    except zlib.error as exc:
        raise FormatError(f"header: deflate stream is damaged ({exc})") from None
    if len(text) > max_header:
        raise FormatError(f"header inflates to more than the limit of {max_header} bytes")
    if not unpacker.eof:
        raise FormatError("header: deflate stream is truncated")
    if unpacker.unused_data:
        raise FormatError(f"header: {len(unpacker.unused_data)} bytes after the end of the "
                          "deflate stream")
    return text


def _parse_header(raw: memoryview | bytes, version: int) -> tuple[dict, list[dict]]:
    try:
        text = str(raw, "utf-8")  # strict: refuses invalid UTF-8 and encoded surrogates
    except UnicodeDecodeError as exc:
        raise FormatError(f"header is not valid UTF-8 (byte {exc.start} of the header)") from None
    try:
        obj = json.loads(text, object_pairs_hook=_pairs, parse_float=_float, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
        raise FormatError(f"header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"header must be a JSON object, got {type(obj).__name__}")
    if obj.keys() != _HEADER_KEYS:
        unknown, missing = sorted(obj.keys() - _HEADER_KEYS), sorted(_HEADER_KEYS - obj.keys())
        raise FormatError(f"header: unknown keys {unknown}, missing keys {missing}")
    if obj["format"] != "esq":
        raise FormatError(f"header: format is {obj['format']!r}, expected 'esq'")
    if obj["version"] != version or not _is_int(obj["version"]):
        raise FormatError(f"header: version {obj['version']!r} does not match the file's "
                          f"version {version}")
    if not isinstance(obj["meta"], dict):
        raise FormatError(f"header: meta must be an object, got {type(obj['meta']).__name__}")
    if not isinstance(obj["sections"], list):
        raise FormatError(f"header: sections must be a list, got {type(obj['sections']).__name__}")
    return obj["meta"], obj["sections"]


def _check_sections(sections: list, payload: int) -> None:
    """Types, unique names, and offsets contiguous from 0 to exactly ``payload`` bytes."""
    names: set[str] = set()
    expected = 0  # where the next section must start
    for i, sec in enumerate(sections):
        if not isinstance(sec, dict):
            raise FormatError(f"section {i}: must be an object, got {type(sec).__name__}")
        name = sec.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise FormatError(f"section {i}: name must be a non-empty string of at most "
                              f"{MAX_NAME} characters, got {str(name)[:80]!r}")
        label = f"section {i} {name[:80]!r}"
        if sec.keys() != _SECTION_KEYS:
            unknown, missing = sorted(sec.keys() - _SECTION_KEYS), sorted(_SECTION_KEYS - sec.keys())
            raise FormatError(f"{label}: unknown keys {unknown}, missing keys {missing}")
        if name in names:
            raise FormatError(f"{label}: duplicate name")
        names.add(name)
        for key in ("offset", "length", "crc32"):
            if not _is_int(sec[key]):
                raise FormatError(f"{label}: {key} must be an integer, got {sec[key]!r:.80}")
            if sec[key] < 0:
                raise FormatError(f"{label}: {key} is negative ({sec[key]})")
        if sec["crc32"] > 0xFFFFFFFF:
            raise FormatError(f"{label}: crc32 {sec['crc32']} does not fit in 32 bits")
        if not isinstance(sec["info"], dict):
            raise FormatError(f"{label}: info must be an object, got {type(sec['info']).__name__}")
        offset, length = sec["offset"], sec["length"]
        if offset < expected:
            earlier = i and offset < sections[i - 1]["offset"]
            what = "is out of order" if earlier else "overlaps the previous section"
            raise FormatError(f"{label}: offset {offset} {what} (the previous section ends at "
                              f"{expected})")
        if offset > expected:
            raise FormatError(f"{label}: offset {offset} leaves a hole of {offset - expected} bytes "
                              f"after byte {expected}")
        if length > payload - offset:  # no sum that could overflow in another language
            raise FormatError(f"{label}: declares bytes {offset}..{offset + length} but the payload "
                              f"has only {payload} bytes")
        expected = offset + length
    if expected != payload:
        raise FormatError(f"payload has {payload} bytes but the sections cover {expected}: "
                          f"{payload - expected} trailing bytes")


def loads(data: bytes | bytearray | memoryview, *, max_header: int = MAX_HEADER) -> Archive:
    """Parse and fully verify an archive held in memory; see :func:`read_esq`."""
    try:
        buf = memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise FormatError(f"cannot read an archive from {type(data).__name__}: {exc}") from None
    size = len(buf)
    if size < _PREFIX.size:
        raise FormatError(f"file has {size} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, flags, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        hint = " (damaged by a text-mode transfer?)" if magic[1:4] == b"ESQ" else ""
        raise FormatError(f"not an .esq file: magic {magic!r}, expected {MAGIC!r}{hint}")
    if version not in SUPPORTED_VERSIONS:
        newer = ("a newer edgesqueeze wrote it (upgrade this one), or the copy is damaged (copy it again)"
                 if version > max(SUPPORTED_VERSIONS) else "a damaged copy: copy the file again")
        raise FormatError(f"format version {version} is not supported; this edgesqueeze reads "
                          f"versions {', '.join(map(str, SUPPORTED_VERSIONS))}: {newer}")
    if flags & ~_KNOWN_FLAGS:
        raise FormatError(f"flags 0x{flags & ~_KNOWN_FLAGS:04x} are not defined in version "
                          f"{version}: a newer edgesqueeze wrote it (upgrade this one), or the copy is damaged "
                          "(copy it again)")
    if hlen > max_header:
        raise FormatError(f"header declares {hlen} bytes, more than the limit of {max_header}")
    room = size - _PREFIX.size - _DIGEST
    if hlen > room:
        raise FormatError(f"header declares {hlen} bytes but the file has only {max(room, 0)} "
                          f"after the {_PREFIX.size}-byte prefix and {_DIGEST}-byte checksum")
    start = _PREFIX.size + hlen
    raw = buf[_PREFIX.size:start]
    if flags & FLAG_DEFLATE:
        raw = _inflate(raw, max_header)
    meta, sections = _parse_header(raw, version)
    _check_sections(sections, room - hlen)
    out: dict[str, tuple[bytes, dict]] = {}
    for sec in sections:
        chunk = buf[start + sec["offset"]: start + sec["offset"] + sec["length"]]
        if zlib.crc32(chunk) != sec["crc32"]:
            raise FormatError(f"section {sec['name']!r}: CRC-32 mismatch, its data is damaged")
        out[sec["name"]] = (bytes(chunk), sec["info"])
    if hashlib.sha256(buf[:-_DIGEST]).digest() != buf[-_DIGEST:]:
        raise FormatError("SHA-256 mismatch: the file is damaged (prefix, header or payload)")
    return Archive(meta=meta, sections=out, version=version)


def read_esq(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview, *,
             max_header: int = MAX_HEADER) -> Archive:
    """Read and fully verify an archive from a path (or bytes).

    Every length and offset is checked against the file size before it is used; nothing is
    allocated from a declared size; every problem is a :class:`FormatError` that names the
    field or section: bad magic, unsupported version, oversized or truncated header, invalid
    JSON or schema, duplicate names, overlapping, out-of-order or missing bytes, trailing
    bytes, CRC-32 of a section, SHA-256 of the file.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return loads(path_or_bytes, max_header=max_header)
    try:
        with open(path_or_bytes, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise FormatError(f"cannot read {os.fspath(path_or_bytes)}: {exc.strerror or exc}") from None
    try:
        return loads(data, max_header=max_header)
    except FormatError as exc:
        raise FormatError(f"{os.fspath(path_or_bytes)}: {with_advice(exc)}") from None


def with_advice(exc: FormatError) -> str:
    """A container error of a file, with what to do: a file that fails its checks is a
    damaged or cut copy (an unknown version or flags say their own)."""
    text = str(exc)
    return text if "version" in text else f"{text}; a damaged or cut copy: copy the file again, or write it again"
