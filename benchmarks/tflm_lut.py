"""TensorFlow Lite Micro's own compression of an int8 ``.tflite``, run in TFLM's interpreter.

    /path/to/tflm-venv/bin/python benchmarks/tflm_lut.py model.int8.tflite --x x.npy --json out.json

Needs only numpy and the PyPI package ``tflite-micro`` (TFLM's interpreter and its
``compression`` module), so it runs in its own environment (``python -m venv tflm &&
tflm/bin/pip install tflite-micro``); ``benchmarks/packed.py --tflm-python`` calls it.

1. Every constant int8 filter of a CONV_2D / DEPTHWISE_CONV_2D is LUT-compressed per tensor
   (``tflite_micro.compression``: a table of the tensor's distinct values and fixed-width
   indices, ``index_bitwidth`` = the bits its distinct-value count needs; TFLM inserts a
   ``TFLM_DECODE`` operator before each use). TFLM's Huffman and pruning methods are not
   implemented in this package ("not yet implemented"), and 8-bit indices are refused, so a
   tensor with more than 128 distinct values stays as it is. Per-channel tables are not
   used: on weights with one scale per tensor (what ``export`` writes for a weight-shared
   model) this package's decoder silently applied channel 0's table to every channel
   (10.35% accuracy on MNIST, no error; found while probing it, 2026-12-03).
2. The plain and the compressed file run in TFLM's interpreter, batch 1, on the prepared
   inputs ``--x`` (float32, the model's input space); their logits are saved beside the JSON
   (``.plain.npy``, ``.lut.npy``) for the caller to score. The arena is what TFLM's
   recording allocator reports ("Arena allocation total"), which is also the smallest
   ``arena_size`` that runs (checked when probing). Flash is the ``.tflite``'s bytes (the
   interpreter's code, DECODE kernels included, is not counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _stderr_of(fn):
    """Run ``fn`` and return (its result, what C code wrote to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode(errors="replace")


def lut_spec(model: bytes) -> tuple[str, list[dict]]:
    """The compression spec (YAML) for every constant int8 conv filter with at most 128
    distinct values, per tensor, and one row per filter."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor as me
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    graph = me.read(model).subgraphs[0]
    convs = (fb.BuiltinOperator.CONV_2D, fb.BuiltinOperator.DEPTHWISE_CONV_2D)
    lines, rows, seen = ["tensors:"], [], set()
    for op in graph.operators:
        t = op.inputs[1] if op.opcode in convs and len(op.inputs) > 1 else None
        if t is None or t.buffer is None or t.dtype != fb.TensorType.INT8 or t.index in seen:
            continue
        seen.add(t.index)
        distinct = len(np.unique(t.array))
        bits = max(1, math.ceil(math.log2(distinct)))
        rows.append({"tensor": t.index, "name": str(t.name), "bytes": int(t.array.size), "distinct": distinct,
                     "index_bits": bits if bits <= 7 else None})
        if bits <= 7:
            lines += ["  - subgraph: 0", f"    tensor: {t.index}", "    compression:", "      - lut:",
                      f"          index_bitwidth: {bits}", "          per_tensor:"]
    return "\n".join(lines) + "\n", rows


def run(model: bytes, x: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Logits of ``x`` (one image at a time), the arena bytes TFLM allocated, seconds."""
    from tflite_micro import runtime

    interp = runtime.Interpreter.from_bytes(model)
    out, t0 = [], time.perf_counter()
    for i in range(len(x)):
        interp.set_input(x[i:i + 1], 0)
        interp.invoke()
        out.append(np.array(interp.get_output(0)).reshape(-1))
    seconds = time.perf_counter() - t0
    _, log = _stderr_of(interp.print_allocations)
    m = re.search(r"Arena allocation total (\d+) bytes", log)
    return np.stack(out), int(m.group(1)) if m else -1, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a plain int8 .tflite")
    ap.add_argument("--x", type=Path, required=True, help="float32 inputs (N, ...) in the model's input space, .npy")
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    args = ap.parse_args()
    import tflite_micro
    from tflite_micro import compression

    plain = args.model.read_bytes()
    x = np.load(args.x).astype(np.float32)
    spec, rows = lut_spec(plain)
    lut = bytes(compression.compress(plain, compression.parse_yaml(spec)))
    res = {"tflite_micro": tflite_micro.__version__, "images": len(x), "filters": rows,
           "plain_bytes": len(plain), "compressed_bytes": len(lut)}
    for name, data in (("plain", plain), ("lut", lut)):
        try:
            logits, arena, seconds = run(data, x)
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden: the caller prints it
            res[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            continue
        np.save(args.json.with_suffix(f".{name}.npy"), logits)
        res[f"{name}_arena_bytes"] = arena
        res[f"{name}_ms_per_image"] = round(1e3 * seconds / max(1, len(x)), 3)
    args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
