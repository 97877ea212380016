"""The ``export`` section of a recipe: which deployable files to write and how to quantize them.

Only configuration (no exporter code), so :mod:`edgesqueeze.recipe` builds it without
importing the exporters; :mod:`edgesqueeze.export` reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from edgesqueeze._config import _build, _check_fields, _range
from edgesqueeze.errors import RecipeError

__all__ = ["ALL_FORMATS", "FORMATS", "INT8_FORMATS", "SUFFIX", "CalibrationConfig", "ExportConfig", "int8_base"]

FORMATS = ("onnx", "onnx-int8", "tflite", "tflite-int8")  # what an export writes by default
# tflite-micro: the tflite-int8 file LUT-compressed for TensorFlow Lite Micro (edgesqueeze.export.tflm);
# asked for by name, since it needs the optional package edgesqueeze[micro]
ALL_FORMATS = (*FORMATS, "tflite-micro")
INT8_FORMATS = ("onnx-int8", "tflite-int8", "tflite-micro")
SUFFIX = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "tflite": ".tflite", "tflite-int8": ".int8.tflite",
          "tflite-micro": ".int8.micro.tflite"}


def int8_base(artifact_format: str) -> str:
    """The format whose quantization settings ``artifact_format`` takes: a tflite-micro file
    is the tflite-int8 file, compressed."""
    return "tflite-int8" if artifact_format == "tflite-micro" else artifact_format


@dataclass(frozen=True)
class CalibrationConfig:
    """Images used to pick activation ranges for INT8 (from the training split, seeded).

    ``method: auto`` (the default) picks per format what measured best; today that is
    ``minmax`` for both. ``mse`` (onnx-int8: :func:`edgesqueeze.export.onnx_int8.mse_range`
    per tensor; tflite-int8: torch's histogram observer, which also minimizes the L2 error,
    as ``entropy`` there) clips rare outliers where that lowers the squared quantization
    error (benchmarks/notes.md, session 23, for what it bought on the ImageNet SqueezeNet).
    onnx-int8: minmax and percentile gave the same agreement on the ImageNet SqueezeNet
    (``benchmarks/results/onnx_int8.json``), and minmax is the cheapest; ``entropy`` ranges
    (TensorRT's KL search over 2048 bins) clip that model's class-score maps, whose top
    values decide the class, and scored 1-2% top-1 there (session 23). tflite-int8: once concatenations were quantized in one range
    (``tflite_quant._share_concat_ranges``), minmax gave the same CIFAR-10 validation accuracy as
    litert-torch's histogram observer (``entropy``) within 0.1 point
    (``benchmarks/results/cifar_int8.json``), and on the ImageNet SqueezeNet 1.0 97% top-1
    agreement with fp32 against 94% on one 2-fold split of the 100 shared images (other
    splits move that by up to 4 points; ``tflite_int8.json``). The artifact's metadata
    records the method actually used.

    ``device``: where the PyTorch statistics passes over the calibration images run: GPTQ's
    layer Hessians and activation equalization's channel ranges (``auto`` takes CUDA when
    present). The rest is CPU work whatever it says: onnx-int8's ranges and bias correction
    run in onnxruntime, tflite-int8's PT2E observers and bias correction in the torch.export
    graph that litert-torch converts, GPTQ's column loop on the CPU. Left out of the recipe's
    hash, like every device.
    """

    images: int = field(default=256, metadata=_range(ge=1, le=100_000))
    method: Literal["auto", "minmax", "entropy", "percentile", "mse"] = "auto"
    percentile: float = field(default=99.999, metadata=_range(gt=50, le=100))
    batch_size: int = field(default=32, metadata=_range(ge=1, le=4096))
    device: str = "auto"  # where the torch-side statistics passes run: auto | cpu | cuda | cuda:N | mps

    def __post_init__(self) -> None:  # built in Python too: held to the recipe's rules
        _check_fields(self)

    AUTO: ClassVar[dict[str, str]] = {"onnx-int8": "minmax", "tflite-int8": "minmax"}

    def resolved(self, artifact_format: str) -> CalibrationConfig:
        """This config with ``auto`` replaced by ``artifact_format``'s default method."""
        if self.method != "auto":
            return self
        return dataclasses.replace(self, method=self.AUTO[artifact_format])


