"""ONNX artifacts through onnxruntime (CPU).

**The same numbers on x86 and ARM.** onnxruntime's ``NchwcTransformer`` (part of its
default ``ORT_ENABLE_ALL`` optimizations) rewrites float convolutions into a blocked
``NCHWc`` layout with their own kernels, on x86 only. Those kernels sum in another order
than the im2col + SGEMM path every CPU otherwise takes, so a float convolution's results
differ in their last bits between x86 and ARM. In a file that is all float that is noise
(ImageNet SqueezeNet fp32: logits within 1.5e-5); in an int8 file whose first layers stay
float it reaches the ``QuantizeLinear`` after them and moves values by a whole
quantization step (logits up to 0.25 apart, and one top-1 of 100 flipped). Files quantized
for every CPU (``onnx-int8`` with ``target: any-cpu``, the default) are therefore opened
without that one transformer (``portable``), here and on the device: on an AVX2 x86 host
the ImageNet file then agrees with an arm64 device on every top-1, logits within 4e-6
(benchmarks/notes.md, session 18), at the cost of the NCHWc kernels' speed for its float
layers on x86 (there 20.4 instead of 18.3 ms a 224x224 image on one thread). ARM runs
nothing different. ``load(..., portable=False)`` keeps onnxruntime's default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from edgesqueeze.errors import FormatError, RuntimeBackendError
from edgesqueeze.runtime._base import (
    META_KEY,
    Artifact,
    _first_line,
    _looks_like_onnx,
    build_spec,
    check_classes,
    parse_meta,
    runtime_source,
)

# onnxruntime's tensor type strings -> numpy dtypes (the ones an image model can take).
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(int64)": "int64",
}


def import_onnxruntime(path: Path | str):
    try:
        import onnxruntime
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "onnxruntime":
            raise RuntimeBackendError(f"{path}: onnxruntime is installed but cannot be imported: it needs "
                                      f"{exc.name!r} ({_first_line(exc)})") from None
        raise RuntimeBackendError(
            f"{path}: is an ONNX model but onnxruntime is not installed ({_first_line(exc)}); "
            f"{_INSTALL_GOOD} (or pip install 'edgesqueeze[runtime]')") from None
    except ImportError as exc:  # installed, but built for another numpy (1.18 under numpy 2) or broken
        raise RuntimeBackendError(
            f"{path}: onnxruntime is installed but cannot be imported ({_first_line(exc)}): an onnxruntime "
            f"built for another numpy? {_INSTALL_GOOD.replace('pip install', 'pip install -U', 1)}") from None
    return onnxruntime


# onnxruntime releases whose x86 int8 kernels gave other results than every other release on
# a CPU with AVX-512 VNNI and AMX (the demo's 7-bit onnx-int8 file: 92.5-93.6% top-1 against
# 98.33% with 1.19, 1.20 and 1.25 onwards; right under AVX2 kernels; session 35). The
# `runtime` extra keeps them out; a session opened with one says so.
_BAD_INT8 = ((1, 21), (1, 24))
_GOOD_SINCE = "1.25"
_INSTALL_GOOD = (f"pip install 'onnxruntime>={_GOOD_SINCE}' (on Python 3.10, which has no wheel of it: "
                 "'onnxruntime>=1.19,<1.21')")


def _bad_int8_release(version: str) -> bool:
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return _BAD_INT8[0] <= major_minor <= _BAD_INT8[1]


_NCHWC = "NchwcTransformer"
_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}


def _varint(read) -> int | None:
    value = shift = 0
    while True:
        b = read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            return None


def metadata_props(source: Path | bytes, *, limit: int = 1 << 20) -> dict[str, str]:
    """A model's ``metadata_props`` read straight from the protobuf (no onnx package), before
    any session exists: the top-level fields are walked and every other one skipped by its
    length (the graph is never read). Anything unexpected gives ``{}``: onnxruntime then
    reports the damage itself. Entries longer than ``limit`` are skipped."""
    import io

    props: dict[str, str] = {}
    with (io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")) as fh:
        while (key := _varint(fh.read)) is not None:
            field, wire = key >> 3, key & 7
            if wire == 0:
                if _varint(fh.read) is None:
                    return {}
            elif wire == 1:
                fh.seek(8, 1)
            elif wire == 5:
                fh.seek(4, 1)
            elif wire == 2:
                size = _varint(fh.read)
                if size is None:
                    return {}
                if field != _METADATA_PROPS or size > limit:
                    fh.seek(size, 1)
                    continue
                entry, pair = fh.read(size), {}
                sub = io.BytesIO(entry)
                while (k := _varint(sub.read)) is not None:
                    n = _varint(sub.read) if k & 7 == 2 else None
                    if n is None:
                        return props
                    pair[k >> 3] = sub.read(n).decode("utf-8", "replace")
                props[pair.get(1, "")] = pair.get(2, "")
            else:
                return {}
    return props


def session_metadata(path: Path | str, session) -> dict[str, str]:
    """The session's ``metadata_props``. onnxruntime decodes them as UTF-8 when asked and
    raises on any other bytes (a damaged entry, or another tool's binary value): that is the
    file's fault, one FormatError naming it, not a traceback."""
    try:
        return dict(session.get_modelmeta().custom_metadata_map or {})
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: its ONNX metadata is not UTF-8 text (byte {exc.start} of a value: "
                          "damaged, or written by a tool that stores binary there); re-export the model "
                          "or remove that metadata entry") from None


def wants_portable(source: Path | bytes) -> bool:
    """Whether a file asks for the same arithmetic on every CPU: an ``onnx-int8`` file of
    target ``any-cpu`` or ``any-cpu-7bit`` (edgesqueeze metadata)."""
    from edgesqueeze.runtime.cpu import EXACT_TARGETS, int8_target

    try:
        meta = json.loads(metadata_props(source).get(META_KEY) or "null")
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and int8_target(meta) in EXACT_TARGETS


def open_session(path: Path, *, threads: int | None, head: bytes = b"", ext: str = "", spin: bool = True,
                 data: bytes | None = None, portable: bool | None = None):
    """An onnxruntime CPU session, with load failures turned into one clear line.

    ``spin=False`` stops the intra-op threads from busy-waiting after each run (onnxruntime
    spins by default): needed when other models run between this one's runs, as when
    ``edgesqueeze bench`` times files interleaved, where the spinning threads took a core
    from LiteRT (its int8 SqueezeNet measured 10.2 ms there against 3.6 ms alone). ``data``:
    the model's bytes (a packed file's decoded content), instead of reading ``path``.
    ``portable``: without onnxruntime's x86-only NCHWc layout transform (see the module
    docstring); None: as the file's metadata asks (:func:`wants_portable`). Returns the
    session; ``session.portable`` says which it is."""
    ort = import_onnxruntime(path)
    if portable is None:
        portable = wants_portable(path if data is None else data)
    opts = ort.SessionOptions()
    # fatal only: the loader's warnings are not the user's business, and an error reaches the
    # user as the exception's one line (a failed run also printed onnxruntime's own coloured
    # "[E:onnxruntime:...] ExecuteKernel" log line before it)
    opts.log_severity_level = 4
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        # enable_fallback=0: on a load error onnxruntime would otherwise print a four-line "EP
        # Error" banner to stdout (into `run --json`'s output) and retry the same CPU provider
        # without disabled_optimizers; older onnxruntime versions ignore the keyword
        session = ort.InferenceSession(runtime_source(path, data), sess_options=opts,
                                       providers=["CPUExecutionProvider"],
                                       disabled_optimizers=[_NCHWC] if portable else None, enable_fallback=0)
        session.portable = bool(portable)
        return session
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind classes
        kind, msg = type(exc).__name__, _ort_reason(exc)
        # a name or string that is not UTF-8 (UnicodeDecodeError) and a graph that contradicts
        # itself ("This is an invalid model") are damage too: a flipped bit does both
        damaged = kind in ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "UnicodeDecodeError") or any(
            s in msg for s in ("Missing opset", "No graph", "Protobuf parsing failed", "This is an invalid model"))
        if damaged and ext == ".tflite":  # named .tflite, no TFL3 identifier, and no ONNX model either
            raise FormatError(f"{path}: not a TFLite file (no 'TFL3' identifier at bytes 4..8) "
                              f"and not an ONNX model either; re-export it or copy it again") from None
        if damaged and kind == "InvalidProtobuf" and not _looks_like_onnx(head):
            raise FormatError(f"{path}: not an ONNX or TFLite model (protobuf parsing failed, "
                              f"first bytes {head[:8]!r}); expected a file written by "
                              f"`edgesqueeze export`") from None
        if damaged:
            raise FormatError(f"{path}: ONNX file is damaged or truncated ({msg}); re-export it "
                              f"or copy it again") from None
        raise RuntimeBackendError(f"{path}: onnxruntime {ort.__version__} cannot load this model "
                                  f"({kind}: {msg}); upgrade onnxruntime or re-export it") from None


