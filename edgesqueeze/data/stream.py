"""Image folders streamed from disk: decoded batch by batch in DataLoader worker processes.

An in-memory :class:`~edgesqueeze.data.Dataset` holds every image as one uint8 array; that
is right for digits, MNIST and CIFAR-10, and impossible for ImageNet's 1.28 million JPEGs.
:class:`LazyImages` stands in for such an array: it has the array's ``dtype``, ``ndim``,
``shape`` and ``len``, and indexing it with a slice, an index array or a mask gives another
``LazyImages`` (no decoding), so splitting, ``limit`` subsets and validation carving work
unchanged. Pixels are decoded only when a batch is drawn: :func:`stream_batches` (which
:func:`~edgesqueeze.data.batches` calls for a ``LazyImages``) hands each batch's indices to a
``torch.utils.data.DataLoader`` worker, which decodes and resizes them; the main process then
augments and normalises exactly as for an array, with the same generator, so the order and
the augmentation are those of the in-memory path. Memory is bounded by the batches in flight
(``workers x prefetch`` batches), not by the dataset.

Each worker process opens the folder or zip itself (a ``zipfile.ZipFile`` shared across a
fork would interleave reads). A file that does not decode stops the run with one line
naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from edgesqueeze.errors import DataError

PREPROCESS = ("resize", "imagenet")  # resize to size x size; or shorter side to 256/224 of size, center crop


class LazyImages:
    """uint8 ``(N, C, size, size)`` images decoded from ``files`` of an image folder or zip
    when they are read (:meth:`decode`), not before. 16-bit grayscale files are scaled to
    8 bits (``round(v / 257)``), not clipped; float (``F``) files are refused naming the file.

    ``preprocess``: ``resize`` (bilinear, antialiased when shrinking, to ``size`` squared) or
    ``imagenet`` (torchvision's evaluation transform: shorter side to ``round(size * 256 / 224)``,
    then a centered ``size`` crop). ``channels`` 1 stores grayscale, 3 RGB."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: str | Path, files: Sequence[str], *, size: int, channels: int = 3,
                 preprocess: str = "resize", check_size: bool = False, check_gray: bool = False) -> None:
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        self.path = Path(path)
        self.files = np.asarray(files, dtype=object)
        self.size, self.channels, self.preprocess = int(size), int(channels), preprocess
        # the size and channels were read from a sample of the folder, not asked for: an image of
        # another size (check_size), or in colour where the sample was gray (check_gray), is
        # refused as the in-memory folder refuses it, instead of stretched or made gray
        self.check_size, self.check_gray = bool(check_size), bool(check_gray)
        self._src: Any = None
        self._pid = -1

    # -- the array interface the rest of edgesqueeze uses ------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.decode([int(key)])[0]
        sub = LazyImages.__new__(LazyImages)
        sub.__dict__.update(self.__dict__)
        sub.files = self.files[key]
        sub._src, sub._pid = None, -1
        return sub

    def __array__(self, dtype=None, copy=None):  # noqa: ARG002 - numpy's signature
        """Every image decoded (what an in-memory dataset holds): only for small folders."""
        out = self.decode(range(len(self)))
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        """Decoded, as ``ndarray.astype``: callers that need pixels in memory (a calibration
        set, a slice being run through onnxruntime) get them; slice first."""
        return self.decode(range(len(self))).astype(dtype)

    def __repr__(self) -> str:
        return f"LazyImages({self.path}, {len(self)} images, {self.channels}x{self.size}x{self.size})"

    def __getstate__(self) -> dict:  # a worker started by spawn opens its own source
        return {**self.__dict__, "_src": None, "_pid": -1}

    # -- decoding ----------------------------------------------------------------------------
    def _source(self):
        if self._src is None or self._pid != os.getpid():  # one open folder/zip per process
            from edgesqueeze.data._images import open_source

            self._src, self._pid = open_source(self.path, listing=False), os.getpid()
        return self._src

    def decode(self, indices) -> np.ndarray:
        """uint8 ``(len(indices), C, size, size)``; a file that does not decode raises a
        DataError naming it."""
        from PIL import Image

        from edgesqueeze.data._images import _GRAY_MODES, decode_image, imagenet_crop
        from edgesqueeze.runtime.images import convert_8bit

        src = self._source()
        idx = list(indices)
        out = np.empty((len(idx), self.channels, self.size, self.size), dtype=np.uint8)
        for j, i in enumerate(idx):
            rel = self.files[i]
            where = src.describe(rel)
            img = decode_image(src.read(rel), where)  # 16-bit scaled to 8-bit, float refused
            gray = self.channels == 1
            _check_like_the_sample(img, where, self.size if self.check_size else None, gray and self.check_gray)
            if not gray and img.mode in _GRAY_MODES:
                img = convert_8bit(img, "L", where)
            img = convert_8bit(img, "L" if gray else "RGB", where)
            if self.preprocess == "imagenet":
                img = imagenet_crop(img, self.size)
            elif img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            arr = np.asarray(img)
            out[j] = arr[None] if gray else arr.transpose(2, 0, 1)
        return out


def _check_like_the_sample(img, where: str, size: int | None, gray: bool) -> None:
    from edgesqueeze.data._images import is_gray

    if size is not None and img.size != (size, size):
        raise DataError(f"{where} is {img.size[0]}x{img.size[1]}, but the folder's images are {size}x{size}; "
                        "set data.image_size to resize every image to one size")
    if gray and not is_gray(img):
        raise DataError(f"{where} is in colour ({img.mode}), but the folder was read as grayscale from a sample "
                        "of its images; set data.channels: 3 (or make every image gray)")


def is_lazy(x: Any) -> bool:
    return isinstance(x, LazyImages)


