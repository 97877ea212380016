"""TFLite flatbuffer editing after conversion: batch-1 shapes freed to any batch, float I/O
around an int8 graph, short tensor names, the artifact metadata entry; :func:`finalize`
applies them and checks the batch. Why each is needed: :mod:`edgesqueeze.export.tflite`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgesqueeze.export._common import META_KEY, meta_json


# ---------------------------------------------------------------------------------------
# Flatbuffer editing: free batch, float I/O around an int8 graph, metadata


def schema():
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    return fb, fbu


def _buffer_bytes(model, index: int) -> bytes | None:
    data = model.buffers[index].data if 0 <= index < len(model.buffers) else None
    return None if data is None or len(data) == 0 else np.asarray(data, np.uint8).tobytes()


def _builtin(model, op) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _free_batch(model) -> None:
    """Make the batch-1 graph resizable: constant RESHAPE shapes ``[1, ...]`` applied to an
    activation whose leading dim is 1 become ``[-1, ...]``; inputs/outputs get batch -1."""
    fb, _ = schema()
    dtypes = {fb.TensorType.INT32: np.int32, fb.TensorType.INT64: np.int64}
    for sg in model.subgraphs:
        for op in sg.operators:
            if _builtin(model, op) != fb.BuiltinOperator.RESHAPE or len(op.inputs) < 2:
                continue
            data_t = sg.tensors[op.inputs[0]]
            if _buffer_bytes(model, data_t.buffer) is not None or not len(data_t.shape) or data_t.shape[0] != 1:
                continue  # a constant, or not batch-leading
            if op.inputs[1] >= 0:
                shape_t = sg.tensors[op.inputs[1]]
                raw = _buffer_bytes(model, shape_t.buffer)
                if raw is not None and shape_t.type in dtypes:
                    new = np.frombuffer(raw, dtypes[shape_t.type]).copy()
                    if new.size and new[0] == 1 and -1 not in new:
                        new[0] = -1
                        # a fresh buffer: the converter may share one shape buffer among ops
                        model.buffers.append(fb.BufferT())
                        model.buffers[-1].data = np.frombuffer(new.tobytes(), np.uint8)
                        shape_t.buffer = len(model.buffers) - 1
            opts = op.builtinOptions
            shape = getattr(opts, "newShape", None)
            if shape is not None and len(shape) and shape[0] == 1 and -1 not in list(shape):
                opts.newShape = [-1, *list(shape)[1:]]
        for t in [*sg.inputs, *sg.outputs]:
            tensor = sg.tensors[t]
            if len(tensor.shape) and tensor.shape[0] == 1:
                tensor.shapeSignature = [-1, *[int(d) for d in tensor.shape[1:]]]


def _opcode_index(model, builtin: int, version: int) -> int:
    fb, _ = schema()
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and code.version == version:
            return i
    code = fb.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)  # the int8 field saturates at 127
    code.version = version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _add_float_io(model) -> None:
    """Float32 in and out of an int8 graph: QUANTIZE each int8 input, DEQUANTIZE each int8
    output. The float tensors take the original names, so I/O names do not depend on ``io``."""
    fb, _ = schema()
    sg = model.subgraphs[0]
    front, back, remap = [], [], {}

    def float_twin(index: int) -> int:
        old = sg.tensors[index]
        twin = fb.TensorT()
        twin.shape = list(old.shape)
        twin.shapeSignature = None if old.shapeSignature is None else list(old.shapeSignature)
        twin.type = fb.TensorType.FLOAT32
        twin.name = old.name
        twin.buffer = 0  # the empty buffer (flatbuffer_utils compacts empties into buffer 0)
        old.name = (old.name or b"") + b"_int8"
        sg.tensors.append(twin)
        remap[index] = len(sg.tensors) - 1
        return remap[index]

    for pos, index in enumerate(sg.inputs):
        if sg.tensors[index].type == fb.TensorType.INT8:
            op = fb.OperatorT()
            op.opcodeIndex = _opcode_index(model, fb.BuiltinOperator.QUANTIZE, 2)
            op.inputs, op.outputs = [float_twin(index)], [index]
            op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.QuantizeOptions, fb.QuantizeOptionsT()
            front.append(op)
            sg.inputs[pos] = remap[index]
    for pos, index in enumerate(sg.outputs):
        if sg.tensors[index].type == fb.TensorType.INT8:
            op = fb.OperatorT()
            op.opcodeIndex = _opcode_index(model, fb.BuiltinOperator.DEQUANTIZE, 2)
            op.inputs, op.outputs = [index], [float_twin(index)]
            op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.DequantizeOptions, fb.DequantizeOptionsT()
            back.append(op)
            sg.outputs[pos] = remap[index]
    sg.operators = front + list(sg.operators) + back
    for sd in model.signatureDefs or []:
        if sd.subgraphIndex == 0:
            for tm in [*(sd.inputs or []), *(sd.outputs or [])]:
                tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)


def io_dtype(model) -> str:
    fb, _ = schema()
    sg = model.subgraphs[0]
    kind = sg.tensors[sg.inputs[0]].type
    return {fb.TensorType.FLOAT32: "float32", fb.TensorType.INT8: "int8"}.get(kind, f"tflite-type-{kind}")


def _set_metadata(model, name: str, data: bytes) -> None:
    fb, _ = schema()
    buf = fb.BufferT()
    buf.data = np.frombuffer(data, np.uint8)
    model.buffers.append(buf)
    entries = [m for m in (model.metadata or []) if (m.name or b"") not in (name, name.encode())]
    entry = fb.MetadataT()
    entry.name, entry.buffer = name, len(model.buffers) - 1
    model.metadata = [*entries, entry]


def _batch_resizes(content: bytes) -> bool:
    """Does batch 2 give what two batch-1 runs give (the check behind ``_free_batch``)?"""
    from ai_edge_litert.interpreter import Interpreter

    try:
        it = Interpreter(model_content=content, num_threads=1)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        shape = [int(d) for d in inp["shape"]]
        rng = np.random.default_rng(0)
        if inp["dtype"] == np.int8:
            x = rng.integers(-128, 128, size=[2, *shape[1:]], dtype=np.int8)
        else:
            x = rng.standard_normal([2, *shape[1:]]).astype(inp["dtype"])

        def run(batch: np.ndarray) -> np.ndarray:
            it.resize_tensor_input(inp["index"], list(batch.shape), strict=True)
            it.allocate_tensors()
            it.set_tensor(inp["index"], batch)
            it.invoke()
            return it.get_tensor(out["index"]).astype(np.float64)

        one = np.concatenate([run(x[:1]), run(x[1:])])
        two = run(x)
    except Exception:  # noqa: BLE001 - resize or invoke refused: the file stays batch 1
        return False
    scale = max(float(np.abs(one).max()), 1e-6)
    return one.shape == two.shape and float(np.abs(one - two).max()) <= 1e-4 * scale + 1e-6


def module_path(name: str) -> str | None:
    """The torch module path in a converter tensor name, or None.

    litert-torch names tensors by their module stack, each frame ``package.Class_attr``
    (``...SqueezeNet/torch.nn.modules.container.Sequential_features/...Fire_9/
    torch.nn.modules.conv.Conv2d_squeeze``), and fused tensors join several with ``;``; the
    last is the op that produces the tensor. This returns ``features.9.squeeze``."""
    parts = [p for p in name.split(";") if p]
    if not parts:
        return None
    frames = parts[-1].split("/")
    attrs = []
    for frame in frames:
        last = frame.rsplit(".", 1)[-1]
        if "_" in last and not last.startswith("_"):
            attrs.append(last.split("_", 1)[1])
    return ".".join(attrs) if attrs and all(attrs) else None


def _short_names(model) -> None:
    """Replace the converter's tensor names by the torch module path they come from.

    The converter writes each tensor's whole module stack, class names included, often
    several joined: 19 KB of the 114 KB digits int8 file (17%), bytes a microcontroller
    flashes for nothing. ``features.9.squeeze`` says the same. Names stay unique (``:2``,
    ``:3`` for the rest of a module's tensors); the graph's inputs and outputs keep theirs
    (runtimes show them), and the signatures map by index, so nothing else changes."""
    for sg in model.subgraphs:
        keep = {*sg.inputs, *sg.outputs}
        seen: dict[str, int] = {}
        for i, tensor in enumerate(sg.tensors):
            if i in keep:
                continue
            raw = tensor.name.decode("utf-8", "replace") if isinstance(tensor.name, bytes) else str(tensor.name or "")
            base = module_path(raw) or (raw if 0 < len(raw) <= 32 else f"t{i}")
            seen[base] = seen.get(base, 0) + 1
            tensor.name = (base if seen[base] == 1 else f"{base}:{seen[base]}").encode()


def finalize(content: bytes, make_meta: Callable[[str], dict[str, Any]], *,
              float_io: bool = False) -> bytes:
    """Free the batch (if the result checks out), add float I/O, shorten the tensor names,
    embed the metadata."""
    _, fbu = schema()
    for free_batch in (True, False):
        model = fbu.read_model_from_bytearray(bytearray(content))
        if free_batch:
            _free_batch(model)
        if float_io:
            _add_float_io(model)
        _short_names(model)
        meta = make_meta(io_dtype(model))
        _set_metadata(model, META_KEY, meta_json(meta).encode("utf-8"))
        out = bytes(fbu.convert_object_to_bytearray(model))
        if not free_batch or _batch_resizes(out):
            return out
    raise AssertionError("unreachable")
