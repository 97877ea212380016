"""What both backends share: file sniffing, the input contract, quantization, batching.

Torch-free by design (numpy and the standard library only at import time): this package
is what ``pip install edgesqueeze[runtime]`` puts on a Raspberry Pi. The backends
(:mod:`._onnx`, :mod:`._tflite`) build on this module; :func:`edgesqueeze.runtime.load`
(:mod:`._load`, above both) picks one per file, importing onnxruntime or LiteRT only when
a file of their kind is loaded, so a device with just one of them installed runs that kind.

The input contract, for every artifact::

    predict(x)          x: float32 NCHW in the artifact's *input space*: what the graph
                        expects before any quantization. For normalization "caller" that
                        is (pixels/255 - mean)/std; for "in-graph" it is pixels/255.
    predict_images(u8)  u8: uint8 NCHW pixels; applies /255 and the normalization the
                        metadata asks for, then predict().

Quantized inputs and outputs (int8/uint8 tensors) are handled here with the file's own
scale and zero point: ``q = clip(round(x / scale) + zero_point)``, ``x = (q - zero_point) *
scale``. Worked example: scale 0.5, zero point -3, int8: x = 1.2 -> round(2.4) - 3 = -1;
reading -1 back gives (-1 + 3) * 0.5 = 1.0.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesqueeze.errors import CheckpointError, DataError, EdgesqueezeError, FormatError, RuntimeBackendError
from edgesqueeze.format.container import MAGIC as ESQ_MAGIC

__all__ = ["Artifact", "InputSpec", "classify", "sniff", "softmax", "topk"]

# Copied from edgesqueeze.export._common (which imports torch-side config code): the
# metadata key and format name every artifact carries.
META_KEY = "edgesqueeze"
META_FORMAT = "edgesqueeze.artifact"


_SNIFF_BYTES = 64


from edgesqueeze._limits import max_threads  # noqa: E402,F401 - where the CLI reads it without numpy


# --------------------------------------------------------------------------- sniffing

def runtime_source(path: Path, data: bytes | None) -> str | bytes:
    """What to hand a runtime for ``path``: its name, or its bytes (``data`` if given, else
    read here) when the name is not valid UTF-8 (a Linux file name of other bytes, held by
    Python as surrogates): onnxruntime and LiteRT take names as UTF-8 strings, and such a name
    failed in onnxruntime's constructor with a TypeError read as "cannot load this model"."""
    if data is not None:
        return data
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return Path(path).read_bytes()
    return name


def sniff(head: bytes) -> str:
    """What a file's first bytes say it is.

    Returns ``"tflite"``, ``"esq"``, ``"zip"`` (a PyTorch checkpoint or TorchScript archive),
    ``"pickle"`` (a legacy torch.save file), ``"hdf5"``, ``"empty"``, or ``"unknown"``
    (which includes ONNX: a protobuf has no magic number, so ONNX is whatever parses).
    """
    if not head:
        return "empty"
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    if head.startswith(ESQ_MAGIC) or head[1:4] == b"ESQ":
        # the second: an .esq whose magic a text-mode transfer damaged (its \r\n and \x1a are
        # there to catch that); the archive reader then says so, not "not an ONNX model"
        return "esq"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "unknown"


def _looks_like_onnx(head: bytes) -> bool:
    # ModelProto field 1 (ir_version, varint) is serialized first: tag byte 0x08.
    return head[:1] == b"\x08"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def unpack_file(path: Path, *, check: bool = True) -> tuple[bytes, dict[str, Any]]:
    """The inner file of a packed ``.esq`` (``model.int8.tflite.esq``) and its
    ``meta["packed"]``, decoded and checked (:mod:`edgesqueeze.format.packed`); a
    checkpoint archive is refused with what to do instead. ``check=False`` leaves the
    SHA-256 comparison of the decoded bytes to the caller (:func:`check_unpacked`): the
    archive's own checksums, layout and size are checked either way."""
    from edgesqueeze.format import container
    from edgesqueeze.format.packed import is_packed, restore

    try:
        archive = container.read_esq(path)
        if not is_packed(archive):
            raise RuntimeBackendError(
                f"{path}: is an edgesqueeze .esq checkpoint (compressed weights of a torch model), which no "
                f"runtime executes; export it (`edgesqueeze export {shlex.quote(str(path))} --pack` writes packed "
                f".onnx.esq / .tflite.esq files the runtime runs) or decode it with `edgesqueeze unpack`; both "
                f"need the toolchain (pip install 'edgesqueeze[train,export]'), which a device install does not have")
        data, info = restore(archive)
        if check:
            check_unpacked(path, data, info)
        return data, info
    except FormatError as exc:
        raise _named(path, exc) from None


