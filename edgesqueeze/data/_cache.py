"""On-disk cache of decoded datasets as plain ``.npy`` files.

Decoding 60,000 CIFAR JPEGs takes tens of seconds; reading the same pixels back from
``.npy`` takes a fraction of one. An entry is a folder ``<cache>/<tag>-<key>/`` holding one
``.npy`` per array and ``meta.json``, written last: ``meta.json`` is the commit marker, so
a crash half-way leaves an entry without it, which is simply rebuilt. The key hashes each
source file's absolute path, size and modification time plus the decoding parameters, so
editing or replacing a source invalidates its entry without any bookkeeping.

Each write also removes the entries no lookup can hit any more (:func:`prune_orphans`): those
whose every source is gone (folders that were deleted: temporary ones, a test's), and those it
supersedes, of the same sources and parameters under another key (the source was edited or
copied again: a dataset folder re-synced with new modification times once left a stale
177 MB CIFAR-10 entry behind each time).

Arrays are read back with ``allow_pickle=False``: a cache folder is never a way to run code.
``meta.json`` records each array's SHA-256 and a digest of itself: any entry that fails to
load, holds other bytes than it recorded (a flipped pixel, a label changed on disk) or whose
``meta.json`` was edited is ignored and rebuilt, never used (hashing costs ~0.1 s for CIFAR-10).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgesqueeze._io import atomic_path, files_below, write_text_atomic
from edgesqueeze.errors import EdgesqueezeError

CACHE_VERSION = 2  # bump when the decoded layout changes, to orphan older entries (2: checksums)


def cache_dir() -> Path:
    """``$EDGESQUEEZE_CACHE``, else ``~/.cache/edgesqueeze``."""
    env = os.environ.get("EDGESQUEEZE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgesqueeze"


def _stat_entry(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def source_entries(sources: Iterable[Path]) -> list:
    """(absolute path, size, mtime) of every source file: a directory source contributes every
    file below it (a walk of the whole tree), so adding, removing or editing one image of an
    image folder changes the key."""
    entries = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            entries += [_stat_entry(p) for p in files_below(src)]
        else:
            entries.append(_stat_entry(src))
    return entries


def source_key(sources: Iterable[Path], params: dict[str, Any], entries: list | None = None) -> str:
    """Hash of :func:`source_entries` (``entries``, when the caller has them: one walk of a
    large folder for several keys) plus ``params``."""
    if entries is None:
        entries = source_entries(sources)
    blob = json.dumps({"v": CACHE_VERSION, "sources": entries, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load(tag: str, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and metadata of a complete, consistent entry, or ``None``."""
    folder = cache_dir() / f"{tag}-{key}"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("key") != key or meta.get("version") != CACHE_VERSION or meta.get("digest") != _digest(meta):
            return None
        arrays = {}
        for name, spec in meta["arrays"].items():
            arr = np.load(folder / f"{name}.npy", allow_pickle=False)
            if (arr.dtype != np.dtype(spec["dtype"]) or list(arr.shape) != spec["shape"]
                    or _array_sha256(arr) != spec["sha256"]):
                return None
            arrays[name] = arr
        return arrays, meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError):
        return None  # missing or damaged: the caller rebuilds and overwrites it


def _array_sha256(arr: np.ndarray) -> str:
    flat = np.ascontiguousarray(arr).reshape(-1)
    return hashlib.sha256(memoryview(flat).cast("B") if flat.size else b"").hexdigest()


def _digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta.json``'s content but this digest: an edited ``meta.json`` (a mean, a
    class name, an array's recorded hash) no longer matches it."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True)
                          .encode()).hexdigest()


def save(tag: str, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path | None:
    """Write an entry atomically, array by array, ``meta.json`` last.

    A cache that cannot be written (read-only home, full disk) only costs speed, so the
    failure is reported on stderr and otherwise ignored.
    """
    folder = cache_dir() / f"{tag}-{key}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)  # invalid until rewritten below
        for name, arr in arrays.items():
            with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        full = json.loads(json.dumps(dict(  # as it will read back (tuples as lists), for the digest
            meta, key=key, version=CACHE_VERSION,
            arrays={n: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _array_sha256(a)}
                    for n, a in arrays.items()})))
        full["digest"] = _digest(full)
        write_text_atomic(folder / "meta.json", json.dumps(full, indent=1))
        as_read = json.loads(json.dumps([meta.get("sources"), meta.get("params")]))  # tuples as lists
        prune_orphans(keep=folder, superseded=(as_read[0], as_read[1]))
        return folder
    except (OSError, EdgesqueezeError) as e:  # the atomic writers raise OutputError (full disk, read-only)
        print(f"edgesqueeze: warning: could not write the dataset cache {folder} ({e}); "
              "set EDGESQUEEZE_CACHE to a writable folder to avoid decoding again", file=sys.stderr)
        return None


_ENTRY = re.compile(r"^[a-z0-9][a-z0-9_.-]*-[0-9a-f]{24}$")


def prune_orphans(keep: Path | None = None, superseded: tuple[Any, Any] | None = None) -> list[Path]:
    """Remove the entries whose every source is gone (an image folder deleted, a temporary
    folder cleaned up), so that the cache does not grow with folders that no longer exist;
    called after each write. With ``superseded=(sources, params)`` (the entry ``keep`` just
    written), also the other entries of ``keep``'s tag with those very sources and parameters:
    their key differs only because a source's size or modification time changed (or an older
    cache version), so no lookup can hit them again. Only complete entries (with
    ``meta.json``) named ``<tag>-<24 hex digits>`` that list their sources are looked at;
    anything else in the folder is left alone. Returns what was removed."""
    import shutil

    removed = []
    try:
        entries = list(cache_dir().iterdir())
    except OSError:
        return removed
    for folder in entries:
        if folder == keep or not _ENTRY.match(folder.name):
            continue
        try:
            meta = json.loads((folder / "meta.json").read_text())
            sources = meta.get("sources")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
            continue
        same = (superseded is not None and keep is not None and superseded[0] == sources
                and superseded[1] == meta.get("params")
                and folder.name.rsplit("-", 1)[0] == keep.name.rsplit("-", 1)[0])
        if same or not any(os.path.exists(s) for s in sources):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
