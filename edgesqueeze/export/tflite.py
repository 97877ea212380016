"""TFLite export, fp32 and full INT8, through litert-torch (no TensorFlow).

fp32: ``litert_torch.convert(model.eval(), (sample,))``. INT8: litert-torch's PT2E quantizer
(per-channel symmetric int8 weights, static per-tensor int8 activations) calibrated on given
images, then the same converter; every conv runs as an int8 kernel. Both files then get the
artifact metadata (:mod:`edgesqueeze.export._common`) as a ``Model.metadata`` entry named
``"edgesqueeze"``, read back without torch by :mod:`edgesqueeze.runtime._tflite_meta`.

What litert-torch 0.10 does and does not do, and what this module adds:

- **Batch.** ``dynamic_shapes`` does not convert: ``torch.flatten`` becomes an ``aten.view``
  with a symbolic size, which the JAX lowering bridge cannot trace (the same failure with
  ``use_v2=True``). So files are exported at batch 1. Most ops then resize with
  ``Interpreter.resize_tensor_input``, but the converter bakes the batch into constant
  ``RESHAPE`` shapes: for a 1-channel input the NCHW -> NHWC transpose becomes a reshape to
  ``[1, H, W, 1]``, and XNNPACK then refuses batch 32. :func:`_free_batch` rewrites a leading
  ``1`` in such a shape to ``-1`` (a reshape that keeps the leading dimension is the per-sample
  reshape, batched) and marks the input and output batch dimension ``-1`` in
  ``shape_signature``; the export then *checks* that batch 2 gives the batch-1 results and
  keeps the static batch-1 file if it does not.
- **INT8 I/O.** With a PT2E ``QuantConfig`` the converter folds the input QUANTIZE and output
  DEQUANTIZE away: its files take and return int8. ``io="int8"`` keeps that (the runtime
  quantizes with the input tensor's own scale and zero point); ``io="float"`` (default) adds a
  QUANTIZE op in front and a DEQUANTIZE op behind, so the file takes and returns float32.
  (Without ``quant_config`` the converter would keep float Q/DQ pairs around float kernels:
  a fake-quantized float model, 2.3x larger, not an int8 one.)
- **Mixed precision.** ``PT2EQuantizer.set_module_name`` refuses ``None`` and its module-name
  filter does not match torch 2.13's ``nn_module_stack`` keys (``L__self__features.0``, not
  ``L__self___features_0``), so :func:`_quantizer` filters by module path itself, in the
  annotation *and* in the propagation to pass-through ops: modules named in ``float_layers``
  stay float (the converter puts QUANTIZE / DEQUANTIZE around them).
- **Pooled logits.** litert-torch gives a global average pool its input's int8 range; the
  pool output of SqueezeNet 1.0 spans an eighth of it, so its logits got 53 levels.
  ``requantize_pool`` (on by default) gives the pool its own range (TFLite's int8 MEAN
  rescales).
- **Weight rounding.** litert-torch rounds weights to nearest. ``weight_rounding="gptq"`` (the
  default) chooses the int8 weights with GPTQ on the calibration images, on the very grid
  the PT2E observer then finds, so the file holds GPTQ's choice. On ImageNet SqueezeNet 1.0
  (whose weights are 256-entry k-means codebooks that int8's uniform grid cannot hold)
  int8 weights alone cost 11 points of top-1 agreement with fp32 rounded to nearest, 2 with
  GPTQ. Measured numbers: ``benchmarks/tflite_int8.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from edgesqueeze._io import write_bytes_atomic
from edgesqueeze.errors import ExportError
from edgesqueeze.export import prepare
from edgesqueeze.config.export import CalibrationConfig
from edgesqueeze.export._common import (
    META_KEY,
    artifact_meta,
    check_float_layers,
    first_line as _first_line,
    meta_json,
    to_input,
)
from edgesqueeze.export.prepare import (  # noqa: F401 - re-exported: they lived here first
    augment_calibration,
    equalize_cross_layer,
    gptq_round,
)

__all__ = [
    "augment_calibration",
    "correct_bias",
    "equalize_cross_layer",
    "export_tflite",
    "export_tflite_int8",
    "gptq_round",
    "quantize_pt2e",
]


# ---------------------------------------------------------------------------------------
# Shared: normalization folding, conversion with readable errors


class _Normalized(nn.Module):
    """``model((x - mean) / std)``: the graph takes pixels / 255 (``fold_normalization``).

    The normalization is a depthwise 1x1 conv (weight 1/std, bias -mean/std), not a subtract
    and a multiply: the INT8 quantizer annotates convs, so with ``io="int8"`` the input is
    int8 too (a float ``sub`` would keep it float). Not folded into the first conv: that
    conv's zero padding means 0 *after* normalization.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        c = len(mean)
        self.normalize = nn.Conv2d(c, c, 1, groups=c)
        with torch.no_grad():
            std_t = torch.tensor(std, dtype=torch.float64)
            self.normalize.weight.copy_((1.0 / std_t).view(c, 1, 1, 1))
            self.normalize.bias.copy_(-torch.tensor(mean, dtype=torch.float64) / std_t)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def _artifact(model: nn.Module, meta: dict[str, Any], fmt: str, fold_normalization: bool,
              **meta_kw: Any) -> dict[str, Any]:
    """The artifact metadata, validated before any slow work."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"export needs a torch nn.Module, got {type(model).__name__}")
    return artifact_meta(meta, fmt, normalization="in-graph" if fold_normalization else "caller",
                         **meta_kw)


def _wrap(model: nn.Module, art: dict[str, Any], fold_normalization: bool) -> nn.Module:
    model = model.eval()
    return _Normalized(model, art["mean"], art["std"]).eval() if fold_normalization else model


@contextlib.contextmanager
def _quiet_litert():
    """litert-torch prints a progress line per conversion step; off unless the user set it."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(key)
    if before is None:
        os.environ[key] = "n"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


