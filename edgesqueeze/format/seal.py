"""A plain ``.onnx`` / ``.tflite`` file's own CRC-32, recorded inside it at export.

A packed file records the SHA-256 of the file it decodes to; a plain file had nothing, so a
flipped weight byte ran silently. Export writes ``"file_crc32":"00000000"`` in the
edgesqueeze metadata JSON (ONNX ``metadata_props``, TFLite ``Model.metadata``: both hold the
JSON text verbatim), computes the CRC-32 of the whole file so, and writes its 8 hex digits
over the zeros: the file's size and layout do not change. To check a file: find the first
``"file_crc32":"``, which must be followed by 8 lowercase hex digits and ``"``, put 8 ``0``
characters in their place, compute the CRC-32, compare (docs/FORMAT.md, "Plain files").

Why a CRC and not a SHA-256: the record sits in the file it checks, so anyone who edits the
file on purpose can recompute either; what it is for is accidental damage (a bad copy, a
flaky SD card), which CRC-32 catches as well (every burst of up to 32 bits, all but 2**-32
of the rest) at a third of SHA-256's time with SHA instructions (0.26 against 0.74 ms for
1.4 MB on an Intel Xeon) and far less on CPUs without them (the Raspberry Pi 4), and in 23
bytes of metadata instead of 79.

Standard library only: the device checks it before any runtime sees the file.
"""

from __future__ import annotations

import re
import zlib

from edgesqueeze.errors import FormatError

__all__ = ["KEY", "PLACEHOLDER", "check_file", "check_seal", "seal"]

KEY = "file_crc32"
PLACEHOLDER = "0" * 8
_MARK = b'"' + KEY.encode() + b'":"'
_VALUE = re.compile(rb"[0-9a-f]{8}\"")


def _crc(data, at: int) -> int:
    """CRC-32 of ``data`` with the 8 digits at ``at`` read as zeros (no copy of the file)."""
    mv = memoryview(data)
    crc = zlib.crc32(mv[:at])
    crc = zlib.crc32(PLACEHOLDER.encode(), crc)
    return zlib.crc32(mv[at + 8:], crc)


def seal(data: bytes) -> bytes:
    """``data`` with its recorded CRC-32 filled in (a file without the marker: unchanged).
    A file sealed before (a converted copy, say) is sealed again over its new bytes."""
    at = data.find(_MARK)
    if at < 0:
        return data
    at += len(_MARK)
    if not _VALUE.match(data, at):  # not 8 digits and a quote: writing 8 would overwrite other bytes
        raise FormatError(f"its recorded checksum ({KEY} in its metadata) is not 8 hex digits; export the file "
                          "again")
    return data[:at] + f"{_crc(data, at):08x}".encode() + data[at + 8:]


def check_seal(data: bytes, where: str) -> str | None:
    """The file's recorded CRC-32 (8 hex digits) when its bytes match it; None for a file
    that records none (exported before it was recorded, not by edgesqueeze, or the zeros not
    filled in). A FormatError naming ``where`` when the bytes differ from the recorded ones,
    or the record is damaged."""
    at = data.find(_MARK)
    if at < 0:
        return None
    at += len(_MARK)
    if not _VALUE.match(data, at):
        raise FormatError(f"{where}: its recorded checksum ({KEY} in its metadata) is damaged; copy or export "
                          f"the file again")
    recorded = data[at:at + 8].decode()
    if recorded == PLACEHOLDER:  # written by a step that does not seal (a temporary file): no record
        return None
    actual = f"{_crc(data, at):08x}"
    if actual != recorded:
        raise FormatError(f"{where}: its bytes are not the ones exported (CRC-32 {actual}, recorded {recorded} in "
                          f"its metadata): a damaged copy, or a file edited after export; copy or export it again (changed "
                          f"on purpose? `edgesqueeze reseal FILE` records its checksum again)")
    return recorded


def check_file(path) -> str | None:
    """:func:`check_seal` of the file at ``path``; None when it cannot be read (the caller's
    own open names a missing or unreadable file better)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return check_seal(data, str(path))
