"""The .esq archive: round trips, determinism, and one test per attack on the reader."""

from __future__ import annotations

import doctest
import hashlib
import json
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesqueeze.format import container
from edgesqueeze.format.container import (
    MAGIC,
    Archive,
    dumps,
    loads,
    read_esq,
    write_esq,
)
from edgesqueeze.errors import EdgesqueezeError, FormatError

META = {"model": "squeezenet1_1", "classes": ["a", "b"], "top1": 0.5751,
        "nested": {"k": [1, None, True]}}
SECTIONS = [
    ("features.0.weight.idx", bytes(range(7)),
     {"shape": [64, 3, 3, 3], "bits": 8, "lengths": [1, 2, 2]}),
    ("features.0.weight.gap", b"", {}),
    ("features.0.bias", b"\x00\x00\x80\x3f" * 3, {"dtype": "float32"}),
    ("ünïcode name", b"\xff", {"note": "ok ✓"}),
]


def blob() -> bytes:
    return dumps(META, SECTIONS)


def craft(header, payload: bytes = b"", *, version=1, flags=0, hlen=None, magic=MAGIC,
          sha=True) -> bytes:
    """Build an archive by hand, with a valid SHA-256 so the reader reaches the check under test."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    hlen = len(text) if hlen is None else hlen
    body = magic + struct.pack("<HHQ", version, flags, hlen) + text + payload
    return body + (hashlib.sha256(body).digest() if sha else bytes(32))


def header_for(sections, meta=None):
    return {"format": "esq", "version": 1, "meta": meta or {}, "sections": sections}


def sec(name, offset, length, data=b"", info=None):
    return {"name": name, "offset": offset, "length": length, "crc32": zlib.crc32(data),
            "info": info or {}}


# ------------------------------------------------------------------- writing

def test_docstring_examples():
    assert doctest.testmod(container).failed == 0


def test_round_trip():
    arc = loads(blob())
    assert isinstance(arc, Archive) and arc.version == container.VERSION == 3
    assert arc.meta == META
    assert list(arc.sections) == [name for name, _, _ in SECTIONS]
    for name, data, info in SECTIONS:
        assert arc.sections[name] == (data, info)


def test_layout():
    data = dumps(META, SECTIONS, deflate_header=False)
    assert data[:8] == b"\x89ESQ\r\n\x1a\n"
    version, flags, hlen = struct.unpack_from("<HHQ", data, 8)
    assert (version, flags) == (3, 0)
    header = json.loads(data[20:20 + hlen].decode("utf-8"))
    assert header["sections"][0] == {"name": "features.0.weight.idx", "offset": 0, "length": 7,
                                     "crc32": zlib.crc32(bytes(range(7))), "info": SECTIONS[0][2]}
    assert data[20:20 + hlen] == json.dumps(header, sort_keys=True, separators=(",", ":"),
                                            ensure_ascii=False).encode()
    assert len(data) == 20 + hlen + sum(len(d) for _, d, _ in SECTIONS) + 32
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()


def test_deflated_header_layout():
    plain, packed = dumps(META, SECTIONS, deflate_header=False), blob()
    _, flags, hlen = struct.unpack_from("<HHQ", packed, 8)
    plain_hlen = struct.unpack_from("<Q", plain, 12)[0]
    assert flags == container.FLAG_DEFLATE
    assert zlib.decompress(packed[20:20 + hlen], -15) == plain[20:20 + plain_hlen]
    assert packed[20 + hlen:-32] == plain[20 + plain_hlen:-32]  # same payload
    assert loads(packed).meta == loads(plain).meta


def test_writer_is_deterministic():
    reordered = dict(reversed(list(META.items())))  # key order does not matter: keys are sorted
    assert dumps(META, SECTIONS) == dumps(reordered, list(SECTIONS)) == blob()


def test_empty_archive():
    arc = loads(dumps({}, []))
    assert arc.meta == {} and arc.sections == {}


def test_write_and_read_file(tmp_path):
    path = tmp_path / "sub" / "m.esq"
    size = write_esq(path, META, SECTIONS)
    assert size == path.stat().st_size == len(blob())
    assert path.read_bytes() == blob()
    assert read_esq(path).meta == META
    assert read_esq(str(path)).sections == loads(blob()).sections
    assert read_esq(bytearray(blob())).meta == META
    assert [p.name for p in path.parent.iterdir()] == ["m.esq"]  # no temporary left behind


def test_failed_write_leaves_old_file(tmp_path):
    path = tmp_path / "m.esq"
    write_esq(path, META, SECTIONS)
    with pytest.raises(FormatError):
        write_esq(path, {"x": float("nan")}, [])
    assert path.read_bytes() == blob()


@pytest.mark.parametrize("meta,sections,match", [
    ([], [], "meta must be a dict"),
    ({"x": float("nan")}, [], r"meta\.x: nan"),
    ({"x": float("inf")}, [], "inf"),
    ({"x": np.int64(3)}, [], "numpy scalars"),
    ({1: "a"}, [], "key 1 is not a string"),
    ({"x": {"y": object()}}, [], r"meta\.x\.y: object"),
    ({}, [("a", b"", {}), ("a", b"", {})], "duplicate name"),
    ({}, [("", b"", {})], "non-empty string"),
    ({}, [(3, b"", {})], "non-empty string"),
    ({}, [("a", "text", {})], "expected"),
    ({}, [("a", b"")], "expected"),
    ({}, [("a", b"", [])], "info must be a dict"),
    ({}, [("a", b"", {"s": (1, float("nan"))})], r"info\.s\[1\]"),
    ({"s": "\ud800"}, [], "UTF-8"),
])
def test_writer_refuses(meta, sections, match):
    with pytest.raises(FormatError, match=match):
        dumps(meta, sections)


def test_numpy_payload_and_tuples_are_accepted():
    arr = np.arange(6, dtype=np.float16)
    arc = loads(dumps({"shape": (2, 3)}, [("cb", arr, {"shape": (6,)})]))
    assert arc.meta == {"shape": [2, 3]}
    assert np.array_equal(np.frombuffer(arc.sections["cb"][0], np.float16), arr)


# ------------------------------------------------------------------- attacks, one by one

def refuses(data, match, **kw):
    with pytest.raises(FormatError, match=match):
        loads(data, **kw)


def test_crafted_valid_file_reads():
    data = b"abcdef"
    arc = loads(craft(header_for([sec("a", 0, 2, b"ab"), sec("b", 2, 4, b"cdef")]), data))
    assert arc.sections == {"a": (b"ab", {}), "b": (b"cdef", {})}


def test_truncated_anywhere():
    data = blob()
    for cut in range(len(data)):
        with pytest.raises(FormatError):
            loads(data[:cut])


def test_shorter_than_prefix():
    refuses(b"", "0 bytes, shorter than the 20-byte prefix")
    refuses(MAGIC + b"\x01\x00", "shorter than the 20-byte prefix")


def test_flipped_bit_anywhere():
    data = blob()
    for bit in range(8 * len(data)):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            loads(bytes(bad))


def test_flipped_payload_bit_names_the_section():
    data = bytearray(blob())
    hlen = struct.unpack_from("<Q", data, 12)[0]
    data[20 + hlen + 2] ^= 0x10  # inside the first section
    refuses(bytes(data), "section 'features.0.weight.idx': CRC-32 mismatch")


def test_sha256_mismatch():
    data = bytearray(blob())
    data[-1] ^= 1
    refuses(bytes(data), "SHA-256 mismatch")
    good = header_for([sec("a", 0, 2, b"ab")])
    refuses(craft(good, b"ab", sha=False), "SHA-256 mismatch")


def test_bad_magic():
    refuses(b"PK\x03\x04" + bytes(100), "not an .esq file")
    text_mode = blob().replace(b"\r\n", b"\n", 1)  # a CRLF -> LF conversion
    refuses(text_mode, "text-mode")


def test_unknown_version():
    assert loads(craft(header_for([]))).version == 1  # older versions stay readable
    two = header_for([]) | {"version": 2}
    assert loads(craft(two, version=2)).version == 2
    assert loads(craft(two | {"version": 3}, version=3)).version == 3
    # what to do, as for the other ways a file is refused: a newer writer, or a flipped byte
    with pytest.raises(FormatError, match="version 4 is not supported; this edgesqueeze reads versions 1, 2, 3: a "
                                          r"newer edgesqueeze wrote it \(upgrade this one\), or the copy is damaged"):
        loads(craft(two | {"version": 4}, version=4))
    with pytest.raises(FormatError, match="version 0 is not supported.*: a damaged copy: copy the file again"):
        loads(craft(header_for([]), version=0))


def test_unknown_flags():
    refuses(craft(header_for([]), flags=2), "flags 0x0002")
    refuses(craft(header_for([]), flags=0x8001), "flags 0x8000 are not defined in version 1: a newer edgesqueeze")


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def test_deflated_header_damage():
    good = deflate(json.dumps(header_for([])).encode())
    assert loads(craft(good, flags=1)).meta == {}
    refuses(craft(good[:-3], flags=1), "deflate stream is truncated")
    refuses(craft(good + b"xx", flags=1), "2 bytes after the end of the deflate stream")
    refuses(craft(b"\xff" * 8, flags=1), "deflate stream is damaged")
    refuses(craft(json.dumps(header_for([])).encode(), flags=1), "deflate")


def test_deflated_header_bomb_is_refused_without_inflating_it():
    bomb = deflate(b" " * (64 << 20))  # 64 MiB of spaces in 64 KiB
    refuses(craft(bomb, flags=1), "inflates to more than the limit of 16777216")


def test_header_length_over_the_limit():
    refuses(craft(header_for([]), hlen=2**40), "more than the limit of 16777216")
    refuses(craft(header_for([])), "more than the limit of 10", max_header=10)


def test_header_length_beyond_the_file():
    data = craft(header_for([]))
    hlen = struct.unpack_from("<Q", data, 12)[0]
    refuses(craft(header_for([]), hlen=hlen + 1),
            f"declares {hlen + 1} bytes but the file has only {hlen}")
    refuses(craft(header_for([]), hlen=2**64 - 1), "more than the limit")
    refuses(craft(header_for([]), hlen=2**64 - 1), "declares", max_header=2**65)


@pytest.mark.parametrize("header,match", [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"format": "esq"', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'"esq"', "must be a JSON object, got str"),
    (b'{"format":"esq","format":"esq","version":1,"meta":{},"sections":[]}', "duplicate key 'format'"),
    (b'{"format":"esq","version":1,"meta":{"x":NaN},"sections":[]}', "NaN is not allowed"),
    (b'{"format":"esq","version":1,"meta":{"x":-Infinity},"sections":[]}', "Infinity is not allowed"),
    (b'{"format":"esq","version":1,"meta":{"x":1e999},"sections":[]}', "not finite"),
    (b'{"format":"esq","version":1,"meta":{"x":' + b"9" * 5000 + b'},"sections":[]}',
     "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"format":"esq","version":1,"meta":{},"sections":[],"extra":1}', r"unknown keys \['extra'\]"),
    (b'{"format":"esq","version":1,"meta":{}}', r"missing keys \['sections'\]"),
    (b'{"format":"zip","version":1,"meta":{},"sections":[]}', "format is 'zip'"),
    (b'{"format":"esq","version":2,"meta":{},"sections":[]}', "version 2 does not match"),
    (b'{"format":"esq","version":true,"meta":{},"sections":[]}', "version True does not match"),
    (b'{"format":"esq","version":1,"meta":[],"sections":[]}', "meta must be an object"),
    (b'{"format":"esq","version":1,"meta":{},"sections":{}}', "sections must be a list"),
])
def test_bad_header(header, match):
    refuses(craft(header), match)


@pytest.mark.parametrize("entry,match", [
    ([1], "section 0: must be an object"),
    ({"offset": 0, "length": 0, "crc32": 0, "info": {}}, "section 0: name must be"),
    ({**sec("", 0, 0)}, "section 0: name must be"),
    ({**sec("a" * 2000, 0, 0)}, "name must be"),
    ({**sec("a", 0, 0), "extra": 1}, r"section 0 'a': unknown keys \['extra'\]"),
    ({k: v for k, v in sec("a", 0, 0).items() if k != "crc32"}, r"missing keys \['crc32'\]"),
    ({**sec("a", 0, 0), "offset": "0"}, "offset must be an integer"),
    ({**sec("a", 0, 0), "offset": 0.0}, "offset must be an integer"),
    ({**sec("a", 0, 0), "length": True}, "length must be an integer"),
    ({**sec("a", 0, 0), "length": -1}, "length is negative"),
    ({**sec("a", 0, 0), "offset": -5}, "offset is negative"),
    ({**sec("a", 0, 0), "crc32": 2**32}, "does not fit in 32 bits"),
    ({**sec("a", 0, 0), "info": []}, "info must be an object"),
])
def test_bad_section_entry(entry, match):
    entries = entry if isinstance(entry, list) else [entry]
    refuses(craft(header_for(entries)), match)


def test_duplicate_section_names():
    refuses(craft(header_for([sec("a", 0, 1, b"x"), sec("a", 1, 1, b"y")]), b"xy"),
            "section 1 'a': duplicate name")


def test_overlapping_offsets():
    refuses(craft(header_for([sec("a", 0, 4, b"abcd"), sec("b", 2, 2, b"cd")]), b"abcd"),
            "section 1 'b': offset 2 overlaps the previous section")


def test_out_of_order_offsets():
    entries = [sec("a", 2, 2, b"cd"), sec("b", 0, 2, b"ab")]
    refuses(craft(header_for(entries), b"abcd"), "section 0 'a': offset 2 leaves a hole")
    entries = [sec("a", 0, 2, b"ab"), sec("b", 4, 2, b"ef"), sec("c", 2, 2, b"cd")]
    refuses(craft(header_for(entries), b"abcdef"), "section 1 'b': offset 4 leaves a hole")
    entries = [sec("a", 0, 2, b"ab"), sec("b", 2, 2, b"cd"), sec("c", 0, 2, b"ab")]
    refuses(craft(header_for(entries), b"abcd"), "section 2 'c': offset 0 is out of order")


def test_holes():
    refuses(craft(header_for([sec("a", 0, 2, b"ab"), sec("b", 3, 1, b"d")]), b"abcd"),
            "section 1 'b': offset 3 leaves a hole of 1 bytes after byte 2")


def test_trailing_bytes():
    refuses(craft(header_for([sec("a", 0, 2, b"ab")]), b"abXYZ"),
            "payload has 5 bytes but the sections cover 2: 3 trailing bytes")


def test_payload_shorter_than_declared():
    refuses(craft(header_for([sec("a", 0, 2, b"ab"), sec("b", 2, 10)]), b"abcd"),
            r"section 1 'b': declares bytes 2\.\.12 but the payload has only 4 bytes")


def test_huge_declared_lengths():
    refuses(craft(header_for([sec("a", 0, 2**63)]), b"ab"), "declares bytes 0..9223372036854775808")
    refuses(craft(header_for([sec("a", 0, 2**64 + 5)]), b"ab"), "payload has only 2 bytes")
    refuses(craft(header_for([sec("a", 2**64, 2)]), b"ab"), "hole")
    refuses(craft(header_for([sec("a", 0, 10**400)]), b"ab"), "payload has only 2 bytes")

def test_crc_mismatch_names_section():
    entries = [sec("a", 0, 2, b"ab"), {**sec("b", 2, 2, b"cd"), "crc32": 0}]
    refuses(craft(header_for(entries), b"abcd"), "section 'b': CRC-32 mismatch")


def test_errors_are_edgesqueeze_errors_with_exit_code_2():
    with pytest.raises(EdgesqueezeError) as info:
        loads(b"nope")
    assert info.value.exit_code == 2


def test_read_esq_names_the_file(tmp_path):
    path = tmp_path / "bad.esq"
    path.write_bytes(blob()[:-1])
    with pytest.raises(FormatError, match="bad.esq: "):
        read_esq(path)
    with pytest.raises(FormatError, match="cannot read"):
        read_esq(tmp_path / "missing.esq")
    with pytest.raises(FormatError, match="cannot read"):
        read_esq(tmp_path)  # a directory
    with pytest.raises(FormatError, match="cannot read an archive"):
        loads(12345)


# ------------------------------------------------------------------- mutation property

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
json_leaf = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8)
             | st.floats(allow_nan=False, allow_infinity=False))
json_val = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8)
archives = st.tuples(
    st.dictionaries(st.text(max_size=6), json_val, max_size=4),
    st.lists(st.tuples(names, st.binary(max_size=64),
                       st.dictionaries(st.text(max_size=5), json_val, max_size=3)),
             max_size=5, unique_by=lambda s: s[0]),
)


def mutate(data: bytes, kind: str, pos: int, value: int) -> bytes:
    pos %= len(data) + 1
    if kind == "flip" and pos < len(data):
        return data[:pos] + bytes([data[pos] ^ (1 << (value % 8))]) + data[pos + 1:]
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + bytes([value % 256]) + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + 1:]
    if kind == "overwrite" and pos < len(data):
        return data[:pos] + bytes([value % 256]) + data[pos + 1:]
    return data


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]),
                               st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives, MUTATIONS)
def test_mutated_archives_are_refused_or_identical(archive, mutations):
    meta, sections = archive
    data = dumps(meta, sections)
    original = loads(data)
    assert original.meta == json.loads(json.dumps(meta))
    bad = data
    for kind, pos, value in mutations:
        bad = mutate(bad, kind, pos, value)
    start = time.perf_counter()
    try:
        got = loads(bad)
    except FormatError:
        pass
    else:
        assert bad == data  # the SHA-256 leaves no other way through
        assert got == original
    assert time.perf_counter() - start < 2.0


def test_a_damaged_file_says_what_to_do(tmp_path):
    """read_esq of a file names it and the remedy (a damaged ONNX/TFLite file said "copy it
    again"; a damaged archive only what was wrong)."""
    import edgesqueeze.format.container as c

    good = c.dumps({"a": 1}, [("t", b"abc" * 10, {})])
    path = tmp_path / "m.esq"
    path.write_bytes(good[:-5])
    with pytest.raises(FormatError, match=r"m\.esq: .*a damaged or cut copy: copy the file again"):
        c.read_esq(path)
