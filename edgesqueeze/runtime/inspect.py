"""What is inside an .onnx or .tflite file: I/O, ops, weights (dtype, bytes, sparsity), metadata.

ONNX is read with the ``onnx`` package when it is installed (every initializer, every op);
without it, onnxruntime gives inputs, outputs and metadata only (``detail: "io-only"``).
TFLite is read through the interpreter (no default delegates, so the ops are the file's
own): constant tensors are those some op reads and no op writes, and their bytes are read
back from the loaded model.

Sparsity is the fraction of stored values that are exactly zero (for a quantized tensor:
the integer equals zero, which is what pruning leaves behind in a symmetric int8 file).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgesqueeze.errors import EdgesqueezeError, FormatError, RuntimeBackendError
from edgesqueeze.runtime._base import META_KEY, _first_line, classify, parse_meta

__all__ = ["inspect_artifact"]



def _symbol(name: str | None) -> str | None:
    """A dynamic dimension as ``inspect`` shows it: its name where a person gave one
    ("batch"), None (any size) for torch.export's numbered symbols ("s77") or none."""
    return None if not name or re.fullmatch(r"s\d+", name) else name

def _tensor_entry(name: str, arr: np.ndarray, *, zero_point: np.ndarray | None = None,
                  **extra: Any) -> dict[str, Any]:
    """One tensor's row. ``zero_point`` (broadcastable to ``arr``): a quantized tensor whose
    zero is stored as that value (uint8 ONNX weights: 128), counted as a zero."""
    n = int(arr.size)
    if zero_point is not None and n:
        try:
            zeros = int(np.count_nonzero(arr == zero_point))
        except ValueError:  # shapes that do not broadcast: count stored zeros
            zeros = int(n - np.count_nonzero(arr))
    else:
        zeros = int(n - np.count_nonzero(arr)) if n else 0
    return {"name": name, "dtype": arr.dtype.name, "shape": [int(d) for d in arr.shape],
            "bytes": int(arr.nbytes), "elements": n, "zeros": zeros,
            "sparsity": zeros / n if n else 0.0, **extra}


def _totals(out: dict[str, Any]) -> dict[str, Any]:
    tensors = out["tensors"]
    out["total_bytes"] = sum(t["bytes"] for t in tensors)
    out["total_elements"] = sum(t["elements"] for t in tensors)
    zeros = sum(t["zeros"] for t in tensors)
    out["sparsity"] = zeros / out["total_elements"] if out["total_elements"] else 0.0
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        by_dtype[t["dtype"]] += t["bytes"]
    out["bytes_by_dtype"] = dict(sorted(by_dtype.items()))
    if out.get("ops") is not None:
        out["op_count"] = sum(out["ops"].values())
    return out


def _checksum(path: Path) -> str:
    """``matches``, ``none recorded``, or why not: the file's own CRC-32 recorded at export
    (:mod:`edgesqueeze.format.seal`). A description, never a refusal: inspecting a damaged
    file should say what is wrong with it."""
    from edgesqueeze.format.seal import check_file

    try:
        return "matches" if check_file(path) else "none recorded"
    except FormatError as exc:
        return "DOES NOT MATCH: " + str(exc).removeprefix(f"{path}: ")


