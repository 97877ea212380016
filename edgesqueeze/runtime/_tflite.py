"""TFLite artifacts through LiteRT (``ai-edge-litert``), or ``tflite-runtime`` when only it is there.

Batches: converters usually bake batch 1 into the file. Most graphs still run at any batch
after ``resize_tensor_input`` + ``allocate_tensors``; a graph with the batch baked into a
reshape (a flatten before the classifier) refuses, and then this runs it one fixed-size
batch at a time. Which of the two works is found out once, on the first batch of a new
size, and remembered.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np

from edgesqueeze._io import native_stderr
from edgesqueeze.errors import FormatError, RuntimeBackendError
from edgesqueeze.runtime._base import Artifact, _first_line, build_spec, check_classes, runtime_source

_INSTALL_HINT = ("pip install ai-edge-litert (or edgesqueeze[runtime]); on an old Raspberry Pi "
                 "OS image, pip install tflite-runtime")


def import_interpreter(path: Path | str, backend: str | None = None):
    """``(Interpreter class, backend name, interpreter module)`` for the backend asked for."""
    errors = []
    if backend in (None, "ai-edge-litert"):
        try:
            from ai_edge_litert import interpreter as mod

            return mod.Interpreter, "ai-edge-litert", mod
        except ImportError as exc:
            errors.append(f"ai-edge-litert: {_first_line(exc)}")
            if backend == "ai-edge-litert":
                raise RuntimeBackendError(f"{path}: backend 'ai-edge-litert' is not installed "
                                          f"({errors[0]}); pip install ai-edge-litert") from None
    try:
        from tflite_runtime import interpreter as mod

        return mod.Interpreter, "tflite-runtime", mod
    except ImportError as exc:
        errors.append(f"tflite-runtime: {_first_line(exc)}")
    if backend == "tflite-runtime":
        raise RuntimeBackendError(f"{path}: backend 'tflite-runtime' is not installed; "
                                  f"pip install tflite-runtime")
    raise RuntimeBackendError(f"{path}: is a TFLite model but no TFLite runtime is installed "
                              f"({'; '.join(errors)}); {_INSTALL_HINT}")


def make_interpreter(path: Path, cls, *, threads: int | None, data: bytes | None = None, **kwargs):
    """An Interpreter with tensors allocated (from ``data``, the model's bytes, if given);
    load failures become one clear line."""
    try:
        given = runtime_source(path, data)
        source = {"model_path": given} if isinstance(given, str) else {"model_content": given}
        it = cls(**source, num_threads=threads, **kwargs)
    except ValueError as exc:
        msg = _first_line(exc)
        if "flatbuffer" in msg.lower() or "model identifier" in msg.lower():
            raise FormatError(f"{path}: TFLite file is damaged or truncated ({msg}); re-export it "
                              f"or copy it again") from None
        raise RuntimeBackendError(f"{path}: the TFLite runtime cannot open it ({msg})") from None
    try:
        with native_stderr():  # LiteRT's "Created TensorFlow Lite XNNPACK delegate" line
            it.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        raise RuntimeBackendError(f"{path}: the TFLite runtime cannot prepare this model "
                                  f"({_first_line(exc)}); it may need ops a newer "
                                  f"ai-edge-litert has") from None
    return it


def tensor_quantization(details: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """``(scales, zero_points, axis)`` of a tensor from the interpreter's details."""
    qp = details.get("quantization_parameters")
    if qp is not None:
        return (np.asarray(qp["scales"], np.float64), np.asarray(qp["zero_points"], np.int64),
                int(qp.get("quantized_dimension", 0)))
    scale, zp = details.get("quantization", (0.0, 0))
    if scale:
        return np.array([scale], np.float64), np.array([zp], np.int64), 0
    return np.zeros(0, np.float64), np.zeros(0, np.int64), 0


def per_tensor(path: Path, details: dict, what: str) -> tuple[float, int] | None:
    scales, zps, _ = tensor_quantization(details)
    dtype = np.dtype(details["dtype"])
    if not np.issubdtype(dtype, np.integer) or scales.size == 0 or not np.any(scales):
        return None
    if scales.size != 1:
        raise RuntimeBackendError(f"{path}: the model's {what} {details['name']!r} is quantized "
                                  f"per channel ({scales.size} scales); only per-tensor input/output "
                                  f"quantization is supported")
    return float(scales[0]), int(zps[0]) if zps.size else 0


def read_meta(path: Path, data: bytes | None = None) -> dict:
    try:
        from edgesqueeze.runtime._tflite_meta import read_tflite_metadata
    except ImportError:
        warnings.warn("edgesqueeze.runtime._tflite_meta is missing: TFLite metadata is not read",
                      stacklevel=3)
        return {}
    meta = read_tflite_metadata(path, data)
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: the 'edgesqueeze' metadata is not a JSON object; re-export it")
    return meta


class TFLiteArtifact(Artifact):
    kind = "tflite"

    def __init__(self, path: Path, *, threads: int | None = None, backend: str | None = None,
                 data: bytes | None = None):
        self.path = Path(path)
        self.threads = threads
        self._cls, self.backend, self._module = import_interpreter(self.path, backend)
        if data is None:  # read once: a rebuilt interpreter (_reset) read the file again, which may have
            # been replaced or removed since (it then ran another model, or failed for good)
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise FormatError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        self._data = data  # kept: the interpreter reads the model from this buffer
        self._run_lock = threading.Lock()
        self.interpreter = make_interpreter(self.path, self._cls, threads=threads, data=data)
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1:
            raise RuntimeBackendError(
                f"{self.path}: the model has {len(inputs)} inputs "
                f"({', '.join(d['name'] for d in inputs)}); edgesqueeze runs single-input image models")
        if not outputs:
            raise FormatError(f"{self.path}: the TFLite model has no outputs; re-export it")
        self._in, self._out = inputs[0], outputs[0]
        self.meta = read_meta(self.path, data)
        check_classes(self.path, self.meta, self._out.get("shape_signature", self._out.get("shape")))
        sig = self._in.get("shape_signature")
        shape = list(sig if sig is not None and len(sig) else self._in["shape"])
        self._base_batch = int(self._in["shape"][0]) if len(self._in["shape"]) else 1
        self.input_spec = build_spec(self.path, self.meta, name=self._in["name"], shape=shape,
                                     dtype=np.dtype(self._in["dtype"]).name,
                                     quantization=per_tensor(self.path, self._in, "input"))
        self._out_q = per_tensor(self.path, self._out, "output")
        self._batch = self._base_batch  # the batch the interpreter is allocated for now
        self._resizable: bool | None = None  # unknown until a batch of another size arrives

    # -- running ----------------------------------------------------------------------
    def _invoke(self, x: np.ndarray) -> np.ndarray:
        it = self.interpreter
        it.set_tensor(self._in["index"], x)
        it.invoke()
        return it.get_tensor(self._out["index"])  # a copy: no reference into the arena

    def _reset(self) -> None:
        """A fresh interpreter at the file's own shapes (after a failed resize)."""
        self.interpreter = make_interpreter(self.path, self._cls, threads=self.threads, data=self._data)
        self._batch = self._base_batch

    def _predict_native(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n == self._batch:
            return self._invoke(x)
        if self._resizable is not False:
            shape = [n, *x.shape[1:]]
            try:
                self.interpreter.resize_tensor_input(self._in["index"], shape)
                self.interpreter.allocate_tensors()
                self._batch = n
                y = self._invoke(x)
            except (RuntimeError, ValueError):
                y = None
            if y is not None and y.ndim >= 1 and y.shape[0] == n:
                self._resizable = True
                return y
            self._resizable = False
            self._reset()
        if self._batch != self._base_batch:
            self._reset()
        return self._chunked(x, self._base_batch, self._invoke)

    def _num_outputs_hint(self) -> int:
        shape = self._out["shape"]
        return int(shape[-1]) if len(shape) else 0