def _ort_reason(exc: BaseException) -> str:
    """onnxruntime's message without its boilerplate: "[ONNXRuntimeError] : 1 : FAIL : Load
    model from x failed:/src/model.cc:245 onnxruntime::Model::Model(...) Missing opset..."
    becomes "Missing opset...". """
    text = str(exc).strip()
    if "failed:" in text:
        text = text.split("failed:", 1)[1]
    text = re.sub(r"^\s*\S+\.(?:cc|h|cpp):\d+\s+\S+?\([^)]*\)\s*", "", text)
    text = re.sub(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:300]


class OnnxArtifact(Artifact):
    kind = "onnx"
    backend = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None = None, head: bytes = b"", ext: str = "",
                 spin: bool = True, data: bytes | None = None, portable: bool | None = None):
        self.path = Path(path)
        self.threads = threads
        self.session = open_session(self.path, threads=threads, head=head, ext=ext, spin=spin, data=data,
                                    portable=portable)
        self.portable = self.session.portable
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise RuntimeBackendError(
                f"{self.path}: the model has {len(inputs)} inputs "
                f"({', '.join(i.name for i in inputs)}); edgesqueeze runs single-input image models")
        outputs = self.session.get_outputs()
        if not outputs:
            raise FormatError(f"{self.path}: the ONNX graph has no outputs; re-export it")
        self._in, self._out = inputs[0], outputs[0]
        custom = session_metadata(self.path, self.session)
        self.meta = parse_meta(self.path, custom.get(META_KEY))
        check_classes(self.path, self.meta, self._out.shape)
        import onnxruntime

        if _bad_int8_release(onnxruntime.__version__) and "int8" in str(self.meta.get("artifact_format", "")):
            import warnings

            from edgesqueeze.errors import Note

            warnings.warn(f"{self.path}: onnxruntime {onnxruntime.__version__} computes int8 files differently "
                          "from other releases on x86 CPUs with AVX-512 VNNI or AMX (onnxruntime 1.21-1.24: the "
                          "demo's int8 file scored 93% there against 98.33% with 1.19, 1.20 and 1.25 onwards); "
                          + _INSTALL_GOOD, Note, stacklevel=2)
        dtype = _ORT_DTYPES.get(self._in.type)
        if dtype is None:
            raise RuntimeBackendError(f"{self.path}: input {self._in.name!r} has type {self._in.type}, "
                                      f"not a numeric tensor this runtime can feed")
        shape = [d if isinstance(d, int) else None for d in self._in.shape]
        # An ONNX integer input has no scale/zero point of its own (QDQ models keep float I/O).
        self.input_spec = build_spec(self.path, self.meta, name=self._in.name, shape=shape,
                                     dtype=dtype, quantization=None)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._out.name], {self._in.name: x})[0]

    def _predict_native(self, x: np.ndarray) -> np.ndarray:
        batch = self.input_spec.batch
        if batch is not None and batch != len(x):  # exported with a fixed batch size
            return self._chunked(x, batch, self._run)
        return self._run(x)

    def _num_outputs_hint(self) -> int:
        last = self._out.shape[-1] if self._out.shape else None
        return last if isinstance(last, int) else 0
