"""Tests for edgesqueeze.data: formats, lookup, splits, cache, augmentation, download."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import edgesqueeze.data._images as images_mod
import edgesqueeze.data.datasets as ds_mod
from edgesqueeze.data import (
    CIFAR10_CLASSES,
    AugmentConfig,
    Dataset,
    apply_augment,
    batches,
    data_search_path,
    default_augment,
    fetch,
    load_dataset,
    random_affine,
    random_crop,
    random_hflip,
    read_idx,
    split_train_val,
)
from edgesqueeze.data.download import MNIST_FILES
from edgesqueeze.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MNIST = SHARED / "datasets" / "mnist"


def needs_shared(path: Path):
    """Mark a test as using ../shared and skip it, saying where we looked, when absent."""
    skip = pytest.mark.skipif(not path.exists(), reason=f"{path} not found (../shared beside the repository)")
    return lambda fn: pytest.mark.shared(skip(fn))


needs_shared_mnist = needs_shared(SHARED_MNIST)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache and sees no user data folder."""
    monkeypatch.setenv("EDGESQUEEZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGESQUEEZE_DATA", raising=False)
    monkeypatch.delenv("EDGESQUEEZE_MNIST_MIRRORS", raising=False)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No shared/ folder and a fresh cwd: only what the test puts in place exists."""
    monkeypatch.setattr(ds_mod, "_shared_dirs", lambda: [])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# ---------------------------------------------------------------------------------------
# helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def make_folder(root: Path, classes=("cat", "ant", "bee"), per_class=4, size=(6, 5), split=True, gray=False):
    """Tiny image folder; pixel values encode (class, index) so the tests can check labels."""
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(sorted(classes)):
        for i in range(per_class):
            shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            arr.flat[0] = ci  # first pixel = label
            sub = ("train" if i < per_class - 1 else "test") if split else ""
            write_png(root / sub / cls / f"{i:04d}.png", arr)
    return root


def zip_folder(folder: Path, dest: Path, prefix: str | None = None) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                zf.write(p, f"{prefix}/{rel}" if prefix else rel)
    return dest


# ---------------------------------------------------------------------------------------
# IDX / MNIST


@needs_shared_mnist
def test_shared_mnist_idx_files():
    shapes = {"train-images-idx3-ubyte": (60000, 28, 28), "train-labels-idx1-ubyte": (60000,),
              "t10k-images-idx3-ubyte": (10000, 28, 28), "t10k-labels-idx1-ubyte": (10000,)}
    for stem, md5 in MNIST_FILES.items():
        path = SHARED_MNIST / f"{stem}.gz"
        assert hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest() == md5
        arr = read_idx(path)
        assert arr.shape == shapes[stem] and arr.dtype == np.uint8
        if "labels" in stem:
            assert arr.min() == 0 and arr.max() == 9 and len(np.unique(arr)) == 10


@needs_shared_mnist
def test_load_mnist_from_shared(monkeypatch):
    ds = load_dataset("mnist", data_dir=SHARED / "datasets", download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    assert ds.classes == tuple("0123456789") and ds.input_shape == (1, 28, 28)
    assert ds.mean[0] == pytest.approx(0.1307, abs=1e-4) and ds.std[0] == pytest.approx(0.3081, abs=1e-4)
    import edgesqueeze.data.datasets as datasets_mod

    def no_decode(*args, **kwargs):
        raise AssertionError("the second load decoded the IDX files again instead of reading the cache")

    monkeypatch.setattr(datasets_mod, "read_idx", no_decode)
    again = load_dataset("mnist", data_dir=SHARED / "datasets", download=False, limit=100, seed=3)
    assert len(again.train_x) == 100 and len(again.test_x) == 100 and again.mean == ds.mean
    assert np.bincount(again.train_y, minlength=10).min() >= 9  # stratified


def test_idx_roundtrip_and_errors(tmp_path):
    labels = np.array([7, 2, 1], dtype=np.uint8)
    p = tmp_path / "labels-idx1-ubyte"
    p.write_bytes(idx_bytes(labels))
    assert read_idx(p).tolist() == [7, 2, 1]
    gz = tmp_path / "labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(labels)))
    assert read_idx(gz, ndim=1).tolist() == [7, 2, 1]

    images = idx_bytes(np.zeros((4, 3, 3)))
    cases = {
        "truncated-idx3-ubyte": (images[:-5], "truncated"),
        "trailing-idx3-ubyte": (images + b"\0", "longer than its header"),
        "magic-idx3-ubyte": (b"\x12\x34" + images[2:], "not an IDX file"),
        "dims-idx3-ubyte": (images[:3] + b"\x02" + images[4:], r"header dims \(4, 3\)"),  # 2 dims, not 3
        "short-idx3-ubyte": (b"\0\0", "too short"),
    }
    for name, (blob, words) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(DataError, match=words) as e:
            read_idx(bad, ndim=None if name.startswith("dims") else 3)
        assert str(bad) in str(e.value) and "delete" in str(e.value)
    with pytest.raises(DataError, match="dimensions, expected 1"):
        read_idx(tmp_path / "trailing-idx3-ubyte", ndim=1)
    cut = tmp_path / "cut-idx3-ubyte.gz"
    cut.write_bytes(gzip.compress(images)[:-12])
    with pytest.raises(DataError, match="not a valid gzip") as e:
        read_idx(cut)
    assert str(cut) in str(e.value)


def test_idx_reading_stops_at_what_the_header_asks_and_names_misnamed_files(tmp_path):
    """A small .gz inflating to gigabytes was decompressed whole before the header was read
    (400 KB took 1 GB of memory); a plain IDX file named .gz, or a gzip named without it,
    got messages about truncation and magic numbers."""
    import tracemalloc

    bomb = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(idx_bytes(np.arange(10) % 10))
        for _ in range(50):
            fh.write(bytes(1 << 20))  # 50 MB of trailing zeros, in a ~50 KB file
    tracemalloc.start()
    with pytest.raises(DataError, match="IDX file is longer than its header says"):
        read_idx(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20, peak
    plain = tmp_path / "labels.gz"
    plain.write_bytes(idx_bytes(np.arange(10) % 10))
    with pytest.raises(DataError, match="is a plain IDX file named .gz: rename it without .gz"):
        read_idx(plain)
    zipped = tmp_path / "labels"
    zipped.write_bytes(gzip.compress(idx_bytes(np.arange(10) % 10)))
    with pytest.raises(DataError, match="is gzip-compressed: name it labels.gz"):
        read_idx(zipped)
    huge = tmp_path / "huge"
    huge.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 4_000_000_000, 4_000_000_000, 4_000_000_000))
    with pytest.raises(DataError, match="ask for .* bytes, more than any MNIST-like file holds"):
        read_idx(huge)


def _write_fake_mnist(folder: Path, n_train=20, n_test=10):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(rng.integers(0, 256, (n, 28, 28)))))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n) % 10))  # raw is fine too


def test_mnist_lookup_local_and_mismatched_counts(isolated):
    _write_fake_mnist(isolated / "data" / "mnist")
    ds = load_dataset("mnist", download=False)  # ./data/mnist, found via the default search path
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_y.tolist() == list(range(10))
    assert load_dataset("mnist", download=False, image_size=14).input_shape == (1, 14, 14)
    (isolated / "data" / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(9) % 10))
    with pytest.raises(DataError, match="holds 10 images but .* holds 9 labels"):
        load_dataset("mnist", download=False)


def test_mnist_files_with_no_images_are_refused(isolated):
    """A test file of 0 images trained, wrote model.pt, then crashed (KeyError 'accuracy')."""
    folder = isolated / "data" / "mnist"
    _write_fake_mnist(folder)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((0, 28, 28)))))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz holds no images"):
        load_dataset("mnist", download=False)


def test_mnist_like_files_of_non_square_images_are_not_stretched_silently(isolated):
    folder = isolated / "data" / "mnist"
    _write_fake_mnist(folder)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(rng.integers(0, 256, (n, 28, 20)))))
    with pytest.raises(DataError, match=r"images are 28x20, not square; set data.image_size"):
        load_dataset("mnist", download=False)
    assert load_dataset("mnist", download=False, image_size=24).input_shape == (1, 24, 24)


def test_a_data_dir_that_does_not_hold_the_dataset_says_which_copy_is_used(isolated, tmp_path):
    """A --data-dir with a typo, or holding 3 of the 4 files, fell through to ./data (or the
    shared copy) without a word, exit 0: another copy of the data was used. Said as a Note (a
    library's way; it was printed to stderr, past warnings filters)."""
    _write_fake_mnist(isolated / "data" / "mnist", n_test=10)
    _write_fake_mnist(tmp_path / "mine" / "mnist", n_test=6)
    (tmp_path / "mine" / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    ds, said = _notes(lambda: load_dataset("mnist", data_dir=tmp_path / "mine", download=False))
    err = " ".join(said)
    assert len(ds.test_y) == 10
    assert f"--data-dir {tmp_path / 'mine'} holds no MNIST" in err
    assert f"{tmp_path / 'mine' / 'mnist'} holds only 3 of the 4 MNIST files (missing t10k-labels-idx1-ubyte" in err
    assert f"using {isolated / 'data' / 'mnist'}" in err
    _, said = _notes(lambda: load_dataset("mnist", data_dir=tmp_path / "typo", download=False))
    assert f"--data-dir {tmp_path / 'typo'} does not exist" in " ".join(said)
    _, said = _notes(lambda: load_dataset("mnist", download=False))  # no --data-dir, the first copy complete
    assert not said
    # Kaggle's names for the same files
    (tmp_path / "mine" / "mnist" / "t10k-images-idx3-ubyte.gz").rename(
        tmp_path / "mine" / "mnist" / "t10k-images.idx3-ubyte.gz")
    (isolated / "data" / "mnist" / "t10k-labels-idx1-ubyte").rename(
        tmp_path / "mine" / "mnist" / "t10k-labels.idx1-ubyte")
    (tmp_path / "mine" / "mnist" / "t10k-labels.idx1-ubyte").write_bytes(idx_bytes(np.arange(6) % 10))
    ds, said = _notes(lambda: load_dataset("mnist", data_dir=tmp_path / "mine", download=False))
    assert len(ds.test_y) == 6 and not said


@pytest.mark.parametrize("kwargs, says", [
    ({"data_dir": 123}, "data_dir: expected a folder path, got 123"),
    ({"data_dir": ""}, "data_dir: expected a folder path"),
    ({"limit": 10, "seed": None}, "seed: expected a whole number >= 0, got None"),
    ({"image_size": 100_000}, "image_size: at most 1024"),
    ({"image_size": 1}, "image_size must be an integer >= 4"),
    ({"download": "no"}, "download: expected True or False, got 'no'"),
])
def test_load_dataset_refuses_wrong_arguments(kwargs, says):
    with pytest.raises(DataError, match=says):
        load_dataset("digits", **kwargs)


def test_missing_mnist_without_download_names_places(isolated, tmp_path):
    here = tmp_path / "elsewhere"
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=here, download=False)
    msg = str(e.value)
    for place in (here / "mnist", here, isolated / "data" / "mnist", isolated / "data"):
        assert str(place) in msg
    assert "download=False" in msg and "--data-dir" in msg and "EDGESQUEEZE_DATA" in msg


def test_search_path_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGESQUEEZE_DATA", str(tmp_path / "env"))
    dirs = data_search_path(tmp_path / "cli")
    assert dirs[:3] == [tmp_path / "cli", tmp_path / "env", tmp_path / "data"]
    repo = Path(__file__).resolve().parents[1]
    assert repo.parent / "shared" / "datasets" in dirs
    assert len(dirs) == len(set(dirs))


# ---------------------------------------------------------------------------------------
# digits, splits, limit


def test_digits_shapes_determinism_and_fixed_test_split():
    a = load_dataset("digits")
    b = load_dataset("digits", seed=123)
    assert a.train_x.shape == (1438, 1, 28, 28) and a.test_x.shape == (359, 1, 28, 28)
    assert a.classes == tuple(str(i) for i in range(10)) and a.num_classes == 10
    assert a.train_x.dtype == np.uint8 and a.train_y.dtype == np.int64 and a.train_x.max() == 255
    np.testing.assert_array_equal(a.test_x, b.test_x)  # the test split ignores the seed
    np.testing.assert_array_equal(a.train_y, b.train_y)
    counts = np.bincount(a.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20%
    small = load_dataset("digits", image_size=8)
    assert small.input_shape == (1, 8, 8) and small.test_y.tolist() == a.test_y.tolist()
    assert 0.2 < a.mean[0] < 0.4 and 0.2 < a.std[0] < 0.5


def test_digits_read_without_sklearn_datasets_are_sklearns_digits(monkeypatch, tmp_path):
    """The CSV read directly is load_digits' data, value for value, without importing
    sklearn.datasets (about a second of every command); a file that differs from the
    recorded checksum falls back to load_digits."""
    import importlib.machinery
    import importlib.util
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    d = load_digits()
    want = np.concatenate([d.images.reshape(len(d.images), -1), d.target[:, None]], axis=1)
    table = ds_mod._digits_table()
    assert table.dtype == np.uint8 and table.shape == (1797, 65)
    np.testing.assert_array_equal(table, want)
    code = ("import sys, edgesqueeze.data.datasets as d; t = d._digits_table(); "
            "print(t.shape, 'sklearn.datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1797,", "65)", "False"], out
    # a sklearn whose digits.csv.gz differs (one pixel changed): not trusted, load_digits used
    pkg = tmp_path / "sklearn"
    (pkg / "datasets" / "data").mkdir(parents=True)
    bad = want.copy()
    bad[0, 0] = 16 - bad[0, 0]
    with gzip.open(pkg / "datasets" / "data" / "digits.csv.gz", "wt") as f:
        np.savetxt(f, bad, fmt="%d", delimiter=",")
    spec = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "sklearn" else real(name, *a))
    np.testing.assert_array_equal(ds_mod._digits_table(), want)
    monkeypatch.setattr(ds_mod, "DIGITS_SHA256", hashlib.sha256(bad.astype(np.uint8).tobytes()).hexdigest())
    np.testing.assert_array_equal(ds_mod._digits_table(), bad)  # the same file, trusted: it is what is read


def test_limit_is_stratified_seeded_and_keeps_stats():
    full = load_dataset("digits")
    a = load_dataset("digits", limit=50, seed=1)
    b = load_dataset("digits", limit=50, seed=1)
    c = load_dataset("digits", limit=50, seed=2)
    assert len(a.train_x) == 50 and len(a.test_x) == 50
    assert np.bincount(a.train_y, minlength=10).tolist() == [5] * 10
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert not np.array_equal(a.train_x, c.train_x)
    assert a.mean == full.mean and a.std == full.std
    assert len(load_dataset("digits", limit=10_000).train_x) == 1438
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DataError, match="limit"):
            load_dataset("digits", limit=bad)