def inspect_artifact(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able description of an .onnx or .tflite file.

    Keys: ``path``, ``kind``, ``file_bytes``, ``detail`` ("full" or "io-only"), ``metadata``
    (the edgesqueeze metadata, ``{}`` if none), ``inputs``/``outputs`` (name, shape with
    None for dynamic dims, dtype, quantization), ``ops`` ({op type: count}, None when
    unknown), ``op_count``, ``tensors`` (constants: name, dtype, shape, bytes, elements,
    zeros, sparsity, quantization), ``total_bytes``, ``total_elements``, ``sparsity``,
    ``bytes_by_dtype``, ``checksum`` (the file's own CRC-32 recorded at export:
    "matches", "none recorded", or "DOES NOT MATCH: why"); ONNX adds ``opset``, ``producer`` and ``metadata_props`` (the other
    metadata entries). A packed file (``.onnx.esq``/``.tflite.esq``) is described by what it
    holds, plus ``packed`` (the inner file's name, format, bytes, SHA-256, and the size ratio).
    """
    path = Path(path)
    kind, head = classify(path)
    if kind == "esq":  # a packed file: describe what it holds, decoded into a temporary file
        import tempfile

        from edgesqueeze.runtime._base import unpack_file

        data, packed = unpack_file(path)
        with tempfile.TemporaryDirectory(prefix="edgesqueeze-inspect-") as tmp:
            inner = Path(tmp, Path(packed["name"]).name or "model")
            inner.write_bytes(data)
            try:
                out = inspect_artifact(inner)
            except EdgesqueezeError as exc:  # name the user's file, not the temporary one
                raise type(exc)(str(exc).replace(str(inner), str(path))) from None
        from edgesqueeze.format import container
        from edgesqueeze.format.packed import layout

        out.update(path=str(path), file_bytes=path.stat().st_size,
                   packed={**packed, "ratio": round(path.stat().st_size / max(1, packed["bytes"]), 4),
                           **layout(container.read_esq(path))})
        return out
    out: dict[str, Any] = {"path": str(path), "kind": kind, "file_bytes": path.stat().st_size,
                           "checksum": _checksum(path)}
    if kind == "tflite":
        try:
            out.update(_inspect_tflite(path))
        except RuntimeBackendError:
            from edgesqueeze.runtime._tflite_meta import micro_ops

            if not micro_ops(path):
                raise
            out.update(_inspect_micro(path))
    else:
        out.update(_inspect_onnx(path, head))
    return _totals(out)


# --------------------------------------------------------------------------- ONNX

def _inspect_onnx(path: Path, head: bytes) -> dict[str, Any]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return _inspect_onnx_io_only(path, head)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, onnx checker errors, ...
        # Let onnxruntime word the failure the same way load() does.
        from edgesqueeze.runtime._onnx import open_session

        open_session(path, threads=1, head=head, ext=path.suffix.lower())
        raise FormatError(f"{path}: the onnx package cannot read it ({_first_line(exc)})") from None

    def np_dtype(elem_type: int) -> str:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
        except (KeyError, ValueError, TypeError):
            return onnx.TensorProto.DataType.Name(elem_type).lower()

    def io(values) -> list[dict]:
        rows = []
        for v in values:
            tt = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else _symbol(d.dim_param) for d in tt.shape.dim]
            rows.append({"name": v.name, "shape": shape, "dtype": np_dtype(tt.elem_type),
                         "quantization": None})
        return rows

    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    # a weight's zero point (DequantizeLinear's third input), so a uint8 weight's 128s count as zeros
    zero_points: dict[str, tuple[str, int]] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2]:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zero_points[node.input[0]] = (node.input[2], axis)
    init_arrays = {t.name: t for t in graph.initializer if t.name in {zp for zp, _ in zero_points.values()}}

    def zero_point_of(name: str, arr: np.ndarray) -> np.ndarray | None:
        if name not in zero_points or zero_points[name][0] not in init_arrays:
            return None
        zp_name, axis = zero_points[name]
        zp = numpy_helper.to_array(init_arrays[zp_name])
        if zp.ndim == 0 or zp.size == 1:
            return zp.reshape(())
        if zp.ndim == 1 and arr.ndim:
            shape = [1] * arr.ndim
            shape[axis % arr.ndim] = zp.size
            return zp.reshape(shape)
        return None
    ops: Counter[str] = Counter()
    tensors: list[dict] = []

    def walk(g) -> None:
        for node in g.node:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            ops[f"{domain}.{node.op_type}" if domain else node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        walk(sub)
                elif node.op_type == "Constant" and attr.name == "value":
                    tensors.append(_tensor_entry(node.output[0], numpy_helper.to_array(attr.t),
                                                 source="constant", quantization=None))
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            tensors.append(_tensor_entry(t.name, arr, zero_point=zero_point_of(t.name, arr), source="initializer",
                                         quantization=None))

    walk(graph)
    props = {p.key: p.value for p in model.metadata_props}
    return {
        "detail": "full",
        "metadata": parse_meta(path, props.pop(META_KEY, None)),
        "metadata_props": props,
        "opset": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": io([v for v in graph.input if v.name not in init_names]),
        "outputs": io(graph.output),
        "ops": dict(sorted(ops.items())),
        "tensors": tensors,
    }


def _inspect_onnx_io_only(path: Path, head: bytes) -> dict[str, Any]:
    from edgesqueeze.runtime._onnx import _ORT_DTYPES, open_session, session_metadata

    sess = open_session(path, threads=1, head=head, ext=path.suffix.lower())
    props = session_metadata(path, sess)
    meta = sess.get_modelmeta()

    def io(values) -> list[dict]:
        return [{"name": v.name, "shape": [d if isinstance(d, int) else _symbol(d) for d in v.shape],
                 "dtype": _ORT_DTYPES.get(v.type, v.type), "quantization": None} for v in values]

    return {
        "detail": "io-only",
        "note": "pip install onnx (that package alone, no torch) to list ops and weights",
        "metadata": parse_meta(path, props.pop(META_KEY, None)),
        "metadata_props": props,
        "producer": f"{meta.producer_name}".strip(),
        "inputs": io(sess.get_inputs()),
        "outputs": io(sess.get_outputs()),
        "ops": None,
        "tensors": [],
    }


# --------------------------------------------------------------------------- TFLite

def _quant_summary(details: dict) -> dict[str, Any] | None:
    from edgesqueeze.runtime._tflite import tensor_quantization

    scales, zps, axis = tensor_quantization(details)
    if scales.size == 0 or not np.any(scales):
        return None
    if scales.size == 1:
        return {"scale": float(scales[0]), "zero_point": int(zps[0]) if zps.size else 0}
    return {"per_channel": int(scales.size), "axis": axis,
            "scale_min": float(scales.min()), "scale_max": float(scales.max()),
            "zero_points": sorted({int(z) for z in zps})[:8]}


def _inspect_tflite(path: Path) -> dict[str, Any]:
    from edgesqueeze.runtime._tflite import (
        import_interpreter,
        make_interpreter,
        read_meta,
    )

    cls, backend, mod = import_interpreter(path)
    kwargs = {}
    resolver = getattr(mod, "OpResolverType", None)
    if resolver is not None and hasattr(resolver, "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
        # Without XNNPACK the node list is the file's own ops, not "DELEGATE".
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = make_interpreter(path, cls, threads=1, **kwargs)

    def io(details: list[dict]) -> list[dict]:
        rows = []
        for d in details:
            sig = d.get("shape_signature")
            shape = list(sig if sig is not None and len(sig) else d["shape"])
            rows.append({"name": d["name"], "shape": [int(v) if v >= 0 else None for v in shape],
                         "dtype": np.dtype(d["dtype"]).name, "quantization": _quant_summary(d)})
        return rows

    inputs, outputs = it.get_input_details(), it.get_output_details()
    out: dict[str, Any] = {"detail": "full", "backend": backend, "metadata": read_meta(path),
                           "inputs": io(inputs), "outputs": io(outputs), "ops": None, "tensors": []}
    get_ops = getattr(it, "_get_ops_details", None)
    if get_ops is None:  # very old tflite-runtime
        out["detail"] = "io-only"
        out["note"] = "this TFLite runtime does not list ops; install ai-edge-litert"
        return out
    ops = get_ops()
    out["ops"] = dict(sorted(Counter(op["op_name"] for op in ops).items()))
    if hasattr(it, "num_subgraphs"):
        out["subgraphs"] = int(it.num_subgraphs())
    read = {int(i) for op in ops for i in op["inputs"] if int(i) >= 0}
    written = {int(i) for op in ops for i in op["outputs"] if int(i) >= 0}
    graph_inputs = {int(d["index"]) for d in inputs}
    details = {int(d["index"]): d for d in it.get_tensor_details()}
    for idx in sorted(read - written - graph_inputs):
        d = details.get(idx)
        if d is None:
            continue
        try:
            arr = it.get_tensor(idx)
        except ValueError:  # a variable or otherwise unreadable tensor
            continue
        out["tensors"].append(_tensor_entry(d["name"], arr, index=idx, quantization=_quant_summary(d)))
    return out


def _inspect_micro(path: Path) -> dict[str, Any]:
    """A TensorFlow Lite Micro compressed file (``TFLM_DECODE`` operators), which LiteRT cannot
    open: its operators and constant tensors as TFLite Micro's model editor reads them (a
    compressed filter appears as its index bytes and its value table), its I/O as TFLite
    Micro's interpreter sees it."""
    from edgesqueeze.runtime._tflm import MicroArtifact

    art = MicroArtifact(path, why="inspecting its TFLM_DECODE operators (TensorFlow Lite Micro compression)")
    from tflite_micro.tensorflow.lite.micro.compression import model_editor
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    graph = model_editor.read(art._data).subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = Counter(o.custom_code or names.get(o.opcode, str(o.opcode)) for o in graph.operators)

    def io(tensors) -> list[dict]:
        return [{"name": str(t.name), "shape": [int(d) for d in t.shape], "dtype": np.dtype(t.numpy_dtype).name,
                 "quantization": None} for t in tensors]

    tensors = []
    for t in graph.tensors:
        arr = np.asarray(t.array) if t.buffer is not None else None
        if arr is not None and arr.size:
            tensors.append(_tensor_entry(str(t.name), arr, index=int(t.index), quantization=None))
    return {"detail": "full", "backend": art.backend, "metadata": art.meta, "inputs": io(graph.inputs),
            "outputs": io(graph.outputs), "ops": dict(sorted(ops.items())), "tensors": tensors,
            "arena_bytes": art.arena_bytes}
