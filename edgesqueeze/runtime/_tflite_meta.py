"""Read the edgesqueeze artifact metadata out of a ``.tflite`` file, without torch or TensorFlow.

The exporter (:mod:`edgesqueeze.export.tflite`) stores the artifact metadata JSON the standard
TFLite way: a ``Model.metadata`` entry named ``"edgesqueeze"`` whose ``buffer`` index points at
a ``Buffer`` holding the UTF-8 JSON text. This module walks just enough of the flatbuffer to
find it, with the standard library only (no ``flatbuffers``, no numpy), so it works on any
device that can run the model, whichever LiteRT / tflite-runtime wheel it has.

Flatbuffer facts used (``tensorflow/compiler/mlir/lite/schema/schema.fbs``)::

    file      = uoffset root (u32 LE) | "TFL3" | ...
    table     = soffset to its vtable (i32: vtable = table - soffset), then fields
    vtable    = u16 vtable bytes | u16 table bytes | u16 offset of field 0, 1, ... (0 = absent)
    vector    = u32 count | elements ; tables in a vector are u32 offsets relative to the slot
    Model     fields: 1 operator_codes: [OperatorCode], 4 buffers: [Buffer], 6 metadata: [Metadata]
    OperatorCode fields: 1 custom_code: string (a custom operator's name, e.g. TFLM_DECODE)
    Metadata  fields: 0 name: string, 1 buffer: u32
    Buffer    fields: 0 data: [ubyte], 1 offset: u64, 2 size: u64  (offset > 1: the bytes live
              at that absolute file offset, outside the flatbuffer: models over 2 GB)

Every offset is checked against the file size before it is followed; a damaged file raises
:class:`~edgesqueeze.errors.FormatError`, never an ``IndexError`` or a huge allocation.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from edgesqueeze.errors import FormatError

META_KEY = "edgesqueeze"  # equal to edgesqueeze.export._common.META_KEY (a test checks it)
FILE_IDENTIFIER = b"TFL3"

__all__ = ["META_KEY", "MICRO_OPS", "micro_ops", "read_tflite_metadata", "tflite_custom_ops",
           "tflite_metadata_entries"]
MICRO_OPS = ("TFLM_DECODE",)  # custom operators only TensorFlow Lite Micro runs

# Model / Metadata / Buffer / OperatorCode field numbers in schema.fbs
_MODEL_OPCODES, _MODEL_BUFFERS, _MODEL_METADATA = 1, 4, 6
_OPCODE_CUSTOM = 1  # OperatorCode.custom_code: string
_META_NAME, _META_BUFFER = 0, 1
_BUF_DATA, _BUF_OFFSET, _BUF_SIZE = 0, 1, 2


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data = data
        self.where = where

    def bad(self, what: str) -> FormatError:
        return FormatError(f"{self.where}: not a valid TFLite flatbuffer ({what})")

    def _unpack(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise self.bad(f"offset {pos} + {size} is outside the {len(self.data)}-byte file")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def root(self) -> int:
        if len(self.data) < 8:
            raise self.bad(f"{len(self.data)} bytes is too short")
        if self.data[4:8] != FILE_IDENTIFIER:
            raise self.bad(f"file identifier {bytes(self.data[4:8])!r}, expected {FILE_IDENTIFIER!r}")
        return self._unpack("<I", 0)

    def field_pos(self, table: int, field: int) -> int | None:
        """Absolute position of ``field`` in ``table``, or None if the field is absent."""
        vtable = table - self._unpack("<i", table)
        vt_size = self._unpack("<H", vtable)
        slot = 4 + 2 * field
        if vt_size < 4 or vt_size % 2:
            raise self.bad(f"vtable size {vt_size} at {vtable}")
        if slot + 2 > vt_size:
            return None
        off = self._unpack("<H", vtable + slot)
        return table + off if off else None

    def scalar(self, table: int, field: int, fmt: str, default: int = 0) -> int:
        pos = self.field_pos(table, field)
        return default if pos is None else self._unpack(fmt, pos)

    def _indirect(self, pos: int) -> int:
        return pos + self._unpack("<I", pos)

    def vector(self, table: int, field: int, elem_size: int = 4) -> tuple[int, int]:
        """(start of elements, count) of a vector field; (0, 0) if absent. The elements must
        fit in the file (a damaged count is refused here, not looped over)."""
        pos = self.field_pos(table, field)
        if pos is None:
            return 0, 0
        vec = self._indirect(pos)
        count = self._unpack("<I", vec)
        if vec + 4 + count * elem_size > len(self.data):
            raise self.bad(f"a vector of {count} x {elem_size} bytes at {vec} runs past the end")
        return vec + 4, count

    def table_at(self, elems: int, i: int) -> int:
        return self._indirect(elems + 4 * i)

    def byte_vector(self, table: int, field: int) -> bytes:
        start, count = self.vector(table, field, 1)
        return bytes(self.data[start:start + count])


def tflite_metadata_entries(data: bytes, *, where: str = "<bytes>") -> dict[str, bytes]:
    """Every ``Model.metadata`` entry of a TFLite flatbuffer: ``{name: buffer bytes}``.

    Converters add their own (``min_runtime_version``...); edgesqueeze's is :data:`META_KEY`.
    """
    r = _Reader(data, where)
    model = r.root()
    buffers, n_buffers = r.vector(model, _MODEL_BUFFERS)
    metas, n_metas = r.vector(model, _MODEL_METADATA)
    out: dict[str, bytes] = {}
    for i in range(n_metas):
        meta = r.table_at(metas, i)
        try:
            name = r.byte_vector(meta, _META_NAME).decode("utf-8")
        except UnicodeDecodeError:
            raise r.bad(f"metadata entry {i} has a name that is not UTF-8") from None
        index = r.scalar(meta, _META_BUFFER, "<I")
        if index >= n_buffers:
            raise r.bad(f"metadata '{name}' points at buffer {index} of {n_buffers}")
        buf = r.table_at(buffers, index)
        offset = r.scalar(buf, _BUF_OFFSET, "<Q")
        if offset > 1:  # stored outside the flatbuffer (models over 2 GB)
            size = r.scalar(buf, _BUF_SIZE, "<Q")
            if offset + size > len(data):
                raise r.bad(f"metadata '{name}' buffer [{offset}, +{size}) runs past the end")
            out[name] = bytes(data[offset:offset + size])
        else:
            out[name] = r.byte_vector(buf, _BUF_DATA)
    return out


def tflite_custom_ops(data: bytes, *, where: str = "<bytes>") -> list[str]:
    """The names of the custom operators a TFLite flatbuffer uses (``Model.operator_codes``
    with a ``custom_code``), in file order: ``["TFLM_DECODE"]`` for a TFLite Micro
    compressed file, ``[]`` for a file of builtin operators only."""
    r = _Reader(data, where)
    codes, n_codes = r.vector(r.root(), _MODEL_OPCODES)
    out = []
    for i in range(n_codes):
        name = r.byte_vector(r.table_at(codes, i), _OPCODE_CUSTOM)
        if name:
            out.append(name.decode("utf-8", errors="replace"))
    return out


def micro_ops(path: str | os.PathLike, data: bytes | None = None) -> list[str]:
    """The custom operators of a TFLite file (or of its bytes ``data``) that only TensorFlow
    Lite Micro runs (``["TFLM_DECODE"]`` for a LUT-compressed file); ``[]`` for anything
    else, including a file that cannot be read or parsed (its loader says why)."""
    try:
        if data is None:
            with open(path, "rb") as fh:
                data = fh.read()
        return [op for op in tflite_custom_ops(data, where=str(path)) if op in MICRO_OPS]
    except (OSError, FormatError):
        return []


def read_tflite_metadata(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any] | None:
    """The edgesqueeze artifact metadata of a ``.tflite`` file (or of its bytes ``data``,
    ``path`` then only names it in errors), or None if it has none.

    Raises FormatError if the file is not a TFLite flatbuffer or the entry is not a JSON
    object. Reading needs only the standard library: no torch, TensorFlow or flatbuffers.
    """
    if data is None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    raw = tflite_metadata_entries(data, where=str(path)).get(META_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: the '{META_KEY}' metadata is not UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: the '{META_KEY}' metadata is a JSON {type(meta).__name__}, "
                          "expected an object")
    return meta