def _indexed_dataset(labels: np.ndarray) -> Dataset:
    """Images whose two pixels spell their index, so splits can be traced back."""
    n = len(labels)
    idx = np.arange(n)
    x = np.stack([idx // 256, idx % 256], 1).astype(np.uint8).reshape(n, 1, 1, 2)
    return Dataset("t", x, labels.astype(np.int64), x[:0], labels[:0].astype(np.int64),
                   tuple(str(i) for i in range(labels.max() + 1)), (0.5,), (0.5,))


def _ids(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(int) * 256 + x[:, 0, 0, 1]


def test_split_train_val():
    labels = np.repeat(np.arange(3), [100, 50, 17])  # awkward class sizes
    ds = _indexed_dataset(labels)
    (xt, yt), (xv, yv) = split_train_val(ds, 0.2, seed=0)
    (xt2, _), (xv2, _) = split_train_val(ds, 0.2, seed=0)
    (_, _), (xv3, _) = split_train_val(ds, 0.2, seed=1)
    ti, vi = _ids(xt), _ids(xv)
    assert len(vi) == round(167 * 0.2) and len(set(ti) & set(vi)) == 0
    assert sorted([*ti, *vi]) == list(range(167))
    np.testing.assert_array_equal(labels[vi], yv)
    np.testing.assert_array_equal(xv, xv2)
    np.testing.assert_array_equal(xt, xt2)
    assert not np.array_equal(xv, xv3)
    assert np.abs(np.bincount(yv) - np.array([20, 10, 3.4])).max() <= 1  # stratified
    (xt0, yt0), (xv0, yv0) = split_train_val(ds, 0.0, seed=0)
    assert len(xt0) == 167 and xv0.shape == (0, 1, 1, 2) and yv0.dtype == np.int64
    for bad in (-0.1, 1.0, "0.2"):
        with pytest.raises(DataError, match="val_fraction"):
            split_train_val(ds, bad, seed=0)


def test_dataset_validates_itself():
    x = np.zeros((2, 1, 4, 4), np.uint8)
    with pytest.raises(DataError, match="uint8"):
        Dataset("t", x.astype(np.float32), np.zeros(2, np.int64), x, np.zeros(2, np.int64), ("a",), (0.5,), (0.5,))
    with pytest.raises(DataError, match="labels outside"):
        Dataset("t", x, np.array([0, 3]), x, np.zeros(2, np.int64), ("a", "b"), (0.5,), (0.5,))


def test_unknown_dataset_suggests():
    with pytest.raises(DataError, match="did you mean 'mnist'") as e:
        load_dataset("mnsit")
    assert "cifar10" in str(e.value) and "imagefolder:PATH" in str(e.value)
    with pytest.raises(DataError, match="did you mean 'cifar10'"):
        load_dataset("cifar-10")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("imagefolder:")
    with pytest.raises(DataError, match="did you mean 'cifar10'"):
        default_augment("cifar_10")


# ---------------------------------------------------------------------------------------
# image folders and zips, cache


def test_imagefolder_dir_and_zip(tmp_path):
    root = make_folder(tmp_path / "imgs")
    for spec in (root, zip_folder(root, tmp_path / "imgs.zip", prefix="top")):
        ds = load_dataset(f"imagefolder:{spec}")
        assert ds.classes == ("ant", "bee", "cat")
        assert ds.train_x.shape == (9, 3, 5, 6) and ds.test_x.shape == (3, 3, 5, 6)
        assert ds.train_x[:, 0, 0, 0].tolist() == ds.train_y.tolist()  # first pixel = label
        assert ds.test_y.tolist() == [0, 1, 2]
    assert load_dataset(f"imagefolder:{root}", image_size=4).input_shape == (3, 4, 4)


def test_imagefolder_classes_only_gray_and_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "flat", per_class=5, split=False, gray=True)
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.input_shape == (1, 5, 6)  # all grayscale -> one channel
    assert len(ds.test_y) == 3 and sorted(ds.test_y.tolist()) == [0, 1, 2]  # fixed 20% carve
    np.testing.assert_array_equal(ds.test_x, load_dataset(f"imagefolder:{root}", seed=9).test_x)
    write_png(root / "ant" / "big.png", np.zeros((9, 9, 3), np.uint8))
    with pytest.raises(DataError, match="differ in size.*image_size"):
        load_dataset(f"imagefolder:{root}")
    mixed = load_dataset(f"imagefolder:{root}", image_size=7)
    assert mixed.input_shape == (3, 7, 7)  # one RGB image -> RGB


def test_imagefolder_errors(tmp_path):
    root = make_folder(tmp_path / "f", per_class=2)
    write_png(root / "train" / "stray.png", np.zeros((5, 6, 3), np.uint8))
    with pytest.raises(DataError, match="stray.png is not in train/<class>/"):
        load_dataset(f"imagefolder:{root}")
    flat = make_folder(tmp_path / "g", per_class=2, split=False)
    write_png(flat / "loose.png", np.zeros((5, 6, 3), np.uint8))
    with pytest.raises(DataError, match="loose.png is not inside a class folder"):
        load_dataset(f"imagefolder:{flat}")
    bad = make_folder(tmp_path / "h", per_class=2)
    (bad / "train" / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="cannot decode image .*broken.jpg"):
        load_dataset(f"imagefolder:{bad}")
    junk = make_folder(tmp_path / "j", per_class=2)
    (junk / "train" / "ant" / "junk.jpg").write_bytes(b"no image header at all")
    with pytest.raises(DataError, match="cannot decode image .*junk.jpg") as exc:
        load_dataset(f"imagefolder:{junk}")
    assert "BytesIO" not in str(exc.value)  # Pillow's own text names its in-memory file
    assert "not an image file Pillow recognizes" in str(exc.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "junk.zip").write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        load_dataset(f"imagefolder:{tmp_path / 'junk.zip'}")
    one = make_folder(tmp_path / "one", classes=("cat",), per_class=3, split=False)
    with pytest.raises(DataError, match="holds one class folder \\('cat'\\); a classifier needs"):
        load_dataset(f"imagefolder:{one}")  # it trained a 1-class model to 100%, without a word


def test_imagefolder_reads_the_image_kinds_run_reads(tmp_path):
    """.webp, .gif and .tiff class images were skipped without a word (run reads them)."""
    from PIL import Image

    root = make_folder(tmp_path / "k", per_class=3, split=False)
    for ext in ("webp", "gif", "tiff"):
        Image.new("RGB", (6, 5), (7, 7, 7)).save(root / "ant" / f"extra.{ext}")
    Image.new("1", (6, 5)).save(root / "ant" / "extra.pbm")  # also skipped, session 35
    ds = load_dataset(f"imagefolder:{root}")
    assert len(ds.train_y) + len(ds.test_y) == 3 * 3 + 4
    from edgesqueeze.data._images import IMAGE_EXTENSIONS
    from edgesqueeze.runtime.images import IMAGE_SUFFIXES

    assert set(IMAGE_EXTENSIONS) == set(IMAGE_SUFFIXES)  # a folder and `run` read the same kinds


def test_imagefolder_follows_symlinked_class_folders(tmp_path):
    """A class folder that is a symbolic link to where its images live is a class like any
    other (pathlib's rglob does not enter such links: the class was silently dropped, or
    its test images were refused as having no train/ folder); a link back up the tree is
    not walked forever."""
    real = make_folder(tmp_path / "real", per_class=3, split=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for cls in ("ant", "bee"):
        (flat / cls).symlink_to(real / cls, target_is_directory=True)
    (flat / "cat").symlink_to(real / "cat", target_is_directory=True)
    (real / "bee" / "loop").symlink_to(real, target_is_directory=True)  # a cycle, not followed
    ds = load_dataset(f"imagefolder:{flat}")
    assert ds.classes == ("ant", "bee", "cat")
    assert len(ds.train_y) + len(ds.test_y) == 9
    split = make_folder(tmp_path / "split", per_class=4)
    moved = tmp_path / "elsewhere"
    (split / "train" / "bee").rename(moved)
    (split / "train" / "bee").symlink_to(moved, target_is_directory=True)
    ds = load_dataset(f"imagefolder:{split}")
    assert ds.classes == ("ant", "bee", "cat") and sorted(set(ds.train_y.tolist())) == [0, 1, 2]


def test_cache_second_load_skips_decoding(tmp_path, monkeypatch):
    zp = zip_folder(make_folder(tmp_path / "c"), tmp_path / "c.zip")
    calls = []
    real = images_mod.decode_image
    monkeypatch.setattr(images_mod, "decode_image", lambda *a: calls.append(1) or real(*a))
    first = load_dataset(f"imagefolder:{zp}")
    assert len(calls) == 12
    entries = list((tmp_path / "cache").glob("imagefolder-*/train_x.npy"))
    assert len(entries) == 1
    second = load_dataset(f"imagefolder:{zp}")
    assert len(calls) == 12  # not decoded again
    np.testing.assert_array_equal(first.train_x, second.train_x)
    assert (first.mean, first.std, first.classes) == (second.mean, second.std, second.classes)
    # a damaged entry is ignored and rebuilt
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    np.testing.assert_array_equal(load_dataset(f"imagefolder:{zp}").train_x, first.train_x)
    assert len(calls) == 24
    # a changed source gets a new entry
    os.utime(zp, ns=(time.time_ns(), time.time_ns() + 10**9))
    load_dataset(f"imagefolder:{zp}")
    assert len(calls) == 36


def test_a_cache_entry_changed_on_disk_is_rebuilt_not_used(tmp_path, monkeypatch):
    """A label or pixel changed in a cached array (still a valid .npy of the right shape),
    or an edited meta.json (a mean, a class name), was used as the dataset: eval scored 0%
    with exit 0 on zeroed labels. The entry records SHA-256s and a digest of itself."""
    import json

    zp = zip_folder(make_folder(tmp_path / "c"), tmp_path / "c.zip")
    calls = []
    real = images_mod.decode_image
    monkeypatch.setattr(images_mod, "decode_image", lambda *a: calls.append(1) or real(*a))
    first = load_dataset(f"imagefolder:{zp}")
    folder = next((tmp_path / "cache").glob("imagefolder-*"))
    decodes = len(calls)

    def damage_and_reload(damage):
        damage()
        again = load_dataset(f"imagefolder:{zp}")
        np.testing.assert_array_equal(again.train_y, first.train_y)
        np.testing.assert_array_equal(again.test_x, first.test_x)
        assert (again.mean, again.std, again.classes) == (first.mean, first.std, first.classes)

    labels = folder / "train_y.npy"
    damage_and_reload(lambda: np.save(labels, np.zeros_like(np.load(labels))))
    assert len(calls) == 2 * decodes  # rebuilt
    pixels = folder / "test_x.npy"

    def flip_a_pixel():
        x = np.load(pixels)
        x.flat[7] ^= 1
        np.save(pixels, x)

    damage_and_reload(flip_a_pixel)
    assert len(calls) == 3 * decodes
    meta = folder / "meta.json"
    for edit in (lambda m: m.update(mean=[0.9] * len(m["mean"])), lambda m: m.update(classes=["x", "y", "z"]),
                 lambda m: m["arrays"].pop("test_y")):
        m = json.loads(meta.read_text())
        edit(m)
        damage_and_reload(lambda m=m: meta.write_text(json.dumps(m)))
    assert len(calls) == 6 * decodes
    load_dataset(f"imagefolder:{zp}")
    assert len(calls) == 6 * decodes  # the rebuilt entry is used again


def test_a_cache_that_cannot_be_written_only_costs_speed(tmp_path, capsys):
    """The atomic writers raise OutputError (a full disk, a read-only folder, a folder in the
    way), which the cache did not catch: the command failed instead of warning."""
    zp = zip_folder(make_folder(tmp_path / "c"), tmp_path / "c.zip")
    first = load_dataset(f"imagefolder:{zp}")
    folder = next((tmp_path / "cache").glob("imagefolder-*"))
    (folder / "meta.json").unlink()
    (folder / "train_x.npy").unlink()
    (folder / "train_x.npy").mkdir()  # in the way of the rewrite
    capsys.readouterr()
    again = load_dataset(f"imagefolder:{zp}")
    np.testing.assert_array_equal(again.train_x, first.train_x)
    assert "warning: could not write the dataset cache" in capsys.readouterr().err


@needs_shared(SHARED / "datasets" / "imagenet-sample-100.zip")
def test_shared_imagenet_sample():
    ds = load_dataset("imagenet-sample", data_dir=SHARED / "datasets")
    assert ds.test_x.shape == (100, 3, 224, 224) and ds.train_x.shape == (0, 3, 224, 224)
    assert ds.test_y.tolist() == list(range(0, 1000, 10)) and ds.classes[0] == "tench"


def test_imagenet_sample_layout(isolated):
    wnids = [f"n{i:08d}" for i in range(1000)]
    (isolated / "data").mkdir()
    (isolated / "data" / "imagenet_classes.txt").write_text(  # with a BOM, as a Windows editor saves it
        "".join(f"{i}\t{w}\tclass_{i}\n" for i, w in enumerate(wnids)), encoding="utf-8-sig")
    src = isolated / "src" / "imagenet-sample-100"
    for label, (w, h) in ((3, (300, 260)), (7, (250, 400))):
        write_png(src / f"{wnids[label]}_thing.JPEG", np.full((h, w, 3), label, np.uint8))
    zip_folder(isolated / "src", isolated / "data" / "imagenet-sample-100.zip")
    ds = load_dataset("imagenet-sample")
    assert ds.train_x.shape == (0, 3, 224, 224) and ds.test_x.shape == (2, 3, 224, 224)
    assert ds.test_y.tolist() == [3, 7] and len(ds.classes) == 1000 and ds.classes[3] == "class_3"
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    assert load_dataset("imagenet-sample", image_size=112).input_shape == (3, 112, 112)


# ---------------------------------------------------------------------------------------
# CIFAR-10


def _cifar_batch(n: int, seed: int) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    return {b"batch_label": b"fake", b"labels": labels, b"data": data,
            b"filenames": [b"x.png"] * n}, data, labels


def _write_cifar_batches(folder: Path) -> tuple[np.ndarray, list[int]]:
    """The official layout, pickled at protocol 2 as the Python 2 originals were."""
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    all_data, all_labels = [], []
    for i, name in enumerate(names):
        d, data, labels = _cifar_batch(3 if name != "test_batch" else 4, i)
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        all_data.append(data)
        all_labels += labels
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(all_data), all_labels


def test_cifar10_pickle_batches_and_tarball(tmp_path):
    data, labels = _write_cifar_batches(tmp_path / "a" / "cifar-10-batches-py")
    ds = load_dataset("cifar10", data_dir=tmp_path / "a", download=False)
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.classes == CIFAR10_CLASSES and ds.train_y.tolist() == labels[:15]
    red = data[0, :1024].reshape(32, 32)  # first 1024 bytes: the red plane, row by row
    np.testing.assert_array_equal(ds.train_x[0, 0], red)
    np.testing.assert_array_equal(ds.train_x[0, 2], data[0, 2048:].reshape(32, 32))

    (tmp_path / "b").mkdir()
    with tarfile.open(tmp_path / "b" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "a" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    tb = load_dataset("cifar10", data_dir=tmp_path / "b", download=False, image_size=16)
    assert tb.input_shape == (3, 16, 16) and tb.test_y.tolist() == labels[15:]


def test_cifar10_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3.*not allowed"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert not marker.exists()
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_3: 'data' must be a uint8 array \(N, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_cifar10_jpeg_zip_layout(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        for cls in CIFAR10_CLASSES:
            for i in range(n):
                write_png(root / split / cls / f"{i:04d}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (tmp_path / "d").mkdir()
    zip_folder(root, tmp_path / "d" / "cifar10-jpeg.zip", prefix="cifar10-jpeg")
    ds = load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_y.tolist() == list(range(10))
    assert ds.classes == CIFAR10_CLASSES


def test_missing_cifar_lists_places(isolated, tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found") as e:
        load_dataset("cifar10", data_dir=tmp_path / "x", download=False)
    for name in ("cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar10-jpeg.zip"):
        assert str(tmp_path / "x" / name) in str(e.value)


# ---------------------------------------------------------------------------------------
# augmentation and batches


def _batch(n=8, c=3, h=10, w=12, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_augment_identities():
    x = _batch()
    assert torch.equal(random_crop(x, 0), x)
    assert torch.equal(random_hflip(random_hflip(x, p=1.0), p=1.0), x)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    ident = random_affine(x, degrees=0, translate=0, generator=torch.Generator().manual_seed(0))
    assert ident.shape == x.shape and ident.dtype == x.dtype
    assert (ident - x).abs().max() < 1e-5
    assert torch.equal(apply_augment(x, AugmentConfig()), x)
    assert torch.equal(apply_augment(x, None), x)


def test_random_crop_is_a_shift_with_zero_fill():
    x = _batch(n=16) + 1  # no zeros in the image, so zeros mark the padding
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(16):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[n], xp[n, :, dy:dy + 10, dx:dx + 12])]
        assert len(matches) == 1
    offsets = {tuple(torch.nonzero(out[n, 0] != 0)[0].tolist()) for n in range(16)}
    assert len(offsets) > 1  # offsets differ per sample


def test_augment_reproducible_and_fast():
    cfg = AugmentConfig(crop_padding=4, hflip=True, rotate_deg=15, translate=0.1, scale=(0.9, 1.1))
    x = _batch(n=32)
    a = apply_augment(x, cfg, torch.Generator().manual_seed(7))
    b = apply_augment(x, cfg, torch.Generator().manual_seed(7))
    c = apply_augment(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape and a.dtype == torch.float32


def test_affine_rotation_moves_pixels():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 6] = 1.0  # right of centre
    cfg_out = random_affine(x, degrees=0, translate=0.0)
    assert torch.allclose(cfg_out, x, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    rotated = random_affine(x.expand(64, 1, 9, 9).contiguous(), degrees=90, generator=g)
    assert not torch.allclose(rotated[0], x[0]) and torch.isfinite(rotated).all()


def test_random_resized_crop_zooms_into_the_image_and_never_its_border():
    from edgesqueeze.data.transforms import random_resized_crop

    x = _batch(n=8)
    whole = random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(whole, x, atol=1e-5)  # the whole image, resized to itself
    # a quarter of a ramp image: each output row spans half the input's columns, inside it
    ramp = torch.linspace(0, 1, 64).repeat(1, 1, 64, 1).expand(256, 1, 64, 64).contiguous()
    out = random_resized_crop(ramp, (0.25, 0.25), (1.0, 1.0), generator=torch.Generator().manual_seed(1))
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert torch.allclose(span, torch.full_like(span, 0.5), atol=0.02)
    starts = out[:, 0, 0, 0]
    assert starts.min() >= 0 and starts.max() <= 0.51 and starts.std() > 0.1  # placed anywhere it fits
    ones = torch.ones(128, 3, 40, 24)  # any box of any shape stays inside: no border is ever sampled
    assert torch.allclose(random_resized_crop(ones, generator=torch.Generator().manual_seed(2)), ones)
    cfg = AugmentConfig(resized_crop=(0.08, 1.0), hflip=True)
    a, b = (apply_augment(x, cfg, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, x)
    with pytest.raises(DataError, match="resized_crop"):
        AugmentConfig(resized_crop=(0.5, 1.5))


def test_default_augment():
    for name in ("digits", "mnist"):
        cfg = default_augment(name)
        assert not cfg.hflip and cfg.rotate_deg > 0 and cfg.translate > 0
    assert default_augment("cifar10") == AugmentConfig(crop_padding=4, hflip=True)
    assert default_augment("imagefolder:/x").hflip
    assert default_augment("imagenet:/x") == AugmentConfig(resized_crop=(0.08, 1.0), hflip=True)
    with pytest.raises(DataError, match="rotate_deg"):
        AugmentConfig(rotate_deg=-1)
    with pytest.raises(DataError, match="scale"):
        AugmentConfig(scale=(1.2, 0.8))


def test_batches_cover_every_sample_once_and_reproduce():
    n = 103
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(2, axis=2)
    y = np.arange(n, dtype=np.int64)

    def epoch(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return list(batches(x, y, batch_size=16, shuffle=True, generator=g, mean=(0.0,), std=(1.0,), **kw))

    a, b, c = epoch(0), epoch(0), epoch(1)
    ys = torch.cat([yb for _, yb in a])
    assert sorted(ys.tolist()) == list(range(n)) and ys.tolist() != list(range(n))
    assert [len(yb) for _, yb in a] == [16] * 6 + [7]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert torch.cat([yb for _, yb in c]).tolist() != ys.tolist()
    for xb, yb in a:  # images travel with their labels; uint8 -> [0, 1]
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert torch.allclose(xb[:, 0, 0, 0] * 255, yb.float())
    assert sum(len(yb) for _, yb in epoch(0, drop_last=True)) == 96


def test_batches_normalise_in_order_and_validate():
    x = np.full((5, 3, 4, 4), 255, np.uint8)
    y = np.zeros(5, np.int64)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    out = list(batches(x, y, batch_size=2, shuffle=False, generator=None, mean=mean, std=std, channels_last=True))
    xb = out[0][0]
    assert xb.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(xb[0, :, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
    assert list(batches(x[:0], y[:0], batch_size=4, shuffle=True, generator=None, mean=mean, std=std)) == []
    with pytest.raises(DataError, match="mean/std"):
        batches(x, y, batch_size=2, shuffle=False, generator=None, mean=(0.5,), std=(0.5,))
    with pytest.raises(DataError, match="uint8"):
        batches(x.astype(np.float32), y, batch_size=2, shuffle=False, generator=None, mean=mean, std=std)
    with pytest.raises(DataError, match="batch_size"):
        batches(x, y, batch_size=0, shuffle=False, generator=None, mean=mean, std=std)


# ---------------------------------------------------------------------------------------
# download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (root, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_verifies_and_falls_back(http_root, tmp_path):
    root, base = http_root
    payload = idx_bytes(np.arange(50) % 10)
    md5 = hashlib.md5(payload).hexdigest()
    (root / "good").mkdir()
    (root / "bad").mkdir()
    (root / "good" / "f.gz").write_bytes(gzip.compress(payload))
    (root / "bad" / "f.gz").write_bytes(gzip.compress(payload[:-1] + b"\x03"))  # a wrong last label
    dest = tmp_path / "out" / "f.gz"

    assert fetch([f"{base}/good/f.gz"], dest, md5=md5, md5_of_decompressed=True) == dest
    assert read_idx(dest).tolist() == (np.arange(50) % 10).tolist()
    dest.unlink()
    fetch([f"{base}/bad/f.gz", f"{base}/missing/f.gz", f"{base}/good/f.gz"], dest, md5=md5, md5_of_decompressed=True)
    assert gzip.decompress(dest.read_bytes()) == payload

    gz_md5 = hashlib.md5((root / "good" / "f.gz").read_bytes()).hexdigest()
    other = tmp_path / "out" / "g.gz"
    fetch([(root / "good" / "f.gz").as_uri()], other, md5=gz_md5)  # file:// and md5 of the raw bytes
    assert other.read_bytes() == (root / "good" / "f.gz").read_bytes()

    lost = tmp_path / "out" / "h.gz"
    urls = [f"{base}/bad/f.gz", f"{base}/missing/f.gz"]
    with pytest.raises(DataError) as e:
        fetch(urls, lost, md5=md5, md5_of_decompressed=True)
    msg = str(e.value)
    assert all(u in msg for u in urls) and "expected " + md5 in msg and "HTTP 404" in msg
    assert not lost.exists() and not list(lost.parent.glob("*.tmp"))  # nothing half-written
    # a failed download into folders it had to make leaves none of them behind (./data/mnist)
    deep = tmp_path / "new" / "data" / "mnist" / "h.gz"
    with pytest.raises(DataError):
        fetch(urls, deep, md5=md5, md5_of_decompressed=True)
    assert not (tmp_path / "new").exists()


@pytest.fixture
def broken_http():
    """A real server on 127.0.0.1 that answers as broken mirrors do, by path: /cut/ a chunked
    body cut short, /garbage/ no HTTP status line, /trickle/ one byte every 0.2 s."""
    import socketserver
    import time

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline().decode("latin-1")
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            path = line.split(" ")[1] if " " in line else ""
            try:
                if path.startswith("/cut/"):
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nabc")
                elif path.startswith("/garbage/"):
                    self.wfile.write(b"SMTP ready\r\n\r\n")
                elif path.startswith("/trickle/"):
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    for _ in range(100):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
            except OSError:
                pass  # the client gave up

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_broken_mirrors_are_skipped_not_a_traceback(broken_http, http_root, tmp_path, monkeypatch):
    """A body cut short (IncompleteRead), a broken status line and a plain folder path as a
    mirror were tracebacks that skipped the good mirrors after them; a mirror sending a byte
    every 0.2 s never timed out (the timeout is per read)."""
    from edgesqueeze.data import download

    root, base = http_root
    payload = idx_bytes(np.arange(50) % 10)
    md5 = hashlib.md5(payload).hexdigest()
    (root / "good").mkdir()
    (root / "good" / "f.gz").write_bytes(gzip.compress(payload))
    dest = tmp_path / "out" / "f.gz"
    urls = [f"{broken_http}/cut/f.gz", f"{broken_http}/garbage/f.gz", f"{broken_http}/trickle/f.gz",
            f"{base}/good/f.gz"]
    started = time.monotonic()
    assert fetch(urls, dest, md5=md5, md5_of_decompressed=True, timeout=1.0) == dest
    assert time.monotonic() - started < 10  # the trickle was given up on after about a second
    assert gzip.decompress(dest.read_bytes()) == payload
    with pytest.raises(DataError) as exc:
        fetch(urls[:3], tmp_path / "none" / "f.gz", md5=md5, timeout=1.0)
    said = str(exc.value)
    assert "IncompleteRead" in said and "BadStatusLine" in said and "too slow: under 64 KiB in 1 s" in said
    assert not (tmp_path / "none").exists()  # the folder made for it is gone

    monkeypatch.setenv("EDGESQUEEZE_MNIST_MIRRORS", f"{root / 'nowhere'},{root / 'good'}")
    mirrors = download.mirrors_for("mnist", download.MNIST_MIRRORS)
    assert mirrors == [(root / "nowhere").as_uri() + "/", (root / "good").as_uri() + "/"]
    assert fetch([m + "f.gz" for m in mirrors], tmp_path / "p" / "f.gz", md5=md5, md5_of_decompressed=True)


def test_an_interrupted_download_leaves_no_folder_and_old_temporaries_are_swept(tmp_path, monkeypatch):
    from edgesqueeze.data import download

    def interrupted(url, tmp, timeout):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_download_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch(["http://127.0.0.1:9/f.gz"], tmp_path / "data" / "mnist" / "f.gz", md5=None)
    assert not (tmp_path / "data").exists()
    monkeypatch.undo()
    folder = tmp_path / "kept"
    folder.mkdir()
    old, fresh, other = folder / ".f.gz.abcd1234.tmp", folder / ".f.gz.wxyz9876.tmp", folder / ".g.gz.abcd1234.tmp"
    for p in (old, fresh, other):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    (folder / "f.gz").write_bytes(b"y")
    with pytest.raises(DataError):
        fetch([(tmp_path / "missing.gz").as_uri()], folder / "f.gz", md5=None)
    assert not old.exists() and fresh.exists() and other.exists()  # another download's, or another file's


@needs_shared_mnist
def test_load_mnist_downloads_from_mirror(http_root, isolated, tmp_path, monkeypatch):
    root, base = http_root
    (root / "mirror").mkdir()
    for stem in MNIST_FILES:
        (root / "mirror" / f"{stem}.gz").symlink_to(SHARED_MNIST / f"{stem}.gz")
    monkeypatch.setenv("EDGESQUEEZE_MNIST_MIRRORS", f"{base}/nowhere/,{base}/mirror/")
    with pytest.raises(DataError, match="download=False"):
        load_dataset("mnist", data_dir=tmp_path / "dl", download=False)
    ds = load_dataset("mnist", data_dir=tmp_path / "dl", limit=20)
    assert (tmp_path / "dl" / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert len(ds.train_x) == 20 and ds.test_x.shape[1:] == (1, 28, 28)
    monkeypatch.setenv("EDGESQUEEZE_MNIST_MIRRORS", f"{base}/nowhere/")
    with pytest.raises(DataError, match=f"MNIST not found.*{base}/nowhere/train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path / "dl2")


def test_cifar_download_refuses_wrong_archive(http_root, isolated, tmp_path, monkeypatch):
    root, base = http_root
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/readme")
        tar.addfile(info, io.BytesIO(b""))
    monkeypatch.setenv("EDGESQUEEZE_CIFAR10_MIRRORS", base)
    with pytest.raises(DataError, match="CIFAR-10 not found.*md5 .*expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", data_dir=tmp_path / "dl")
    assert not (tmp_path / "dl" / "cifar-10-python.tar.gz").exists()


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("packed", ["folder", "zip", "zip without directory entries"])
def test_imagefolder_empty_class_folder_is_a_note(tmp_path, split, packed):
    """A class folder without images is not a class (nothing to learn it from); it is said,
    with the folder, rather than a model silently getting one output fewer. In a zip too (it
    was not looked at): an empty folder there is a directory entry, or a folder holding only
    files that are not images."""
    import warnings
    import zipfile

    from edgesqueeze.errors import Note

    root = make_folder(tmp_path / "f", per_class=5, split=split)
    (root / ("train/dog" if split else "dog")).mkdir()
    (root / ".hidden").mkdir()
    if packed != "folder":
        if packed.endswith("entries"):
            (root / ("train/dog" if split else "dog") / "README.txt").write_text("no images yet")
        with zipfile.ZipFile(tmp_path / "f.zip", "w") as zf:
            for p in sorted(root.rglob("*")):
                if p.is_file() or not packed.endswith("entries"):
                    zf.write(p, "top/" + p.relative_to(root).as_posix())
        root = tmp_path / "f.zip"
    for attempt in range(2):  # the second load may come from the cache: still said
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ds = load_dataset(f"imagefolder:{root}")
        assert ds.classes == ("ant", "bee", "cat")
        notes = [str(w.message) for w in seen if issubclass(w.category, Note) and "test split" not in str(w.message)]
        assert len(notes) == 1 and "(dog)" in notes[0] and "3 classes" in notes[0], (attempt, notes)


def test_cache_entries_of_deleted_folders_are_pruned_on_the_next_write(tmp_path, monkeypatch):
    """An image folder that is gone leaves no cache entry behind once anything else is cached
    (the tests' own temporary folders once piled up in ~/.cache/edgesqueeze); entries whose
    source exists, and anything that is not an entry, stay."""
    import numpy as np
    from PIL import Image

    from edgesqueeze.data import _cache

    monkeypatch.setenv("EDGESQUEEZE_CACHE", str(tmp_path / "cache"))

    def folder(name):
        for cls in ("a", "b"):
            (tmp_path / name / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(tmp_path / name / cls / f"{i}.png")
        return tmp_path / name

    gone, kept = folder("gone"), folder("kept")
    load_dataset(f"imagefolder:{gone}")
    load_dataset(f"imagefolder:{kept}")
    (tmp_path / "cache" / "bookworm-arm64").mkdir()  # not an entry: never touched
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("imagefolder-")]) == 2
    import shutil

    shutil.rmtree(gone)
    load_dataset(f"imagefolder:{folder('third')}")  # a write prunes the orphan
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert names == ["bookworm", "imagefolder", "imagefolder"], names
    assert _cache.prune_orphans() == []


def test_a_cache_entry_superseded_by_a_new_write_of_the_same_source_is_removed(tmp_path, monkeypatch):
    """A source copied again (new modification time, same path) gets a new key; the entry of
    its old copy can never be hit again and goes when the new one is written (a re-synced
    dataset folder left a stale 177 MB CIFAR-10 entry per copy). An entry of the same source
    with other decoding parameters, and another source's, stay."""
    import json
    import os

    import numpy as np
    from PIL import Image

    monkeypatch.setenv("EDGESQUEEZE_CACHE", str(tmp_path / "cache"))
    for name in ("src", "other"):
        for cls in ("a", "b"):
            (tmp_path / name / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(tmp_path / name / cls / f"{i}.png")
    src = tmp_path / "src"

    def entries():  # {(source folder name, image_size): entry folder name}
        out = {}
        for p in (tmp_path / "cache").iterdir():
            meta = json.loads((p / "meta.json").read_text())
            out[(os.path.basename(meta["sources"][0]), meta["params"]["image_size"])] = p.name
        return out

    load_dataset(f"imagefolder:{src}")
    load_dataset(f"imagefolder:{src}", image_size=4)  # same source, other parameters
    load_dataset(f"imagefolder:{tmp_path / 'other'}")
    before = entries()
    assert len(before) == 3 and len(os.listdir(tmp_path / "cache")) == 3
    for p in src.rglob("*.png"):  # copied again: same bytes, newer times
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert load_dataset(f"imagefolder:{src}").train_x.shape[-1] == 6
    after = entries()
    assert len(os.listdir(tmp_path / "cache")) == 3
    assert after[("src", None)] != before[("src", None)]  # rebuilt; the old one removed
    assert after[("src", 4)] == before[("src", 4)] and after[("other", None)] == before[("other", None)]
    assert load_dataset(f"imagefolder:{src}", image_size=4).train_x.shape[-1] == 4  # its own turn
    final = entries()
    assert len(os.listdir(tmp_path / "cache")) == 3 and final[("src", 4)] != before[("src", 4)]
    load_dataset(f"imagefolder:{src}")
    load_dataset(f"imagefolder:{tmp_path / 'other'}")
    assert entries() == final  # hits: nothing rebuilt, nothing removed


def test_split_folders_of_another_name_are_named_and_a_class_missing_from_test_is_said(tmp_path):
    """Train/ and Test/ gave "nested too deep", val/ "not in train/<class>/"; a test/ without
    one of train/'s classes was scored on the others without a word."""
    import shutil
    import warnings

    from edgesqueeze.errors import Note

    root = make_folder(tmp_path / "u")
    (root / "train").rename(root / "Train")
    with pytest.raises(DataError, match=r"'Train/' looks like a split folder, but only train/ and test/ \(lowercase\)"):
        load_dataset(f"imagefolder:{root}")
    (root / "Train").rename(root / "train")
    shutil.copytree(root / "test", root / "val")
    with pytest.raises(DataError, match=r"'val/' looks like a split folder.*data\.val_fraction"):
        load_dataset(f"imagefolder:{root}")
    shutil.rmtree(root / "val")
    shutil.rmtree(root / "test" / "bee")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(f"imagefolder:{root}")
    assert ds.num_classes == 3
    assert any(issubclass(w.category, Note) and "test/ has no images of 1 class(es) that train/ has (bee)"
               in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_a_broken_link_to_an_image_is_a_note(tmp_path):
    """A class folder's link to a moved image was left out without a word (run refuses it)."""
    import warnings

    from edgesqueeze.errors import Note

    root = make_folder(tmp_path / "l", split=False)
    (root / "ant" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(f"imagefolder:{root}")
    assert len(ds.train_y) + len(ds.test_y) == 12
    assert any(issubclass(w.category, Note) and "1 symbolic link(s) to images lead nowhere" in str(w.message)
               and "ant/gone.png" in str(w.message) for w in caught), [str(w.message) for w in caught]


def _notes(fn):
    import warnings

    from edgesqueeze.errors import Note

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, Note)]


def test_images_in_formats_not_read_are_counted_and_jfif_is_read(tmp_path):
    """.jfif/.avif images (what browsers save) were dropped without a word, by the dataset and
    by `run`; a class of only such files was "a folder that holds no images"."""
    from PIL import Image

    from edgesqueeze.runtime.images import image_files

    root = make_folder(tmp_path / "s", per_class=5, split=False)
    Image.new("RGB", (6, 5), (7, 7, 7)).save(root / "ant" / "saved.jfif", format="JPEG")
    (root / "bee" / "photo.avif").write_bytes(b"not decoded: left out, and counted")
    (root / "bee" / "README.txt").write_text("not an image: left out without a note")
    ds, notes = _notes(lambda: load_dataset(f"imagefolder:{root}"))
    assert len(ds.train_y) + len(ds.test_y) == 16  # the .jfif read
    assert [n for n in notes if "format edgesqueeze does not read" in n] == [
        f"{root}: 1 image file(s) in a format edgesqueeze does not read were left out (bee/photo.avif): convert "
        "them (.avif) to PNG or JPEG to use them"], notes
    _, again = _notes(lambda: load_dataset(f"imagefolder:{root}"))  # from the cache: said again
    assert [n for n in notes if "does not read" in n] == [n for n in again if "does not read" in n]
    files, said = _notes(lambda: image_files([root / "bee"]))
    assert len(files) == 5 and any("1 image file(s) in a format" in n and "photo.avif" in n for n in said), said
    zp, znotes = zip_folder(root, tmp_path / "s.zip"), None
    _, znotes = _notes(lambda: load_dataset(f"imagefolder:{zp}"))
    assert any(f"{zp}: 1 image file(s)" in n for n in znotes), znotes


def test_a_carved_test_split_is_said_and_an_empty_test_folder_too(tmp_path):
    """An empty test/ fell back to a split carved from train/ without a word, and eval of a
    <class>/* folder measured a fixed fifth of it, documented nowhere."""
    root = make_folder(tmp_path / "e", per_class=6)
    for f in (root / "test").rglob("*.png"):
        f.unlink()
    ds, notes = _notes(lambda: load_dataset(f"imagefolder:{root}"))
    assert len(ds.test_y) == 3 and any(
        "test/ holds no images (or there is none), so its test split is a fixed 20% of the images in train/ (3 of 15)"
        in n for n in notes), notes
    flat = make_folder(tmp_path / "flat", per_class=5, split=False)
    _, notes = _notes(lambda: load_dataset(f"imagefolder:{flat}"))
    assert any("the folder has no train/ and test/, so its test split is a fixed 20% of its images (3 of 15)" in n
               for n in notes), notes
    _, notes = _notes(lambda: load_dataset(f"imagefolder:{make_folder(tmp_path / 'split', per_class=3)}"))
    assert not [n for n in notes if "test split is a fixed" in n]  # test/ images: nothing to say


def test_a_gray_gif_is_gray_in_memory_and_streamed(tmp_path):
    """Palette images were colour by their mode: one gray GIF made a gray folder's model take 3
    channels in memory, and streamed it was refused as "in colour (P)"."""
    from PIL import Image

    root = make_folder(tmp_path / "g", per_class=4, gray=True, size=(6, 6))
    gif = np.arange(36, dtype=np.uint8).reshape(6, 6) * 7
    Image.fromarray(gif, "L").convert("P").save(root / "test" / "ant" / "zz.gif")
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.input_shape == (1, 6, 6)
    np.testing.assert_array_equal(ds.test_x[ds.test_y == 0][-1, 0], gif)  # its gray values, exactly
    streamed = load_dataset(f"imagefolder:{root}", stream=True)
    assert streamed.input_shape == (1, 6, 6)
    np.testing.assert_array_equal(streamed.test_x.decode(range(len(streamed.test_y))), ds.test_x)
    Image.fromarray(np.stack([gif, gif, gif // 2], -1), "RGB").convert("P").save(root / "test" / "bee" / "c.gif")
    assert load_dataset(f"imagefolder:{root}").input_shape == (3, 6, 6)  # a colour palette is colour


@pytest.mark.parametrize("how", ["infozip", "nfd"])
def test_zip_member_names_read_as_the_folder_reads_them(tmp_path, how):
    """Info-ZIP stores UTF-8 names without the flag that says so (zipfile read 'Ärger' as
    '├ärger'), and macOS stores decomposed names (another class order; a zip mixing both had two
    classes that look the same): a zip gives the folder's class names."""
    import unicodedata

    class InfoZip(zipfile.ZipInfo):  # UTF-8 bytes, flag unset: what `zip -r` on Linux writes
        def _encodeFilenameFlags(self):
            return self.filename.encode("utf-8"), self.flag_bits

    root = make_folder(tmp_path / "u", classes=("Ärger", "bee", "cat"), per_class=3)
    zp = tmp_path / "u.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            rel = p.relative_to(root).as_posix()
            zf.writestr(InfoZip(rel) if how == "infozip" else zipfile.ZipInfo(unicodedata.normalize("NFD", rel)),
                        p.read_bytes())
    if how == "infozip":
        with zipfile.ZipFile(zp) as zf:
            assert "\u251c" in "".join(zf.namelist())  # as zipfile reads it: '├ärger'
    folder, zipped = load_dataset(f"imagefolder:{root}"), load_dataset(f"imagefolder:{zp}")
    assert zipped.classes == folder.classes == ("bee", "cat", "Ärger")
    np.testing.assert_array_equal(zipped.train_x, folder.train_x)


def test_a_folder_decoded_at_its_own_size_is_not_decoded_again_at_that_size(tmp_path, monkeypatch):
    """train read a folder at its images' size, export at the model's input size (the same):
    the whole folder was decoded and cached a second time."""
    root = make_folder(tmp_path / "s", per_class=3, size=(6, 6))
    calls = []
    real = images_mod.decode_image
    monkeypatch.setattr(images_mod, "decode_image", lambda *a: calls.append(1) or real(*a))
    own = load_dataset(f"imagefolder:{root}")
    assert len(calls) == 9
    sized = load_dataset(f"imagefolder:{root}", image_size=6)
    assert len(calls) == 9  # from the first entry
    np.testing.assert_array_equal(sized.train_x, own.train_x)
    assert load_dataset(f"imagefolder:{root}", image_size=4).input_shape == (3, 4, 4) and len(calls) == 18


def test_a_folders_notes_are_said_once_when_another_size_is_asked_for(tmp_path):
    """A folder decoded at its own size, then asked for at another: its notes (a carved test
    split) were said by the probe of the first entry and again by the decoding."""
    root = make_folder(tmp_path / "n", per_class=5, split=False, size=(6, 6))
    load_dataset(f"imagefolder:{root}")
    _, notes = _notes(lambda: load_dataset(f"imagefolder:{root}", image_size=4))
    assert len([n for n in notes if "test split is a fixed 20%" in n]) == 1, notes
    _, notes = _notes(lambda: load_dataset(f"imagefolder:{root}", image_size=6))  # the first entry, used
    assert len([n for n in notes if "test split is a fixed 20%" in n]) == 1, notes
