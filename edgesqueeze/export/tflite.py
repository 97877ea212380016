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
  ``[1, H, W, 1]``, and XNNPACK then refuses batch 32. ``tflite_flatbuffer._free_batch`` rewrites a leading
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
  ``L__self___features_0``), so ``tflite_quant._quantizer`` filters by module path itself, in the
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
import functools
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from edgesqueeze._io import native_stderr, write_bytes_atomic
from edgesqueeze.format.seal import seal
from edgesqueeze.errors import ExportError, Note
from edgesqueeze.export import prepare
from edgesqueeze.config.export import CalibrationConfig
from edgesqueeze.export._common import (
    artifact_meta,
    check_calibration_shape,
    check_float_layers,
    first_line as _first_line,
    to_input,
    under,
)
from edgesqueeze.export.prepare import (  # noqa: F401 - re-exported: they lived here first
    augment_calibration,
    equalize_cross_layer,
    gptq_round,
)
from edgesqueeze.export.tflite_flatbuffer import finalize, io_dtype, schema
from edgesqueeze.export.tflite_quant import check_converted_float_layers, quantize_pt2e


__all__ = [
    "augment_calibration",
    "equalize_cross_layer",
    "export_tflite",
    "export_tflite_int8",
    "gptq_round",
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
    """Keep litert-torch's and its stack's chatter out of the user's terminal; errors and
    lines not known to be noise still come through. It prints a progress line per
    conversion step (off unless the user set ``LITERT_TORCH_SHOW_PROGRESS``); torchao logs
    warnings about CUDA kernels it cannot load when imported; torch's pytree and
    litert-torch raise deprecation warnings at each other; the MLIR converter writes absl
    INFO records to file descriptor 2 (:data:`edgesqueeze._io.NATIVE_NOISE`)."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(key)
    if before is None:
        os.environ[key] = "n"
    loggers = [logging.getLogger(name) for name in ("torchao", "torch", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), native_stderr():
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", Note)  # edgesqueeze's own notes are for the user
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if before is None:
            os.environ.pop(key, None)


def _quiet(fn):
    """:func:`_quiet_litert` around a whole export (imports and calibration included)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _quiet_litert():
            return fn(*args, **kwargs)
    return wrapper


def _convert(module: nn.Module, sample: torch.Tensor, what: str, **kwargs: Any) -> bytes:
    """litert-torch conversion; any failure becomes an ExportError naming the module and op."""
    try:
        import litert_torch
    except ImportError as exc:
        raise ExportError(f"TFLite export needs litert-torch ({exc}); "
                          "pip install 'edgesqueeze[export]'") from None
    try:
        return bytes(litert_torch.convert(module, (sample,), **kwargs).model_content())
    except Exception as exc:  # the converter raises many types (RuntimeError, AssertionError...)
        raise _conversion_error(module, sample, exc, what) from exc


_OP_PATTERNS = (r"Lowering not found: ([\w.]+)", r"target=torch\.ops\.([\w.]+)\]")


_EQUIVALENTS = {"aten.adaptive_max_pool2d": "a global max pool, adaptive_max_pool2d(x, 1), is x.amax((2, 3), "
                                            "keepdim=True)"}


def _conversion_error(module: nn.Module, sample: torch.Tensor, exc: BaseException,
                      what: str) -> ExportError:
    """Name the op and the module it came from: litert-torch's message has the op and the
    FX node name; the node's ``nn_module_stack`` in a fresh ``torch.export`` has the module."""
    text = str(exc)
    op = next((m.group(1) for p in _OP_PATTERNS if (m := re.search(p, text))), None)
    node_name = (m.group(1) if (m := re.search(r"While executing %(\w+)", text)) else None)
    where = _module_of(module, sample, node_name, op) if (op or node_name) else None
    reason = _first_line(exc)
    # ops with a plain equivalent the converter lowers (global pooling to 1x1 is a reduction)
    swap = next((f" ({hint})" for name, hint in _EQUIVALENTS.items() if op and op.startswith(name)), "")
    if op and where:
        return ExportError(f"litert-torch cannot convert {what}: op {op} in module {where} "
                           f"({reason}); replace that module with supported ops{swap}, or export "
                           "to ONNX instead")
    if op:
        return ExportError(f"litert-torch cannot convert {what}: op {op} ({reason})"
                           + (f"; replace it{swap}" if swap else ""))
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
# fp32


@_quiet
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
    data = finalize(content, lambda dtype: {**art, "input_dtype": dtype})
    out = Path(out)
    write_bytes_atomic(out, seal(data))  # its own CRC-32 in its metadata
    return out


# ---------------------------------------------------------------------------------------
# INT8 export


def check_space_to_depth_stem(model: nn.Module, name: str, input_shape: Sequence[int] | None,
                              float_layers: Sequence[str] = ()) -> None:
    """ExportError unless ``model``'s module ``name`` is an int8 conv that
    :class:`~edgesqueeze.export.prepare.SpaceToDepthConv` can compute (inputs of
    ``input_shape``, C, H, W)."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ExportError(f"space_to_depth_stem: the model has no module named '{name}'")
    if under(name, float_layers):
        raise ExportError(f"space_to_depth_stem: the stem {name} is in float_layers; the rewrite speeds up an "
                          "int8 stem only: drop it from float_layers or set space_to_depth_stem: false")
    hw = list(input_shape)[1:] if input_shape is not None and len(input_shape) == 3 else None
    why = prepare.space_to_depth_refusal(modules[name], hw)
    if why:
        raise ExportError(f"space_to_depth_stem: cannot rewrite the stem {name}: {why}; set "
                          "space_to_depth_stem: false")


def int8_stem_note(model: nn.Module, float_layers: Sequence[str], input_channels: int,
                   space_to_depth: bool = False) -> str | None:
    """A note for a tflite-int8 file whose first conv (the first ``Conv2d`` taking the
    input's ``input_channels``, fewer than 8) is int8, else None. XNNPACK's int8 kernels
    without VNNI (AVX2-only x86) or the ARM dot product (Raspberry Pi 4) take input channels
    in blocks of 8, so a 3-channel stem does 8 channels' work, and on AVX2-only x86 they
    widen every product to 16 bits: timed on those kernels (``tools/with-avx2-cpuid.sh``),
    ImageNet SqueezeNet's file with an int8 stem runs 1.50x onnxruntime fp32's time, 1.09x
    with the stem as a space-to-depth (``space_to_depth``: 12 channels pad to 16), 0.95x with
    the stem float (as good on six held-out halves), and the recipe's onnx-int8 0.77x
    (benchmarks/notes.md, session 29). On a Pi 4 the space-to-depth stem
    counted 0.83x fp32's instructions (session 27), so its note names AVX2-only x86 alone."""
    if input_channels >= 8:
        return None
    name = prepare.find_stem(model, input_channels)
    if name is None or under(name, float_layers):
        return None
    channels = f"{input_channels} input channel{'s' * (input_channels > 1)}"
    if space_to_depth:
        return (f"note: the first conv ({name}, {channels}) is int8, as a space-to-depth: fast with VNNI or "
                "the ARM dot product; on AVX2-only x86 XNNPACK's int8 kernels run it 1.6x slower than a float "
                "stem, and ImageNet SqueezeNet's file 1.09x onnxruntime fp32's time (benchmarks/notes.md, "
                f"session 29); for such devices keep it float (export.float_layers: [{name}, ...] and "
                "export.space_to_depth_stem: false: 0.95x there, as recipes/squeezenet-imagenet.yaml does), "
                "or ship an onnx-int8 file")
    fix = f"keep it float (export.float_layers: [{name}, ...])"
    if prepare.space_to_depth_refusal(model.get_submodule(name)) is None:
        fix = f"compute it as a space-to-depth (export.space_to_depth_stem: true) or {fix}"
    return (f"note: the first conv ({name}, {channels}) is int8: "
            "fast on x86 with VNNI; on AVX2-only x86 and a Raspberry Pi 4 (no dot product) XNNPACK pads its "
            "channels to 8 and the file can be slower than fp32 (benchmarks/notes.md, sessions 25 and 29); for "
            f"those devices {fix}")


@_quiet
def export_tflite_int8(model: nn.Module, meta: dict[str, Any], out: str | os.PathLike,
                       calib_images: np.ndarray, *,
                       calibration: CalibrationConfig | None = None,
                       io: Literal["float", "int8"] = "float",
                       fold_normalization: bool = False,
                       float_layers: Sequence[str] = (),
                       requantize_pool: bool = True,
                       weight_rounding: Literal["nearest", "gptq"] = "gptq",
                       gptq_layers: Sequence[str] = (),
                       shared: bool = False,
                       rounded: dict[str, Any] | None = None,
                       equalize: bool = False,
                       equalize_activations: float = 0.0,
                       bias_correction: bool = False,
                       augment: int = 0,
                       per_channel: bool = True,
                       source_sha256: str | None = None,
                       calibration_split: str = "train",
                       calibration_seed: int | None = None,
                       calibration_dataset: str | None = None,
                       space_to_depth_stem: str | None = None,
                       device: torch.device | None = None) -> Path:
    """Write a full-integer ``.tflite``: int8 weights (symmetric, per output channel) and
    int8 activations with ranges calibrated on ``calib_images`` (uint8 NCHW, all of them;
    pick them with ``_common.calibration_images``).

    ``calibration``: the observer (``method``: minmax / entropy / percentile / mse, see
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
    ``gptq_layers``: the modules GPTQ rounds (empty: every int8 layer); ``shared``: the
    model is weight-shared, and GPTQ keeps each layer's shared values (:func:`gptq_round`).
    ``rounded``: if given, filled with the float weights the int8 ones are rounded from,
    GPTQ's where it ran (for the packer; a space-to-depth stem's before the rearrangement,
    under the name of the conv that computes it).
    ``bias_correction``: empirical bias correction of the calibrated model
    (:func:`~edgesqueeze.export.tflite_quant.correct_bias`, on at most 64 calibration images) before conversion.
    ``equalize``: cross-layer equalization first; ``augment``: add
    that many flipped / cropped copies of each calibration image (neither helped SqueezeNet;
    see the benchmark). ``space_to_depth_stem``: the name of a stride-2 first conv to
    compute as a 2x2 space-to-depth and a stride-1 conv over four times the channels
    (:class:`~edgesqueeze.export.prepare.SpaceToDepthConv`), rewritten after GPTQ so that
    its int8 weights are the plain conv's, rearranged (XNNPACK's int8 kernels without VNNI
    or the ARM dot product pad input channels to blocks of 8: 3 -> 8, but 12 -> 16); the
    activation ranges are those observed on the model before the rewrite, so the file computes
    what the plain-stem file computes (the rewritten stem's float sums, taken in another
    order, moved ranges by an ulp and flipped near-tie images).
    ``device``: where the statistics passes of activation equalization
    and GPTQ run (None: the CPU; PT2E's observers and bias correction run on the CPU).
    Raises ExportError like :func:`export_tflite`.
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
    if space_to_depth_stem is not None:
        check_space_to_depth_stem(model, space_to_depth_stem, meta.get("input_shape"), float_layers)
    model = prepare.explicit_padding(model)  # padding="same" convs were left float32 by the quantizer
    info = {"images": len(images), "method": calibration.method, "split": calibration_split,
            **({"dataset": calibration_dataset} if calibration_dataset else {}),  # as onnx-int8 records it
            "seed": calibration_seed, "augment": int(augment), "equalize": bool(equalize),
            "equalize_activations": float(equalize_activations),
            "bias_correction": bool(bias_correction), "float_layers": list(float_layers), "requantize_pool": bool(requantize_pool),
            "weight_rounding": weight_rounding, "gptq_layers": list(gptq_layers),
            "weights": "per-channel" if per_channel else "per-tensor"}
    if space_to_depth_stem is not None:
        info["space_to_depth_stem"] = space_to_depth_stem
    if calibration.method == "percentile":
        info["percentile"] = calibration.percentile
    art = _artifact(model, meta, "tflite-int8", fold_normalization, calibration=info,
                    source_sha256=source_sha256)
    check_calibration_shape(images, art["input_shape"])
    module = _wrap(equalize_cross_layer(model) if equalize else model, art, fold_normalization)
    prefix = "model." if fold_normalization else ""
    images = augment_calibration(images, augment, seed=calibration_seed or 0)
    calib = torch.from_numpy(to_input(images, art["mean"], art["std"], normalize=not fold_normalization))
    if equalize_activations:
        found: dict[str, int] = {}
        module = prepare.equalize_activations(module, calib, alpha=equalize_activations,
                                              batch_size=calibration.batch_size, device=device, found=found)
        if not found["pairs"]:  # nothing rescaled: the file says so
            art["calibration"]["equalize_activations"] = 0.0
    reference = module  # bias correction pulls toward the function before any rounding
    if weight_rounding == "gptq":
        if not per_channel:
            raise ExportError("weight_rounding='gptq' rounds onto the per-channel grid; use per_channel=True")
        module = gptq_round(module, calib, batch_size=calibration.batch_size,
                            skip=[prefix + n for n in float_layers], only=[prefix + n for n in gptq_layers],
                            shared=shared, device=device)
    if rounded is not None:  # the weights the file's integers come from, by the model's own names
        rounded.update({k[len(prefix):]: v.detach().clone() for k, v in module.state_dict().items()
                        if k.startswith(prefix)})
    plain = plain_reference = None  # with a space-to-depth stem: the model whose ranges and biases the file takes
    if space_to_depth_stem is not None:  # after GPTQ: the same int8 weights, rearranged, zeros kept zero
        plain, plain_reference = module, reference
        module = prepare.space_to_depth_stem(module, prefix + space_to_depth_stem)
        reference = prepare.space_to_depth_stem(reference, prefix + space_to_depth_stem)
        if rounded is not None:  # the packer codes the weight before the rearrangement (no zero taps)
            rounded[space_to_depth_stem + ".conv.weight"] = rounded.pop(space_to_depth_stem + ".weight")
    gm, quantizer = quantize_pt2e(module, calib, method=calibration.method,
                                  percentile=calibration.percentile, batch_size=calibration.batch_size,
                                  float_layers=[prefix + n for n in float_layers], per_channel=per_channel,
                                  requantize_pool=requantize_pool, ranges_from=plain,
                                  correct_toward=reference if bias_correction else None,
                                  ranges_toward=plain_reference)
    from litert_torch.quantize.quant_config import QuantConfig

    content = _convert(gm, calib[:1], type(model).__name__ + " (int8)",
                       quant_config=QuantConfig(pt2e_quantizer=quantizer))
    data = finalize(content, lambda dtype: {**art, "input_dtype": dtype}, float_io=io == "float")
    converted = schema()[1].read_model_from_bytearray(bytearray(data))
    int8_io_floats = ExportError(
        f"tflite-int8 with int8 input and output (tflite_int8_io: int8): float_layers {', '.join(float_layers)} "
        "cannot stay float there: a float region at the input leaves the file a float input, and one elsewhere "
        "is quantized by the converter; export it with no float layers (--float-layers none, or "
        "export.float_layers_by_format: {tflite-int8: []}), or keep float input and output (tflite_int8_io: float)")
    if io == "int8" and io_dtype(converted) != "int8":
        if float_layers:
            raise int8_io_floats
        raise ExportError(f"io='int8': the converted input is {io_dtype(converted)}; use io='float'")
    try:
        check_converted_float_layers(model, float_layers, converted)
    except ExportError:
        if io != "int8":
            raise
        # the message said to keep the first conv float, which was what was asked
        raise int8_io_floats from None
    out = Path(out)
    write_bytes_atomic(out, seal(data))  # its own CRC-32 in its metadata
    return out