def check_unpacked(path: Path, data: bytes, info: dict[str, Any]) -> None:
    """Refuse decoded bytes whose SHA-256 is not the one ``info`` (``meta["packed"]``) recorded."""
    from edgesqueeze.format.packed import check_digest

    try:
        check_digest(data, info["sha256"])
    except FormatError as exc:
        raise _named(path, exc) from None


def _named(path: Path, exc: FormatError) -> FormatError:
    text = str(exc)
    return FormatError(text if text.startswith(str(path)) else f"{path}: {text}")


def classify(path: Path) -> tuple[str, bytes]:
    """``("onnx" | "tflite", first bytes)`` for a model file; a clear error for anything else.

    Only TFLite is recognised positively (``TFL3``); ONNX is "not something else" and is
    confirmed by parsing it. A packed ``.esq`` is ``"esq"`` (:func:`unpack_file` opens it).
    """
    from edgesqueeze._io import not_a_file

    why = not_a_file(path)
    if why:
        raise FormatError(f"{path}: {why}")
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    what = sniff(head)
    if what == "empty":
        raise FormatError(f"{path}: file is empty (0 bytes); re-export it or copy it again")
    if len(head) < 8:
        raise FormatError(f"{path}: only {len(head)} bytes, too short to be a model (truncated?); "
                          f"re-export it or copy it again")
    if what == "esq":
        return "esq", head
    if what in ("zip", "pickle"):
        raise RuntimeBackendError(
            f"{path}: is a PyTorch checkpoint, which the runtimes do not run; export it to "
            f".onnx or .tflite with `edgesqueeze export` first (eval and bench run it in PyTorch; all three need "
            f"the toolchain, pip install 'edgesqueeze[train,export]', which a device install does not have: "
            f"copy the exported file to the device)")
    if what == "hdf5":
        raise FormatError(f"{path}: is an HDF5 (Keras) file, not an .onnx or .tflite model")
    return ("tflite" if what == "tflite" else "onnx"), head


def given_image_shape(path: Path | str, shape, given) -> list[int]:
    """``given`` (``--input-shape`` C, H, W) where a file's own image shape ``shape`` (None
    where its input leaves a dimension free) allows it; DataError where it fixes another."""
    given = [int(d) for d in given]
    if len(shape) != 3 or any(d is not None and d != g for d, g in zip(shape, given)):
        raise DataError(f"{path}: takes images of shape {list(shape)}, but --input-shape gives {given}; "
                        "leave --input-shape out, or give one its free dimensions allow")
    return given


def check_name(path: Path, kind: str, *, packed: bool) -> None:
    """Refuse (FormatError) a file named as a packed ``.onnx.esq`` / ``.tflite.esq`` that holds
    the other model kind, or no .esq at all (a plain model renamed): a mix-up upstream (a copy
    step, a wrong glob). ``kind``: the model inside, "onnx" or "tflite"; ``packed``: whether
    the file is a packed .esq. (A plain name, ``.onnx`` / ``.tflite``, is load()'s check.)"""
    name = path.name.lower()
    named = next((k for k in ("onnx", "tflite") if name.endswith((f".{k}.esq", f".{k}"))), None)
    fmt = {"onnx": "ONNX", "tflite": "TFLite"}
    if not packed and name.endswith(".esq"):
        base = path.name[:-4]
        base = base[:base.lower().rindex(".")] if named else base
        raise FormatError(f"{path}: is named as a packed file (.esq) but holds a plain {fmt[kind]} model, with no .esq "
                          f"header; rename it to {base}.{kind} if that is what it is")
    if packed and named is not None and named != kind:
        as_named = (f"a packed {fmt[named]}" if name.endswith(".esq")
                    else f"a{'n' if named == 'onnx' else ''} {fmt[named]}")
        raise FormatError(f"{path}: is named as {as_named} file but holds a packed {fmt[kind]} model; rename it "
                          f"to {path.name[:name.rindex('.' + named)]}.{kind}.esq if that is what it is")


# --------------------------------------------------------------------------- metadata