@dataclass
class _Batches(torch.utils.data.Dataset):
    """Item ``i``: the decoded uint8 images of batch ``i`` (index lists fixed up front)."""

    images: LazyImages
    chunks: list[np.ndarray]
    part: tuple[int, int] | None = None  # (rank, world): decode only every world-th image, from rank

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        chunk = self.chunks[i]
        if self.part is None:
            return torch.from_numpy(self.images.decode(chunk))
        rank, world = self.part
        _, c, h, w = self.images.shape
        out = torch.zeros((len(chunk), c, h, w), dtype=torch.uint8)  # the other ranks' images stay black
        out[rank::world] = torch.from_numpy(self.images.decode(chunk[rank::world]))
        return out


def default_workers() -> int:
    """``$EDGESQUEEZE_WORKERS``, else 2 (0: decode in the main process; set but empty: 2)."""
    value = os.environ.get("EDGESQUEEZE_WORKERS", "").strip() or "2"
    try:
        n = int(value)
    except ValueError:
        raise DataError(f"$EDGESQUEEZE_WORKERS={value!r} is not a number of worker processes") from None
    if n < 0:
        raise DataError(f"$EDGESQUEEZE_WORKERS={n}: must be 0 or more")
    return n


def stream_batches(x: LazyImages, y: np.ndarray, *, batch_size: int, order: np.ndarray | None, stop: int,
                   mean_t: torch.Tensor, std_t: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor],
                   channels_last: bool, workers: int | None = None,
                   part: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """What :func:`~edgesqueeze.data.batches` yields for an array, for ``LazyImages``: the same
    batches in the same order (``order``, drawn by the caller), decoded in ``workers``
    DataLoader processes two batches ahead of the model.

    ``part=(rank, world)`` (a torchrun rank, which keeps every ``world``-th image of each
    global batch from ``rank``): only those images are decoded, the others are left black.
    The whole batch is still augmented, so the random numbers drawn, and with them the data
    order of later epochs, are the same on every rank and as in one process. ``augment`` is
    the caller's augmentation of a float batch in [0, 1] (drawing from its generator)."""

    n = len(x)
    idx = order if order is not None else np.arange(n)
    chunks = [np.asarray(idx[s:min(s + batch_size, n)]) for s in range(0, stop, batch_size)]
    for chunk, raw in zip(chunks, _decoded(x, chunks, workers, part)):
        xt = raw.to(torch.float32).div_(255.0)
        xt = augment(xt)
        xt = (xt - mean_t) / std_t
        if channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        yield xt, torch.from_numpy(np.asarray(y[chunk], dtype=np.int64))


def uint8_batches(x: LazyImages, *, batch_size: int = 256, workers: int | None = None) -> Iterator[np.ndarray]:
    """The images of ``x`` in order, as uint8 ``(B, C, H, W)`` arrays of ``batch_size``,
    decoded in ``workers`` DataLoader processes ahead of the caller: how ``verify`` runs a
    streamed test split through onnxruntime or LiteRT with memory bounded by the batch."""
    n = len(x)
    chunks = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    for raw in _decoded(x, chunks, workers):
        yield raw.numpy()


def _decoded(x: LazyImages, chunks: list[np.ndarray], workers: int | None,
             part: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """The uint8 images of each of ``chunks`` (index arrays into ``x``), in order, decoded in
    ``workers`` DataLoader processes (default :func:`default_workers`) two chunks ahead; a
    file that does not decode in a worker is one DataError naming it."""
    workers = min(default_workers() if workers is None else workers, len(chunks))
    loader = torch.utils.data.DataLoader(
        _Batches(x, chunks, part if part is not None and part[1] > 1 else None), batch_size=None, shuffle=False,
        num_workers=workers, prefetch_factor=2 if workers else None, persistent_workers=False,
        # its own generator: the workers' base seed was drawn from torch's global one, which moved
        # the dropout masks of every later step (streamed training left in-memory training's
        # weights by up to 4e-3 in a model with dropout); the workers only decode, drawing nothing
        generator=torch.Generator())
    it = iter(loader)
    error = None
    try:
        for _ in chunks:
            try:
                batch = next(it)
            except DataError as e:  # raised in a worker: DataLoader prefixes its traceback
                error = _worker_message(str(e))
                # DataLoader's re-raise leaves the error in a cycle with its traceback's frames,
                # the iterator among them: freed later by the garbage collector, which closes
                # the iterator's queues (weak references) before its __del__ stops the
                # workers, so no worker got its stop signal and each join waited out
                # DataLoader's 5 s timeout (10 s more for a corrupt image, with 2 workers).
                e.__traceback__ = None
                break
            yield batch
    finally:
        del it  # the last reference: the workers stop now, their queues still open
    if error is not None:
        raise DataError(error)


def _worker_message(text: str) -> str:
    """The original one-line message of an error re-raised by DataLoader from a worker."""
    for line in reversed(text.strip().splitlines()):
        if "DataError: " in line:
            return line.split("DataError: ", 1)[1].strip()
    return text.strip().splitlines()[-1] if text.strip() else "a data loader worker failed"


def sample_histograms(x: LazyImages, k: int = 2000, seed: int = 0) -> np.ndarray:
    """Per-channel 256-bin histograms of ``k`` seeded images (for mean/std without reading
    the whole folder), summed 64 images at a time, so memory stays that of 64 images."""
    if len(x) == 0:
        raise DataError("cannot compute mean/std of an empty training set")
    pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:k])
    hists = np.zeros((x.channels, 256), dtype=np.int64)
    for i in range(0, len(pick), 64):
        chunk = x.decode(pick[i:i + 64])
        for c in range(x.channels):
            hists[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
    return hists
