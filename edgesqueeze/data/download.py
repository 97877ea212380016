"""Downloading dataset files from a list of mirrors, verified, never half-written.

Each URL is streamed into a temporary file beside the destination and renamed over it
only once its md5 matches, so an interrupted or wrong download never masquerades as a
dataset. MNIST is checked by the md5 of its *decompressed* bytes: the same images are
served re-gzipped by different mirrors (and our shared copy was re-gzipped), so the gzip
bytes are not a stable identity, the content is.

Mirrors can be overridden per dataset with ``EDGESQUEEZE_<NAME>_MIRRORS`` (comma-separated
base URLs; ``file://`` works) or with the ``mirrors=`` argument, e.g. to use a local copy
or to test against a local server.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Sequence

from edgesqueeze._io import atomic_path
from edgesqueeze.errors import DataError

__all__ = ["fetch", "mirrors_for", "download_mnist", "download_cifar10", "MNIST_FILES",
           "MNIST_MIRRORS", "CIFAR10_MIRRORS", "CIFAR10_ARCHIVE", "CIFAR10_MD5"]

# md5 of the decompressed IDX files (see shared/README.md): stable across re-gzipping.
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the .tar.gz itself
CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

_USER_AGENT = "edgesqueeze/0.1 (+dataset download)"


class _Rejected(Exception):
    """One mirror failed; the message says why and the next mirror is tried."""


def mirrors_for(dataset: str, default: Sequence[str], mirrors: Sequence[str] | None = None) -> list[str]:
    """``mirrors`` if given, else ``$EDGESQUEEZE_<DATASET>_MIRRORS``, else ``default``. A
    mirror given as a plain folder path (``/srv/mnist``) is that folder's ``file://`` URL."""
    if mirrors is None:
        env = os.environ.get(f"EDGESQUEEZE_{dataset.upper()}_MIRRORS", "")
        mirrors = [m.strip() for m in env.split(",") if m.strip()] or list(default)
    out = []
    for m in mirrors:
        if "://" not in m:  # a local folder: urllib needs a scheme ("unknown url type" was a traceback)
            m = Path(m).expanduser().resolve().as_uri()
        out.append(m if m.endswith("/") else m + "/")
    return out


def _md5_of_gunzipped(path: Path) -> str:
    h = hashlib.md5()
    try:
        with gzip.open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except (OSError, EOFError, zlib.error) as e:
        raise _Rejected(f"not a valid gzip file ({e})") from e
    return h.hexdigest()


def _progress(total: int | None, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)


_STALL_BYTES = 1 << 16  # a mirror must send this much within each `timeout` seconds