def _convert(module: nn.Module, sample: torch.Tensor, what: str, **kwargs: Any) -> bytes:
    """litert-torch conversion; any failure becomes an ExportError naming the module and op."""
    try:
        import litert_torch
    except ImportError as exc:
        raise ExportError(f"TFLite export needs litert-torch ({exc}); "
                          "pip install 'edgesqueeze[export]'") from None
    try:
        with _quiet_litert():
            return bytes(litert_torch.convert(module, (sample,), **kwargs).model_content())
    except Exception as exc:  # the converter raises many types (RuntimeError, AssertionError...)
        raise _conversion_error(module, sample, exc, what) from exc


_OP_PATTERNS = (r"Lowering not found: ([\w.]+)", r"target=torch\.ops\.([\w.]+)\]")


def _conversion_error(module: nn.Module, sample: torch.Tensor, exc: BaseException,
                      what: str) -> ExportError:
    """Name the op and the module it came from: litert-torch's message has the op and the
    FX node name; the node's ``nn_module_stack`` in a fresh ``torch.export`` has the module."""
    text = str(exc)
    op = next((m.group(1) for p in _OP_PATTERNS if (m := re.search(p, text))), None)
    node_name = (m.group(1) if (m := re.search(r"While executing %(\w+)", text)) else None)
    where = _module_of(module, sample, node_name, op) if (op or node_name) else None
    reason = _first_line(exc)
    if op and where:
        return ExportError(f"litert-torch cannot convert {what}: op {op} in module {where} "
                           f"({reason}); replace that module with supported ops, or export "
                           "to ONNX instead")
    if op:
        return ExportError(f"litert-torch cannot convert {what}: op {op} ({reason})")
    return ExportError(f"litert-torch cannot convert {what}: {type(exc).__name__}: {reason}")


def _module_of(module: nn.Module, sample: torch.Tensor, node_name: str | None,
               op: str | None) -> str | None:
    """``'name' (Type)`` of the innermost module that emitted ``node_name`` / ``op``."""
    try:
        graph = torch.export.export(module, (sample,), strict=False).graph
    except Exception:  # noqa: BLE001 - export itself is what failed: nothing to look up
        return None
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    hit = next((n for n in nodes if n.name == node_name), None)
    if hit is None and op:
        hit = next((n for n in nodes if str(n.target) == op), None)
    stack = hit.meta.get("nn_module_stack") if hit is not None else None
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    kind = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1]
    if isinstance(module, _Normalized):  # name the user's module, not our wrapper's
        path = path.removeprefix("model.")
    return f"'{path}' ({kind})" if path else f"<root> ({kind})"