def parse_meta(path: Path, text: str | bytes | None) -> dict[str, Any]:
    """The artifact metadata JSON object, ``{}`` when the file carries none."""
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: the {META_KEY!r} metadata is not valid JSON ({_first_line(exc)}); "
                          f"re-export the model") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: the {META_KEY!r} metadata is a JSON {type(meta).__name__}, "
                          f"not an object; re-export the model")
    return meta


# --------------------------------------------------------------------------- input spec

@dataclass(frozen=True)
class InputSpec:
    """What the model's (single) input takes.

    ``shape`` is the tensor's shape including the batch dimension, ``None`` where dynamic,
    in the tensor's own ``layout`` ("NCHW", or "NHWC" for a foreign channels-last TFLite
    file; :meth:`Artifact.predict` always takes NCHW and transposes). ``dtype`` is the
    tensor's numpy dtype name; ``quantization`` its per-tensor ``(scale, zero_point)`` when
    it is an integer tensor. ``normalization`` is "caller", "in-graph", or ``None`` when the
    file carries no metadata and nothing is known (then ``mean``/``std`` are ``None`` too
    and ``predict_images`` feeds pixels/255).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    quantization: tuple[float, int] | None
    normalization: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    layout: str = "NCHW"

    @property
    def batch(self) -> int | None:
        return self.shape[0] if self.shape else None

    @property
    def image_shape(self) -> tuple[int | None, ...]:
        """One image's shape as [C, H, W] (NCHW order whatever the tensor's layout)."""
        rest = tuple(self.shape[1:])
        if self.layout == "NHWC" and len(rest) == 3:
            return (rest[2], rest[0], rest[1])
        return rest


def check_classes(path: Path, meta: dict, output_shape) -> None:
    """Refuse metadata whose class list does not match the model's output (10 names, 7
    scores): `run` stopped with 'topk: 10 class names for 7 scores', naming no file."""
    classes = meta.get("classes") if meta else None
    dims = list(output_shape) if output_shape is not None else []
    last = _dim(dims[-1]) if dims else None
    if classes and last is not None and len(dims) >= 2 and last != len(classes):
        raise FormatError(f"{path}: its metadata names {len(classes)} classes but the model outputs {last} "
                          "scores; the metadata does not belong to this model (re-export it)")


def _dim(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, np.integer)) and int(v) > 0 else None


def build_spec(path: Path, meta: dict, *, name: str, shape, dtype: str,
               quantization: tuple[float, int] | None) -> InputSpec:
    """Combine the tensor's own facts with the metadata; refuse metadata that does not fit."""
    dims = tuple(_dim(v) for v in shape)
    layout = "NCHW"
    m_shape = meta.get("input_shape")
    if m_shape is not None:
        try:
            chw = tuple(int(v) for v in m_shape)
        except (TypeError, ValueError):
            raise FormatError(f"{path}: metadata input_shape {m_shape!r} is not a list of "
                              f"integers; re-export the model") from None
        if len(dims) != len(chw) + 1:
            raise FormatError(f"{path}: metadata says one input is {list(chw)} but the model's "
                              f"input has rank {len(dims)} ({_fmt_shape(dims)}); the metadata "
                              f"does not belong to this model")

        def fits(order):
            return all(d is None or d == c for d, c in zip(dims[1:], order))

        if len(chw) == 3 and not fits(chw) and fits((chw[1], chw[2], chw[0])):
            layout = "NHWC"
        elif not fits(chw):
            raise FormatError(f"{path}: metadata says one input is {list(chw)} but the model "
                              f"takes {_fmt_shape(dims)}; the metadata does not belong to this model")
        # Fill dynamic dims from the metadata (batch stays as the model says).
        order = chw if layout == "NCHW" else (chw[1], chw[2], chw[0])
        dims = (dims[0], *(d if d is not None else c for d, c in zip(dims[1:], order)))
    elif len(dims) == 4 and dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4) and dims[1] is not None:
        layout = "NHWC"  # a foreign channels-last file with no metadata: [N, H, W, C]

    norm = meta.get("normalization") if meta else None
    if norm is not None and norm not in ("caller", "in-graph"):
        raise FormatError(f"{path}: metadata normalization {norm!r} is neither 'caller' nor "
                          f"'in-graph'; re-export the model")
    mean = std = None
    if meta:
        c = (dims[1] if layout == "NCHW" else dims[-1]) if len(dims) == 4 else None
        mean, std = _vec(path, meta, "mean", c, 0.0), _vec(path, meta, "std", c, 1.0)
        if any(s == 0 for s in std):
            raise FormatError(f"{path}: metadata std has a zero; re-export the model")
        if norm is None:
            norm = "caller"
    return InputSpec(name=name, shape=dims, dtype=dtype, quantization=quantization,
                     normalization=norm, mean=mean, std=std, layout=layout)


