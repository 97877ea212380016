"""Datasets as plain uint8 NumPy arrays in memory: digits, MNIST, CIFAR-10, image folders,
the ImageNet sample.

Every loader returns the same :class:`Dataset`, so training, evaluation and export never
care where pixels came from. Files are looked up along :func:`data_search_path`; decoded
results are cached as ``.npy`` (see ``_cache``) so the second load of CIFAR-10 skips
60,000 JPEG decodes. Anything missing or malformed raises :class:`DataError` naming the
file, the places looked, and what to do.

Kept whole at about 530 lines: it is the one place a dataset name becomes arrays, and its
loaders share the search path, the cache and the wording of every error; the file-format
readers already live apart (``_idx``, ``_cifar``, ``_images``, ``_cache``).
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgesqueeze.data import _cache, _cifar, _images
from edgesqueeze.data._cifar import CIFAR10_CLASSES
from edgesqueeze.data._idx import read_idx
from edgesqueeze.data.download import CIFAR10_ARCHIVE, MNIST_FILES, download_cifar10, download_mnist
from edgesqueeze.errors import DataError

__all__ = ["Dataset", "load_dataset", "split_train_val", "data_search_path", "channel_stats", "fit_channels",
           "with_channels", "KNOWN_DATASETS", "CIFAR10_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "read_idx"]

from edgesqueeze._datasets import (  # noqa: E402 - re-exported: the names are checked torch-free
    KNOWN_DATASETS, check_dataset_name, dataset_file, unknown_dataset_error)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Seed of the carved test splits (digits, class-only image folders). Fixed, and not the
# user's seed, so that the test set is the same in every run and every recipe.
_TEST_SPLIT_SEED = 20160224
_TEST_FRACTION = 0.2
_REPO = Path(__file__).resolve().parents[2]  # parent of the edgesqueeze package


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test images as uint8 (N, C, H, W), labels as int64, plus how to normalise.

    ``mean``/``std`` are per channel in [0, 1] units, from the *full* training set (a
    ``limit`` subset keeps them), so a model trained on a subset normalises like one
    trained on everything.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        from edgesqueeze.data.stream import is_lazy

        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if not (isinstance(x, np.ndarray) or is_lazy(x)) or x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"dataset '{self.name}': {split}_x must be uint8 (N, C, H, W), got "
                                f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
                raise DataError(f"dataset '{self.name}': {split}_y must be int64 of shape ({len(x)},)")
            if len(y) and (y.min() < 0 or y.max() >= len(self.classes)):
                raise DataError(f"dataset '{self.name}': {split} labels outside 0..{len(self.classes) - 1}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(f"dataset '{self.name}': train images {self.train_x.shape[1:]} and test images "
                            f"{self.test_x.shape[1:]} differ in shape")
        c = self.train_x.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise DataError(f"dataset '{self.name}': mean/std need {c} values, got {self.mean}, {self.std}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={len(self.train_x)}, test={len(self.test_x)}, "
                f"input_shape={self.input_shape}, classes={self.num_classes})")


def with_channels(ds: Dataset, channels: int) -> Dataset:
    """``ds`` with ``channels`` channels: grayscale images with their one channel repeated 3
    times (what torchvision's ``Grayscale(num_output_channels=3)`` and Pillow's
    ``convert("RGB")`` of a gray image give; ``edgesqueeze run`` feeds a gray image file to a
    3-channel model so), mean and std repeated alike. ``ds`` itself when it has them already;
    any other change is a DataError (a colour dataset is not made gray: that loses the colour
    the model was trained to see)."""
    c = ds.input_shape[0]
    if channels == c:
        return ds
    if c != 1 or channels != 3:
        raise DataError(f"dataset '{ds.name}' has {c}-channel images; only grayscale ones can be given "
                        f"{channels} channels (the gray value repeated in each), not {c}-channel ones")
    from edgesqueeze.data.stream import is_lazy

    def repeat(x):
        if is_lazy(x):  # decoded as RGB when read: a gray pixel becomes three equal ones
            out = x[:]
            out.channels = 3
            return out
        return np.repeat(x, 3, axis=1)

    return replace(ds, train_x=repeat(ds.train_x), test_x=repeat(ds.test_x),
                   mean=tuple(ds.mean) * 3, std=tuple(ds.std) * 3)


def to_gray(ds: Dataset) -> Dataset:
    """``ds``'s RGB images as grayscale, by Pillow's ``convert("L")`` (ITU-R 601-2 luma, its
    own fixed-point rounding: what ``edgesqueeze run`` does to a colour file for a 1-channel
    model; a gray image stored as RGB gets its own values back)."""
    from edgesqueeze.data.stream import is_lazy

    def gray(x):
        if is_lazy(x):  # each file converted to L as it is read, as run does
            out = x[:]
            out.channels, out.check_gray = 1, False
            return out
        x = np.asarray(x)
        rgb = x.astype(np.uint32)
        luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
        return luma.astype(np.uint8)[:, None]

    return replace(ds, train_x=gray(ds.train_x), test_x=gray(ds.test_x),
                   mean=(float(np.mean(ds.mean)),), std=(float(np.mean(ds.std)),))


def fit_channels(ds: Dataset, input_shape, *, source: object) -> Dataset:
    """``ds`` as a model of ``input_shape`` takes it, with a Note naming both: a grayscale
    dataset for a 3-channel model of the same image size gets its channel repeated
    (:func:`with_channels`); a colour one for a 1-channel model (an image folder with colour
    files, which ``run`` converts one by one) is converted to gray (:func:`to_gray`). Anything
    else comes back unchanged (the caller's shape check says what does not fit)."""
    import warnings

    from edgesqueeze.errors import Note

    try:
        want = [int(d) for d in input_shape or ()]
    except (TypeError, ValueError):
        return ds
    have = list(ds.input_shape)
    if len(want) != 3 or want[1:] != have[1:] or (want[0], have[0]) not in ((3, 1), (1, 3)):
        return ds
    if want[0] == 1:
        warnings.warn(f"dataset '{ds.name}' has colour images and {source} takes 1-channel ones: each is converted "
                      f"to gray (as for a colour image file in `edgesqueeze run`)", Note, stacklevel=2)
        return to_gray(ds)
    warnings.warn(f"dataset '{ds.name}' is grayscale and {source} takes 3-channel images: each gray value is "
                  f"repeated in the 3 channels (as for a gray image file in `edgesqueeze run`)", Note, stacklevel=2)
    return with_channels(ds, 3)


# ---------------------------------------------------------------------------------------
# Where data lives


def _shared_dirs() -> list[Path]:
    """The read-only ``shared/datasets`` beside the repository (or beside the cwd)."""
    return [_REPO.parent / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets"]


def data_search_path(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for dataset files, in order, absolute, without duplicates.

    ``data_dir`` (``--data-dir``), then ``$EDGESQUEEZE_DATA`` (``os.pathsep``-separated),
    then ``./data``, then ``shared/datasets`` beside the repository and beside the cwd.
    Folders that do not exist are listed too: they are where a file *would* be found, and
    an error message should name them.
    """
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("EDGESQUEEZE_DATA", "")
    dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    dirs.append(Path("data"))
    dirs += _shared_dirs()
    out: list[Path] = []
    for d in dirs:
        d = Path(os.path.abspath(d))
        if d not in out:
            out.append(d)
    return out


def _download_dir(search: list[Path]) -> Path | None:
    """The first search folder we may write to; never ``shared/`` (read-only input)."""
    shared = {Path(os.path.abspath(p)) for p in _shared_dirs()}
    for d in search:
        if d in shared:
            continue
        p = d
        while not p.exists() and p != p.parent:
            p = p.parent
        if p.is_dir() and os.access(p, os.W_OK | os.X_OK):
            return d
    return None


def _where(search: list[Path]) -> str:
    return ", ".join(str(d) for d in search)


_WHAT_TO_DO = "pass --data-dir DIR or set EDGESQUEEZE_DATA=DIR to a folder that holds it"


# ---------------------------------------------------------------------------------------
# Splits and statistics


def _stratified_pick(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``k`` items with each class represented in proportion.

    Per-class quotas are ``k * count / n`` rounded by largest remainder (ties broken at
    random), so they sum to exactly ``k``. Example: y with 6 zeros and 3 ones, k = 3 ->
    two zeros and one one.
    """
    n = len(y)
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.arange(0)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = counts * k / n
    take = np.floor(quota).astype(np.int64)
    order = np.lexsort((rng.permutation(len(classes)), -(quota - take)))
    take[order[: k - int(take.sum())]] += 1
    picked = [rng.permutation(np.flatnonzero(inverse == ci))[: take[ci]] for ci in range(len(classes))]
    return np.sort(np.concatenate(picked))


def split_train_val(ds: Dataset, val_fraction: float, seed: int):
    """``((x_train, y_train), (x_val, y_val))`` carved from ``ds``'s training set.

    Stratified, deterministic in ``seed``, disjoint, covering every training item; the
    validation part has ``round(n * val_fraction)`` items (0 -> empty).
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(ds.train_y)
    val = _stratified_pick(ds.train_y, int(round(n * val_fraction)), np.random.default_rng(seed))
    mask = np.ones(n, dtype=bool)
    mask[val] = False
    return (ds.train_x[mask], ds.train_y[mask]), (ds.train_x[val], ds.train_y[val])


def calibration_indices(pool: int, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` of ``pool`` images (all if fewer), drawn without replacement, seeded,
    sorted. Compress and export both draw their calibration images with it, so with the
    same seed they calibrate on the same images and leave the same ones unseen (the ImageNet
    sample has only a test split: what one held out, the other must not calibrate on)."""
    return np.sort(np.random.default_rng(seed).permutation(pool)[:min(n, pool)])


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in [0, 1] units of uint8 images (N, C, H, W).

    A 256-bin histogram per channel gives both without a float copy of the data (CIFAR
    as float64 would be 1.2 GB). A constant channel gets std 1/255, not 0.
    """
    if len(x) == 0:
        raise DataError("cannot compute mean/std of an empty training set")
    return stats_from_histograms([np.bincount(x[:, c].ravel(), minlength=256) for c in range(x.shape[1])])


def stats_from_histograms(hists) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`channel_stats` from per-channel 256-bin histograms of uint8 values (summed over
    chunks of a dataset too large to hold: the same histograms, the same numbers)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for h in hists:
        hist = np.asarray(h).astype(np.float64)
        m = float((hist * v).sum() / hist.sum())
        var = float((hist * (v - m) ** 2).sum() / hist.sum())
        means.append(round(m, 6))
        stds.append(round(max(var ** 0.5, 1 / 255), 6))
    return tuple(means), tuple(stds)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 NCHW to size x size (antialiased when shrinking), in chunks."""
    if x.shape[2:] == (size, size):
        return x
    import torch
    import torch.nn.functional as F

    shrink = size < x.shape[2] or size < x.shape[3]
    out = np.empty((len(x), x.shape[1], size, size), dtype=np.uint8)
    for i in range(0, len(x), 4096):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + 4096])).float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[i:i + 4096] = t.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _take(ds: Dataset, limit: int, seed: int) -> Dataset:
    tr = _stratified_pick(ds.train_y, limit, np.random.default_rng([seed, 0]))
    te = limited_test(ds.test_y, limit, seed)
    return replace(ds, train_x=ds.train_x[tr], train_y=ds.train_y[tr], test_x=ds.test_x[te], test_y=ds.test_y[te])


