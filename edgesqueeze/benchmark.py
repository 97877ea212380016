"""``edgesqueeze bench``: latency of any mix of .pt, .esq, .onnx and .tflite files, same run.

.onnx and .tflite run through the torch-free runtime; .pt and .esq run in PyTorch eager
through a small adapter with the runtime's :class:`~edgesqueeze.runtime.Artifact`
interface, so :func:`edgesqueeze.runtime.bench.compare` times them all interleaved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgesqueeze.runtime._base import Artifact, InputSpec


class TorchArtifact(Artifact):
    """A checkpoint or .esq archive run in PyTorch eager (inference mode), for comparison."""

    def __init__(self, path: Path, *, threads: int | None = None, model_args: dict[str, Any] | None = None) -> None:
        import torch

        from edgesqueeze.checkpoint import load_model

        loaded = load_model(path, **(model_args or {}))
        self._torch = torch
        self.model = loaded.model.eval()
        self.path, self.kind, self.backend = Path(path), loaded.kind, "pytorch-eager"
        self.meta, self.threads = dict(loaded.meta), threads
        if threads:
            torch.set_num_threads(threads)
        shape = self.meta.get("input_shape")
        if not shape:
            from edgesqueeze.errors import ModelError

            raise ModelError(f"{path}: no input_shape in its metadata; cannot make a benchmark input (pass "
                             "--input-shape C,H,W)")
        self.input_spec = InputSpec("input", (None, *shape), "float32", None, "caller",
                                    tuple(self.meta.get("mean") or ()), tuple(self.meta.get("std") or ()))

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._torch.from_numpy(x)).numpy()


def _given_shape(arts: list[Artifact], given) -> None:
    """``--input-shape`` (C, H, W) for runtime files: the size of one image where a file's own
    input leaves it dynamic (an ONNX file another tool exported with free H and W could not be
    timed), and a refusal where the file fixes another (it was ignored)."""
    if not given:
        return
    import dataclasses

    from edgesqueeze.runtime._base import given_image_shape

    for art in arts:
        if isinstance(art, TorchArtifact):
            continue  # read with --input-shape as load_model reads it
        spec = art.input_spec
        c, h, w = given_image_shape(art.path, spec.image_shape, given)
        art.input_spec = dataclasses.replace(
            spec, shape=(spec.shape[0], h, w, c) if spec.layout == "NHWC" else (spec.shape[0], c, h, w))
        art.shape_given = any(d is None for d in spec.image_shape)


def open_any(path: Path, *, threads: int | None, model_args: dict[str, Any] | None = None,
             portable: bool | None = None) -> Artifact:
    from edgesqueeze.runtime import load
    from edgesqueeze.verify import sniff

    # spin=False: files are timed interleaved, and onnxruntime's busy-waiting threads would
    # take a core from whichever file runs next (see runtime._onnx.open_session)
    return (TorchArtifact(path, threads=threads, model_args=model_args if sniff(path) == "pt" else None)
            if sniff(path) in ("pt", "esq")
            else load(path, threads=threads, spin=False, portable=portable))


def _torch_cold(path: Path, threads: int | None, model_args) -> tuple[Artifact, dict[str, Any]]:
    """A PyTorch file opened, and its cold load: file to a model ready to run in eager mode
    (an .esq decoded on the way), median of 3 loads after a first untimed one."""
    import time

    import importlib.util

    if importlib.util.find_spec("torch") is None:  # a device install: say which file, and what runs there
        from edgesqueeze.errors import RuntimeBackendError

        raise RuntimeBackendError(f"{path}: a PyTorch file ({path.suffix or 'no suffix'}), which bench times in "
                                  "PyTorch, not installed here (a device install); bench its exported files "
                                  "(.onnx, .tflite, or packed .onnx.esq / .tflite.esq) here instead")
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        art = open_any(path, threads=threads, model_args=model_args)
        if i:
            times.append(time.perf_counter() - t0)
    return art, {"cold_load_ms": 1e3 * float(np.median(times)), "decode_ms": None}


def _batches_fit(arts, batch_sizes) -> None:
    """Refuse a batch whose input alone takes more than half this machine's memory, before
    any latency is timed (after the cold loads, which give each file's input shape): ``-b 1 -b
    100000000`` timed batch 1, then failed and lost its rows."""
    from edgesqueeze.errors import DataError

    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # not POSIX: the batch's own MemoryError says it
        return
    for art in arts:
        shape = getattr(getattr(art, "input_spec", None), "image_shape", None)
        if not shape or any(not isinstance(d, int) for d in shape):
            continue
        for bs in batch_sizes:
            need = 4 * bs * int(np.prod(shape))
            if need > memory // 2:
                raise DataError(f"{art.path}: --batch-size {bs}: a batch of {bs:,} images of shape {list(shape)} "
                                f"does not fit in memory ({need:,} bytes of input alone, more than half of this "
                                f"machine's {memory:,}); time a smaller batch size")


def bench_files(paths: list[Path], *, batch_sizes: list[int], runs: int = 50, warmup: int = 10,
                threads: int | None = None, model_args: dict[str, Any] | None = None,
                portable: bool | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per (file, batch size): p50/p90/mean ms and the ratio of p50 to the first file's,
    and the cold load (file to ready session, a packed file's decoding included; median of 3
    interleaved loads; a PyTorch file's: to a model ready in eager mode, median of 3), how it was timed (``runs``, ``warmup``,
    ``threads``: None for each runtime's default; ``date``, ``edgesqueeze_version``), and
    ``cpu`` (:func:`cpu_info`: the model and the features that pick int8 kernels; ``cores``). ``model_args``: how to read ``.pt`` files
    that do not describe themselves (:func:`edgesqueeze.checkpoint.load_model`). ``portable``:
    ONNX sessions with or without onnxruntime's x86-only NCHWc kernels (None: as each file
    asks; :func:`edgesqueeze.runtime.load`)."""
    from edgesqueeze.runtime.bench import cold_loads, compare
    from edgesqueeze.runtime.cpu import cpu_info
    from edgesqueeze.verify import sniff

    import datetime as dt

    from edgesqueeze import __version__

    cpu = cpu_info()  # int8 timings depend on it: every row says where it was measured
    cpu = {k: cpu[k] for k in ("cpu", "arch", "features", "int8_kernels", "note") if k in cpu}
    cpu["cores"] = os.cpu_count()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    from edgesqueeze.verify import unique_files

    paths = unique_files(paths, log)
    torch_files = [sniff(Path(p)) in ("pt", "esq") for p in paths]
    runtime_paths = [p for p, t in zip(paths, torch_files) if not t]
    # the PyTorch files first: one that cannot be opened (no torch on a device, a state_dict
    # without --arch) is refused before the runtime files' cold loads are timed
    opened = {i: _torch_cold(Path(p), threads, model_args) for i, (p, t) in enumerate(zip(paths, torch_files)) if t}
    if runtime_paths:  # the PyTorch files' loads were timed above, one each
        log(f"timing loads: 1 + 3 loads of each of {len(runtime_paths)} runtime file(s), interleaved"
            + (f" (the {len(opened)} PyTorch file(s): loaded once each, above)" if opened else ""))
    loaded = iter(cold_loads(runtime_paths, threads=threads, portable=portable)) if runtime_paths else iter(())
    arts, cold = [], []
    for i in range(len(paths)):
        art, c = opened[i] if i in opened else next(loaded)
        arts.append(art)
        cold.append(c)
    _given_shape(arts, ((model_args or {}).get("input_meta") or {}).get("input_shape"))
    _batches_fit(arts, batch_sizes)  # every batch size before any timing: the last one failed after the others
    rows = []
    for bs in batch_sizes:
        log(f"timing batch {bs}: {warmup} warm-up + {runs} runs of each of {len(arts)} file(s), interleaved")
        for art, c, row in zip(arts, cold, compare(arts, batch_size=bs, warmup=warmup, runs=runs)):
            fmt = (art.meta or {}).get("artifact_format") or Path(art.path).suffix.lstrip(".")
            if getattr(art, "packed", None):
                fmt += ".esq"
            rows.append({"file": str(art.path), "format": fmt, "backend": art.backend, "batch_size": bs,
                         # TensorFlow Lite Micro's interpreter runs on one thread, whatever --threads says
                         "threads": 1 if art.backend == "tflite-micro" else threads,
                         "portable": bool(getattr(art, "portable", False)),
                         "p50_ms": row["p50_ms"], "p90_ms": row["p90_ms"], "mean_ms": row["mean_ms"],
                         "ratio": row["p50_ratio"], "bytes": row["size_bytes"], **c,
                         "runs": runs, "warmup": warmup, "date": when, "edgesqueeze_version": __version__,
                         "cpu": cpu})
    return rows