def _download_one(url: str, tmp: Path, timeout: float) -> str:
    """Stream ``url`` into ``tmp``; return the md5 of the bytes as received. A mirror that
    sends less than 64 KiB in ``timeout`` seconds is given up on (the socket's own timeout
    is per read: one byte every half second kept a download going for ever)."""
    import http.client
    import time

    h = hashlib.md5()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as out:
            length = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
            bar = _progress(int(length) if length and length.isdigit() else None, Path(url).name)
            mark, since = time.monotonic(), 0
            read = getattr(resp, "read1", resp.read)  # what has arrived: read() waits for all it asks
            for block in iter(lambda: read(1 << 16), b""):
                out.write(block)
                h.update(block)
                since += len(block)
                now = time.monotonic()
                if since >= _STALL_BYTES:
                    mark, since = now, 0
                elif now - mark > timeout:
                    raise _Rejected(f"too slow: under {_STALL_BYTES // 1024} KiB in {timeout:g} s")
                if bar is not None:
                    bar.update(len(block))
            if bar is not None:
                bar.close()
    except urllib.error.HTTPError as e:
        raise _Rejected(f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise _Rejected(str(e.reason)) from e
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, resets, malformed URLs,
        raise _Rejected(f"{type(e).__name__}: {e}") from e          # a body cut short, a broken status line
    return h.hexdigest()


def _remove_stale_downloads(dest: Path, older_than_s: float = 3600) -> None:
    """The temporary files of ``dest`` a killed download left (SIGKILL runs no cleanup; for
    CIFAR-10 up to 163 MB): only those untouched for an hour, since another process may be
    downloading the same file into the same folder now."""
    import re
    import time

    pattern = re.compile(rf"\.{re.escape(dest.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    try:
        for p in dest.parent.glob(f".{dest.name}.*.tmp"):
            if pattern.fullmatch(p.name) and p.is_file() and time.time() - p.stat().st_mtime > older_than_s:
                p.unlink()
    except OSError:
        pass  # not ours to fail on: the download itself says what is wrong with the folder


def fetch(urls: Sequence[str], dest: str | os.PathLike, *, md5: str | None,
          md5_of_decompressed: bool = False, timeout: float = 60.0) -> Path:
    """Download the first URL whose content verifies into ``dest``; return ``dest``.

    ``md5`` is checked against the downloaded bytes, or against their gunzipped content
    when ``md5_of_decompressed``. A mirror that fails or serves other bytes is skipped; if
    none works, :class:`DataError` lists every URL with its reason. ``dest`` is replaced
    atomically and only by verified content.
    """
    dest = Path(dest)
    if not urls:
        raise DataError(f"no URL to download {dest.name} from; pass mirrors or set the mirror variable")
    failures = []
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # deepest first
    _remove_stale_downloads(dest)
    done = False
    try:
        for url in urls:
            try:
                with atomic_path(dest) as tmp:
                    print(f"edgesqueeze: downloading {url} -> {dest}", file=sys.stderr)
                    got = _download_one(url, tmp, timeout)
                    if md5_of_decompressed:
                        got = _md5_of_gunzipped(tmp)
                    if md5 is not None and got != md5.lower():
                        what = "decompressed md5" if md5_of_decompressed else "md5"
                        raise _Rejected(f"{what} {got}, expected {md5.lower()}")
                done = True
                return dest
            except _Rejected as e:
                failures.append(f"{url} ({e})")
    finally:
        if not done:  # failed or interrupted (Ctrl-C, SIGTERM): the folders made for it, if still empty
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
    raise DataError(f"could not download {dest.name} to {dest.parent}: every mirror failed: "
                    + "; ".join(failures)
                    + ". Check the network, or download the file yourself into that folder "
                      "(or into a folder given with --data-dir / EDGESQUEEZE_DATA)")


def download_mnist(dest_dir: str | os.PathLike, *, mirrors: Sequence[str] | None = None,
                   timeout: float = 60.0) -> Path:
    """Fetch the four MNIST ``.gz`` files into ``dest_dir``; skip files already verified there."""
    dest_dir = Path(dest_dir)
    bases = mirrors_for("mnist", MNIST_MIRRORS, mirrors)
    for name, md5 in MNIST_FILES.items():
        gz = dest_dir / f"{name}.gz"
        if gz.is_file():
            try:
                if _md5_of_gunzipped(gz) == md5:
                    continue
            except _Rejected:
                pass  # damaged: download again, replacing it atomically
        fetch([b + gz.name for b in bases], gz, md5=md5, md5_of_decompressed=True, timeout=timeout)
    return dest_dir


def download_cifar10(dest_dir: str | os.PathLike, *, mirrors: Sequence[str] | None = None,
                     timeout: float = 60.0) -> Path:
    """Fetch the official ``cifar-10-python.tar.gz`` (about 163 MB) into ``dest_dir``."""
    bases = mirrors_for("cifar10", CIFAR10_MIRRORS, mirrors)
    dest = Path(dest_dir) / CIFAR10_ARCHIVE
    return fetch([b + CIFAR10_ARCHIVE for b in bases], dest, md5=CIFAR10_MD5, timeout=timeout)
