"""TFLite files through TensorFlow Lite Micro's interpreter (the PyPI package ``tflite-micro``).

The microcontroller runtime, run on the host: what a TFLite Micro compressed file
(``model.int8.micro.tflite``, its filters behind ``TFLM_DECODE`` operators) needs, since
LiteRT cannot run it, and what any int8 ``.tflite`` can be checked in before it is flashed
(``load(path, backend="tflite-micro")``). The kernels are TFLite Micro's portable reference
kernels, so accuracy is what a Cortex-M computes with them; speed here says nothing about a
microcontroller.

One image per invoke (TFLite Micro has no batch resizing). The arena is allocated at load
(generously: the file's size times ten, at least 16 MiB); :attr:`MicroArtifact.arena_bytes`
is what TFLite Micro's recording allocator reports it used, the ``arena_size`` a
microcontroller needs for this file.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np

from edgesqueeze._io import native_stderr
from edgesqueeze.errors import FormatError, RuntimeBackendError
from edgesqueeze.runtime._base import Artifact, _first_line, build_spec
from edgesqueeze.runtime._tflite import per_tensor, read_meta

__all__ = ["MICRO_INSTALL_HINT", "MicroArtifact", "import_micro_runtime"]

MICRO_INSTALL_HINT = "pip install 'edgesqueeze[micro]' (TensorFlow Lite Micro's interpreter; x86-64 Linux wheels)"
_MIN_ARENA = 16 << 20


def import_micro_runtime(path: Path | str, why: str = ""):
    """``tflite_micro.runtime``, or one line naming the file and the install."""
    try:
        from tflite_micro import runtime
    except ImportError as exc:
        raise RuntimeBackendError(f"{path}: {why or 'backend tflite-micro'} needs TensorFlow Lite Micro's "
                                  f"Python package ({_first_line(exc)}); {MICRO_INSTALL_HINT}") from None
    return runtime


def _stderr_of(fn):
    """Run ``fn``; return what native code wrote to file descriptor 2 meanwhile (TFLite
    Micro prints its allocation record there, and nowhere else)."""
    with native_stderr(keep=lambda line: False) as caught:
        fn()
    return caught.text


class MicroArtifact(Artifact):
    kind = "tflite"
    backend = "tflite-micro"

    def __init__(self, path: Path, *, data: bytes | None = None, why: str = ""):
        self.path = Path(path)
        self.threads = 1
        runtime = import_micro_runtime(self.path, why)
        if data is None:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise FormatError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        self._data = bytes(data)
        self._run_lock = threading.Lock()  # one interpreter, one arena: one call at a time
        try:  # the package parses the whole flatbuffer in Python first: damage is refused there
            with native_stderr(keep=lambda line: False) as said:  # its reasons go to fd 2, not the exception
                try:
                    self.interpreter = runtime.Interpreter.from_bytes(
                        self._data, arena_size=max(_MIN_ARENA, 10 * len(self._data)))
                except (RuntimeError, ValueError) as exc:
                    failed = exc
                else:
                    failed = None
            if failed is not None:
                missing = sorted(set(re.findall(r"Didn't find op for builtin opcode '(\w+)'", said.text)))
                why = (f"it has no {', '.join(missing)} operator{'s' if len(missing) > 1 else ''}" if missing
                       else _first_line(failed))
                raise RuntimeBackendError(f"{self.path}: TensorFlow Lite Micro cannot open it ({why})") from None
        except RuntimeBackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - flatbuffers' struct / index errors on a damaged file
            raise FormatError(f"{self.path}: TFLite file is damaged or truncated ({type(exc).__name__}: "
                              f"{_first_line(exc)}); re-export it or copy it again") from None
        inp, out = self.interpreter.get_input_details(0), self.interpreter.get_output_details(0)
        self._arena: int | None = None
        inp, out = {"name": "input", **inp}, {"name": "output", **out}
        self.meta = read_meta(self.path, self._data)
        shape = [int(d) for d in inp["shape"]]
        self.input_spec = build_spec(self.path, self.meta, name="input", shape=shape,
                                     dtype=np.dtype(inp["dtype"]).name,
                                     quantization=per_tensor(self.path, inp, "input"))
        self._out_q = per_tensor(self.path, out, "output")
        self._out_shape = [int(d) for d in out["shape"]]
        self._batch = shape[0] if shape else 1

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        it = self.interpreter
        try:
            it.set_input(x, 0)
            it.invoke()
        except (RuntimeError, ValueError) as exc:
            raise RuntimeBackendError(f"{self.path}: TensorFlow Lite Micro failed to run it "
                                      f"({_first_line(exc)})") from None
        return np.array(it.get_output(0))

    def _predict_native(self, x: np.ndarray) -> np.ndarray:
        return self._chunked(x, self._batch, self._invoke)

    def _num_outputs_hint(self) -> int:
        return self._out_shape[-1] if self._out_shape else 0

    @property
    def arena_bytes(self) -> int | None:
        """The arena TFLite Micro allocated for this file ("Arena allocation total"), measured
        after one inference (run on zeros if none has been); None if it printed no total."""
        if self._arena is None:
            shape = self.input_spec.shape
            if not any(d is None for d in shape):
                self._invoke(np.zeros([int(d) for d in shape], np.dtype(self.input_spec.dtype)))
            m = re.search(r"Arena allocation total (\d+) bytes", _stderr_of(self.interpreter.print_allocations))
            self._arena = int(m.group(1)) if m else -1
        return self._arena if self._arena >= 0 else None
