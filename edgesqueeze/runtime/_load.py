"""Open any artifact: the one place that knows both backends, above them and :mod:`._base`.

Kept out of :mod:`._base` so that the backends import the shared code and nothing imports
back: ``_load -> _onnx, _tflite -> _base``.
"""

from __future__ import annotations

import numbers
import os
import time
from pathlib import Path

from edgesqueeze.errors import FormatError, RuntimeBackendError
from edgesqueeze.runtime._base import (_SNIFF_BYTES, Artifact, check_name, check_unpacked, classify, max_threads,
                                        sniff, unpack_file)
from edgesqueeze.runtime._tflite_meta import micro_ops

__all__ = ["BACKENDS", "load"]

BACKENDS = ("onnxruntime", "ai-edge-litert", "tflite-runtime", "tflite-micro")
_KIND_OF_BACKEND = {"onnxruntime": "onnx", "ai-edge-litert": "tflite", "tflite-runtime": "tflite",
                    "tflite-micro": "tflite"}
# a decoded file at least this large has its SHA-256 checked on another thread while the
# runtime builds its session (1.4 MB: ~0.7 ms); a smaller one's hash is quicker than a thread
_DIGEST_THREAD_BYTES = 256 * 1024


def load(path: str | os.PathLike, *, threads: int | None = None,
         backend: str | None = None, spin: bool = True, portable: bool | None = None,
         check: bool = True) -> Artifact:
    """Open an ``.onnx`` or ``.tflite`` artifact for inference, torch-free.

    The file's content decides what it is (a TFLite flatbuffer has ``TFL3`` at bytes 4..8;
    anything else that parses as a protobuf is ONNX); a file whose ``.onnx``/``.tflite``
    extension disagrees with its content is refused (other extensions are fine). ``threads``
    sets the backend's intra-op threads (None: the backend's default, which for
    onnxruntime is one per physical core and for LiteRT is 1). ``backend`` picks one of
    ``onnxruntime``, ``ai-edge-litert``, ``tflite-runtime``, ``tflite-micro`` (None: the one
    that fits, preferring ai-edge-litert over tflite-runtime; a TFLite Micro compressed
    file, whose filters sit behind ``TFLM_DECODE`` operators, goes to TensorFlow Lite
    Micro's interpreter, :mod:`._tflm`, since LiteRT cannot run it).

    ``portable`` (ONNX only): open the session without onnxruntime's x86-only NCHWc layout
    transform, whose float kernels round differently from ARM's; None (default): when the
    file asks for it, as ``onnx-int8`` files of target ``any-cpu`` do (:mod:`._onnx`).

    A packed file (``model.int8.tflite.esq``, :mod:`edgesqueeze.format.packed`) is decoded
    in memory, checked against its recorded SHA-256, and run from those bytes: the artifact's
    ``packed`` holds its ``meta["packed"]`` and ``decode_seconds`` the time decoding took
    (``None`` and 0.0 for a plain file). The archive's own checksums (CRC-32 per section,
    SHA-256 of the file) are checked before decoding, so a damaged file never reaches a
    runtime; the SHA-256 of the decoded bytes is computed on another thread while the
    runtime builds its session from them (``hashlib`` releases the GIL), and the session is
    dropped and the file refused if it differs: on a multi-core device the check costs no
    load time (ImageNet SqueezeNet fp32: 2.5 ms of SHA-256 on a Zen 5 x86 with SHA
    instructions; more on CPUs without them, such as the Raspberry Pi 4's Cortex-A72).

    A plain file exported by edgesqueeze records its own CRC-32 in its metadata
    (``file_crc32``, :mod:`edgesqueeze.format.seal`); it is checked before the runtime opens
    the file (0.3 ms for 1.4 MB on an Intel Xeon; the runtimes hold the GIL while they open a
    file, so a second thread would not hide it), so a flipped byte is refused instead of run.
    ``check=False`` skips it (a file edited on purpose after export); files without the
    record are opened as they are.

    Raises :class:`FormatError` for a file that is missing, empty, damaged or not a model
    this runtime runs, and :class:`RuntimeBackendError` when the runtime it needs is not
    installed or cannot open it.
    """
    if isinstance(path, bytes) and len(path) < 4096 and b"\0" not in path and os.path.lexists(path):
        path = os.fsdecode(path)  # a file name as bytes (os.fsencode's), not a model's bytes
    if not isinstance(path, (str, os.PathLike)):
        raise FormatError(f"load takes the path of a model file, got {type(path).__name__} {path!r:.60}"
                          + ("; to run bytes in memory, write them to a file first" if isinstance(path, bytes) else ""))
    path = Path(path)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
                                or threads < 1):
        raise RuntimeBackendError(f"threads must be a positive integer or None, got {threads!r}")
    threads = None if threads is None else int(threads)  # numpy's integers too
    if threads is not None and threads > max_threads():
        raise RuntimeBackendError(f"threads={threads}: at most {max_threads()} (8 per core of this machine's "
                                  f"{os.cpu_count()}, and at least 64); more threads than cores only slow a "
                                  "runtime down")
    if backend is not None and backend not in BACKENDS:
        raise RuntimeBackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    kind, head = classify(path)
    ext = path.suffix.lower()
    data, packed, decode_seconds, digest = None, None, 0.0, None
    if kind == "esq":
        t0 = time.perf_counter()
        data, packed = unpack_file(path, check=False)
        decode_seconds = time.perf_counter() - t0
        from edgesqueeze.format.packed import Background

        # beside the session's creation; a small file's hash (~50 us) costs less than a thread
        digest = Background(check_unpacked, path, data, packed, threaded=len(data) >= _DIGEST_THREAD_BYTES)
        head = data[:_SNIFF_BYTES]
        kind = "tflite" if sniff(head) == "tflite" else "onnx"
        ext = Path(packed["name"]).suffix.lower()
    elif check:  # a plain file's own CRC-32, recorded in it at export: before any runtime sees it
        from edgesqueeze.format.seal import check_file

        check_file(path)
    try:
        art = _open(path, kind, head, ext, data, threads=threads, backend=backend, spin=spin,
                    portable=portable)
    except BaseException:
        if digest is not None:
            digest.result()  # bytes that are not the recorded ones explain any failure best
        raise
    if digest is not None:
        digest.result()  # FormatError: the session (and the bytes) are dropped with it
    art.packed, art.decode_seconds = packed, decode_seconds
    check_name(path, kind, packed=packed is not None)
    if ext in (".onnx", ".tflite") and ext[1:] != kind:
        # A misnamed file is a mix-up upstream (a copy step, a wrong glob): say so rather than
        # run something other than what the caller believes it is running.
        raise FormatError(f"{path}: has a {ext} extension but holds a"
                          f"{'n ONNX' if kind == 'onnx' else ' TFLite'} model; rename it to "
                          f".{kind} if that is what it is")
    return art


