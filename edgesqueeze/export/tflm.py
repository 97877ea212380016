"""TFLite Micro files (``model.int8.micro.tflite``): an int8 ``.tflite`` whose weight-shared
filters are compressed the way TensorFlow Lite Micro decodes them on a microcontroller.

TFLite Micro's own compression (the PyPI package ``tflite-micro``, module ``compression``)
stores a tensor as a *value table* (its distinct int8 values) plus fixed-width *indices* into
it, and inserts a ``TFLM_DECODE`` operator before each use; the interpreter expands the
tensor into its arena just before the operator that reads it. The file stays a flatbuffer the
microcontroller runs from flash as it is: no load-time decoding of the whole file, which is
what a packed ``.esq`` needs and what a device without a file system cannot do.

What this writer does with a model:

* every constant int8 filter of a ``CONV_2D``, ``DEPTHWISE_CONV_2D`` or ``FULLY_CONNECTED``
  gets value tables with ``ceil(log2(distinct values))``-bit indices: one per tensor for
  weights with one int8 scale (what ``export`` writes for a weight-shared model: zero and 16
  centroids a layer, 17 values, 5 bits a weight instead of 8), one per output channel for
  weights with a scale per channel (GPTQ's, or ``int8_weights: per-channel``), as wide as
  the channel with the most values;
* a tensor with more than 128 distinct values stays as it is: this build of TFLite Micro
  refuses 8-bit indices, which would save nothing anyway; so does a tensor too small for
  its table and DECODE operator to pay off;
* the kind of table must follow the scales, or the file computes other numbers without
  any error (``tflite-micro`` 0.dev20261023182759, the version pinned in
  ``edgesqueeze[micro]``): on weights with one int8 scale per tensor the package's
  per-channel decoder applied channel 0's table to every channel (10.35% accuracy on MNIST;
  found 2026-12-03), and on weights with a scale per channel a per-tensor table gave logits
  0.40 away from LiteRT's on a small RGB net (found in session 26; tests/test_micro.py).

What TFLite Micro does not have: entropy coding and pruning ("not yet implemented" in its
``compression`` package), so a pruned model's zeros cost a full index each. The packed
``.esq`` of the same model is several times smaller (docs/BENCHMARKS.md "Packed files"); this
file is the one a microcontroller runs. LiteRT refuses it ("unresolved custom op:
TFLM_DECODE"); :mod:`edgesqueeze.runtime` runs it in TFLite Micro's interpreter and reports
the arena it needed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from edgesqueeze.errors import ExportError
from edgesqueeze.export._common import meta_json

__all__ = ["MICRO_SPEC", "MAX_INDEX_BITS", "micro_compress"]

MICRO_SPEC = "tflite-micro==0.dev20261023182759"  # the build measured; pinned by edgesqueeze[micro]
MAX_INDEX_BITS = 7  # TFLite Micro's LUT compression refuses 8-bit indices


def table_could_pay(n: int, distinct: int, table: int | None = None) -> bool:
    """Whether a filter of ``n`` weights holding ``distinct`` values (at most, per table) is
    worth value tables of ``table`` bytes in all (default one table, ``distinct``): the
    indices, the tables and a DECODE operator's tensors smaller than the int8 tensor. Export
    asks it of the float model before converting anything; the int8 file's own filters are
    judged by it too (with their per-channel tables)."""
    bits = max(1, math.ceil(math.log2(max(2, distinct))))
    return (bits <= MAX_INDEX_BITS
            and math.ceil(n * bits / 8) + (distinct if table is None else table) + _DECODE_BYTES < n)
# what a DECODE operator, its two extra tensors and the value table's buffer add to the
# flatbuffer: 220-290 B each, measured on digits nets (session 37's audit; 64 was assumed
# before, and tables on filters of 160-600 weights made files larger than the plain one)
_DECODE_BYTES = 256
META_KEY = "edgesqueeze"


def import_micro(what: str = "format tflite-micro"):
    """``(tflite_micro package, model_editor, schema)``, or one line saying how to get them."""
    try:
        import tflite_micro
        from tflite_micro.tensorflow.lite.micro.compression import model_editor
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema
    except ImportError as exc:
        raise ExportError(f"{what} needs TensorFlow Lite Micro's Python package ({exc}); pip install "
                          f"'edgesqueeze[micro]' (it pins {MICRO_SPEC}; x86-64 Linux wheels only)") from None
    return tflite_micro, model_editor, schema


def _filters(model, schema) -> list[Any]:
    """The constant int8 weight tensors of the first subgraph's conv, depthwise conv and
    fully connected operators, each once, in operator order."""
    ops = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D,
           schema.BuiltinOperator.FULLY_CONNECTED)
    seen, out = set(), []
    for op in model.subgraphs[0].operators:
        t = op.inputs[1] if op.opcode in ops and len(op.inputs) > 1 else None
        if t is None or t.buffer is None or t.dtype != schema.TensorType.INT8 or t.index in seen:
            continue
        seen.add(t.index)
        out.append(t)
    return out


def _channel_axis(t, arr: np.ndarray) -> int | None:
    """The quantized dimension of a filter with one int8 scale per channel, else None."""
    q = getattr(t, "quantization", None)
    scales = getattr(q, "scales", None)
    if scales is None or len(scales) <= 1:
        return None
    axis = int(getattr(q, "axis", 0) or 0)
    return axis if 0 <= axis < arr.ndim and arr.shape[axis] == len(scales) else None


def micro_compress(data: bytes, *, what: str = "tflite-micro") -> tuple[bytes, dict[str, Any]]:
    """TFLite Micro LUT compression of the int8 ``.tflite`` ``data``: the compressed file's
    bytes and a report (``compressed``, ``filters``, ``weight_bytes`` before and after, one
    row per filter with its distinct values and index bits, or why it stayed as it was).

    The file's edgesqueeze metadata is kept, with ``artifact_format`` set to
    ``tflite-micro`` and the report under ``micro``. A model with no filter worth a table (at
    most 128 distinct values, and large enough for the table to pay off) raises
    :class:`ExportError`: the file would be the plain one, and the file to ship is then
    ``tflite-int8``."""
    tflite_micro, model_editor, schema = import_micro(f"{what}")
    from tflite_micro import compression

    try:
        model = model_editor.read(data)
    except Exception as exc:  # noqa: BLE001 - the package raises what flatbuffers raises
        raise ExportError(f"{what}: TFLite Micro cannot read the int8 file ({type(exc).__name__}: {exc})") from None
    rows, spec = [], ["tensors:"]
    for t in _filters(model, schema):
        arr = np.asarray(t.array)
        axis = _channel_axis(t, arr)
        if axis is None:  # one int8 scale: one value table
            distinct = table = int(np.unique(arr).size)
        else:  # one scale per channel: a table per channel, as wide as the widest
            slices = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
            distinct = max(int(np.unique(row).size) for row in slices)
            table = distinct * len(slices)
        n, bits = int(arr.size), max(1, math.ceil(math.log2(distinct)))
        worth = table_could_pay(n, distinct, table)  # the indices, the tables and DECODE's tensors < n
        row = {"tensor": int(t.index), "name": str(t.name), "weights": n, "distinct": distinct,
               "tables": "per tensor" if axis is None else "per channel", "index_bits": bits if worth else None}
        rows.append(row)
        if row["index_bits"]:
            spec += ["  - subgraph: 0", f"    tensor: {t.index}", "    compression:", "      - lut:",
                     f"          index_bitwidth: {bits}"]
            spec += ["          per_channel:", f"            axis: {axis}"] if axis is not None else ["          per_tensor:"]
    done = [r for r in rows if r["index_bits"]]
    if not done:
        many = sum(r["distinct"] > 2 ** MAX_INDEX_BITS for r in rows)
        raise ExportError(f"{what}: no int8 filter is worth a TFLite Micro value table ({len(rows)} filters: "
                          f"{many} with more than {2 ** MAX_INDEX_BITS} distinct values, {len(rows) - many} too small "
                          "for a table to pay off); export a weight-shared model (an .esq from `edgesqueeze "
                          "compress`) or ship the tflite-int8 file")
    report = {"tflite_micro": str(tflite_micro.__version__),
              "method": "lut: a value table per tensor, per channel where the int8 scales are",
              "compressed": len(done), "filters": len(rows),
              "weight_bytes": sum(r["weights"] for r in rows),
              "coded_weight_bytes": sum(math.ceil(r["weights"] * (r["index_bits"] or 8) / 8) for r in rows),
              "rows": rows}
    meta = model.metadata.get(META_KEY)
    if meta is not None:  # rewrite ours before TFLite Micro rebuilds the file (it keeps metadata)
        info = json.loads(bytes(meta).rstrip(b"\0").decode("utf-8"))
        info["artifact_format"] = "tflite-micro"
        info["micro"] = {k: v for k, v in report.items() if k != "rows"}
        model.metadata[META_KEY] = meta_json(info).encode()  # the checksum's zeros again, filled in below
        data = bytes(model.build())
    try:
        out = bytes(compression.compress(data, compression.parse_yaml("\n".join(spec) + "\n")))
    except Exception as exc:  # noqa: BLE001 - one line, whatever the package raised
        raise ExportError(f"{what}: TFLite Micro's compression failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    from edgesqueeze.format.seal import seal

    return seal(out), report  # the rebuilt file's own CRC-32
