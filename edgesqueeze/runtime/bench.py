"""Latency of loaded artifacts, measured with time.perf_counter around ``predict``.

What is timed is what a device caller pays per call: input quantization, the runtime's
invoke, output dequantization (not image decoding or normalization). The input is fixed
random data (seed 0) in the artifact's input space, so every run does the same work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from edgesqueeze.errors import DataError
from edgesqueeze.runtime._base import Artifact
from edgesqueeze.runtime._load import load

__all__ = ["benchmark", "cold_loads", "compare"]


def _input(art: Artifact, batch_size: int) -> np.ndarray:
    shape = art.input_spec.image_shape
    if any(d is None for d in shape):
        raise DataError(f"{art.path}: the input shape {list(shape)} has dynamic dimensions and the "
                        f"file has no metadata saying what one image is; give one (bench --input-shape C,H,W)")
    try:
        return np.random.default_rng(0).standard_normal((batch_size, *shape)).astype(np.float32)
    except MemoryError:
        raise DataError(f"{art.path}: a batch of {batch_size:,} images of shape {list(shape)} does not fit in "
                        f"memory ({4 * batch_size * int(np.prod(shape)):,} bytes of input alone); time a "
                        f"smaller batch size") from None


def _check(batch_size: int, warmup: int, runs: int) -> None:
    if batch_size < 1 or warmup < 0 or runs < 1:
        raise DataError(f"benchmark needs batch_size >= 1, warmup >= 0, runs >= 1; got "
                        f"batch_size={batch_size}, warmup={warmup}, runs={runs}")


def _summary(art: Artifact, times: list[float], batch_size: int, warmup: int) -> dict:
    ms = np.asarray(times) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "runs": len(times),
        "warmup": warmup,
        "batch_size": batch_size,
        "threads": art.threads,  # None: the backend's default
        "backend": art.backend,
        "kind": art.kind,
        "portable": bool(getattr(art, "portable", False)),  # ONNX without the x86-only NCHWc kernels
        "path": str(art.path),
    }


def benchmark(artifact: Artifact, *, batch_size: int = 1, warmup: int = 10, runs: int = 50) -> dict:
    """Latency of ``artifact.predict`` on one fixed batch.

    Returns ``p50_ms``, ``p90_ms``, ``mean_ms``, ``min_ms`` (per call, i.e. per batch),
    ``runs``, ``warmup``, ``batch_size``, ``threads`` (None: backend default), ``backend``,
    ``kind``, ``path``.
    """
    _check(batch_size, warmup, runs)
    x = _input(artifact, batch_size)
    for _ in range(warmup):
        artifact.predict(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        artifact.predict(x)
        times.append(time.perf_counter() - t0)
    return _summary(artifact, times, batch_size, warmup)


def cold_loads(paths: Sequence[str | os.PathLike], *, threads: int | None = None, loads: int = 3,
               portable: bool | None = None) -> list[tuple[Artifact, dict]]:
    """Load each file ``loads + 1`` times, interleaved, and time it from the file to a ready
    session (a packed file's decoding included): the first round is untimed (it pays the
    backends' imports and fills the page cache alike for every file), the others give the
    median. Returns each file's last artifact and ``{"cold_load_ms", "decode_ms"}``.
    ``portable``: as :func:`~edgesqueeze.runtime.load` (None: as each file asks)."""
    arts: list[Artifact | None] = [None] * len(paths)
    times: list[list[float]] = [[] for _ in paths]
    decode: list[list[float]] = [[] for _ in paths]
    for r in range(loads + 1):
        for i, p in enumerate(paths):
            arts[i] = None  # the previous session goes first: one model in memory at a time
            t0 = time.perf_counter()
            # spin=False: interleaved, a spinning onnxruntime pool would slow the next file down
            arts[i] = load(p, threads=threads, spin=False, portable=portable)
            if r:
                times[i].append(time.perf_counter() - t0)
                decode[i].append(arts[i].decode_seconds)
    return [(a, {"cold_load_ms": float(np.median(t)) * 1e3 if t else None,
                 "decode_ms": float(np.median(d)) * 1e3 if d else None})
            for a, t, d in zip(arts, times, decode)]


def compare(artifacts: Sequence[Artifact | str | os.PathLike], *, batch_size: int = 1,
            warmup: int = 10, runs: int = 50, threads: int | None = None, loads: int = 3) -> list[dict]:
    """Benchmark several artifacts in the same run; ratios are against the first.

    Paths are loaded with ``threads``, ``loads`` timed times each (:func:`cold_loads`:
    ``cold_load_ms``, file to ready session, and ``decode_ms``, the part a packed file
    spends decoding; None for artifacts passed in loaded). Runs are interleaved (one call of
    each artifact in turn) so that a machine getting busier or cooler mid-run shifts every
    row alike. Each row is :func:`benchmark`'s dict plus ``size_bytes``, ``p50_ratio``,
    ``mean_ratio`` and ``size_ratio`` (this row / the first row: below 1 is faster or
    smaller).
    """
    if not artifacts:
        return []
    _check(batch_size, warmup, runs)
    paths = [a for a in artifacts if not isinstance(a, Artifact)]
    loaded = iter(cold_loads(paths, threads=threads, loads=loads)) if paths else iter(())
    arts, cold = [], []
    for a in artifacts:
        art, c = (a, {"cold_load_ms": None, "decode_ms": None}) if isinstance(a, Artifact) else next(loaded)
        arts.append(art)
        cold.append(c)
    inputs = [_input(a, batch_size) for a in arts]
    for _ in range(warmup):
        for a, x in zip(arts, inputs):
            a.predict(x)
    times: list[list[float]] = [[] for _ in arts]
    for _ in range(runs):
        for i, (a, x) in enumerate(zip(arts, inputs)):
            t0 = time.perf_counter()
            a.predict(x)
            times[i].append(time.perf_counter() - t0)
    rows = []
    for a, t, c in zip(arts, times, cold):
        row = _summary(a, t, batch_size, warmup)
        row["size_bytes"] = os.path.getsize(a.path)
        row.update(c)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["p50_ratio"] = row["p50_ms"] / base["p50_ms"] if base["p50_ms"] > 0 else float("nan")
        row["mean_ratio"] = row["mean_ms"] / base["mean_ms"] if base["mean_ms"] > 0 else float("nan")
        row["size_ratio"] = row["size_bytes"] / base["size_bytes"] if base["size_bytes"] else float("nan")
    return rows
