"""ONNX INT8 export: ``export_onnx_int8`` and the QDQ quantization it is made of.

About 600 lines on purpose: every pass here (quantization, uint8 weights, bias correction,
compaction) edits the same QDQ graph by onnxruntime's naming conventions, in the one order
:func:`quantize_int8_graph` applies them; split, each part would need the others' internals.

INT8: ``onnxruntime.quantization.quantize_static`` in QDQ form, weights int8 symmetric per
output channel, activations **uint8** asymmetric per tensor, calibrated on given images, then
empirical bias correction. Measured with ``benchmarks/onnx_int8.py`` on the ImageNet SqueezeNet
1.0 (224x224, batch 1, 2 threads; results in ``benchmarks/results/onnx_int8.json``, each
record naming its CPU):

- **Same results on every CPU: uint8 weights by default** (``target="any-cpu"``). ORT's
  x86 uint8 x int8 kernels on CPUs without VNNI (AVX2 only, AVX-512 without VNNI: many CI
  runners and older servers) add pairs of products in 16 bits with saturation
  (``vpmaddubsw``): 255 x 127 x 2 overflows int16, so an int8-weight file computes different
  logits there than on VNNI x86 or ARM, whose kernels are exact. The default file stores the
  same symmetric 8-bit weights (-127..127) as uint8 with zero point 128; onnxruntime then runs
  its uint8 x uint8 kernels, which widen to 16 bits before multiplying on every x86 level
  (AVX2, AVX-512, AVX-VNNI-INT8) and use ``udot``/widening multiplies on ARM: exact
  everywhere, with the full 8-bit weight grid. On the digits SqueezeNet the optimized session
  on an AVX2-only host agreed 100% on top-1 with the QDQ graph's own arithmetic, against 94%
  (logits up to 6.3 apart) with int8 weights. 7-bit int8 weights (onnxruntime's
  ``reduce_range``, ``weights="int8-7bit"``) give the same guarantee but cost ImageNet
  SqueezeNet 2.75 points of agreement with fp32 (``benchmarks/results/onnx_int8.json``);
  ``target="any-cpu-7bit"`` exports them for models that hold their accuracy on that grid,
  since they run onnxruntime's uint8 x int8 kernels, faster than uint8 x uint8 on every x86
  (the digits demo: 0.98-1.02x fp32's time where ``any-cpu`` takes 1.28x on AVX2 kernels,
  1.56x with VNNI; benchmarks/notes.md, session 34).
  ``target="vnni-or-arm"`` keeps
  int8 weights, whose VNNI kernels (``vpdpbusd``) are faster than the uint8 x uint8 ones on
  VNNI x86; the file records it and ``verify`` warns when it runs on a CPU that saturates.
- **Why uint8 activations** (ORT's default is int8): ORT's CPU provider fuses
  ``DQ -> Conv -> Q`` into an integer ``QLinearConv`` only for uint8 activations on x86
  (int8 x int8 fusion is an ARM default). With int8 activations 24 of 26 convs run as float
  convs on dequantized tensors, amid 98 Q/DQ nodes and NCHW/NHWC transposes, and the max
  pools run as a slow NCHW kernel: 1.3-1.5x *slower* than fp32. With uint8 activations all 26
  convs are ``QLinearConv``, the ReLUs fold into the requantization and the graph runs in
  NHWC: 0.4x fp32's time (AVX-512 VNNI). (Turning on ORT's ``session.qdqisint8allowed`` for
  the int8 file is worse still: its x86 int8 x int8 kernels are 2.5x slower than fp32.)
  Per-tensor vs per-channel weights, QOperator vs QDQ and ``quant_pre_process`` change
  nothing measurable; graph optimization level ``ORT_ENABLE_ALL`` (the default: it adds the
  NHWC layout) matters.
- **Bias correction** (:func:`correct_biases`, default on): agreement with fp32 top-1 on
  held-out images 88 -> 90-91%, logit SQNR +1.3 dB; no runtime cost.
- **Mixed precision** (``float_layers``): SqueezeNet's error comes from its first layers;
  ``["features.0", "features.3", "features.4"]`` (stem and first two Fires float, 29% of
  the MACs) with bias correction reaches 97% agreement and fp32's top-1 within one image, at
  0.55x fp32's time. Not a default: which layers matter is model-specific.
- **GPTQ weights and activation equalization** (``weight_rounding="gptq"``,
  ``equalize_activations``; :mod:`edgesqueeze.export.prepare`): with the mixed precision
  above, KL to fp32 0.0088 -> 0.0044 and agreement 95.5% -> 97.3% (4 random 2-fold splits;
  all int8: KL 0.030 -> 0.016). Not defaults: measured on this model only.
- **Where an all-int8 file loses** (session 23, the 490 KB ImageNet ``.esq``, graph
  surgery on the QDQ file): the stem's int8 weights (GPTQ on the stem's own shared values,
  ``weight_rounding="gptq"`` with ``gptq_layers``, recovers most of it: held-out KL 0.046 ->
  0.029, same bytes) and the activation ranges, above all Fire 1's squeeze output: ``mse``
  ranges (:func:`mse_range`) took the all-int8 KL from 0.035 to 0.024, and a 0.6-0.7x range
  on that one tensor alone does as much. **Concats** (``share_concats``,
  :func:`share_concat_ranges`): onnxruntime's ``QLinearConcat`` requantizes each input
  through a lookup table unless it already has the output's scale: 0.6-0.7 ms of a 3.7 ms
  int8 run (VNNI x86, 1 thread); shared ranges make it a copy, 1.91x -> 2.23x fp32's speed
  with the same agreement on six held-out halves.
- Did not help: cross-layer equalization (``equalize``; with per-channel weights it only
  moves range imbalance into the activations: 88 -> 83%, 89% with bias correction),
  augmented calibration images. Calibration method with the stem and two Fires float:
  minmax and percentile the same agreement; ``entropy`` (2048 bins) clips the class-score
  maps and scores 1-2% top-1; ``mse`` lowers held-out KL on six halves (0.0146 -> 0.0104)
  at the same agreement.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesqueeze.config.export import CalibrationConfig
from edgesqueeze.errors import ExportError
from edgesqueeze.export import prepare
from edgesqueeze.export._common import META_KEY, check_calibration_shape, check_float_layers, meta_json, to_input
from edgesqueeze.export._common import first_line as _first_line
from edgesqueeze.export.onnx import (
    _WEIGHTED,
    INPUT_NAME,
    _artifact,
    _quiet,
    _write,
    onnx_graph,
    own_onnx_graph,
)

__all__ = ["export_onnx_int8", "quantize_int8_graph", "quantize_qdq", "correct_biases", "compact_qdq",
           "weights_to_uint8", "share_concat_ranges", "mse_range", "INT8_TARGETS", "WEIGHT_TYPES"]

# onnx-int8 targets: which CPUs compute the file exactly, and the weights' storage type
# (both hold symmetric 8-bit weights, -127..127, per output channel).
# any-cpu: uint8 with zero point 128 (uint8 x uint8 kernels), exact on x86 with or without
#   VNNI and on ARM.
# vnni-or-arm: int8 (uint8 x int8 kernels), exact on x86 with VNNI and on ARM; x86 without
#   VNNI saturates.
# any-cpu-7bit: int8 -64..64 (onnxruntime's reduce_range: uint8 x int8 kernels, whose int16
#   pair sums cannot saturate: 255 x 64 x 2 < 32768), exact everywhere and the fastest x86
#   kernels, on a coarser weight grid.
INT8_TARGETS = {"any-cpu": "uint8", "any-cpu-7bit": "int8-7bit", "vnni-or-arm": "int8"}
WEIGHT_TYPES = ("uint8", "int8", "int8-7bit")


class _Reader:
    """``CalibrationDataReader`` over a float32 array, in batches (the batch is dynamic)."""

    def __init__(self, x: np.ndarray, batch_size: int) -> None:
        self.x, self.batch_size, self.i = x, batch_size, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        batch = self.x[self.i:self.i + self.batch_size]
        self.i += self.batch_size
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.i = 0


def _matching_nodes(proto, layers: Sequence[str]) -> list[str]:
    """ONNX node names inside the torch modules ``layers`` (a module covers its children:
    ``features.3`` is the whole Fire). An unknown name is an ExportError with a suggestion."""
    import difflib

    names = [n.name for n in proto.graph.node]
    out: list[str] = []
    for layer in layers:
        hits = [n for n in names if n == layer or n.startswith(layer + ".") or n.startswith(layer + "/")]
        if not hits:
            convs = [n.name for n in proto.graph.node if n.op_type in _WEIGHTED]
            close = difflib.get_close_matches(layer, convs, n=1)
            tip = f"; did you mean '{close[0]}'?" if close else ""
            raise ExportError(f"float_layers: '{layer}' has no node in the exported graph (a module "
                              f"that does nothing in eval mode, like Dropout?){tip}")
        out += [h for h in hits if h not in out]
    # A float conv's ReLU and max pool stay float with it: quantized after the conv, the
    # pool would run as ORT's uint8 NCHW MaxPool (16 ms on the ImageNet stem, measured)
    # instead of the float NCHWc one (0.5 ms); the first quantized conv then quantizes.
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    by_name = {n.name: n for n in proto.graph.node}
    for name in list(out):
        node = by_name[name]
        while node.op_type in _WEIGHTED + _FLOAT_FOLLOWERS:
            nxt = consumers.get(node.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in _FLOAT_FOLLOWERS:
                break
            node = nxt[0]
            if node.name not in out:
                out.append(node.name)
    return out


_FLOAT_FOLLOWERS = ("Relu", "Clip", "MaxPool")


def _session(model_bytes: bytes, *, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _channel_means(proto, tensors: Sequence[str], x: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of the named tensors over ``x``, run by ONNX Runtime.

    The graph is cut after the tensors (nothing downstream runs) and the tensors become its
    outputs; ORT's optimizations stay on, so everything upstream runs as it will in
    deployment (integer kernels) and only the probed nodes stay unfused."""
    import onnx

    wanted = list(dict.fromkeys(tensors))
    try:
        probe = onnx.utils.Extractor(proto).extract_model([INPUT_NAME], wanted)
    except Exception:  # noqa: BLE001 - shape inference found no type for a tensor (some exporters)
        # Then the whole graph runs, the probed tensors added as outputs of any shape.
        probe = copy.deepcopy(proto)
        have = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                  for t in wanted if t not in have)
    sess = _session(probe.SerializeToString(), threads=os.cpu_count() or 1)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(x), batch_size):
        for t, v in zip(wanted, sess.run(wanted, {INPUT_NAME: x[i:i + batch_size]})):
            axes = (0,) + tuple(range(2, v.ndim))
            sums[t] = sums.get(t, 0) + v.sum(axis=axes, dtype=np.float64)
            counts[t] = counts.get(t, 0) + v.size // v.shape[1]
    return {t: sums[t] / counts[t] for t in wanted}