def _vec(path: Path, meta: dict, key: str, channels: int | None, default: float) -> tuple[float, ...]:
    raw = meta.get(key)
    if raw is None:
        return tuple([default] * (channels or 1))
    try:
        vals = tuple(float(v) for v in raw)
    except (TypeError, ValueError):
        raise FormatError(f"{path}: metadata {key} {raw!r} is not a list of numbers") from None
    if channels is not None and len(vals) not in (1, channels):
        raise FormatError(f"{path}: metadata {key} has {len(vals)} values for {channels} "
                          f"channel{'s' if channels != 1 else ''}")
    return vals


def _fmt_shape(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# --------------------------------------------------------------------------- quantization

def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """float -> integer tensor, rounding half away from zero like TFLite's own Quantize."""
    info = np.iinfo(dtype)
    v = x.astype(np.float64) / scale
    q = np.sign(v) * np.floor(np.abs(v) + 0.5) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


# --------------------------------------------------------------------------- artifact

class Artifact:
    """A loaded model file and its runtime; one interface for ONNX and TFLite.

    Attributes: ``path``, ``kind`` ("onnx" | "tflite"), ``backend`` ("onnxruntime" |
    "ai-edge-litert" | "tflite-runtime" | "tflite-micro"), ``meta`` (the artifact metadata,
    ``{}`` when the file has none), ``input_spec`` (:class:`InputSpec`), ``classes``,
    ``threads``; ``packed`` (a packed file's ``meta["packed"]``, else None) and
    ``decode_seconds``; ``shape_given`` (the input size came from ``--input-shape``); a
    TensorFlow Lite Micro artifact adds ``arena_bytes``; ``portable``
    is True for an ONNX session opened without onnxruntime's x86-only NCHWc kernels
    (:mod:`._onnx`).
    """

    path: Path
    kind: str
    backend: str
    meta: dict[str, Any]
    input_spec: InputSpec
    packed: dict[str, Any] | None = None
    decode_seconds: float = 0.0
    portable: bool = False
    threads: int | None
    shape_given: bool = False  # input_spec's size set by the caller (--input-shape) where the file leaves it free
    # LiteRT's and TFLite Micro's interpreters hold one input, one arena: two threads calling
    # predict at once got "There is at least 1 reference to internal data" (read as a damaged
    # file) or, silently, another call's scores. They run one call at a time; an onnxruntime
    # session runs calls from several threads at once, so ONNX files take none.
    _run_lock: Any = None

    def __getstate__(self):  # a runtime session or interpreter does not pickle: "cannot pickle 'module'"
        raise TypeError(f"{self.path}: a loaded model cannot be pickled (its runtime session is native); "
                        "load it in each process instead: edgesqueeze.runtime.load(path)")

    # -- subclass hooks ---------------------------------------------------------------
    def _run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Run one batch of native-dtype, native-layout input; return the raw first output."""
        raise NotImplementedError

    _out_q: tuple[float, int] | None = None  # (scale, zero point) of an int8 output

    def _dequantize_output(self, y: np.ndarray) -> np.ndarray:
        return y if self._out_q is None else dequantize(y, *self._out_q)

    # -- public -----------------------------------------------------------------------
    @property
    def classes(self) -> list[str] | None:
        c = self.meta.get("classes")
        return list(c) if c else None

    @property
    def has_metadata(self) -> bool:
        """False for a file without edgesqueeze metadata: normalization is then unknown."""
        return bool(self.meta)

    def describe(self, meta: dict[str, Any]) -> None:
        """Describe the input of a file that carries no edgesqueeze metadata (one exported by
        another tool), as export would have recorded it: ``mean`` and ``std`` (pixels /255,
        then (x - mean) / std), and optionally ``input_shape`` and ``classes``. A file that
        has metadata of its own is refused (FormatError): its description is the exporter's."""
        if self.meta:
            raise FormatError(f"{self.path}: records its own input description (mean, std), which is used; leave out "
                              "--mean and --std")
        if meta.get("mean") is None or meta.get("std") is None:
            raise FormatError(f"{self.path}: a description needs both mean and std")
        spec = self.input_spec
        described = {"normalization": "caller", **meta}
        try:
            self.input_spec = build_spec(self.path, described, name=spec.name, shape=spec.shape, dtype=spec.dtype,
                                         quantization=spec.quantization)
        except FormatError as exc:  # the values came from the caller (--mean/--std), not the file
            raise FormatError(str(exc).replace(": metadata ", ": the given ", 1)) from None
        self.meta = described

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Scores (N, K) float32 for float32 NCHW input in the artifact's input space.

        The batch is one runtime call: its memory grows with N, and onnxruntime and LiteRT keep
        their peak for as long as the artifact lives (5,000 digits images: about 0.9 GB). A
        service classifying many images calls it in parts, as :meth:`predict_images` does.
        Safe to call from several threads (TFLite files run one call at a time)."""
        x = np.asarray(x)
        spec = self.input_spec
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"predict takes float32 input in the model's input space, got "
                            f"{x.dtype}; for uint8 pixels use predict_images")
        want = spec.image_shape
        if x.ndim != len(want) + 1:
            raise DataError(f"predict takes a batch shaped [N, {', '.join(map(str, want))}], "
                            f"got an array of shape {list(x.shape)}")
        if any(w is not None and w != g for w, g in zip(want, x.shape[1:])):
            raise DataError(f"{self.path.name} takes images of shape {list(want)}, got "
                            f"{list(x.shape[1:])} (batch shape {list(x.shape)})")
        given = x
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: said below
            x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x)
        if not finite.all():  # an int8 file maps NaN to some pixel value and answers with confidence
            if given is not x and np.isfinite(given).all():  # it said "holds NaN or infinite values"
                raise DataError(f"predict: the input holds values up to {np.abs(given).max():.3g}, beyond float32's "
                                f"{np.finfo(np.float32).max:.3g}: the model takes float32 in its input space (pixels "
                                "normalized, about -3..3); for uint8 pixels use predict_images")
            raise DataError(f"predict: the input holds {x.size - int(finite.sum())} NaN or infinite value(s) of "
                            f"{x.size}; no model computes meaningful scores from them (an int8 file still "
                            "answers, with confidence): give finite input")
        image_shape = [int(d) for d in x.shape[1:]]
        if spec.layout == "NHWC" and x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
        x = self._to_native(x)
        if len(x) == 0:
            return np.zeros((0, self._num_outputs_hint()), np.float32)
        try:
            with self._run_lock or contextlib.nullcontext():  # an interpreter one thread at a time may run
                y = self._predict_native(np.ascontiguousarray(x))
        except (EdgesqueezeError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's Fail & co. (plain Exceptions), LiteRT's RuntimeError
            if self.shape_given or any(w is None for w in want):  # the caller chose the size: not damage
                raise RuntimeBackendError(
                    f"{self.path}: {self.backend} cannot run the model on images of shape {image_shape} "
                    f"({_first_line(exc)}); the file leaves its input size free: give the --input-shape C,H,W "
                    "it was made for") from None
            raise RuntimeBackendError(
                f"{self.path}: {self.backend} failed running the model ({_first_line(exc)}); the file may be "
                f"damaged (export it again, or copy it again) or need ops this runtime version lacks") from None
        y = np.asarray(self._dequantize_output(y), dtype=np.float32)
        return y.reshape(len(y), -1)

    def predict_images(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Scores (N, K) for uint8 NCHW pixels: /255, then the metadata's normalization."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DataError(f"predict_images takes uint8 pixels (NCHW), got {images.dtype}; "
                            f"for prepared float input use predict")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"predict_images: batch_size must be an integer >= 1, got {batch_size!r}")
        if images.ndim != 4:
            raise DataError(f"predict_images takes a batch shaped [N, C, H, W], got "
                            f"{list(images.shape)}")
        outs = [self.predict(self.prepare(images[i:i + batch_size]))
                for i in range(0, len(images), batch_size)]
        if not outs:
            return np.zeros((0, self._num_outputs_hint()), np.float32)
        return np.concatenate(outs)

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 NCHW pixels -> float32 input space: /255, then (x - mean)/std if "caller"."""
        x = np.asarray(images).astype(np.float32) / np.float32(255.0)
        spec = self.input_spec
        if spec.normalization == "caller" and spec.mean is not None and x.ndim == 4:
            m = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
            s = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
            x = (x - m) / s
        return np.ascontiguousarray(x, dtype=np.float32)

    def __repr__(self) -> str:
        s = self.input_spec
        return (f"<{type(self).__name__} {self.path.name} kind={self.kind} backend={self.backend} "
                f"input={s.name}{_fmt_shape(s.shape)} {s.dtype} normalization={s.normalization}>")

    # -- shared machinery ---------------------------------------------------------------
    def _to_native(self, x: np.ndarray) -> np.ndarray:
        spec = self.input_spec
        dt = np.dtype(spec.dtype)
        if np.issubdtype(dt, np.integer):
            if spec.quantization is None:
                raise RuntimeBackendError(
                    f"{self.path}: the model takes {spec.dtype} input but the file carries no "
                    f"quantization scale/zero point for it, so float input cannot be mapped onto it")
            scale, zp = spec.quantization
            return quantize(x, scale, zp, dt)
        return x.astype(dt, copy=False)

    def _predict_native(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)

    def _num_outputs_hint(self) -> int:
        return 0

    @staticmethod
    def _chunked(x: np.ndarray, size: int, fn) -> np.ndarray:
        """Run ``fn`` on chunks of exactly ``size`` (a fixed-batch model), padding the last."""
        outs = []
        for i in range(0, len(x), size):
            part = x[i:i + size]
            n = len(part)
            if n < size:
                pad = np.zeros((size - n, *part.shape[1:]), part.dtype)
                part = np.concatenate([part, pad])
            outs.append(np.asarray(fn(part))[:n])
        return np.concatenate(outs)


# --------------------------------------------------------------------------- scores

def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Probabilities from scores along ``axis`` (float32). Scores holding NaN or infinity are
    refused (DataError), as :func:`topk` refuses them: a row of -inf gave NaN with a numpy
    warning."""
    z = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(z).all():
        raise DataError("softmax: the scores hold NaN or infinity (what the model computed from its input): "
                        "no probabilities can be read from them")
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def topk(scores: np.ndarray, k: int = 5, classes: list[str] | None = None, *,
         logits: bool = True) -> list[tuple[int, str, float]]:
    """The ``k`` best classes of one image's scores as ``(index, name, probability)``.

    Probabilities are the softmax of ``scores`` (pass ``logits=False`` when the model
    already outputs probabilities). Names come from ``classes``, else the index as text.
    Ties keep the lower index first. Example: ``topk([2.0, 1.0, 0.1], 2, ["a", "b", "c"])``
    gives ``[(0, "a", 0.659), (1, "b", 0.242)]``.
    """
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim == 2 and s.shape[0] == 1:
        s = s[0]
    if s.ndim != 1 or s.size == 0:
        raise DataError(f"topk takes one image's scores (K,) or (1, K), got shape {list(s.shape)}")
    if classes is not None and len(classes) != s.size:
        raise DataError(f"topk: {len(classes)} class names for {s.size} scores")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"topk: k must be a positive integer, got {k!r}")
    if not np.isfinite(s).all():  # argsort put NaN last: class 0 came first, "probability nan"
        raise DataError("topk: the scores hold NaN or infinity (what the model computed from this input): no class "
                        "can be ranked")
    p = softmax(s) if logits else s
    k = max(0, min(int(k), s.size))
    order = np.argsort(-p, kind="stable")[:k]
    return [(int(i), str(classes[i]) if classes is not None else str(int(i)), float(p[i]))
            for i in order]


def not_torch_file(path: Path, head: bytes) -> None:
    """Refuse (CheckpointError) a file whose first bytes are not a PyTorch zip, a legacy
    ``torch.save`` pickle or an ``.esq``, saying what it looks like instead: unpickling
    advice for an ONNX file would be wrong, and torch's own errors for one are tracebacks."""
    what = sniff(head)
    if what in ("zip", "pickle", "esq"):
        return
    if what == "empty":
        raise CheckpointError(f"{path}: file is empty (0 bytes); save or copy the model again")
    runs = "edgesqueeze inspect, verify, run and bench read it; this command takes a PyTorch model"
    hint = {"tflite": f"it is a TFLite model ({runs})",
            "hdf5": "it is an HDF5 file (a Keras model?); edgesqueeze reads PyTorch models"}.get(what)
    if hint is None:
        hint = (f"it looks like an ONNX model ({runs})" if _looks_like_onnx(head)
                else "it has no zip or pickle header; expected a torch.save checkpoint or state_dict, a "
                     "TorchScript archive, a torch.export .pt2 or an .esq")
    raise CheckpointError(f"{path}: not a PyTorch model file: {hint}")