# ---------------------------------------------------------------------------------------
# Flatbuffer editing: free batch, float I/O around an int8 graph, metadata


def _schema():
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
    fb, _ = _schema()
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
    fb, _ = _schema()
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
    fb, _ = _schema()
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


def _io_dtype(model) -> str:
    fb, _ = _schema()
    sg = model.subgraphs[0]
    kind = sg.tensors[sg.inputs[0]].type
    return {fb.TensorType.FLOAT32: "float32", fb.TensorType.INT8: "int8"}.get(kind, f"tflite-type-{kind}")


def _set_metadata(model, name: str, data: bytes) -> None:
    fb, _ = _schema()
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


def _module_path(name: str) -> str | None:
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
            base = _module_path(raw) or (raw if 0 < len(raw) <= 32 else f"t{i}")
            seen[base] = seen.get(base, 0) + 1
            tensor.name = (base if seen[base] == 1 else f"{base}:{seen[base]}").encode()


def _finalize(content: bytes, make_meta: Callable[[str], dict[str, Any]], *,
              float_io: bool = False) -> bytes:
    """Free the batch (if the result checks out), add float I/O, shorten the tensor names,
    embed the metadata."""
    _, fbu = _schema()
    for free_batch in (True, False):
        model = fbu.read_model_from_bytearray(bytearray(content))
        if free_batch:
            _free_batch(model)
        if float_io:
            _add_float_io(model)
        _short_names(model)
        meta = make_meta(_io_dtype(model))
        _set_metadata(model, META_KEY, meta_json(meta).encode("utf-8"))
        out = bytes(fbu.convert_object_to_bytearray(model))
        if not free_batch or _batch_resizes(out):
            return out
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------
# fp32


def export_tflite(model: nn.Module, meta: dict[str, Any], out: str | os.PathLike, *,
                  fold_normalization: bool = False, source_sha256: str | None = None) -> Path:
    """Write ``model`` as a float32 ``.tflite`` with the artifact metadata embedded.

    Input is NCHW float32 at batch 1, resizable to any batch with
    ``Interpreter.resize_tensor_input`` (checked at export; see the module docstring).
    ``fold_normalization`` puts ``(x - mean) / std`` in the graph: feed ``pixels / 255``.
    The model is put in eval mode. Raises ExportError naming the module and op the
    converter cannot handle; ``out`` is written atomically (never a partial file).
    """
    art = _artifact(model, meta, "tflite", fold_normalization, source_sha256=source_sha256)
    module = _wrap(model, art, fold_normalization)
    sample = torch.zeros(1, *art["input_shape"])
    content = _convert(module, sample, type(model).__name__)
    data = _finalize(content, lambda dtype: {**art, "input_dtype": dtype})
    out = Path(out)
    write_bytes_atomic(out, data)
    return out


# ---------------------------------------------------------------------------------------
# INT8: observers, quantizer, calibration data, cross-layer equalization


def _percentile_observer():
    from torchao.quantization.pt2e.observer import HistogramObserver

    class PercentileObserver(HistogramObserver):
        """HistogramObserver's histogram, but the range is the [100 - p, p] percentiles
        (both tails; zero stays representable) instead of the L2-optimal search."""

        def __init__(self, *args: Any, percentile: float = 99.999, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.percentile = float(percentile)

        def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
            hist = self.histogram.double()
            cdf = torch.cumsum(hist, 0) / hist.sum().clamp_min(1e-12)
            q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], dtype=torch.float64)
            lo, hi = (int(i) for i in torch.searchsorted(cdf, q).clamp(0, self.bins - 1))
            width = (self.max_val - self.min_val) / self.bins
            return self.min_val + width * lo, self.min_val + width * (hi + 1)

    return PercentileObserver


