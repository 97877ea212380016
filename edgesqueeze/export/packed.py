"""Write packed files (``model.int8.tflite.esq``): an exported ONNX or TFLite file with its
weight tensors Deep-Compression-coded (:mod:`edgesqueeze.format.packed`).

This side needs the file's tensors and their values: onnx reads them from an ``.onnx``,
LiteRT's interpreter from a ``.tflite``. The decoder on the device needs neither: it splices
bytes back by offset, and the runtime then loads the restored file from memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgesqueeze._io import write_bytes_atomic
from edgesqueeze.errors import ExportError, FormatError
from edgesqueeze.format.packed import MAX_BLOCK, PackedTensor, bits_per_nonzero, pack, space_to_depth_shape

__all__ = ["PACKED_SUFFIX", "onnx_tensors", "tflite_tensors", "pack_file"]

PACKED_SUFFIX = ".esq"  # model.int8.tflite -> model.int8.tflite.esq


def onnx_tensors(data: bytes, sources: dict[str, np.ndarray] | None = None) -> list[PackedTensor]:
    """Every initializer of an ONNX file, with the zero point of uint8 weights (128 for
    onnx-int8's any-cpu files) as their offset, so that their zeros code as zeros.

    ``sources``: the float weights by torch name (``features.3.squeeze.weight``); an int8
    weight whose initializer is named after its module (``features.3.squeeze.w``, as
    :func:`~edgesqueeze.export.onnx_int8.compact_qdq` names them) and whose DequantizeLinear
    has per-channel scales gets its float source and scales, so that the packer can code the
    float codebook and requantize on the device (:class:`PackedTensor`)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    inits = {t.name: t for t in model.graph.initializer}
    offsets: dict[str, int] = {}
    scales: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        if len(node.input) == 3 and node.input[2] in inits:
            zp = numpy_helper.to_array(inits[node.input[2]])
            if zp.dtype == np.uint8 and zp.size and (zp == zp.flat[0]).all():
                offsets[node.input[0]] = int(zp.flat[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.input[1] in inits and axis == 0:
            scales[node.input[0]] = numpy_helper.to_array(inits[node.input[1]])
    out = []
    for name, t in inits.items():
        arr = numpy_helper.to_array(t)
        offset = offsets.get(name, 0) if arr.dtype == np.uint8 else 0
        source = None
        if sources and name in scales and name.endswith(".w"):
            source = sources.get(name[:-2] + ".weight")
        out.append(PackedTensor(name, arr, offset, source=source, scales=scales.get(name) if source is not None
                                else None))
    return out


def tflite_tensors(data: bytes, sources: dict[str, np.ndarray] | None = None) -> list[PackedTensor]:
    """The constant tensors of a TFLite file (weights, biases), read through LiteRT.

    ``sources``: as for :func:`onnx_tensors`. An int8 weight with one scale per output
    channel (axis 0) whose tensor is named after its module (``features.3.squeeze:2``, as
    litert-torch names them) gets its float source, transposed to TFLite's OHWI for a conv,
    and its scales, so that the packer can code the float codebook and requantize. A conv
    computed as a space-to-depth (``export.space_to_depth_stem``: ``features.0.conv:2``,
    ``[96, 4, 4, 12]``) whose source is the weight before the rearrangement
    (``features.0.conv.weight``, ``[96, 3, 7, 7]``) is coded as that weight, without the
    zero taps the rearrangement adds."""
    return _read_tflite(data, sources)[0]


def _read_tflite(data: bytes, sources: dict[str, np.ndarray] | None = None):
    """``(tflite_tensors(data, sources), per-channel scale arrays of every tensor)``: the
    scales of an int8 conv's bias are its input's scale times its weight's, which the packer
    leaves for the decoder to multiply out (``pack(scale_arrays=...)``)."""
    from edgesqueeze.runtime._tflite import import_interpreter

    cls, _, _ = import_interpreter("<bytes>")
    # not allocated: then only the constant tensors have data. Allocated, the input and output
    # tensors read as whatever the arena held (zeros, or another run's bytes), and a run of
    # zeros matched inside a pruned weight, which then packed another way: same file, other bytes
    interp = cls(model_content=bytes(data))
    out, scale_arrays = [], []
    for d in interp.get_tensor_details():
        q = d.get("quantization_parameters") or {}
        if len(q.get("scales", [])) > 1:
            scale_arrays.append(np.asarray(q["scales"], np.float32))
        try:
            arr = interp.get_tensor(d["index"])
        except ValueError:  # tensors without data
            continue
        zps = np.asarray(q.get("zero_points", []))
        offset = int(zps.flat[0]) if arr.dtype == np.uint8 and zps.size and (zps == zps.flat[0]).all() else 0
        source, scales, block = _tflite_source(d["name"], arr, q, sources) if sources else (None, None, 0)
        out.append(PackedTensor(d["name"], np.array(arr), offset, source=source, scales=scales,
                                space_to_depth=block))
    return out, scale_arrays


def _tflite_source(name: str, arr: np.ndarray, q: dict, sources: dict[str, np.ndarray]):
    """``(float source in TFLite's layout, per-channel scales, space-to-depth block)`` of a
    TFLite int8 weight (block 0: the source has the tensor's shape), or ``(None, None, 0)``."""
    none = None, None, 0
    scales = np.asarray(q.get("scales", []), np.float32)
    if arr.dtype != np.int8 or arr.ndim < 2 or scales.size != arr.shape[0] or int(q.get("quantized_dimension", 0)):
        return none
    module = name.rsplit(":", 1)[0]
    w = sources.get(module + ".weight")
    if w is None and module.startswith("model."):  # a graph that normalizes its input itself
        w = sources.get(module[len("model."):] + ".weight")
    if w is None:
        return none
    w = np.asarray(w)
    if w.ndim == 4:
        w = w.transpose(0, 2, 3, 1)  # OIHW -> OHWI
    if w.shape == arr.shape:
        return w, scales, 0
    if w.ndim == 4:  # the weight before a space-to-depth rearrangement (the packer checks the values)
        block = next((b for b in range(2, MAX_BLOCK + 1) if space_to_depth_shape(w.shape, b) == list(arr.shape)), 0)
        if block:
            return w, scales, block
    return none


def pack_file(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
              fmt: str | None = None, sources: dict[str, np.ndarray] | None = None) -> tuple[Path, dict[str, Any]]:
    """Pack the ``.onnx`` or ``.tflite`` at ``path`` into ``out`` (default ``path + ".esq"``),
    written atomically; returns the path and a report: sizes, bits per non-zero weight, and
    one row per tensor. ``fmt``: the artifact format recorded in the header (``onnx-int8``
    ...; default ``onnx`` or ``tflite`` by the file's kind). The artifact metadata stays
    inside the file, so the packed header holds only what unpacking needs. ``sources``: the
    model's float weights by torch name (``onnx_tensors``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
    kind = "tflite" if data[4:8] == b"TFL3" else "onnx"
    try:
        tensors, scale_arrays = _read_tflite(data, sources) if kind == "tflite" else (onnx_tensors(data, sources), [])
    except Exception as exc:  # onnx / LiteRT raise many kinds
        raise ExportError(f"{path}: not a readable {kind} file: {type(exc).__name__}: {str(exc)[:200]}") from None
    fmt = fmt or kind
    try:
        blob, rows = pack(data, tensors, name=path.name, fmt=fmt, scale_arrays=scale_arrays)
    except FormatError as exc:
        raise ExportError(f"{path}: {exc}") from None
    out = Path(out) if out is not None else path.with_name(path.name + PACKED_SUFFIX)
    write_bytes_atomic(out, blob)
    coded = [r for r in rows if r["coded_bytes"] is not None]
    report = {"file": path.name, "format": fmt, "bytes": len(data), "packed_bytes": len(blob),
              "coded_tensors": len(coded), "coded_weight_bytes": sum(r["bytes"] for r in coded),
              "coded_bytes": sum(r["coded_bytes"] for r in coded),
              "bits_per_nonzero": bits_per_nonzero(rows), "tensors": rows}
    return out, report
