"""Strict reader for IDX files (the MNIST format), plain or gzipped.

IDX: 2 zero bytes, a type byte (0x08 = uint8), the number of dimensions, then one
big-endian uint32 per dimension, then the data in C order. The file length must be
exactly header + product(dims): a truncated download and a file with trailing garbage are
both refused, naming the file, instead of being padded or silently cut.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from edgesqueeze.errors import DataError

_UBYTE = 0x08


def _redo(path: Path) -> str:
    return f"delete {path} and download it again"


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file of unsigned bytes into a uint8 array of the header's shape.

    Worked example: the bytes ``00 00 08 01 | 00 00 00 03 | 07 02 01`` are labels
    ``[7, 2, 1]``. ``ndim`` (3 for images, 1 for labels) is checked when given.

    A ``.gz`` file is decompressed as it is read, never more than its header asks for plus
    one byte: a 400 KB gzip that inflates to gigabytes is refused as "longer than its header
    says" after that, not after filling memory.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    gz = path.suffix == ".gz"
    if gz and magic[:2] != b"\x1f\x8b":
        what = ("a plain IDX file named .gz: rename it without .gz" if magic[:3] == b"\x00\x00\x08"
                else f"not a gzip file (it starts {magic.hex() or 'empty'}): it is probably damaged; {_redo(path)}")
        raise DataError(f"{path} is {what}")
    if not gz and magic[:2] == b"\x1f\x8b":
        raise DataError(f"{path} is gzip-compressed: name it {path.name}.gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            return _parse(fh, path, ndim)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is not a valid gzip file ({e}): it is probably truncated; "
                        f"{_redo(path)}") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def _read(fh, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the data)."""
    parts, left = [], n
    while left > 0:
        block = fh.read(min(left, 1 << 24))
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _parse(fh, path: Path, ndim: int | None) -> np.ndarray:
    raw = _read(fh, 4)
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an IDX file ({len(raw)} bytes); {_redo(path)}")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (magic {raw[:4].hex()}, expected 0000 08 nn); "
                        f"{_redo(path)}")
    if raw[2] != _UBYTE:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x} is not supported (only 0x08, unsigned "
                        f"bytes, as in MNIST)")
    dims_n = raw[3]
    if dims_n == 0 or (ndim is not None and dims_n != ndim):
        want = f"{ndim}" if ndim is not None else "at least 1"
        raise DataError(f"{path}: IDX header has {dims_n} dimensions, expected {want}; is this the right "
                        f"file? Otherwise {_redo(path)}")
    head = _read(fh, 4 * dims_n)
    if len(head) < 4 * dims_n:
        raise DataError(f"{path}: truncated IDX header; {_redo(path)}")
    dims = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=dims_n))
    expected = math.prod(dims)  # Python ints: a bogus header cannot overflow
    if expected > _MAX_BYTES:
        raise DataError(f"{path}: IDX header dims {dims} ask for {expected:,} bytes, more than any MNIST-like "
                        f"file holds (at most {_MAX_BYTES:,} read); {_redo(path)}")
    data = _read(fh, expected + 1)  # one byte more tells trailing data from an exact fit
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "longer than its header says"
        held = f"the file holds {len(data)}" if len(data) < expected else "the file holds more"
        raise DataError(f"{path}: IDX file is {kind}: header dims {dims} need {expected} bytes of data, "
                        f"{held}; {_redo(path)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims).copy()


_MAX_BYTES = 1 << 32  # 4 GiB of pixels: EMNIST's largest split is 0.6 GB