def _conv_outputs(qproto) -> list[tuple[str, str, str, str]]:
    """``(node name, output tensor, int32 bias initializer, bias scale initializer)`` for every
    conv of a QDQ graph whose bias is a quantized initializer, in graph (topological) order.
    The output tensor is the conv's own (pre-activation): when the quantizer drops a ReLU
    into the requantization, the conv's output takes over the ReLU's tensor name."""
    producers = {o: n for n in qproto.graph.node for o in n.output}
    inits = {i.name for i in qproto.graph.initializer}
    out = []
    for node in qproto.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3:
            continue
        dq = producers.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        out.append((node.name, node.output[0], dq.input[0], dq.input[1]))
    return out


def _conv_levels(proto, convs: Sequence[str]) -> list[list[str]]:
    """Group conv node names by depth: a conv's level is one more than the deepest conv
    upstream of it. Convs of one level do not feed each other, so their biases can be
    corrected together (a Fire's expand1x1 and expand3x3 share a level)."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    wanted = set(convs)
    memo: dict[str, int] = {}

    def depth(node) -> int:  # deepest conv level at or above node's output
        if node.name in memo:
            return memo[node.name]
        memo[node.name] = 0  # cycle guard (ONNX graphs are acyclic)
        above = max((depth(producers[i]) for i in node.input if i in producers), default=0)
        memo[node.name] = above + (1 if node.name in wanted else 0)
        return memo[node.name]

    by_level: dict[int, list[str]] = {}
    for node in proto.graph.node:
        if node.name in wanted:
            by_level.setdefault(depth(node), []).append(node.name)
    return [by_level[k] for k in sorted(by_level)]


def correct_biases(qproto, fproto, x: np.ndarray, *, batch_size: int = 32) -> int:
    """Empirical bias correction (Nagel et al. 2019) of a QDQ graph, in place.

    Quantization shifts each conv's mean output. For every conv with an int32 bias, the
    per-channel mean of its output in the quantized graph (run by ONNX Runtime with the Q/DQ
    arithmetic explicit) is compared with the same conv's output in the fp32 graph
    ``fproto`` on the calibration inputs ``x``, and the difference is subtracted from the
    bias, in units of the bias scale so that it stays exactly representable. Layers are
    corrected in network order, each with everything upstream already corrected (one run
    of the graph per depth level): correcting all layers from one run would count each
    upstream shift twice. Returns the number of convs corrected.

    Example: a conv whose quantized output averages 0.30 above fp32 on channel 0, with bias
    scale 0.01, gets 30 subtracted from its int32 bias on channel 0.
    """
    from onnx import numpy_helper

    # The fp32 twin of each conv is the node of the same name (the quantizer keeps names);
    # compare the conv outputs themselves, before any activation, in both graphs.
    fp_out = {n.name: n.output[0] for n in fproto.graph.node if n.op_type == "Conv"}
    convs = {c[0]: c for c in _conv_outputs(qproto) if c[0] in fp_out}
    if not convs:
        return 0
    ref = _channel_means(fproto, [fp_out[name] for name in convs], x, batch_size)
    inits = {i.name: i for i in qproto.graph.initializer}
    for level in _conv_levels(qproto, list(convs)):
        got = _channel_means(qproto, [convs[name][1] for name in level], x, batch_size)
        for name in level:
            _, out, bias_name, scale_name = convs[name]
            bias = numpy_helper.to_array(inits[bias_name]).astype(np.int64)
            scale = np.broadcast_to(numpy_helper.to_array(inits[scale_name]).astype(np.float64), bias.shape)
            shift = got[out] - ref[fp_out[name]]
            step = np.rint(np.divide(shift, scale, out=np.zeros_like(scale), where=scale > 0))
            new = np.clip(bias - step.astype(np.int64), -(2 ** 31) + 1, 2 ** 31 - 1).astype(np.int32)
            inits[bias_name].CopyFrom(numpy_helper.from_array(new, bias_name))
    return len(convs)


def share_concat_ranges(proto) -> int:
    """Quantize every input of a quantized ``Concat`` in the concat's own range, in place:
    each input's ``QuantizeLinear`` / ``DequantizeLinear`` pair takes the scale and zero point
    of the ``QuantizeLinear`` after the concat (the tensor that feeds only the concat). Then
    onnxruntime's ``QLinearConcat`` copies bytes instead of requantizing each input through a
    lookup table; the producing convs requantize into the shared range for free. Returns how
    many inputs changed.

    Example: a Fire module's expand1x1 (range 0-900) and expand3x3 (0-1,900) outputs both
    get the concat's 0-1,900: a coarser step for expand1x1, and no requantization pass over
    the 128-channel output. On ImageNet SqueezeNet 1.0 (AVX-512 VNNI, 1 thread) the concats
    took 0.6-0.7 ms of a 3.7 ms int8 run (benchmarks/notes.md, session 23)."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    changed = 0
    for node in graph.node:
        if node.op_type != "Concat":
            continue
        after = [c for c in consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"]
        if len(after) != 1 or len(after[0].input) < 3:
            continue
        scale, zero = after[0].input[1], after[0].input[2]
        for tensor in node.input:
            dq = producer.get(tensor)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if (q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or len(dq.input) < 3
                    or len(consumers.get(q.output[0], [])) != 1 or len(consumers.get(tensor, [])) != 1):
                continue
            if (q.input[1], q.input[2]) != (scale, zero):
                q.input[1], q.input[2] = scale, zero
                dq.input[1], dq.input[2] = scale, zero
                changed += 1
    return changed  # the inputs' own scales, now unread, go with compact_qdq's unused initializers


_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile",
            "mse": "MinMax"}  # mse: our ranges (_mse_ranges), handed to quantize_static as minmax ones
