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
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is not a valid gzip file ({e}): it is probably truncated; "
                            f"{_redo(path)}") from e
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
    header = 4 + 4 * dims_n
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {_redo(path)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims_n, offset=4))
    expected = math.prod(dims)  # Python ints: a bogus header cannot overflow
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "longer than its header says"
        raise DataError(f"{path}: IDX file is {kind}: header dims {dims} need {expected} bytes of data, "
                        f"the file holds {actual}; {_redo(path)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()