def _quant_config(method: str, percentile: float, per_channel: bool):
    """litert-torch's symmetric static config with the activation observer ``method`` picks."""
    from litert_torch.quantize import pt2e_quantizer as pq
    from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver

    config = pq.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)
    eps = 2 ** -12  # litert-torch's choice
    if method == "minmax":
        ctr = MinMaxObserver.with_args(eps=eps)
    elif method == "entropy":
        ctr = HistogramObserver.with_args(eps=eps)
    elif method == "percentile":
        ctr = _percentile_observer().with_args(eps=eps, percentile=percentile)
    else:
        raise ExportError(f"calibration.method: unknown method {method!r}; choose minmax, "
                          "entropy or percentile")
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=ctr)
    return dataclasses.replace(config, input_activation=act, output_activation=act)


_POOLS = ("aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default", "aten.mean.dim")


def _quantizer(config, float_layers: Sequence[str], requantize_pool: bool = False):
    """A PT2EQuantizer whose ops from the modules in ``float_layers`` (or below them) stay
    float; with ``requantize_pool``, global average pools get their own output range instead
    of sharing their input's (averaging shrinks the range: SqueezeNet 1.0's pooled logits span
    [0, 46] but inherit the [0, 373] range of the conv before, 53 int8 levels for 1000 logits)."""
    from litert_torch.quantize import pt2e_quantizer_utils as qu
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        SharedQuantizationSpec,
    )

    keep = _not_in(tuple(float_layers))

    class Quantizer(PT2EQuantizer):
        def annotate(self, model):
            # PT2EQuantizer.annotate, with the float-layer filter applied to the propagation
            # to pass-through ops too (its own propagation would quantize a float pool)
            self._annotate_all_static_patterns(model, self.global_config, keep)
            for n in model.graph.nodes:
                if n.op != "call_function" or not keep(n):
                    continue
                ann = n.meta.get("quantization_annotation")
                if requantize_pool and str(n.target) in _POOLS and ann is not None:
                    ann.output_qspec = self.global_config.output_activation
                    continue
                prev = n.args[0] if n.args else None
                prev_ann = getattr(prev, "meta", {}).get("quantization_annotation")
                if (not qu._is_share_obs_or_fq_op(n.target) or prev_ann is None
                        or prev_ann.output_qspec is None or (ann is not None and ann._annotated)):
                    continue
                shared = SharedQuantizationSpec(prev)
                n.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={prev: shared}, output_qspec=shared, _annotated=True)
                if requantize_pool and str(n.target) in _POOLS:
                    n.meta["quantization_annotation"].output_qspec = self.global_config.output_activation
            _share_concat_ranges(model, keep, SharedQuantizationSpec)
            return model

    return Quantizer().set_global(config)


