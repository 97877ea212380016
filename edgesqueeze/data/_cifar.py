"""CIFAR-10 in its official "python version": pickled batches, in a folder or the .tar.gz.

Each batch is a Python 2 pickle of ``{b'data': uint8 array (10000, 3072), b'labels': [int],
...}``. A pickle can run arbitrary code, so we never call plain ``pickle.load`` on it: a
restricted ``Unpickler`` resolves only the handful of globals that a NumPy array needs to
be rebuilt (``_reconstruct``, ``ndarray``, ``dtype``, ``_frombuffer`` and ``_codecs.encode``
for bytes pickled by Python 3 at protocol 2); any other global is refused. Builtin
containers (dict, list, bytes, str, int) need no global at all. The result is then checked
for exactly the shape and types we expect before it is used.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from edgesqueeze.errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
BATCH_DIR = "cifar-10-batches-py"


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray, numeric
    allowed = {}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module: str, name: str):
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _numpy_globals()
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")
        return obj


def safe_unpickle(data: bytes, source: str) -> object:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as e:
        raise DataError(f"{source} is not a valid CIFAR-10 python batch ({e}); delete it and "
                        f"download cifar-10-python.tar.gz again") from e


def _get(d: dict, key: str):
    return d.get(key.encode(), d.get(key))


def parse_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one pickled batch.

    The 3072 bytes of a row are the red plane, then green, then blue, each 32x32 in row
    order, so a plain reshape gives NCHW.
    """
    obj = safe_unpickle(data, source)
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict in a CIFAR-10 batch, found {type(obj).__name__}")
    x, y = _get(obj, "data"), _get(obj, "labels")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{source}: 'data' must be a uint8 array (N, 3072), found "
                        f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if not isinstance(y, list) or len(y) != len(x) or not all(type(v) is int and 0 <= v < 10 for v in y):
        raise DataError(f"{source}: 'labels' must be a list of {len(x)} integers in 0..9")
    return x.reshape(-1, 3, 32, 32).copy(), np.asarray(y, dtype=np.int64)


def _check_meta(data: bytes, source: str) -> None:
    obj = safe_unpickle(data, source)
    names = _get(obj, "label_names") if isinstance(obj, dict) else None
    if names is None:
        raise DataError(f"{source}: no 'label_names' in batches.meta")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if names != CIFAR10_CLASSES:
        raise DataError(f"{source}: label names {names} are not the CIFAR-10 classes {CIFAR10_CLASSES}")


def _assemble(read) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``read(name) -> (bytes, source)`` for each official member."""
    meta = read(META, required=False)
    if meta is not None:
        _check_meta(*meta)
    parts = [parse_batch(*read(b)) for b in TRAIN_BATCHES]
    tx, ty = parse_batch(*read(TEST_BATCH))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), tx, ty


def load_batch_dir(folder: Path):
    """From an extracted ``cifar-10-batches-py/`` folder."""
    def read(name, required=True):
        path = folder / name
        if not path.is_file():
            if not required:
                return None
            raise DataError(f"{path} is missing: the CIFAR-10 folder {folder} is incomplete; delete it "
                            f"and extract cifar-10-python.tar.gz again")
        return path.read_bytes(), str(path)

    return _assemble(read)


def load_tarball(path: Path):
    """Straight from ``cifar-10-python.tar.gz``, read in one forward pass without extracting."""
    wanted = {*TRAIN_BATCHES, TEST_BATCH, META}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted and base not in members:
                    members[base] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable .tar.gz ({e}); delete it and download it again") from e

    def read(name, required=True):
        if name not in members:
            if not required:
                return None
            raise DataError(f"{path} has no {BATCH_DIR}/{name}; it is not the CIFAR-10 python archive, "
                            f"or it is truncated: delete it and download it again")
        return members[name], f"{path}:{name}"

    return _assemble(read)