def limited_test(y: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` test images, the subset ``load_dataset(..., limit=limit,
    seed=seed)`` keeps (seeded, each class in proportion): what ``verify --limit`` and ``eval
    --limit`` measure alike."""
    return _stratified_pick(np.asarray(y), int(limit), np.random.default_rng([seed, 1]))


def _carve_test(x: np.ndarray, y: np.ndarray):
    te = _stratified_pick(y, int(round(len(y) * _TEST_FRACTION)), np.random.default_rng(_TEST_SPLIT_SEED))
    mask = np.ones(len(y), dtype=bool)
    mask[te] = False
    return x[mask], y[mask], x[te], y[te]


# ---------------------------------------------------------------------------------------
# Caching wrapper


# in the cache key of datasets decoded from image files: entries decoded before images were
# turned upright by their EXIF orientation (session 37) are not reused
_IMAGE_FILES = {"exif": "upright"}


def _cached(name: str, tag: str, sources: list[Path], params: dict, build: Callable[[], tuple],
            stats: tuple | None = None, entries: list | None = None) -> Dataset:
    """Load ``tag`` from the cache, or ``build()`` it, compute mean/std, and cache it.

    ``build() -> (train_x, train_y, test_x, test_y, classes)``; ``stats`` fixes mean/std
    instead of measuring them (ImageNet's standard values).
    """
    import warnings

    from edgesqueeze.errors import Note

    key = _cache.source_key(sources, params, entries)  # one walk of a folder's files, for the hit or the save
    hit = _cache_hit(name, tag, key)
    if hit is not None:
        return hit
    print(f"edgesqueeze: decoding {name} from {', '.join(map(str, sources))} "
          f"(once; cached in {_cache.cache_dir()})", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tx, ty, vx, vy, classes = build()
    for w in caught:  # said now, and (the notes) again whenever the entry is used
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    notes = [str(w.message) for w in caught if issubclass(w.category, Note)]
    mean, std = stats if stats is not None else channel_stats(tx)
    arrays = {"train_x": tx, "train_y": ty.astype(np.int64), "test_x": vx, "test_y": vy.astype(np.int64)}
    ds = Dataset(name=name, classes=tuple(classes), mean=tuple(mean), std=tuple(std), **arrays)
    _cache.save(tag, key, arrays, {"name": name, "classes": list(classes), "mean": list(mean),
                                   "std": list(std), "sources": [os.path.abspath(s) for s in sources], "params": params,
                                   "notes": notes})
    return ds


def _cache_hit(name: str, tag: str, key: str, *, say: bool = True) -> Dataset | None:
    """The cached dataset of ``key`` (:func:`~edgesqueeze.data._cache.source_key`), or None; the
    notes its decoding raised (images left out, a carved test split) are said again, as on the
    run that decoded it (``say=False``: by :func:`say_notes`, once the caller uses it)."""
    hit = _cache.load(tag, key)
    if hit is None:
        return None
    arrays, meta = hit
    try:
        ds = Dataset(name=name, classes=tuple(meta["classes"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                     **arrays)
    except (DataError, KeyError, TypeError, ValueError):
        return None  # an entry its own checks passed but a Dataset refuses: rebuilt, never used
    object.__setattr__(ds, "_notes", [str(n) for n in meta.get("notes", ())])  # a frozen dataclass
    if say:
        say_notes(ds)
    return ds


def say_notes(ds: Dataset) -> None:
    """Say again the notes the decoding of ``ds`` raised (kept with its cache entry)."""
    import warnings

    from edgesqueeze.errors import Note

    for note in getattr(ds, "_notes", ()):
        warnings.warn(str(note), Note, stacklevel=3)


# ---------------------------------------------------------------------------------------
# Loaders


# SHA-256 of the 1,797 x 65 table in sklearn's datasets/data/digits.csv.gz (64 pixels 0..16,
# then the label), as uint8: the file read directly is used only if it holds exactly these values
DIGITS_SHA256 = "68aea062d35a127749050fa0e52dca09d6569ac08092c925610e0954e172dde2"


def _digits_table() -> np.ndarray:
    """sklearn's 8x8 digits as a (1797, 65) uint8 table: 64 pixels (0..16), then the label.

    Read straight from the CSV that sklearn ships, without importing ``sklearn.datasets``:
    that import (SciPy and most of sklearn) took 0.8-1.4 s of every command that loads
    digits, longer than the rest of loading them. The values are checked against
    :data:`DIGITS_SHA256`; a sklearn whose file moved or differs is read with
    ``sklearn.datasets.load_digits`` as before."""
    import gzip
    import hashlib
    import importlib.util

    try:
        spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
        where = list(spec.submodule_search_locations or []) if spec else []
        path = Path(where[0]) / "datasets" / "data" / "digits.csv.gz" if where else None
        if path is not None and path.is_file():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",", ndmin=2)
            if table.shape == (1797, 65) and (table == np.rint(table)).all() and table.min() >= 0 \
                    and table.max() <= 16:
                table = table.astype(np.uint8)
                if hashlib.sha256(table.tobytes()).hexdigest() == DIGITS_SHA256:
                    return table
    except (OSError, ValueError, EOFError, ImportError):
        pass
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.concatenate([d.images.reshape(len(d.images), -1), d.target[:, None]], axis=1).astype(np.uint8)


def _load_digits(image_size: int) -> Dataset:
    """sklearn's embedded 8x8 digits, values 0..16 -> 0..255, upscaled bilinearly."""
    table = _digits_table()
    images = table[:, :64].reshape(-1, 8, 8).astype(np.float64)
    x = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    x = _resize(x, image_size)
    tx, ty, vx, vy = _carve_test(x, table[:, 64].astype(np.int64))
    mean, std = channel_stats(tx)
    return Dataset("digits", tx, ty, vx, vy, tuple(str(i) for i in range(10)), mean, std)


def _mnist_names(stem: str) -> tuple[str, ...]:
    """The names one MNIST file goes by: ``train-images-idx3-ubyte[.gz]``, and as Kaggle's
    copy names it, ``train-images.idx3-ubyte``."""
    kaggle = stem.replace("-idx", ".idx")
    return (f"{stem}.gz", stem, f"{kaggle}.gz", kaggle)


def _find_mnist(search: list[Path], partial: list[str] | None = None) -> tuple[list[Path] | None, list[Path]]:
    """The four IDX files from the first folder that holds all of them (.gz or raw).
    ``partial`` gets one line per folder before it that holds some but not all of them (a
    file missing or misnamed there would otherwise pass unnoticed, another copy used)."""
    looked = []
    for d in search:
        for loc in (d / "mnist", d):
            looked.append(loc)
            found, missing = [], []
            for stem in MNIST_FILES:
                try:
                    hit = next((loc / n for n in _mnist_names(stem) if (loc / n).is_file()), None)
                except OSError:  # an unreadable folder holds nothing we can use
                    hit = None
                if hit is None:
                    missing.append(stem)
                else:
                    found.append(hit)
            if not missing:
                return found, looked
            if found and partial is not None:
                partial.append(f"{loc} holds only {len(found)} of the 4 MNIST files (missing "
                               f"{', '.join(f'{m}[.gz]' for m in missing)})")
    return None, looked


def _other_copy_note(what: str, used: Path, data_dir: Path | None, partial: list[str]) -> None:
    """Say on stderr when the copy used is not in ``--data-dir`` (a typo, an empty or half-filled
    folder fell through to ./data or ../shared without a word), and which folders held part of
    the dataset."""
    notes = list(partial)
    if data_dir is not None and not Path(os.path.abspath(used)).is_relative_to(data_dir):
        notes.insert(0, f"--data-dir {data_dir} " + ("does not exist" if not data_dir.exists()
                                                     else f"holds no {what}"))
    if notes:  # a Note, as library code says things (the CLI prints it as `note: ...`)
        import warnings

        from edgesqueeze.errors import Note

        warnings.warn(f"{'; '.join(notes)}; using {used}", Note, stacklevel=3)


def _load_mnist(search: list[Path], download: bool, image_size: int | None,
                data_dir: Path | None = None) -> Dataset:
    partial: list[str] = []
    files, looked = _find_mnist(search, partial)
    if files is None:
        names = ", ".join(f"{s}[.gz]" for s in MNIST_FILES)
        missing = f"MNIST not found: looked for {names} in {_where(looked)}" + (f" ({'; '.join(partial)})"
                                                                               if partial else "")
        if not download:
            raise DataError(f"{missing}; downloading is off (data.download: false in the recipe; download=False): "
                            f"put the four files in one of these folders, or {_WHAT_TO_DO}")
        dest = _download_dir(search)
        if dest is None:
            raise DataError(f"{missing}, and none of {_where(search)} is writable to download into; "
                            f"{_WHAT_TO_DO}")
        try:
            download_mnist(dest / "mnist")
        except DataError as e:
            raise DataError(f"{missing}; downloading failed: {e}") from e
        files, _ = _find_mnist([dest])
    else:
        _other_copy_note("MNIST", files[0].parent, data_dir, partial)

    def build():
        tx, ty, vx, vy = (read_idx(p, ndim=3 if "images" in p.name else 1) for p in files)
        for x, y, px, py in ((tx, ty, files[0], files[1]), (vx, vy, files[2], files[3])):
            if len(x) != len(y):
                raise DataError(f"{px} holds {len(x)} images but {py} holds {len(y)} labels; one of them is "
                                f"from another dataset or damaged: delete both and download them again")
            if len(y) and y.max() > 9:
                raise DataError(f"{py}: label {int(y.max())} is not a digit; delete it and download it again")
        for x, px in ((tx, files[0]), (vx, files[2])):
            if len(x) == 0:  # training on it finished, then the final test line crashed (KeyError)
                raise DataError(f"{px} holds no images; delete it and download it again")
        if tx.shape[1:] != vx.shape[1:]:
            raise DataError(f"{files[0]} and {files[2]} hold images of different sizes")
        if tx.shape[1] != tx.shape[2] and not image_size:  # was stretched to a square without a word
            raise DataError(f"{files[0]}: images are {tx.shape[1]}x{tx.shape[2]}, not square; set data.image_size "
                            "(--set data.image_size=N, or --image-size N) to resize them to NxN")
        size = image_size or tx.shape[1]
        return (_resize(tx[:, None], size), ty.astype(np.int64), _resize(vx[:, None], size),
                vy.astype(np.int64), tuple(str(i) for i in range(10)))

    return _cached("mnist", "mnist", files, {"image_size": image_size}, build)


def _train_test(out: dict, path: Path) -> tuple:
    """``(train_x, train_y, test_x, test_y)`` from an image folder's splits (``layout``):
    ``all`` or a lone ``train`` has a fixed test split carved from it, with a Note saying so
    (an empty test/ fell back to it without a word, and eval of a folder measured a fifth)."""
    if "test" in out:
        return (*out["train"], *out["test"])
    import warnings

    from edgesqueeze.errors import Note

    whole = out.get("all", out.get("train"))
    n = int(round(len(whole[1]) * _TEST_FRACTION))
    where = "the folder has no train/ and test/" if "all" in out else "test/ holds no images (or there is none)"
    warnings.warn(f"{path}: {where}, so its test split is a fixed {_TEST_FRACTION:.0%} of "
                  f"{'its images' if 'all' in out else 'the images in train/'} ({n:,} of {len(whole[1]):,}), held out the same "
                  "way by train, eval and verify; put test images in test/<class>/ to measure on others",
                  Note, stacklevel=2)
    return _carve_test(*whole)


def _folder_dataset(src_path: Path, image_size: int | None, desc: str):
    """(train_x, train_y, test_x, test_y, classes) from an image folder or zip."""
    src = _images.open_source(src_path)
    try:
        splits, classes = _images.layout(src)
        index = {c: i for i, c in enumerate(classes)}
        out = {}
        gray_all = True
        for split, items in splits.items():
            items = sorted(items, key=lambda it: (index[it[0]], it[1]))
            hwc, gray = _images.decode_all(src, items, image_size=image_size, desc=f"{desc} {split}")
            out[split] = (hwc, np.array([index[c] for c, _ in items], dtype=np.int64))
            gray_all &= gray
    finally:
        src.close()
    out = {k: (_images.to_nchw(x, gray_all), y) for k, (x, y) in out.items()}
    tx, ty, vx, vy = _train_test(out, src_path)
    if tx.shape[1:] != vx.shape[1:]:
        raise DataError(f"{src_path}: train images are {tx.shape[2]}x{tx.shape[3]} but test images are "
                        f"{vx.shape[2]}x{vx.shape[3]}; set data.image_size (--set data.image_size=N, or --image-size N) to resize them all")
    return tx, ty, vx, vy, tuple(classes)


def _load_cifar10(search: list[Path], download: bool, image_size: int | None,
                  data_dir: Path | None = None) -> Dataset:
    """First of, per search folder: pickled batches, the official .tar.gz, the JPEG zip or folder."""
    looked = []
    found = None
    for d in search:
        for kind, p, is_dir in (("batches", d / _cifar.BATCH_DIR, True),
                                ("tar", d / CIFAR10_ARCHIVE, False),
                                ("folder", d / "cifar10-jpeg.zip", False),
                                ("folder", d / "cifar10-jpeg", True)):
            looked.append(p)
            if p.is_dir() if is_dir else p.is_file():
                found = (kind, p)
                break
        if found:
            break
    if found is None:
        missing = f"CIFAR-10 not found: looked for {', '.join(map(str, looked))}"
        if not download:
            raise DataError(f"{missing}; downloading is off (data.download: false in the recipe; download=False): "
                            f"{_WHAT_TO_DO}")
        dest = _download_dir(search)
        if dest is None:
            raise DataError(f"{missing}, and no search folder is writable to download into; {_WHAT_TO_DO}")
        try:
            found = ("tar", download_cifar10(dest))
        except DataError as e:
            raise DataError(f"{missing}; downloading failed: {e}") from e
    else:
        _other_copy_note("CIFAR-10", found[1], data_dir, [])
    kind, path = found

    def build():
        if kind == "folder":
            tx, ty, vx, vy, classes = _folder_dataset(path, image_size, path.name)
            if classes != CIFAR10_CLASSES or len(vx) == 0:
                raise DataError(f"{path}: expected train/ and test/ folders of the CIFAR-10 classes "
                                f"{', '.join(CIFAR10_CLASSES)}, found classes {', '.join(classes)}")
            return tx, ty, vx, vy, classes
        tx, ty, vx, vy = _cifar.load_batch_dir(path) if kind == "batches" else _cifar.load_tarball(path)
        if len(tx) == 0 or len(vx) == 0:
            raise DataError(f"{path}: holds no {'training' if len(tx) == 0 else 'test'} images; delete it and "
                            "download it again")
        size = image_size or 32
        return _resize(tx, size), ty, _resize(vx, size), vy, CIFAR10_CLASSES

    decoded = _IMAGE_FILES if kind == "folder" else {}  # the python batches hold pixels, not files
    return _cached("cifar10", "cifar10", [path], {"image_size": image_size, "kind": kind, **decoded}, build)


def folder_test_image(name: str) -> tuple[str, tuple[int, int]] | None:
    """``(where, (width, height))`` of the first test image of ``imagefolder:PATH`` (its
    first image when it has no test/), read from the file's header; None for other datasets
    or a folder that cannot be read (loading it says why)."""
    if not name.lower().startswith("imagefolder:"):
        return None
    from PIL import Image

    try:
        src = _images.open_source(Path(os.path.abspath(os.path.expanduser(name.split(":", 1)[1]))))
        try:
            splits, _ = _images.layout(src)
            rel = (splits.get("test") or next(iter(splits.values())))[0][1]
            from edgesqueeze.runtime.images import QUARTER_TURNS

            with Image.open(io.BytesIO(src.read(rel))) as img:
                turned = img.getexif().get(0x0112) in QUARTER_TURNS  # read upright (EXIF): width and height swap
                return src.describe(rel), img.size[::-1] if turned else img.size
        finally:
            src.close()
    except (DataError, OSError, Image.UnidentifiedImageError):
        return None


def _load_imagefolder(name: str, spec: str, image_size: int | None) -> Dataset:
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"image folder {path.absolute()} (from dataset '{name}') does not exist; give "
                        f"imagefolder:PATH with a folder or .zip holding train/<class>/ and test/<class>/")
    path = Path(os.path.abspath(path))
    ds = None
    entries = _cache.source_entries([path])  # one walk of the folder for both keys below
    if image_size is not None:  # decoded at the images' own size (train) when that is the size asked for
        # (export asks for the model's input size): the same pixels, not the folder decoded again
        own = _cache_hit(name, "imagefolder", _cache.source_key([path], {"image_size": None, **_IMAGE_FILES}, entries),
                         say=False)
        if own is not None and own.train_x.shape[-2:] == (image_size, image_size):
            ds = own
            say_notes(ds)  # said once: the probe of another size said them again
    if ds is None:
        ds = _cached(name, "imagefolder", [path], {"image_size": image_size, **_IMAGE_FILES},
                     lambda: _folder_dataset(path, image_size, path.name), entries=entries)
    _images.note_empty_classes(path, ds.classes)
    return ds


_STREAM_SAMPLE = 200  # images whose size and mode a streamed folder reads up front


def _stream_folder(name: str, spec: str, image_size: int | None, seed: int) -> Dataset:
    """An image folder or zip (the layouts of :func:`_folder_dataset`) streamed from disk:
    :class:`~edgesqueeze.data.stream.LazyImages`, nothing decoded but one image (its size and
    channels) and a seeded sample of 2,000 for mean/std."""
    from edgesqueeze.data.stream import LazyImages, sample_histograms

    path = Path(os.path.abspath(Path(spec).expanduser()))
    if not path.exists():
        raise DataError(f"image folder {path} (from dataset '{name}') does not exist; give imagefolder:PATH with "
                        "a folder or .zip holding train/<class>/ and test/<class>/")
    src = _images.open_source(path)
    try:
        splits, classes = _images.layout(src)
        _images.note_empty_classes(path, classes)
        first = next(iter(splits.values()))[0][1]
        img = _images.decode_image(src.read(first), src.describe(first))
        size = image_size or img.size[0]
        if image_size is None and img.size[0] != img.size[1]:
            raise DataError(f"{src.describe(first)} is {img.size[0]}x{img.size[1]}, not square; pass image_size "
                            "(data.image_size) to resize every image to a square")
        # channels and size from a seeded sample, not the first file alone: a folder whose first
        # class was gray streamed every colour image as gray (in memory it was RGB); the images
        # outside the sample are checked as they are decoded (LazyImages' check_size, check_gray)
        everything = [rel for items in splits.values() for _, rel in items]
        rng = np.random.default_rng([seed, 5])
        sample = everything if len(everything) <= _STREAM_SAMPLE else [
            everything[i] for i in np.sort(rng.choice(len(everything), _STREAM_SAMPLE, replace=False))]
        gray = _images.is_gray(img)
        for rel in sample:
            other = _images.decode_image(src.read(rel), src.describe(rel))
            if image_size is None and other.size != img.size:
                raise DataError(f"images differ in size: {src.describe(rel)} is {other.size[0]}x{other.size[1]}, "
                                f"{src.describe(first)} {img.size[0]}x{img.size[1]}; set data.image_size to "
                                "resize every image to one size")
            gray = gray and _images.is_gray(other)
    finally:
        src.close()
    channels = 1 if gray else 3
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, items in splits.items():
        items = sorted(items, key=lambda it: (index[it[0]], it[1]))
        out[split] = (LazyImages(path, [rel for _, rel in items], size=size, channels=channels,
                                 check_size=image_size is None, check_gray=gray),
                      np.array([index[c] for c, _ in items], dtype=np.int64))
    tx, ty, vx, vy = _train_test(out, path)
    mean, std = stats_from_histograms(sample_histograms(tx, seed=seed))
    return Dataset(name, tx, ty, vx, vy, tuple(classes), mean, std)


def _imagenet_classes_file(path: Path, search: list[Path]) -> Path:
    for p in [path / "imagenet_classes.txt", *(d / "imagenet_classes.txt" for d in search)]:
        if p.is_file():
            return p
    raise DataError(f"imagenet:{path} needs the class list imagenet_classes.txt ('index<TAB>wnid<TAB>name' per "
                    f"line, 1000 lines): put it in {path} or in one of {_where(search)}")


def _imagenet_split(root: Path, split: str, label: dict[str, int], classes_file: Path) -> tuple[list[str], list[int]]:
    """``(files relative to root, labels)`` of ``root/split/<wnid>/*``; sorted, so the same
    folder gives the same order on every machine."""
    base = root / split
    files, labels = [], []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if entry.name.lower().endswith(_images.IMAGE_EXTENSIONS):
                raise DataError(f"{entry.path}: images in {base} must be in class folders {split}/<wnid>/ (for "
                                "the official validation images, sort them with the usual valprep script)")
            continue
        if entry.name not in label:
            raise DataError(f"{entry.path}: '{entry.name}' is not a class (wnid) listed in {classes_file}; "
                            "remove the folder or use a class list that has it")
        names = sorted(n for n in os.listdir(entry.path)
                       if not n.startswith(".") and n.lower().endswith(_images.IMAGE_EXTENSIONS))
        files += [f"{split}/{entry.name}/{n}" for n in names]
        labels += [label[entry.name]] * len(names)
    return files, labels


def _load_imagenet_folder(name: str, spec: str, search: list[Path], image_size: int | None) -> Dataset:
    """The standard ImageNet layout, ``PATH/train/<wnid>/*.JPEG`` and ``PATH/val/<wnid>/*.JPEG``,
    streamed from disk (val is the test split; validation is carved from train). Images get
    torchvision's evaluation transform at ``image_size`` (224); mean/std are ImageNet's."""
    from edgesqueeze.data.stream import LazyImages

    root = Path(os.path.abspath(Path(spec).expanduser()))
    if not (root / "train").is_dir():
        raise DataError(f"imagenet:{root}: no train/ folder; expected {root}/train/<wnid>/*.JPEG and "
                        f"{root}/val/<wnid>/*.JPEG")
    classes_file = _imagenet_classes_file(root, search)
    wnids, names = _read_imagenet_classes(classes_file)
    label = {w: i for i, w in enumerate(wnids)}
    crop = image_size or 224
    tr_files, tr_y = _imagenet_split(root, "train", label, classes_file)
    if not tr_files:
        raise DataError(f"imagenet:{root}: train/ holds no images")
    te_files, te_y = _imagenet_split(root, "val", label, classes_file) if (root / "val").is_dir() else ([], [])

    def lazy(files):
        return LazyImages(root, files, size=crop, channels=3, preprocess="imagenet")

    return Dataset(name, lazy(tr_files), np.array(tr_y, dtype=np.int64), lazy(te_files),
                   np.array(te_y, dtype=np.int64), tuple(names), IMAGENET_MEAN, IMAGENET_STD)


def _imagenet_preprocess(img, crop: int) -> np.ndarray:
    """RGB, then torchvision's eval transform (:func:`._images.imagenet_crop`), as CHW."""
    return np.asarray(_images.imagenet_crop(img.convert("RGB"), crop)).transpose(2, 0, 1)


def _read_imagenet_classes(path: Path) -> tuple[list[str], list[str]]:
    wnids, names = [], []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as Windows editors write, is not the index
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the class list ({exc})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] != str(len(wnids)) or not parts[1].startswith("n"):
            raise DataError(f"{path}:{lineno}: expected 'index<TAB>wnid<TAB>name' with index {len(wnids)}, "
                            f"got {line!r}")
        wnids.append(parts[1])
        names.append(parts[2])
    if len(wnids) != 1000:
        raise DataError(f"{path} lists {len(wnids)} classes, expected the 1000 ImageNet classes")
    return wnids, names


def _load_imagenet_sample(search: list[Path], image_size: int | None) -> Dataset:
    zips = [d / "imagenet-sample-100.zip" for d in search]
    txts = [d / "imagenet_classes.txt" for d in search]
    zp = next((p for p in zips if p.is_file()), None)
    tp = next((p for p in txts if p.is_file()), None)
    if zp is None or tp is None:
        missing = [n for n, f in (("imagenet-sample-100.zip", zp), ("imagenet_classes.txt", tp)) if f is None]
        raise DataError(f"imagenet-sample needs {' and '.join(missing)}: looked in {_where(search)}; "
                        f"{_WHAT_TO_DO} (it is not downloadable)")
    crop = image_size or 224

    def build():
        wnids, names = _read_imagenet_classes(tp)
        label = {w: i for i, w in enumerate(wnids)}
        src = _images.open_source(zp)
        try:
            xs, ys = [], []
            for rel in src.files:
                wnid = rel.rsplit("/", 1)[-1].split("_", 1)[0]
                if wnid not in label:
                    raise DataError(f"{src.describe(rel)}: '{wnid}' is not a wnid listed in {tp}")
                xs.append(_imagenet_preprocess(_images.decode_image(src.read(rel), src.describe(rel)), crop))
                ys.append(label[wnid])
        finally:
            src.close()
        if not xs:
            raise DataError(f"{zp} holds no images")
        empty = np.empty((0, 3, crop, crop), dtype=np.uint8)
        return empty, np.empty(0, dtype=np.int64), np.stack(xs), np.array(ys, dtype=np.int64), tuple(names)

    return _cached("imagenet-sample", "imagenet-sample", [zp, tp], {"crop": crop, **_IMAGE_FILES}, build,
                   stats=(IMAGENET_MEAN, IMAGENET_STD))


# ---------------------------------------------------------------------------------------
# Entry point


def _check_opt_int(what: str, v, lo: int) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo):
        raise DataError(f"{what} must be an integer >= {lo}, got {v!r}")


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = True,
                 image_size: int | None = None, limit: int | None = None, seed: int = 0,
                 stream: bool = False) -> Dataset:
    """Load a dataset by name: ``digits``, ``mnist``, ``cifar10``, ``imagenet-sample`` or
    ``imagefolder:PATH``.

    ``image_size`` resizes to a square (digits default 28, MNIST 28, CIFAR 32, ImageNet
    crop 224, image folders their own size if uniform). ``limit`` keeps a seeded,
    stratified subset of at most ``limit`` train and ``limit`` test items; ``seed`` affects
    nothing else. ``download`` allows fetching MNIST / CIFAR-10 when no copy is found.

    ``imagenet:PATH`` (``PATH/train/<wnid>/``, ``PATH/val/<wnid>/``) and, with ``stream``,
    ``imagefolder:PATH`` are streamed from disk (:mod:`edgesqueeze.data.stream`): their
    images are decoded batch by batch in DataLoader workers, never all held in memory.
    """
    check_dataset_name(name)
    _check_opt_int("image_size", image_size, 4)
    if image_size is not None and image_size > 1024:  # as data.image_size: 100000 was a MemoryError
        raise DataError(f"image_size: at most 1024 pixels a side, got {image_size}")
    _check_opt_int("limit", limit, 1)
    if seed is None:
        raise DataError("seed: expected a whole number >= 0, got None")
    _check_opt_int("seed", seed, 0)
    if not isinstance(download, bool):
        raise DataError(f"download: expected True or False, got {download!r}")
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)) or isinstance(data_dir, bytes) or not str(data_dir).strip():
            raise DataError(f"data_dir: expected a folder path, got {data_dir!r}")
        data_dir = Path(data_dir).expanduser()
    given = Path(os.path.abspath(data_dir)) if data_dir is not None else None
    name = name.strip()
    low = name.lower()
    if low.startswith(("imagefolder:", "imagenet:")):  # recorded as an absolute path: a model that
        # recorded imagefolder:base was evaluated on whatever ./base held where the command ran
        prefix, spec = name.split(":", 1)
        spec = os.path.abspath(os.path.expanduser(spec))
        name = f"{prefix}:{spec}"
    if low.startswith("imagefolder:"):
        ds = (_stream_folder(name, spec, image_size, seed) if stream
              else _load_imagefolder(name, spec, image_size))
    elif low.startswith("imagenet:"):
        ds = _load_imagenet_folder(name, spec, data_search_path(data_dir), image_size)
    elif low == "digits":
        ds = _load_digits(image_size or 28)
    elif low == "mnist":
        ds = _load_mnist(data_search_path(data_dir), download, image_size, given)
    elif low == "cifar10":
        ds = _load_cifar10(data_search_path(data_dir), download, image_size, given)
    elif low == "imagenet-sample":
        ds = _load_imagenet_sample(data_search_path(data_dir), image_size)
    else:
        raise unknown_dataset_error(name)
    return _take(ds, int(limit), int(seed)) if limit is not None else ds