def _share_concat_ranges(model, keep: Callable[[Any], bool], shared_spec) -> None:
    """One int8 range for a channel concatenation *and the ops that produce its inputs*.

    litert-torch's ``cat`` annotator finds concatenations by their source partition, which
    the non-strict ``torch.export`` graph does not carry: the ``cat`` stays unannotated, so
    the PT2E simulation concatenates in float (each branch in its own range), while the
    converter writes an int8 CONCATENATION in the *first* input's range ("Missing
    quantization parameter on the output") and clips the other branches to it. On the CIFAR
    tiny SqueezeNet, expand3x3 outputs up to 6.4 were clipped at 3.2 (expand1x1's range) in
    every Fire whose expand3x3 spans more, and the file agreed with the float model on 92%
    of validation images while its simulation agreed on 99%. Here the first producer's
    observer is shared with the other producers (each of which feeds only the
    concatenation) and with the concatenation's output: one range that covers every branch,
    in the simulation and in the file alike, and nothing is requantized.
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    import torch.fx

    for n in model.graph.nodes:
        if n.op != "call_function" or n.target != torch.ops.aten.cat.default or not keep(n):
            continue
        ins = n.args[0] if n.args else ()
        if len(ins) < 2 or not all(isinstance(a, torch.fx.Node) for a in ins):
            continue
        anns = [a.meta.get("quantization_annotation") for a in ins]
        if (any(x is None or x.output_qspec is None for x in anns)
                or any(len(a.users) != 1 for a in ins[1:]) or len(set(ins)) != len(ins)):
            continue
        first = shared_spec(ins[0])
        for x in anns[1:]:
            x.output_qspec = first
        n.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={a: first for a in ins}, output_qspec=first, _annotated=True)


def _not_in(names: tuple[str, ...]) -> Callable[[Any], bool]:
    def keep(node) -> bool:
        paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
        return not any(p == n or p.startswith(n + ".") for p in paths for n in names)

    return keep


def _check_float_layers(model: nn.Module, float_layers: Sequence[str], converted) -> None:
    """The converter re-quantizes a float conv that sits alone between int8 ops (it fuses
    DEQUANTIZE -> conv -> QUANTIZE into an int8 conv). Float regions that reach the graph's
    input or output stay float, and so does a region of two or more convs in a row (a whole
    Fire module: its squeeze feeds float expands). Count the float convs in the file."""
    fb, fbu = _schema()
    kinds = (nn.Conv2d, nn.Linear)
    wanted = sum(isinstance(m, kinds) for n, m in model.named_modules()
                 if any(n == f or n.startswith(f + ".") for f in float_layers))
    if not wanted:
        return
    sg = converted.subgraphs[0]
    heavy = {fb.BuiltinOperator.CONV_2D, fb.BuiltinOperator.DEPTHWISE_CONV_2D,
             fb.BuiltinOperator.FULLY_CONNECTED}
    floats = sum(fbu.get_builtin_code_from_operator_code(converted.operatorCodes[op.opcodeIndex]) in heavy
                 and sg.tensors[op.inputs[0]].type == fb.TensorType.FLOAT32 for op in sg.operators)
    if floats < wanted:
        raise ExportError(f"float_layers: the file has {floats} float conv/linear ops, {wanted} were "
                          "asked for; the converter re-quantizes a lone float conv between int8 layers. "
                          "Keep float a whole block (e.g. a Fire module, features.3) or a region that "
                          "reaches the input or the output (e.g. the first conv, or the whole classifier)")


def quantize_pt2e(model: nn.Module, calib: torch.Tensor, *, method: str = "entropy",
                  percentile: float = 99.999, batch_size: int = 32,
                  float_layers: Sequence[str] = (), per_channel: bool = True,
                  requantize_pool: bool = False):
    """Calibrated PT2E int8 model (a GraphModule of quantize/dequantize + float ops that
    simulates the int8 file in torch) and the quantizer that made it.

    ``calib`` is float model input (N, C, H, W). ``method``: ``minmax`` (observed range),
    ``entropy`` (torch's HistogramObserver: the range minimising L2 quantization error over a
    2048-bin histogram, litert-torch's default; PyTorch's analogue of entropy calibration,
    not KL), ``percentile`` (clip both tails at ``percentile``). Weights: symmetric int8,
    per output channel if ``per_channel``. ``float_layers``: module names left in float.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calib.ndim != 4 or len(calib) == 0:
        raise ExportError(f"calibration input must be a non-empty (N, C, H, W) batch, got {tuple(calib.shape)}")
    check_float_layers(model, float_layers)
    # torch.export's module shares parameters with ``model``: copy, so that nothing done to
    # the quantized module (bias correction) leaks into the caller's float model
    model = copy.deepcopy(model).eval()
    quantizer = _quantizer(_quant_config(method, percentile, per_channel), float_layers, requantize_pool)
    what = type(model).__name__
    try:  # a dynamic batch lets calibration run in batches; fall back to one image at a time
        example = calib[:1].repeat(2, 1, 1, 1)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        gm = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False).module()
    except Exception:  # noqa: BLE001 - no dynamic batch for this model: calibrate one by one
        batch_size = 1
        try:
            gm = torch.export.export(model, (calib[:1],), strict=False).module()
        except Exception as exc:
            raise ExportError(f"torch.export cannot trace {what} for INT8 calibration: "
                              f"{_first_line(exc)}") from exc
    try:
        gm = prepare_pt2e(gm, quantizer)
        move_exported_model_to_eval(gm)
        with torch.no_grad():
            for i in range(0, len(calib), batch_size):
                gm(calib[i:i + batch_size])
        gm = convert_pt2e(gm, fold_quantize=False)
        move_exported_model_to_eval(gm)
        gm.training = False  # .eval() is disallowed on PT2E modules; litert-torch checks the flag
    except Exception as exc:
        raise ExportError(f"PT2E quantization of {what} failed: {_first_line(exc)}") from exc
    return gm, quantizer