def _open(path: Path, kind: str, head: bytes, ext: str, data: bytes | None, *, threads: int | None,
          backend: str | None, spin: bool, portable: bool | None) -> Artifact:
    if backend is not None and _KIND_OF_BACKEND[backend] != kind:
        raise RuntimeBackendError(
            f"{path}: is a{'n ONNX' if kind == 'onnx' else ' TFLite'} model; backend {backend!r} "
            f"runs {_KIND_OF_BACKEND[backend].upper()} files only")
    if kind == "tflite" and backend == "tflite-micro":
        from edgesqueeze.runtime._tflm import MicroArtifact

        if threads not in (None, 1):  # taken without a word
            import warnings

            from edgesqueeze.errors import Note

            warnings.warn(f"{path}: TensorFlow Lite Micro runs on one thread (a microcontroller's); threads="
                          f"{threads} is not used", Note, stacklevel=3)
        art = MicroArtifact(path, data=data)
    elif kind == "tflite":
        from edgesqueeze.runtime._tflite import TFLiteArtifact

        try:
            art = TFLiteArtifact(path, threads=threads, backend=backend, data=data)
        except RuntimeBackendError:
            # LiteRT cannot run a TFLite Micro compressed file: read its operator codes only
            # then (a plain file's cold load stays LiteRT's own), and run it where it runs
            micro = micro_ops(path, data) if backend is None else []
            if not micro:
                raise
            from edgesqueeze.runtime._tflm import MicroArtifact

            art = MicroArtifact(path, data=data, why=f"its {', '.join(micro)} operators (TensorFlow Lite "
                                                     "Micro compression, which LiteRT cannot run)")
    else:
        from edgesqueeze.runtime._onnx import OnnxArtifact

        art = OnnxArtifact(path, threads=threads, head=head, ext=ext, spin=spin, data=data,  # garbage refused here
                           portable=portable)
    return art