@dataclass(frozen=True)
class ExportConfig:
    """The ``export`` section of a recipe.

    ``float_layers``: torch module names (``features.0``, or a whole block like the Fire
    ``features.3``) kept in float in both INT8 formats (mixed precision); every other layer
    is int8. The names are checked against the model's modules when it is loaded
    (:func:`check_float_layers`), before anything is written, and each INT8 file records them
    in its ``calibration`` metadata. On ImageNet SqueezeNet 1.0 the stem and the first two
    Fires float took top-1 agreement with fp32 from 90% to 97% (onnx-int8) and from 95% to 96%
    (tflite-int8, minmax) on the benchmarks' first split (``benchmarks/results/*_int8.json``).

    ``weight_rounding``: how INT8 weights are rounded onto their per-channel grid, ``gptq``
    (:func:`edgesqueeze.export.prepare.gptq_round`) or ``nearest``; ``auto`` keeps each
    format's measured default (GPTQ for tflite-int8, nearest for onnx-int8, whose MNIST and
    CIFAR-10 numbers were measured with it). ``gptq_layers``: the module names GPTQ rounds
    (empty: every int8 layer); the others round to nearest. On a weight-shared model GPTQ
    keeps each layer's shared values (:func:`edgesqueeze.export.prepare.gptq_round`). ``equalize_activations``: alpha of activation
    equalization (:func:`edgesqueeze.export.prepare.equalize_activations`; 0: off), both
    INT8 formats. ``bias_correction``: empirical bias correction on the calibration images
    after quantization; unset keeps each format's measured default (on for onnx-int8, off for
    tflite-int8).

    ``onnx_int8_target``: which CPUs compute the onnx-int8 file exactly. ``any-cpu``
    (default): 8-bit weights stored as uint8, the same results on x86 with or without VNNI
    and on ARM. ``any-cpu-7bit``: 7-bit int8 weights (-64..64), the same results everywhere
    too, and onnxruntime's faster uint8 x int8 kernels on every x86 (the digits demo: as fast
    as fp32, where ``any-cpu`` takes 1.28x its time on AVX2 kernels), for models that keep
    their accuracy on a 7-bit grid (ImageNet SqueezeNet lost 2.75 points of agreement).
    ``vnni-or-arm``: int8 weights for devices that are all VNNI x86 or ARM
    (faster VNNI kernels); x86 CPUs without VNNI saturate its products and compute other
    logits (see :mod:`edgesqueeze.export.onnx_int8`).

    ``share_concat_ranges`` (onnx-int8; tflite-int8 always does): each concat's inputs
    quantized in the concat's range, so that onnxruntime's concat copies bytes instead of
    requantizing (:func:`edgesqueeze.export.onnx_int8.share_concat_ranges`).

    ``int8_weights``: one int8 scale per output channel or per tensor, both INT8 formats;
    ``auto`` picks per tensor for a weight-shared model (:meth:`int8_per_channel`).
    ``pack``: also write each file packed (``model.int8.tflite.esq``:
    :mod:`edgesqueeze.format.packed`), its weights Deep-Compression-coded.

    ``space_to_depth_stem`` (tflite-int8 and tflite-micro): compute the model's stride-2
    first conv over few input channels as a 2x2 space-to-depth and a stride-1 conv over
    four times the channels, the same int8 weights rearranged
    (:class:`edgesqueeze.export.prepare.SpaceToDepthConv`). XNNPACK's int8 kernels without
    VNNI or the ARM dot product pad input channels to blocks of 8 (3 -> 8; 12 -> 16), so an
    int8 RGB stem costs more than a float one there (benchmarks/notes.md, sessions 25-26).
    """

    VERSION: ClassVar[int] = 1

    formats: tuple[str, ...] = FORMATS
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    fold_normalization: bool = False
    opset: int = field(default=18, metadata=_range(ge=18, le=23))  # torch.onnx's exporter writes 18 at least
    tflite_int8_io: Literal["float", "int8"] = "float"
    float_layers: tuple[str, ...] = ()
    float_layers_by_format: dict[str, Any] = field(default_factory=dict)
    weight_rounding: Literal["auto", "nearest", "gptq"] = "auto"
    gptq_layers: tuple[str, ...] = ()
    share_concat_ranges: bool = False
    equalize_activations: float = field(default=0.0, metadata=_range(ge=0, le=1))
    bias_correction: bool | None = None
    onnx_int8_target: Literal["any-cpu", "any-cpu-7bit", "vnni-or-arm"] = "any-cpu"
    int8_weights: Literal["auto", "per-channel", "per-tensor"] = "auto"
    pack: bool = False
    space_to_depth_stem: bool = False

    WEIGHT_ROUNDING: ClassVar[dict[str, str]] = {"onnx-int8": "nearest", "tflite-int8": "gptq"}

    def __post_init__(self) -> None:
        _check_fields(self)  # built in Python too: held to the recipe's rules
        if self.weight_rounding == "gptq" and self.int8_weights == "per-tensor":  # refused after a file, before
            raise RecipeError("export.weight_rounding: gptq rounds onto the per-channel int8 grid, and "
                              "export.int8_weights is per-tensor (--weight-rounding gptq, --int8-weights "
                              "per-tensor); choose nearest rounding or per-channel weights")
        bad = [f for f in self.formats if f not in ALL_FORMATS]
        if bad:
            from edgesqueeze.config.budget import format_hint

            raise RecipeError(f"export.formats: unknown format {bad[0]!r}{format_hint(bad[0], ALL_FORMATS)}; "
                              f"choose from {', '.join(ALL_FORMATS)}")
        if not self.formats:
            raise RecipeError("export.formats: needs at least one format")
        twice = [f for i, f in enumerate(self.formats) if f in self.formats[:i]]
        if twice:
            raise RecipeError(f"export.formats: '{twice[0]}' is listed twice")
        _check_names(self.float_layers, "export.float_layers")
        _check_names(self.gptq_layers, "export.gptq_layers")
        by_format = {}
        for fmt, names in self.float_layers_by_format.items():
            if fmt not in ("onnx-int8", "tflite-int8", "tflite-micro"):
                raise RecipeError(f"export.float_layers_by_format: {fmt!r} is not an INT8 format; "
                                  "use onnx-int8, tflite-int8 or tflite-micro")
            if isinstance(names, str) or not isinstance(names, (list, tuple)):
                raise RecipeError(f"export.float_layers_by_format.{fmt}: expected a list of module names, "
                                  f"got {names!r}")
            by_format[fmt] = _check_names(tuple(names), f"export.float_layers_by_format.{fmt}")
        object.__setattr__(self, "float_layers_by_format", by_format)

    def float_layers_for(self, artifact_format: str) -> tuple[str, ...]:
        """The layers kept float in ``artifact_format``: its ``float_layers_by_format`` entry
        (``[]`` means all-int8) where there is one, else (tflite-micro) tflite-int8's entry,
        else ``float_layers``. A microcontroller gains nothing from a float layer that a
        desktop CPU's int8 kernels make worth it, and pays for it in arena (float
        activations): a recipe says so with ``tflite-micro: []``."""
        by_format = self.float_layers_by_format
        if artifact_format in by_format:
            return tuple(by_format[artifact_format])
        return tuple(by_format.get(int8_base(artifact_format), self.float_layers))

    def bias_correction_for(self, artifact_format: str) -> bool:
        """``bias_correction`` with unset resolved for ``artifact_format``."""
        if self.bias_correction is not None:
            return self.bias_correction
        return int8_base(artifact_format) == "onnx-int8"

    def weight_rounding_for(self, artifact_format: str, shared: bool = False) -> str:
        """``weight_rounding`` with ``auto`` resolved for ``artifact_format``: nearest for a
        weight-shared model (what its numbers were measured with; GPTQ, which keeps the shared
        values, is asked for by name)."""
        if self.weight_rounding != "auto":
            return self.weight_rounding
        if self.int8_weights == "per-tensor":  # GPTQ rounds onto the per-channel grid
            return "nearest"
        return "nearest" if shared else self.WEIGHT_ROUNDING[int8_base(artifact_format)]

    def int8_per_channel(self, artifact_format: str, shared: bool = False) -> bool:
        """``int8_weights`` resolved: ``auto`` gives a weight-shared model (``shared``: every
        conv and linear weight holds at most 256 distinct values, as pruning plus k-means
        leave it) one int8 scale per tensor, so each shared value stays one int8 value and the
        packed file codes it as compactly as the ``.esq`` (digits SqueezeNet: the same bytes
        per layer); it keeps per-channel scales where the settings already change the weights
        (GPTQ rounding asked for, activation equalization), and for every other model."""
        if self.int8_weights != "auto":
            return self.int8_weights == "per-channel"
        keeps = self.weight_rounding_for(artifact_format, shared) == "nearest" and not self.equalize_activations
        return not (shared and keeps)

    @classmethod
    def from_dict(cls, raw: Any, *, path: str = "export") -> ExportConfig:
        return _build(path, raw, cls)


def _check_names(names: tuple, what: str) -> tuple[str, ...]:
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise RecipeError(f"{what}[{i}]: expected a module name like 'features.0', got {name!r}")
    dup = [n for i, n in enumerate(names) if n in names[:i]]
    if dup:
        raise RecipeError(f"{what}: '{dup[0]}' is listed twice")
    return tuple(names)