_BIAS_IMAGES = 128  # calibration images that bias correction runs on (the first ones)


def name_nodes(proto) -> int:
    """Give every unnamed node of ``proto`` a unique name, in place (``Conv_17``): the
    quantizer keeps node names, and bias correction and ``float_layers`` find a conv's fp32
    twin and its module by them, whatever the exporter named (or did not name). Returns the
    number of nodes named."""
    taken = {n.name for n in proto.graph.node if n.name}
    named = 0
    for i, node in enumerate(proto.graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
        named += 1
    return named


def quantize_qdq(fproto, x: np.ndarray, *, calibration: CalibrationConfig,
                 float_nodes: Sequence[str] = (), per_channel: bool = True,
                 weights: str = "uint8", activation_type: str = "uint8"):
    """``quantize_static`` of ``fproto`` (fp32, input ``"input"``) in QDQ form, calibrated on
    the float inputs ``x``; returns the quantized ModelProto. Weights symmetric 8-bit (per
    output channel with ``per_channel``) stored as ``weights``: ``"uint8"`` (zero point 128,
    exact on every CPU), ``"int8"``, or ``"int8-7bit"`` (onnxruntime's ``reduce_range``,
    -64..64); see ``INT8_TARGETS``. Activations ``activation_type`` per tensor."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}.get(activation_type)
    if act is None:
        raise ExportError(f"activation_type must be 'uint8' or 'int8', got {activation_type!r}")
    if weights not in WEIGHT_TYPES:
        raise ExportError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, got {weights!r}")
    calibration = calibration.resolved("onnx-int8")
    name_nodes(fproto)  # bias correction pairs each quantized conv with its fp32 twin by name
    extra: dict[str, Any] = {}
    if calibration.method == "percentile":
        extra["CalibPercentile"] = float(calibration.percentile)
    method = getattr(CalibrationMethod, _METHODS[calibration.method])
    with tempfile.TemporaryDirectory(prefix="edgesqueeze-onnx-") as tmp, _quiet():
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fproto.SerializeToString())
        reader, cache = _Reader(x, calibration.batch_size), None
        if calibration.method in ("percentile", "mse"):  # histogram methods: see _equal_batches
            reader = _Reader(x, _equal_batches(len(x), calibration.batch_size))
        try:
            if calibration.method == "entropy":
                cache, reader = _entropy_ranges(src, reader, Path(tmp)), None
            elif calibration.method == "mse":
                cache, reader = _mse_ranges(src, reader, Path(tmp)), None
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=weights == "int8-7bit",
                            activation_type=act, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(float_nodes), calibrate_method=method,
                            extra_options=extra, calibration_cache_path=cache)
        except Exception as exc:  # ORT raises plain Exceptions of many kinds
            raise ExportError(f"onnxruntime quantization failed: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from exc
        proto = onnx.load(str(dst))
    if weights == "uint8":
        weights_to_uint8(proto)
    return proto


def weights_to_uint8(proto) -> int:
    """Store every int8 constant that a ``DequantizeLinear`` reads (the weights) as uint8
    ``q + 128`` with zero point 128, in place; returns how many. The dequantized values are
    bit for bit the same, so the graph computes the same function, but onnxruntime now runs
    its uint8 x uint8 kernels, which are exact on every CPU (``INT8_TARGETS``). The zero
    points are per channel (onnxruntime refuses a scalar one beside per-channel scales), one
    initializer per shape, shared by every weight of that shape: a few hundred bytes on a
    SqueezeNet instead of one byte per output channel of every layer."""
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    shared: dict[tuple[int, ...], str] = {}
    done = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = inits[node.input[0]]
        if w.data_type != TensorProto.INT8 and node.input[0] not in done:
            continue
        if node.input[0] not in done:
            q = numpy_helper.to_array(w).astype(np.int16)
            w.CopyFrom(numpy_helper.from_array((q + 128).astype(np.uint8), node.input[0]))
            done.add(node.input[0])
        shape = tuple(numpy_helper.to_array(inits[node.input[1]]).shape)
        if shape not in shared:
            name = "zp128" + "".join(f"/{d}" for d in shape)
            graph.initializer.append(numpy_helper.from_array(np.full(shape, 128, np.uint8), name))
            shared[shape] = name
        if len(node.input) == 3:
            node.input[2] = shared[shape]
        else:
            node.input.append(shared[shape])
    used = {x for node in graph.node for x in node.input}
    kept = [t for t in graph.initializer if t.name in used or t.data_type != TensorProto.INT8]
    del graph.initializer[:]
    graph.initializer.extend(kept)  # the int8 zero points the uint8 ones replaced
    return len(done)


# onnxruntime's quantizer names every tensor it adds by appending a role to the original
# name; shorter roles say the same (weights keep their torch module path).
_SUFFIXES = (("_DequantizeLinear_Output", "/dq"), ("_QuantizeLinear_Output", "/q"),
             ("_quantized_scale", "/s"), ("_quantized_zero_point", "/zp"), ("_quantized", "/i8"),
             ("_zero_point", "/zp"), ("_scale", "/s"),
             (".weight_bias", ".b"), (".weight", ".w"), (".bias", ".b"))


def _bias_scales_as_products(proto) -> int:
    """Replace each int32 bias's scale initializer (one float per output channel) by a
    ``Mul`` of the scales it is made of, the input activation's and the weights', where that
    product is bit for bit the stored one (onnxruntime's quantizer multiplies them in float32,
    as ``Mul`` does); returns how many. onnxruntime's constant folding turns the ``Mul`` back
    into an initializer before it fuses the convs, so the fused graph is the same; the file
    loses 4 bytes per output channel and gains one ~60-byte node per layer (MNIST
    SqueezeNet: about 2 KB)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def dq_scale(tensor: str) -> str | None:
        node = producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            return None
        return node.input[1]

    new_nodes, done = {}, set()
    for node in graph.node:
        if not (node.op_type == "DequantizeLinear" and node.input[0] in inits
                and inits[node.input[0]].data_type == TensorProto.INT32 and node.input[1] in inits):
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type not in ("Conv", "Gemm") or len(users[0].input) < 3:
            continue
        sx, sw = dq_scale(users[0].input[0]), dq_scale(users[0].input[1])
        scale = node.input[1]
        if sx is None or sw is None or scale in done or len(consumers.get(scale, [])) != 1:
            continue
        want = numpy_helper.to_array(inits[scale])
        got = (numpy_helper.to_array(inits[sx]).astype(np.float32) * numpy_helper.to_array(inits[sw]).astype(np.float32))
        if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
            continue
        new_nodes[id(node)] = helper.make_node("Mul", [sx, sw], [scale])
        done.add(scale)
    if not done:
        return 0
    order = []
    for node in graph.node:  # each Mul just before the DequantizeLinear that reads it
        if id(node) in new_nodes:
            order.append(new_nodes[id(node)])
        order.append(node)
    del graph.node[:]
    graph.node.extend(order)
    kept = [t for t in graph.initializer if t.name not in done]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(done)


def compact_qdq(proto) -> None:
    """Drop what a QDQ file carries for nothing, in place; the graph computes the same.

    On the MNIST SqueezeNet (70 k weights) this is 18 KB of a 120 KB file, the difference
    between over and under a 100 KB budget: (1) zero points of constant weights and biases
    that are all zero (symmetric int8 weights, int32 biases): DequantizeLinear's zero point
    is optional and defaults to 0; (2) the quantizer's long tensor names
    (``features.3.squeeze.weight_DequantizeLinear_Output`` -> ``features.3.squeeze.w/dq``);
    (3) node names (optional in ONNX; the tensors they read and write keep the torch module
    paths, and onnxruntime names nodes itself); (4) ``value_info``, the shape annotations of
    intermediate tensors, which onnxruntime infers itself; (5) each bias's scale vector,
    which is the input's scale times the weights' scales (:func:`_bias_scales_as_products`).
    ORT still fuses every ``DQ -> Conv -> Q`` into ``QLinearConv`` (a test checks it)."""
    from onnx import TensorProto, numpy_helper

    _bias_scales_as_products(proto)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in inits:
            zp = inits.get(node.input[2])
            if (zp is not None and zp.data_type in (TensorProto.INT8, TensorProto.INT32)
                    and not numpy_helper.to_array(zp).any()):
                del node.input[2]
    used = {x for node in graph.node for x in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)

    def short(name: str, table) -> str:
        for long, role in table:
            name = name.replace(long, role)
        return name

    io = {v.name for v in graph.input} | {v.name for v in graph.output}
    names = {t.name for t in graph.initializer}
    names |= {x for node in graph.node for x in [*node.input, *node.output] if x and x not in io}
    # A quantized weight takes its weight's name (the float weight is gone); where that
    # clashes (a bias's int32 values and the DQ output both derive from one name), "/i8".
    first = {x: short(x, (("_quantized", ""), *_SUFFIXES)) for x in names}
    taken = [*first.values(), *io]
    renamed = {x: (y if taken.count(y) == 1 else short(x, _SUFFIXES)) for x, y in first.items()}
    if len(set(renamed.values()) | io) != len(renamed) + len(io):  # still a clash: keep all
        renamed = {}
    for t in graph.initializer:
        t.name = renamed.get(t.name, t.name)
    for node in graph.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
        node.output[:] = [renamed.get(x, x) for x in node.output]
        node.name = ""
    del graph.value_info[:]


def _equal_batches(n: int, batch_size: int) -> int:
    """The largest batch size up to ``batch_size`` that divides ``n`` images. onnxruntime's
    histogram calibrators (entropy, percentile) stack the outputs of all batches with
    ``np.asarray``: batches of unequal size (50 images in batches of 32) make that fail."""
    return max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)