def correct_bias(gm, model: nn.Module, calib: torch.Tensor, *, max_images: int = 64):
    """Empirical bias correction of a calibrated PT2E model ``gm``, in place; returns it.

    Quantization (rounding, and the clipping of a tight activation range) shifts the mean of
    each conv's output. Going through the convs in graph order, add to each bias (per output
    channel) the mean over images and positions of float output minus quantized output,
    measured with every earlier conv already corrected: correcting all at once overshoots,
    since a layer's shift is partly inherited from the layers before it. One pass over
    ``calib[:max_images]`` held as one batch (memory: that many images' activations).
    """
    from edgesqueeze.models.fold import fold_batchnorm
    from edgesqueeze.errors import ModelError

    conv = torch.ops.aten.conv2d.default
    try:  # PT2E folds BatchNorm into the conv: the float target is the folded conv's output
        model = fold_batchnorm(model).eval()
    except ModelError as exc:
        raise ExportError(f"bias correction: {exc}") from None
    modules = dict(model.named_modules())
    calib = calib[:max_images]
    targets = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != conv or len(node.args) < 3:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else None
        bias = node.args[2]
        if path in modules and getattr(bias, "op", None) == "get_attr":
            targets[node] = (path, bias.target)
    if not targets:
        return gm

    want: dict[str, torch.Tensor] = {}
    hooks = [modules[p].register_forward_hook(
        lambda mod, inp, out, p=p: want.__setitem__(p, out.detach().double().mean((0, 2, 3))))
        for p in {p for p, _ in targets.values()}]
    try:
        with torch.no_grad():
            model(calib)
    finally:
        for h in hooks:
            h.remove()

    def attr(target: str) -> torch.Tensor:
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    class Correct(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in targets:
                path, target = targets[n]
                delta = (want[path] - out.detach().double().mean((0, 2, 3))).to(out.dtype)
                bias = attr(target)
                bias.add_(delta.to(bias.dtype))
                out = out + delta.view(1, -1, 1, 1)  # what the corrected conv now outputs
            return out

    with torch.no_grad():
        Correct(gm).run(calib)
    return gm


# ---------------------------------------------------------------------------------------
# INT8 export


def export_tflite_int8(model: nn.Module, meta: dict[str, Any], out: str | os.PathLike,
                       calib_images: np.ndarray, *,
                       calibration: CalibrationConfig | None = None,
                       io: Literal["float", "int8"] = "float",
                       fold_normalization: bool = False,
                       float_layers: Sequence[str] = (),
                       requantize_pool: bool = True,
                       weight_rounding: Literal["nearest", "gptq"] = "gptq",
                       equalize: bool = False,
                       equalize_activations: float = 0.0,
                       bias_correction: bool = False,
                       augment: int = 0,
                       per_channel: bool = True,
                       source_sha256: str | None = None,
                       calibration_split: str = "train",
                       calibration_seed: int | None = None) -> Path:
    """Write a full-integer ``.tflite``: int8 weights (symmetric, per output channel) and
    int8 activations with ranges calibrated on ``calib_images`` (uint8 NCHW, all of them;
    pick them with ``_common.calibration_images``).

    ``calibration``: the observer (``method``: minmax / entropy / percentile, see
    :func:`quantize_pt2e`) and batch size; ``images`` is not used here (the caller chose).
    Without one: ``auto``, i.e. ``minmax`` (see :class:`CalibrationConfig`).
    ``io``: ``"float"`` - float32 in and out (QUANTIZE / DEQUANTIZE ops at the edges);
    ``"int8"`` - int8 in and out, quantize the input with the input tensor's scale and zero
    point. ``float_layers``: module names kept float (mixed precision); only regions that
    reach the graph's input or output can stay float (the converter re-quantizes a float op
    between int8 ones, which raises ExportError here).
    ``requantize_pool`` (default on): a global average pool gets its own int8 range instead
    of its input's; it took SqueezeNet 1.0's top-1 agreement with fp32 from 87% to 92% at no
    cost (all ops stay int8). ``weight_rounding="gptq"`` (default) rounds the int8 weights
    with GPTQ on the calibration images (:func:`gptq_round`): on SqueezeNet 1.0 int8 weights
    alone cost 11 points of agreement with nearest rounding and 2 with GPTQ; "nearest" is
    litert-torch's. ``equalize_activations``: activation equalization with that ``alpha``
    before GPTQ (0: off; :func:`~edgesqueeze.export.prepare.equalize_activations`).
    ``bias_correction``: empirical bias correction of the calibrated model
    (:func:`correct_bias`, on at most 64 calibration images) before conversion.
    ``equalize``: cross-layer equalization first; ``augment``: add
    that many flipped / cropped copies of each calibration image (neither helped SqueezeNet;
    see the benchmark). Raises ExportError like :func:`export_tflite`.
    """
    calibration = (calibration or CalibrationConfig()).resolved("tflite-int8")
    if io not in ("float", "int8"):
        raise ExportError(f"io must be 'float' or 'int8', got {io!r}")
    if weight_rounding not in ("nearest", "gptq"):
        raise ExportError(f"weight_rounding must be 'nearest' or 'gptq', got {weight_rounding!r}")
    images = np.asarray(calib_images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ExportError(f"calibration images must be a non-empty uint8 (N, C, H, W) array, "
                          f"got {images.dtype} {images.shape}")
    if not 0 <= equalize_activations <= 1:
        raise ExportError(f"equalize_activations must be in [0, 1] (0: off), got {equalize_activations}")
    check_float_layers(model, float_layers)
    info = {"images": len(images), "method": calibration.method, "split": calibration_split,
            "seed": calibration_seed, "augment": int(augment), "equalize": bool(equalize),
            "equalize_activations": float(equalize_activations),
            "bias_correction": bool(bias_correction), "float_layers": list(float_layers), "requantize_pool": bool(requantize_pool),
            "weight_rounding": weight_rounding,
            "weights": "per-channel" if per_channel else "per-tensor"}
    if calibration.method == "percentile":
        info["percentile"] = calibration.percentile
    art = _artifact(model, meta, "tflite-int8", fold_normalization, calibration=info,
                    source_sha256=source_sha256)
    if tuple(images.shape[1:]) != tuple(art["input_shape"]):
        raise ExportError(f"calibration images are {tuple(images.shape[1:])}, the model takes "
                          f"{tuple(art['input_shape'])}")
    module = _wrap(equalize_cross_layer(model) if equalize else model, art, fold_normalization)
    prefix = "model." if fold_normalization else ""
    images = augment_calibration(images, augment, seed=calibration_seed or 0)
    calib = torch.from_numpy(to_input(images, art["mean"], art["std"], normalize=not fold_normalization))
    if equalize_activations:
        module = prepare.equalize_activations(module, calib, alpha=equalize_activations,
                                              batch_size=calibration.batch_size)
    reference = module  # bias correction pulls toward the function before any rounding
    if weight_rounding == "gptq":
        if not per_channel:
            raise ExportError("weight_rounding='gptq' rounds onto the per-channel grid; use per_channel=True")
        module = gptq_round(module, calib, batch_size=calibration.batch_size,
                            skip=[prefix + n for n in float_layers])
    gm, quantizer = quantize_pt2e(module, calib, method=calibration.method,
                                  percentile=calibration.percentile, batch_size=calibration.batch_size,
                                  float_layers=[prefix + n for n in float_layers], per_channel=per_channel,
                                  requantize_pool=requantize_pool)
    if bias_correction:
        correct_bias(gm, reference, calib)
    from litert_torch.quantize.quant_config import QuantConfig

    content = _convert(gm, calib[:1], type(model).__name__ + " (int8)",
                       quant_config=QuantConfig(pt2e_quantizer=quantizer))
    data = _finalize(content, lambda dtype: {**art, "input_dtype": dtype}, float_io=io == "float")
    converted = _schema()[1].read_model_from_bytearray(bytearray(data))
    if io == "int8" and _io_dtype(converted) != "int8":
        raise ExportError(f"io='int8': the converted input is {_io_dtype(converted)} (is the first "
                          "layer in float_layers?); use io='float'")
    _check_float_layers(model, float_layers, converted)
    out = Path(out)
    write_bytes_atomic(out, data)
    return out
