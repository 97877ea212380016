"""Evaluate artifacts through the runtime that will run them, never through PyTorch.

``.onnx`` files run in onnxruntime and ``.tflite`` files in LiteRT (``edgesqueeze.runtime``),
a TensorFlow Lite Micro compressed ``.tflite`` (``TFLM_DECODE`` operators) in TensorFlow Lite
Micro's interpreter (its row then carries ``arena_bytes``, the RAM it needs beside its flash);
an ``.esq`` archive is decoded by its own decoder (and its weights checked against the hash
recorded at compress time) and run as the PyTorch model it describes, which is what a
PyTorch deployment of it does; a ``.pt`` checkpoint is the float reference.

One row per artifact (JSON-ready), the input of :func:`edgesqueeze.budget.check` and of
:mod:`edgesqueeze.verify_report` (``verify.md`` and its plots)::

    path, format, runtime, bytes, gzip_bytes, sha256, n, accuracy, agreement,
    reference_accuracy, decode_check, latency_ms, warning, error

``sha256`` is the file's, as measured: ``edgesqueeze check`` refuses to judge a report row
whose file has changed since (a re-export without a new ``verify`` passed on old numbers).

``warning`` is one line when the file's numbers on this CPU are known not to be what
another CPU computes (an ``onnx-int8`` file with 8-bit weights: :mod:`edgesqueeze.runtime.cpu`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgesqueeze._progress import Progress, bar
from edgesqueeze.budget import rows_from_report  # noqa: F401 - its home is numpy-free, for check
from edgesqueeze.errors import DataError, EdgesqueezeError, FormatError

Log = Callable[[str], None]


def gzip_size(path: Path | bytes) -> int:
    """The file after gzip level 9 (Python's gzip, mtime 0: deterministic): the kind of
    compressed size TF Model Optimization's guides report (they zip the file with DEFLATE at
    its default level, a few percent larger; GNU gzip -9 differs by a few hundred bytes)."""
    data = path if isinstance(path, bytes) else path.read_bytes()
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def sniff(path: Path) -> str:
    """What a file is, from its bytes: esq (a checkpoint archive), packed (an .onnx.esq or
    .tflite.esq the runtime runs), pt (a zip or legacy pickle), tflite, or onnx (the rest)."""
    from edgesqueeze._io import not_a_file
    from edgesqueeze.runtime._base import sniff as sniff_head

    why = not_a_file(path)  # a pipe read here would give its later bytes to the reader after it
    if why:
        raise FormatError(f"{path}: {why}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    what = sniff_head(head)
    if what == "empty":
        raise FormatError(f"{path}: file is empty (0 bytes); re-export it or copy it again")
    if what == "esq":
        from edgesqueeze.format import container
        from edgesqueeze.format.packed import is_packed

        return "packed" if is_packed(container.read_esq(path)) else "esq"
    return {"zip": "pt", "pickle": "pt", "unknown": "onnx"}.get(what, what)


def unique_files(paths, log: Callable[[str], None]) -> list[Path]:
    """``paths`` with each file once (by its real path), and a note naming the repeats: a
    file given twice (``export/*`` and ``export/model.onnx``) was measured twice."""
    from edgesqueeze._io import once_each

    out, repeats = once_each(paths)
    if repeats:
        log(f"note: given more than once, measured once: {', '.join(repeats)}")
    return [Path(p) for p in out]


def format_from_name(path: Path) -> str:
    """The format a file's name says, as export names files (``model.int8.onnx.esq`` is
    ``onnx-int8.esq``): the label of a row whose file could not be read."""
    from edgesqueeze.config.export import SUFFIX

    name = path.name.lower()
    packed = name.endswith((".onnx.esq", ".tflite.esq"))
    if packed:
        name = name[:-4]
    for fmt, suffix in sorted(SUFFIX.items(), key=lambda kv: -len(kv[1])):  # the longest suffix first
        if name.endswith(suffix):
            return fmt + (".esq" if packed else "")
    return path.suffix.lstrip(".").lower() or "?"


def _artifact_format(kind: str, meta: dict, art: Any) -> str:
    fmt = meta.get("artifact_format")
    if fmt:
        return fmt
    try:  # files exported elsewhere: call them int8 when their input or ops say so
        from edgesqueeze.runtime.inspect import inspect_artifact

        info = inspect_artifact(art.path)
        ops = " ".join(info.get("ops") or {})
        quantized = "Quantize" in ops or "QLinear" in ops or any(
            str(t.get("dtype")) in ("int8", "uint8") for t in info.get("tensors", []))
    except Exception:  # noqa: BLE001 - a description only; never fail verification on it
        quantized = False
    return f"{kind}-int8" if quantized else kind


class _Data:
    """The test split, loaded once per (dataset, image size). ``stream``: an image folder is
    streamed from disk (:class:`~edgesqueeze.data.stream.LazyImages`), as the reference
    model was trained when its checkpoint records ``data_stream`` (``imagenet:`` always is)."""

    def __init__(self, name: str | None, data_dir, limit: int | None, log: Log) -> None:
        self.name, self.data_dir, self.limit, self.log = name, data_dir, limit, log
        self.subset = False  # --limit left images out: a file's recorded (whole test split) accuracy is not comparable
        self.stream = False
        self._cache: dict[tuple, Any] = {}

    def get(self, name: str | None, shape: list[int] | None, source: str):
        name = self.name or name
        if not name:
            raise DataError(f"{source}: does not record its dataset; pass --data NAME")
        # the folder resized to the model's (square) input; a non-square model was trained on the
        # folder's own size, which a square resize would miss (image_size is one side)
        image_size = int(shape[-1]) if shape and (len(shape) < 2 or shape[-1] == shape[-2]) else None
        key = (name, image_size)
        if key not in self._cache:
            from edgesqueeze.data import load_dataset

            ds = load_dataset(name, data_dir=self.data_dir, image_size=image_size
                              if name.lower().startswith(("imagefolder:", "imagenet:")) else None, stream=self.stream)
            x, y = ds.test_x, ds.test_y
            keep = slice(None)
            if self.limit:  # eval's --limit subset: seeded, each class in proportion (the first N of
                # an image folder, ordered by class, were its first class alone)
                from edgesqueeze.data.datasets import limited_test

                keep = limited_test(y, self.limit)
                self.subset = self.subset or len(keep) < len(y)
                x, y = x[keep], y[keep]
            if not len(x):
                raise DataError(f"dataset '{name}' has no test images")
            from edgesqueeze.data.stream import is_lazy

            if is_lazy(x):
                self.log(f"note: {len(x):,} test images of {name} streamed from disk, a batch at a time, "
                         "once per file verified")
            if image_size is not None:  # eval refuses an image folder of another size; here the
                # exported file records no training image size, so the folder is resized, but not silently
                from edgesqueeze.data.datasets import folder_test_image

                first = folder_test_image(name)
                if first and first[1] != (image_size, image_size):
                    self.log(f"note: {first[0]} (the first test image of {name}) is {first[1][0]}x{first[1][1]}; "
                             f"the images are resized to {image_size}x{image_size}, the input of {source}")
            self._cache[key] = (ds, x, y, keep)
        ds, x, y, keep = self._cache[key]
        if shape and list(ds.input_shape) != list(shape):  # gray for a 3-channel model, or colour for a gray one?
            fit = (*key, "channels", int(shape[0]))
            if fit not in self._cache:
                from edgesqueeze.data import fit_channels

                fitted = fit_channels(ds, shape, source=source)
                self._cache[fit] = (fitted, fitted.test_x[keep], y, keep)
            ds, x, y, keep = self._cache[fit]
        if shape and list(ds.input_shape) != list(shape):
            raise DataError(f"{source}: expects images of shape {list(shape)} but dataset '{name}' gives "
                            f"{list(ds.input_shape)}; pass the dataset it was made for (--data)")
        return ds, x, y


def _check_classes(scores: np.ndarray, ds, classes: list | None, source: str) -> None:
    if scores.ndim != 2 or scores.shape[1] != ds.num_classes:
        raise DataError(f"{source}: outputs {scores.shape[-1]} classes but dataset '{ds.name}' has "
                        f"{ds.num_classes}; pass the dataset it was made for (--data)")
    from edgesqueeze.models.probe import check_class_names

    check_class_names(classes, ds, source)


def _torch_scores(loaded, path: Path, x: np.ndarray, ds, progress: Progress | None = None) -> np.ndarray:
    """The scores of ``loaded`` (a :class:`~edgesqueeze.checkpoint.LoadedModel`) on ``x``, fed
    as it was trained (its normalization, else the dataset's)."""
    from edgesqueeze.evaluation import input_normalization, predict
    from edgesqueeze.models.probe import check_fits

    check_fits(loaded.model, ds.input_shape, source=path, data=ds.name)  # one line, not a conv's traceback
    mean, std, _ = input_normalization(loaded.meta, ds)
    with bar(progress, path.name, len(x)) as update:
        return predict(loaded.model, x, mean=mean, std=std, batch_size=256, on_batch=update).numpy()


# In-memory test images go to a runtime in parts of this many, a progress bar's step: a whole
# number of predict_images' batches (32), so every batch holds the images it held in one call.
_PART = 512


def _runtime_scores(art, x, path: Path | None = None, progress: Progress | None = None) -> np.ndarray:
    """``art``'s scores on uint8 images ``x``. A test split streamed from disk
    (:class:`~edgesqueeze.data.stream.LazyImages`: an image folder, ImageNet's val/) is
    decoded batch by batch in DataLoader workers, so memory holds a batch of images, not the
    split (the scores, N x classes float32, are kept)."""
    from edgesqueeze.data.stream import is_lazy, uint8_batches

    if not is_lazy(x) and not len(x):
        return np.asarray(art.predict_images(x), dtype=np.float32)
    with bar(progress, path.name if path else "images", len(x)) as update:
        parts = []
        for images in uint8_batches(x) if is_lazy(x) else (x[i:i + _PART] for i in range(0, len(x), _PART)):
            parts.append(np.asarray(art.predict_images(images), dtype=np.float32))
            if update is not None:
                update(len(images))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _torch_latency(model, shape: list[int], runs: int = 30, threads: int | None = None) -> float:
    """Batch-1 p50 in PyTorch eager, on ``threads`` intra-op threads when given (as the
    runtimes get them: a .pt row timed on 2 beside files on 1 compared unlike setups)."""
    import time

    import torch

    x = torch.randn(1, *shape)
    times = []
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for i in range(runs + 5):
                t0 = time.perf_counter()
                model(x)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 1e3 * float(np.median(times))


def evaluate_artifacts(paths: list[str | Path], *, dataset: str | None = None, data_dir=None,
                       reference: str | Path | None = None, limit: int | None = None,
                       threads: int | None = None, latency: bool = False,
                       arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                       trust_pickle: bool = False, input_meta: dict[str, Any] | None = None,
                       default_dataset: str | None = None, log: Log | None = print,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Measure every artifact on the test split through its runtime; one row each.

    The float reference is ``reference`` or else the first ``.pt`` among ``paths``: its
    predictions give every other row its top-1 agreement, and its accuracy their drop.
    Failures to load or evaluate one artifact become that row's ``error`` (the gate reports
    them as not measured, never as a pass), so one bad file does not hide the others.
    ``arch`` / ``arch_kwargs`` / ``trust_pickle`` / ``input_meta`` / ``default_dataset``: how to read ``.pt`` files
    that do not describe themselves (plain state_dicts, pickles, TorchScript, ``.pt2``), as
    for ``load_model``; edgesqueeze checkpoints know their own. ``progress``: a bar per file
    over its test images (:mod:`edgesqueeze._progress`; the CLI's draws on standard error).

    Returns ``dataset`` (as given), ``datasets`` (the names of the test splits used),
    ``reference``, ``reference_accuracy`` and ``artifacts`` (the rows).
    """
    if isinstance(paths, (str, Path)):  # one file, not the characters of its name
        paths = [paths]
    if log is None:  # as fit takes it: nothing said
        def log(_msg: str) -> None:
            pass
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive number of test images, got {limit!r}")
    data = _Data(dataset, data_dir, limit, log)
    model_args = {"arch": arch, "arch_kwargs": arch_kwargs, "trust_pickle": trust_pickle, "input_meta": input_meta,
                  "default_dataset": default_dataset}
    files = unique_files(paths, log)
    ref_path = Path(reference) if reference else next((p for p in files if p.is_file()
                                                       and _safe_sniff(p) == "pt"), None)
    ref_scores, ref_acc = None, None
    if ref_path is not None:
        from edgesqueeze.checkpoint import load_model

        from edgesqueeze.evaluation import input_normalization

        ref_loaded = load_model(ref_path, **model_args)
        ref_meta = ref_loaded.meta
        data.stream = bool(ref_meta.get("data_stream"))  # trained streamed: its folder is too big to hold
        ds, x, y = data.get(ref_meta.get("dataset"), ref_meta.get("input_shape"), str(ref_path))
        how = input_normalization(ref_meta, ds)[2]
        if how.startswith("measured"):
            log(f"note: {ref_path}: input normalization {how}")
        ref_scores = _torch_scores(ref_loaded, ref_path, x, ds, progress)
        del ref_loaded
        _check_classes(ref_scores, ds, ref_meta.get("classes"), str(ref_path))
        ref_acc = float((ref_scores.argmax(1) == y).mean())
        log(f"reference {ref_path}: test accuracy {100 * ref_acc:.2f}% on {len(y):,} images ({ds.name})")
    rows, sources = [], []
    for path in files:
        row = _empty_row(path, ref_acc)
        try:
            row.update(_evaluate_one(path, data, ref_scores, threads=threads, latency=latency,
                                     model_args=model_args, progress=progress))
            recorded = row.pop("_meta_reference", None)
            recorded_on, measured_on = row.pop("_datasets", (None, None))
            other_data = bool(recorded_on and measured_on and recorded_on.lower() != measured_on.lower())
            same_images = not data.subset and not other_data
            if ref_acc is not None and recorded is not None and same_images and row["n"] \
                    and abs(recorded - ref_acc) * row["n"] > max(2.5, 0.005 * row["n"]):
                # more than a CPU's rounding apart: agreement and drop would be against another model
                log(f"note: {path} records its float model at {100 * recorded:.2f}% test accuracy, but the "
                    f"reference {ref_path} scores {100 * ref_acc:.2f}% on these images: is it the model this file "
                    "came from? Agreement and drop are measured against the reference")
            if row["reference_accuracy"] is None and recorded is not None:
                if other_data:
                    # the float model's accuracy on its own dataset: a drop against it mixed two datasets
                    log(f"note: {path}: the float model's recorded accuracy ({100 * recorded:.2f}%) is on "
                        f"{recorded_on}, not {measured_on} (--data), so no drop is measured; give the float "
                        "model (.pt) as --reference to measure it on the same images")
                elif data.subset:  # measured on all the test images: a drop against it mixes two sets
                    log(f"note: {path}: the float model's recorded accuracy ({100 * recorded:.2f}%) is on the "
                        f"whole test split, not these {row['n']:,} images, so no drop is measured; give the "
                        "float model (.pt) as --reference to measure it on the same images")
                else:
                    row["reference_accuracy"] = recorded
        except EdgesqueezeError as exc:
            row["error"] = str(exc)
        except (OSError, ValueError, RuntimeError) as exc:  # a runtime refusing a damaged file
            row["error"] = _runtime_error(path, exc)
        sources.append(row.pop("_source", None))
        if sources[-1]:
            row["source_sha256"] = sources[-1]  # the model file it was exported from (SHA-256)
        if row["error"]:
            log(f"{path}: NOT evaluated: {row['error']}")
        else:
            agr = "" if row["agreement"] is None else f", agreement {100 * row['agreement']:.2f}%"
            arena = f", arena {row['arena_bytes']:,} B" if row.get("arena_bytes") else ""
            log(f"{path} [{row['format']}, {row['runtime']}]: {row['bytes']:,} B{arena}, accuracy "
                f"{100 * row['accuracy']:.2f}%{agr}")
            if row["warning"]:
                log(f"warning: {path}: {row['warning']}")
        rows.append(row)
    report = {"dataset": dataset, "datasets": sorted({key[0] for key in data._cache}),
              "reference": str(ref_path) if ref_path else None, "reference_accuracy": ref_acc, "artifacts": rows}
    note = mixed_sources_note(rows)
    if note:
        report["notes"] = [note]
        log(f"note: {note}")
    if latency:
        from edgesqueeze.runtime.cpu import cpu_info

        report["speed_notes"] = int8_speed_notes(rows, sources, cpu_info()["int8_kernels"])
        for note in report["speed_notes"]:
            log(f"note: {note}")
    return report


def _empty_row(path: Path, reference_accuracy: float | None) -> dict[str, Any]:
    """A report row of ``path`` before anything is measured: every field, None or 0."""
    return {"path": str(path), "format": format_from_name(path), "runtime": None, "bytes": None, "gzip_bytes": None,
            "n": 0, "accuracy": None, "agreement": None, "reference_accuracy": reference_accuracy,
            "decode_check": None, "latency_ms": None, "warning": None, "error": None}


def _loaded_fields(art) -> dict[str, Any]:
    """A runtime file's row fields once ``runtime.load`` opened it: format, runtime, and for a
    packed file (decoded in memory, then the same runtime: the file that ships) its decoding."""
    fields: dict[str, Any] = {"runtime": art.backend, "format": _artifact_format(art.kind, art.meta or {}, art)}
    if art.packed:
        fields.update(format=fields["format"] + ".esq", runtime=f"edgesqueeze unpack + {art.backend}",
                      packed={"inner_bytes": art.packed["bytes"], "decode_ms": round(1e3 * art.decode_seconds, 2)},
                      decode_check=True)  # load() refused it otherwise: the decoded bytes' SHA-256 matched
    return fields


def _runtime_error(path: Path, exc: BaseException) -> str:
    """A row's ``error`` for a runtime's own exception on ``path`` (a damaged file)."""
    return f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def measure_sizes(paths: list[str | Path], *, log: Log = print) -> list[dict[str, Any]]:
    """Rows of ``paths`` (runtime files: .onnx, .tflite, packed .onnx.esq / .tflite.esq) for a
    budget of sizes alone: each file opened through its runtime, as the device opens it
    (``edgesqueeze.runtime.load``: its checksum, a packed file decoded and its SHA-256
    checked), its bytes counted, no test images run. `check FILE --max-size` evaluated every
    file on its dataset, which needs torch: a device could not gate a file's size."""
    from edgesqueeze import runtime

    rows = []
    for path in map(Path, paths):
        row = _empty_row(path, None)
        try:
            art = runtime.load(path)
            row.update(_loaded_fields(art))
            row["bytes"] = path.stat().st_size
            if art.meta and art.meta.get("source_sha256"):
                row["source_sha256"] = art.meta["source_sha256"]
            log(f"{path} [{row['format']}, {row['runtime']}]: {row['bytes']:,} B (opened; size budget only, "
                "not evaluated)")
        except EdgesqueezeError as exc:
            row["error"] = str(exc)
        except (OSError, ValueError, RuntimeError) as exc:  # a runtime refusing a damaged file
            row["error"] = _runtime_error(path, exc)
        if row["error"]:
            log(f"{path}: NOT measured: {row['error']}")
        rows.append(row)
    return rows


def mixed_sources_note(rows: list[dict[str, Any]]) -> str | None:
    """A line when the exported files measured were exported from more than one model file
    (their recorded ``source_sha256`` differ): `verify out/*` over a folder holding an earlier
    export of another model judged both together without a word."""
    by_source: dict[str, list[str]] = {}
    for row in rows:
        if row.get("source_sha256"):
            by_source.setdefault(row["source_sha256"], []).append(Path(row["path"]).name)
    if len(by_source) < 2:
        return None
    groups = "; ".join(f"{sha[:12]}: {', '.join(names)}" for sha, names in by_source.items())
    return (f"the exported files come from {len(by_source)} different model files (the SHA-256 each records of "
            f"the file it was exported from: {groups}); compare files of one model, or re-export the others")


_FP32_FILES = ("onnx", "tflite", "onnx.esq", "tflite.esq")
_INT8_FILES = ("onnx-int8", "tflite-int8", "onnx-int8.esq", "tflite-int8.esq")
SLOWER = 1.05  # within 5% of the fp32 file's time is "as fast": one-after-the-other p50s move that much


def int8_speed_notes(rows: list[dict[str, Any]], sources: list[str | None], kernels: str) -> list[str]:
    """A line for each int8 file (ONNX or LiteRT, plain or packed) whose batch-1 latency on this
    CPU is at least ``SLOWER`` times the fastest fp32 runtime file's of the same model (the
    same ``source_sha256``): int8 speed depends on the CPU's kernels (``kernels``, as
    :func:`~edgesqueeze.runtime.cpu.cpu_info` names them), and a file that is smaller but not
    faster here should say so where it is measured, not be taken for a faster one."""
    timed = [(r, s) for r, s in zip(rows, sources)
             if s and not r.get("error") and r.get("latency_ms") and r.get("format") in _FP32_FILES + _INT8_FILES]
    notes = []
    for r, s in timed:
        if r["format"] not in _INT8_FILES:
            continue
        fp32 = [f for f, fs in timed if fs == s and f["format"] in _FP32_FILES]
        if not fp32:
            continue
        best = min(fp32, key=lambda f: f["latency_ms"])
        ratio = r["latency_ms"] / best["latency_ms"]
        if ratio >= SLOWER:
            notes.append(f"{r['path']}: {ratio:.2f}x the batch-1 time of {best['path']} (fp32, "
                         f"{best['latency_ms']:.2f} ms) on this CPU ({kernels.split(':')[0]}): int8 made it "
                         "smaller, not faster, here (timed one after the other; `edgesqueeze bench` times "
                         "files interleaved)")
    return notes


def _safe_sniff(path: Path) -> str | None:
    try:
        return sniff(path)
    except FormatError:
        return None


def _evaluate_one(path: Path, data: _Data, ref_scores, *, threads, latency, model_args,
                  progress: Progress | None = None) -> dict[str, Any]:
    if path.is_dir():
        raise FormatError(f"{path}: is a folder, not a model file; pass the files in it ({path}/*)")
    from edgesqueeze._io import not_a_file

    why = not_a_file(path)
    if why:
        raise FormatError(f"{path}: {why}")
    kind = sniff(path)
    raw = path.read_bytes()
    out: dict[str, Any] = {"bytes": len(raw), "gzip_bytes": gzip_size(raw),
                           "sha256": hashlib.sha256(raw).hexdigest()}
    del raw
    if kind in ("pt", "esq"):
        from edgesqueeze.checkpoint import load_model, state_digest

        # an .esq knows its architecture and inputs: only where its code is (--arch) and the
        # permission to import it (--trust-pickle) apply to it
        args = dict(model_args or {}) if kind == "pt" else {k: v for k, v in (model_args or {}).items()
                                                             if k in ("arch", "trust_pickle")}
        loaded = load_model(path, **args)
        meta = loaded.meta
        out["format"], out["runtime"] = kind, ("edgesqueeze .esq decoder + pytorch" if kind == "esq" else "pytorch")
        if kind == "esq":
            expected = meta.get("weights_sha256")
            out["decode_check"] = None if expected is None else state_digest(loaded.model.state_dict()) == expected
        ds, x, y = data.get(meta.get("dataset"), meta.get("input_shape"), str(path))
        scores = _torch_scores(loaded, path, x, ds, progress)
        _check_classes(scores, ds, meta.get("classes"), str(path))
        out["_meta_reference"] = ((meta.get("metrics") or {}).get("test") or {}).get("accuracy") \
            if kind == "pt" else meta.get("reference_accuracy")
        out["_datasets"] = (meta.get("dataset"), ds.name)  # the recorded accuracy's, and these images'
        if latency:
            out["latency_ms"] = _torch_latency(loaded.model, list(ds.input_shape), threads=threads)
    else:
        from edgesqueeze import runtime

        art = runtime.load(path, threads=threads)
        meta = art.meta or {}
        out.update(_loaded_fields(art))
        given = {k: v for k, v in ((model_args or {}).get("input_meta") or {}).items() if v is not None}
        if not meta and "mean" in given and "std" in given:  # a file another tool exported, described
            art.describe(given)
            meta = art.meta
            out["input_described_by"] = sorted("--" + k.replace("_", "-") for k in given)
        ds, x, y = data.get(meta.get("dataset"), meta.get("input_shape") or None, str(path))
        if not meta:
            raise FormatError(f"{path}: has no edgesqueeze metadata, so its input normalization is unknown; "
                              "give it with --mean and --std (and --classes), or export it with "
                              "`edgesqueeze export`")
        scores = _runtime_scores(art, x, path, progress)
        _check_classes(scores, ds, art.classes, str(path))
        if art.backend == "tflite-micro":  # the RAM a microcontroller needs beside the file's flash
            out["arena_bytes"] = art.arena_bytes
        out["_meta_reference"] = meta.get("reference_accuracy")
        out["_datasets"] = (meta.get("dataset"), ds.name)
        out["_source"] = meta.get("source_sha256")  # files of one model, for int8_speed_notes
        if art.kind == "onnx":  # without onnxruntime's x86-only NCHWc kernels: what ARM computes
            out["ort_portable"] = art.portable
        from edgesqueeze.runtime.cpu import int8_warning

        out["warning"] = int8_warning({"artifact_format": out["format"], **meta})
        if latency:
            from edgesqueeze.runtime.bench import benchmark

            out["latency_ms"] = benchmark(art, batch_size=1)["p50_ms"]
    pred = scores.argmax(1)
    out["n"] = int(len(y))
    out["accuracy"] = float((pred == y).mean())
    if ref_scores is not None and len(ref_scores) == len(pred):
        out["agreement"] = float((pred == ref_scores.argmax(1)).mean())
    return out