def _histograms(src: Path, reader: _Reader, tmp: Path, **options):
    """onnxruntime's entropy calibrator after collecting 2048-bin histograms of every tensor
    the quantizer will quantize (``calibrator.collector.histogram_dict``), over ``reader``'s
    images in equal batches; ``options``: more of its ``extra_options``."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(src, list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                   augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": 2048, **options})
    calibrator.collect_data(_Reader(reader.x, _equal_batches(len(reader.x), reader.batch_size)))
    return calibrator


def _entropy_ranges(src: Path, reader: _Reader, tmp: Path) -> Path:
    """Entropy (KL, TensorRT-style) activation ranges, saved as a calibration cache.

    ``quantize_static`` cannot do this itself: it builds the entropy histogram with 128
    bins and searches thresholds over 128 quantized bins, which leaves one candidate, the
    full range: its "entropy" ranges equal minmax's (checked: identical scales), and it
    does not pass on a bin count. So calibrate here with TensorRT's 2048 bins."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    calibrator = _histograms(src, reader, tmp, num_quantized_bins=128)
    # its own threshold search, with the same result ~10x sooner (24 s of 26 on digits)
    calibrator.collector.get_entropy_threshold = functools.partial(entropy_threshold, calibrator.collector)
    cache = tmp / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def entropy_threshold(collector, histogram, num_quantized_bins: int):
    """``HistogramCollector.get_entropy_threshold`` of onnxruntime (TensorRT's KL threshold
    search) with the same result, bit for bit: its integer work (the outlier sums, merging
    the sliced histogram into ``num_quantized_bins`` bins and expanding them back) done with
    cumulative sums and reshapes instead of Python loops and ``sum()`` over numpy slices,
    which took 0.3-0.5 s per tensor at 2048 bins; its float work (``smooth_distribution``,
    ``entropy``) is still its own functions, candidate by candidate, so the KL values and
    their argmin are its own. A histogram of non-integer counts goes to onnxruntime's method
    (float sums in another order could differ in the last bit). ``collector``: the
    ``HistogramCollector``."""
    from onnxruntime.quantization.calibrate import HistogramCollector, entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, edges = histogram[0], histogram[1]
    if not np.issubdtype(hist.dtype, np.integer):
        return HistogramCollector.get_entropy_threshold(collector, histogram, num_quantized_bins)
    num_bins = hist.size
    zero = num_bins // 2
    half_q = num_quantized_bins // 2
    dtype = edges.dtype
    cum = np.concatenate([np.zeros(1, hist.dtype), np.cumsum(hist)])  # cum[k] = sum(hist[:k]), exact
    kl = np.zeros(zero - half_q + 1)
    thresholds = []
    for k, i in enumerate(range(half_q, zero + 1)):
        start, end = zero - i, min(zero + i + 1, num_bins)
        thresholds.append((edges[start], edges[end]))
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += cum[start]
        p[-1] += cum[-1] - cum[end]
        merged = sliced.size // num_quantized_bins
        body = num_quantized_bins * merged
        quantized = sliced[:body].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[body:].sum()
        norm = (p[:body] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = np.where(norm != 0, quantized / np.maximum(norm, 1), 0.0)  # float64, as int / int
        q[:body] = np.repeat(spread, merged).astype(np.int64)  # truncated, as numpy assigns a float to int64
        p, q = smooth_distribution(p), smooth_distribution(q)
        kl[k] = np.inf if p is None or q is None else np.array(entropy(p, q), dtype=dtype)
    lo, hi = thresholds[int(np.argmin(kl))]
    if lo < histogram[2]:
        lo = histogram[2]
    if hi > histogram[3]:
        hi = histogram[3]
    return lo, hi


def mse_range(counts: np.ndarray, edges: np.ndarray, lo: float, hi: float, *,
              steps: int = 100, levels: int = 256) -> tuple[float, float]:
    """The range ``(f * lo', f * hi')`` (``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``, as
    onnxruntime widens a range to hold zero) with ``f`` in ``1/steps .. 1`` that minimizes
    the mean squared error of quantizing a tensor with histogram ``counts`` over ``edges``
    (bin centers stand for their values) onto ``levels`` asymmetric levels: clipping a few
    large values in exchange for a finer step for all the others, where that pays.

    Example: a ReLU output whose values are mostly under 300 but reach 3,000 on a few pixels
    gets a range well under 3,000, where a 99.999th percentile keeps nearly all of it."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    counts = np.asarray(counts, np.float64)
    if hi - lo <= 0 or counts.sum() == 0:
        return lo, hi
    edges = np.asarray(edges, np.float64)
    width = float(np.max(np.diff(edges)))
    v = 0.5 * (edges[:-1] + edges[1:])
    v, counts = v[counts > 0], counts[counts > 0]
    f = np.arange(1, steps + 1, dtype=np.float64)[:, None] / steps  # candidates x 1
    scale = f * (hi - lo) / (levels - 1)
    zp = np.round(-f * lo / scale)
    q = (np.clip(np.round(v[None, :] / scale) + zp, 0, levels - 1) - zp) * scale
    # a bin's values spread over its width: inside the range, a step finer than the bin
    # errs by step^2 / 12 on them (its center alone could fall on a level and err by 0)
    inside = (v[None, :] >= f * lo) & (v[None, :] <= f * hi)
    sq = np.where(inside & (scale < width), scale ** 2 / 12, (q - v[None, :]) ** 2)
    err = (sq * counts[None, :]).sum(1)
    best = float(f[int(np.argmin(err)), 0])
    return best * lo, best * hi


def _mse_ranges(src: Path, reader: _Reader, tmp: Path) -> Path:
    """MSE-optimal activation ranges (:func:`mse_range`), one per tensor, from 2048-bin
    histograms that onnxruntime's histogram calibrator collects, saved as a calibration
    cache of plain ranges (``quantize_static`` then runs as for minmax)."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    calibrator = _histograms(src, reader, tmp)
    ranges = {}
    for name, (counts, edges, lo, hi, *_) in calibrator.collector.histogram_dict.items():
        a, b = mse_range(counts, edges, lo, hi)
        ranges[name] = TensorData(lowest=np.float32(a), highest=np.float32(b))
    cache = tmp / "ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
    return cache


def export_onnx_int8(model: nn.Module, meta: dict[str, Any], out: str | os.PathLike,
                     calib_images: np.ndarray, *,
                     calibration: CalibrationConfig | None = None,
                     calibration_info: dict[str, Any] | None = None,
                     opset: int = 18,
                     fold_normalization: bool = False,
                     float_layers: Sequence[str] = (),
                     equalize: bool = False,
                     equalize_activations: float = 0.0,
                     weight_rounding: str = "nearest",
                     gptq_layers: Sequence[str] = (),
                     shared: bool = False,
                     rounded: dict[str, Any] | None = None,
                     share_concats: bool = False,
                     bias_correction: bool = True,
                     augment: int = 0,
                     per_channel: bool = True,
                     target: str = "any-cpu",
                     source_sha256: str | None = None,
                     device: torch.device | None = None,
                     fp32_graph: Any = None) -> Path:
    """Write an INT8 QDQ ``.onnx``: int8 weights (symmetric, per output channel), uint8
    activations calibrated on ``calib_images`` (uint8 NCHW, all of them: pick them with
    ``_common.calibration_images``), with the artifact metadata (``artifact_format``
    ``"onnx-int8"``, the ``calibration`` block filled). Input and output stay float32: the
    graph quantizes its input itself, so it is fed exactly like the fp32 file.

    ``calibration``: ``method`` (minmax / entropy / percentile with ``percentile``) and
    ``batch_size``; its ``images`` is not used (the caller chose the images).
    ``calibration_info``: what the caller knows about the images (``split``, ``seed``,
    ``dataset``), recorded in the metadata.
    ``float_layers``: torch module names kept in float (mixed precision; a module covers
    its children). ``equalize``: cross-layer equalization of consecutive convs first.
    ``equalize_activations``: activation equalization with that ``alpha`` (0: off; see
    :func:`~edgesqueeze.export.prepare.equalize_activations`). ``weight_rounding``:
    ``"nearest"`` (onnxruntime's) or ``"gptq"`` (:func:`~edgesqueeze.export.prepare.gptq_round`,
    on the grid onnxruntime's symmetric per-channel int8 uses, so it keeps GPTQ's choice).
    ``gptq_layers``: the modules GPTQ rounds (empty: every int8 layer). ``shared``: the
    model is weight-shared, and GPTQ keeps each layer's shared values. ``rounded``: if given,
    filled with the float weights the file's integers were rounded from (the GPTQ-rounded
    model's state dict; left empty without GPTQ), for the packer to code. ``share_concats``:
    quantize each concat's inputs in the concat's range (:func:`share_concat_ranges`).
    ``bias_correction``: empirical bias correction on the calibration images.
    ``augment``: add that many flipped / cropped copies of each calibration image.
    ``target``: ``"any-cpu"`` (default: 8-bit weights stored as uint8 with zero point 128,
    the same results on x86 with or without VNNI and on ARM) or ``"vnni-or-arm"`` (int8
    weights, exact only where the uint8 x int8 kernels do not saturate: x86 with VNNI, ARM);
    recorded in the metadata. ``device``: where the statistics passes of activation
    equalization and GPTQ run (None: the CPU). ``fp32_graph``: as for
    :func:`quantize_int8_graph` (the caller's fp32 graph of ``model``, same ``opset`` and
    ``fold_normalization``; not modified).
    Raises ExportError like :func:`export_onnx`; ``out`` is written atomically.
    """
    calibration = (calibration or CalibrationConfig()).resolved("onnx-int8")
    images = np.asarray(calib_images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ExportError(f"calibration images must be a non-empty uint8 (N, C, H, W) array, "
                          f"got {images.dtype} {images.shape}")
    if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
        raise ExportError(f"augment must be an integer >= 0, got {augment!r}")
    if weight_rounding not in ("nearest", "gptq"):
        raise ExportError(f"weight_rounding must be 'nearest' or 'gptq', got {weight_rounding!r}")
    if weight_rounding == "gptq" and not per_channel:
        raise ExportError("weight_rounding='gptq' rounds onto the per-channel grid; use per_channel=True")
    if not 0 <= equalize_activations <= 1:
        raise ExportError(f"equalize_activations must be in [0, 1] (0: off), got {equalize_activations}")
    if target not in INT8_TARGETS:
        raise ExportError(f"target must be one of {', '.join(INT8_TARGETS)}, got {target!r}")
    info = dict(calibration_info or {})
    info.setdefault("split", "train")
    info.setdefault("seed", None)
    info.update({"images": int(len(images)), "method": calibration.method,
                 "activations": "uint8",
                 "weights": f"{INT8_TARGETS[target]} {'per-channel' if per_channel else 'per-tensor'}",
                 "target": target, "equalize": bool(equalize),
                 "equalize_activations": float(equalize_activations), "weight_rounding": weight_rounding,
                 "gptq_layers": list(gptq_layers), "share_concat_ranges": bool(share_concats),
                 "bias_correction": bool(bias_correction), "float_layers": list(float_layers),
                 "augment": int(augment)})
    if calibration.method == "percentile":
        info["percentile"] = calibration.percentile
    art = _artifact(model, meta, "onnx-int8", fold_normalization, calibration=info,
                    source_sha256=source_sha256)
    check_calibration_shape(images, art["input_shape"])
    check_float_layers(model, float_layers)  # before the slow work
    found: dict[str, int] = {}
    qproto = quantize_int8_graph(
        model, meta, images, mean=art["mean"], std=art["std"], calibration=calibration, opset=opset,
        fold_normalization=fold_normalization, float_layers=float_layers, equalize=equalize,
        equalize_activations=equalize_activations, weight_rounding=weight_rounding,
        gptq_layers=gptq_layers, shared=shared, rounded=rounded, share_concats=share_concats,
        bias_correction=bias_correction, augment=augment, augment_seed=info.get("seed") or 0,
        per_channel=per_channel, weights=INT8_TARGETS[target], device=device, found=found,
        fp32_graph=fp32_graph)
    if equalize_activations and not found.get("pairs"):  # nothing rescaled: the file says so
        art["calibration"]["equalize_activations"] = 0.0
    compact_qdq(qproto)
    return _write(qproto, {META_KEY: meta_json(art)}, out)


def quantize_int8_graph(model: nn.Module, meta: dict[str, Any], images: np.ndarray, *, mean, std,
                        calibration: CalibrationConfig, opset: int = 18, fold_normalization: bool = False,
                        float_layers: Sequence[str] = (), equalize: bool = False,
                        equalize_activations: float = 0.0, weight_rounding: str = "nearest",
                        gptq_layers: Sequence[str] = (), shared: bool = False,
                        rounded: dict[str, Any] | None = None, share_concats: bool = False,
                        bias_correction: bool = True, augment: int = 0, augment_seed: int = 0,
                        per_channel: bool = True, weights: str = "uint8",
                        fp32_graph: Any = None, device: torch.device | None = None,
                        found: dict | None = None) -> Any:
    """:func:`export_onnx_int8`'s work without its checks, metadata or file: the QDQ graph
    (not yet compacted) of ``model`` calibrated on uint8 ``images``, normalized with
    ``mean`` / ``std``. ``fp32_graph``: the fp32 graph of ``model`` if the caller has it (a
    benchmark quantizing one model many ways, with the same ``opset`` and
    ``fold_normalization``; an ``onnx.ModelProto``, as is the result, and not modified), used
    only when no transform (equalization, GPTQ) changes the weights. ``weights``: how they are stored
    (:func:`quantize_qdq`); ``gptq_layers``, ``shared``, ``rounded``, ``share_concats``: as
    for :func:`export_onnx_int8`; ``found``: as for
    :func:`~edgesqueeze.export.prepare.equalize_activations`."""
    if augment:
        images = prepare.augment_calibration(images, augment, seed=augment_seed)
    if equalize:
        model = prepare.equalize_cross_layer(model)
    reference = model  # bias correction pulls toward this: the function before any rounding
    if equalize_activations or weight_rounding == "gptq":  # torch-side: normalized inputs
        xt = torch.from_numpy(to_input(images, mean, std))
        if equalize_activations:
            model = prepare.equalize_activations(model, xt, alpha=equalize_activations,
                                                 batch_size=calibration.batch_size, device=device, found=found)
        reference = model
        if weight_rounding == "gptq":  # onto the grid quantize_qdq will use
            model = prepare.gptq_round(model, xt, batch_size=calibration.batch_size, skip=float_layers,
                                       qmax=64 if weights == "int8-7bit" else 127, only=gptq_layers,
                                       shared=shared, device=device)
            if rounded is not None:
                rounded.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    unchanged = not (equalize or equalize_activations or weight_rounding == "gptq")
    # its own copy: quantize_qdq names the nodes of the graph it is given
    fproto = own_onnx_graph(model, meta, opset=opset, fold_normalization=fold_normalization,
                            graph=fp32_graph if unchanged else None)
    float_nodes = _matching_nodes(fproto, float_layers)
    x = to_input(images, mean, std, normalize=not fold_normalization)
    qproto = quantize_qdq(fproto, x, calibration=calibration, float_nodes=float_nodes,
                          per_channel=per_channel, weights=weights)
    if share_concats:
        share_concat_ranges(qproto)
    if bias_correction:  # means need fewer images than ranges: cap the cost on big sets
        # toward the float model before GPTQ: its rounding shifts means too (KL 0.0044 -> 0.0040
        # on ImageNet SqueezeNet 1.0, 4 splits, against correcting toward the rounded model)
        rproto = fproto if reference is model else onnx_graph(reference, meta, opset=opset,
                                                              fold_normalization=fold_normalization)
        correct_biases(qproto, rproto, x[:_BIAS_IMAGES], batch_size=calibration.batch_size)
    return qproto
