"""Image files -> uint8 CHW pixels the way the training transforms made them (Pillow, no torch).

With ``resize`` (the metadata's ``"resize"``, an int) this is torchvision's
``Resize(resize)`` + ``CenterCrop((H, W))``: the shorter side becomes ``resize``, the longer
one ``int(resize * long / short)`` (truncated, as torchvision does), bilinear; then the
centre ``H x W`` is cut out (``top = round((h - H) / 2)``), zero-padded if the image is
smaller. Example: a 640x480 photo with resize 256 and input 224x224 becomes 341x256, then
the crop starts at column 58, row 16. Without ``resize`` the image is resized straight to
``W x H``.

Pixel depth (:func:`to_8bit`, which the image-folder datasets in ``edgesqueeze.data`` use
too): models take 8-bit pixels, and Pillow's own ``convert("L")`` / ``convert("RGB")`` clips
wider ones at 255 (a 16-bit grayscale PNG would come out nearly white). So, before anything
else, by the image's Pillow mode:

- ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` (16-bit grayscale PNG, TIFF, PGM): scaled to
  8 bits, ``round(v / 257)``, so 65535 -> 255 and an 8-bit picture saved as 16-bit
  (``v * 257``) reads back exactly.
- ``I`` (32-bit integer; Pillow opens 16-bit PGMs and some TIFFs so, on the 0..65535 scale):
  scaled as 16-bit when every pixel lies in 0..65535; otherwise refused (DataError naming
  the file), since no fixed scale maps such values to 8 bits.
- ``F`` (32-bit float): refused (DataError naming the file). Float images have no standard
  range (0..1 and 0..255 are both common; Pillow itself would clip at 0..255), so guessing
  would feed the model wrong pixels silently; save it as 8- or 16-bit integers.
- 16-bit-per-channel RGB / RGBA PNGs: Pillow already opens them as 8-bit ``RGB`` / ``RGBA``
  (the high byte of each sample), so they pass unchanged, as do all 8-bit modes.

A mode Pillow cannot convert to the model's colour mode (``LAB``, ``La``) is a DataError
naming the file too.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Sequence

import numpy as np

from edgesqueeze.errors import DataError, Note, RuntimeBackendError

__all__ = ["IMAGE_SUFFIXES", "OTHER_IMAGE_SUFFIXES", "convert_8bit", "image_files", "load_image", "load_images", "to_8bit"]

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeBackendError("reading image files needs Pillow; pip install Pillow") from None
    return Image


_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_8bit(img, where: str | os.PathLike):
    """A PIL image with 8-bit samples: 16-bit (and 0..65535 ``I``) grayscale scaled to
    ``L`` with ``round(v / 257)``; ``F`` and out-of-range ``I`` refused with a DataError
    naming ``where``; anything else returned as it is (see the module docstring)."""
    mode = img.mode
    if mode == "F":
        raise DataError(f"{where}: 32-bit floating-point pixels (Pillow mode F) have no standard "
                        f"0-255 scale; save the image with 8- or 16-bit integer pixels")
    if mode != "I" and mode not in _16BIT_MODES:
        return img
    a = np.asarray(img)
    if mode == "I" and a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise DataError(f"{where}: 32-bit integer pixels range {lo}..{hi}, outside the 16-bit "
                            f"0..65535 that can be scaled to 8 bits; save the image with 8- or "
                            f"16-bit pixels")
    a8 = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257); 65535 -> 255
    Image = _pil()
    return Image.fromarray(np.ascontiguousarray(a8))


def convert_8bit(img, mode: str, where: str | os.PathLike):
    """:func:`to_8bit`, then Pillow's ``convert(mode)`` (always a new image, so ``img`` may be
    closed after); a conversion Pillow refuses is a DataError naming ``where``."""
    img = to_8bit(img, where)
    try:
        return img.convert(mode)  # a new image even when the mode is already right
    except (ValueError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: cannot convert its {img.mode} pixels to {mode} ({text}); "
                        f"save it as an 8- or 16-bit grayscale or RGB image") from None


def _chw(input_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = [int(v) for v in input_shape]
    except (TypeError, ValueError):  # None: a dynamic dimension of a file without metadata
        raise DataError(f"input_shape must be [C, H, W] of positive integers, got {list(input_shape)}; a model "
                        f"with dynamic dimensions needs the image size from its metadata (input_shape)") from None
    if len(shape) == 4:  # tolerate a batch dimension in front
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"input_shape must be [C, H, W], got {list(input_shape)}")
    return shape[0], shape[1], shape[2]


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int) output size as (w, h): shorter side -> size, truncating."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def _crop_offset(resized: int, out: int) -> int:
    """torchvision's CenterCrop offset along one side; negative where it pads the image (zeros)."""
    return round((resized - out) / 2.0) if resized >= out else -((out - resized) // 2)


#: A resized image more than this many times the crop's pixels is resized only where the crop
#: keeps it (a 12000 x 1 strip resized to a 256 shorter side is 3,072,000 x 256 pixels: 7.7 GB).
_FULL_RESIZE_LIMIT = 16


def resize_crop(img, size: tuple[int, int], left: int, top: int, out_w: int, out_h: int):
    """``img.resize(size, BILINEAR).crop((left, top, left + out_w, top + out_h))``: a PIL image,
    zeros where the box lies outside the resized image. Exactly that, unless the resized image
    would hold more than ``_FULL_RESIZE_LIMIT`` times the crop's pixels (an extreme aspect
    ratio); then only the kept region is resized (Pillow's ``box``: the same sample positions,
    a pixel value here and there 1 apart), so memory stays the crop's, not the whole image's."""
    Image = _pil()
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    w, h = size
    if w * h <= _FULL_RESIZE_LIMIT * out_w * out_h:
        if img.size != (w, h):
            img = img.resize((w, h), bilinear)
        return img if (left, top, out_w, out_h) == (0, 0, w, h) else img.crop((left, top, left + out_w, top + out_h))
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + out_w, w), min(top + out_h, h)
    sx, sy = img.width / w, img.height / h
    part = img.resize((x1 - x0, y1 - y0), bilinear, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    if part.size == (out_w, out_h):
        return part
    canvas = Image.new(part.mode, (out_w, out_h))  # zeros, as the crop gives outside the image
    canvas.paste(part, (x0 - left, y0 - top))
    return canvas


#: The EXIF orientations that turn an image a quarter (width and height swap).
QUARTER_TURNS = (5, 6, 7, 8)


def upright(im) -> None:
    """Turn the loaded image ``im`` upright in place as its EXIF orientation tag says, as every
    image viewer shows it: a phone stores a portrait photo sideways with tag 6, and the digits
    test images saved so were classified at 8% instead of 98% (audit, session 37). An image
    without the tag, or whose EXIF block cannot be read, stays as stored."""
    import struct

    from PIL import ImageOps

    try:
        ImageOps.exif_transpose(im, in_place=True)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        pass  # a damaged EXIF block: the pixels themselves decoded, so use them as stored


def replay_warnings(caught, where, im) -> None:
    """Pillow's warnings recorded while ``im`` (from ``where``) was decoded, shown again, its
    two-line DecompressionBombWarning (which names no file) as one note naming it."""
    Image = _pil()
    for rec in caught:
        if issubclass(rec.category, Image.DecompressionBombWarning):
            warnings.warn(f"{where}: {im.width:,} x {im.height:,} pixels, more than Pillow's "
                          f"{Image.MAX_IMAGE_PIXELS:,}-pixel limit for untrusted images; read anyway", Note,
                          stacklevel=3)
        else:
            warnings.warn_explicit(rec.message, rec.category, rec.filename, rec.lineno)


def load_image(path: str | os.PathLike, input_shape: Sequence[int], *,
               resize: int | None = None) -> np.ndarray:
    """One image file as uint8 ``[C, H, W]`` for a model whose input is ``input_shape``.

    The image is turned upright as its EXIF orientation tag says (:func:`upright`).
    ``C`` picks the colour mode: 1 grayscale, 3 RGB, 4 RGBA. With 1 or 3 an alpha channel is
    dropped, not blended: the colour stored under transparent pixels is what the model gets
    (as the image-folder datasets read such files for training). A file of several frames (an
    animated GIF, a multi-page TIFF) gives its first.
    16-bit images are scaled to 8 bits first (:func:`to_8bit`; float ``F`` images are refused).
    Raises :class:`DataError` naming the file when it is missing, not a readable image, or
    holds pixels that cannot be read as 8-bit grayscale or colour.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):  # None: an AttributeError from Pillow
        raise DataError(f"load_image takes the path of an image file, got {type(path).__name__} {path!r:.60}")
    c, h, w = _chw(input_shape)
    if c not in _MODES:
        raise DataError(f"input_shape {list(input_shape)}: {c} channels; images have 1, 3 or 4")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, numbers.Integral) or resize < 1):
        raise DataError(f"resize must be a positive integer (the shorter side), got {resize!r}")
    resize = None if resize is None else int(resize)  # numpy's integers too
    Image = _pil()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                upright(im)
                img = convert_8bit(im, _MODES[c], path)
        replay_warnings(caught, path, im)
    except FileNotFoundError:
        from edgesqueeze._io import dangling_link  # in a folder given to run, a link whose file was moved

        raise DataError(f"{path}: {dangling_link(path) or 'no such image file'}") from None
    except Image.DecompressionBombError:
        raise DataError(f"{path}: too large to read: more than twice Pillow's {Image.MAX_IMAGE_PIXELS:,}-pixel "
                        f"limit for untrusted images; shrink it first") from None
    # UnidentifiedImageError is an OSError
    except (OSError, ValueError, SyntaxError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read as an image ({text}); is it a damaged or "
                        f"non-image file?") from None
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    if resize is not None:  # torchvision's Resize(resize) then CenterCrop((h, w))
        rw, rh = _resized_size(img.width, img.height, resize)
        img = resize_crop(img, (rw, rh), _crop_offset(rw, w), _crop_offset(rh, h), w, h)
        a = np.asarray(img, dtype=np.uint8)
        a = a.reshape(a.shape[0], a.shape[1], -1)
    else:
        if img.size != (w, h):
            img = img.resize((w, h), bilinear)
        a = np.asarray(img, dtype=np.uint8)
        a = a.reshape(a.shape[0], a.shape[1], -1)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def load_images(paths: Sequence[str | os.PathLike], input_shape: Sequence[int], *,
                resize: int | None = None) -> np.ndarray:
    """Several image files as one uint8 ``[N, C, H, W]`` batch (one path alone: a batch of one)."""
    if isinstance(paths, (str, bytes, os.PathLike)):  # a string was read one character at a time ("/: ...")
        paths = [paths]
    c, h, w = _chw(input_shape)
    out = np.empty((len(paths), c, h, w), np.uint8)
    for i, p in enumerate(paths):
        out[i] = load_image(p, (c, h, w), resize=resize)
    return out


#: What :func:`image_files` takes from a folder: the formats Pillow reads that hold photos.
#: A file named explicitly is read whatever its name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm",
                  ".ppm", ".pbm")
#: Image formats a folder may hold that :func:`image_files` and the image-folder datasets do
#: not read (not every Pillow build decodes them, and a dataset must read the same everywhere):
#: left out with a :class:`Note` counting them, never silently.
OTHER_IMAGE_SUFFIXES = (".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jpx", ".apng", ".ico", ".tga",
                        ".psd", ".qoi", ".pcx", ".dng", ".cr2", ".nef", ".arw", ".svg")


def note_other_images(where: str, names: Sequence[str], stacklevel: int = 3) -> None:
    """A :class:`Note` naming the files among ``names`` in :data:`OTHER_IMAGE_SUFFIXES` (that
    a folder's listing leaves out), if any."""
    other = [n for n in names if n.lower().endswith(OTHER_IMAGE_SUFFIXES)]
    if other:
        kinds = sorted({os.path.splitext(n)[1].lower() for n in other})
        warnings.warn(f"{where}: {len(other)} image file(s) in a format edgesqueeze does not read were left out "
                      f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}): convert them ({'/'.join(kinds)}) to "
                      "PNG or JPEG to use them", Note, stacklevel=stacklevel)


def image_files(args: Sequence[str | os.PathLike]) -> list[str]:
    """Image files and folders -> the files to classify, in order, each once.

    A folder stands for the image files under it (:data:`IMAGE_SUFFIXES`, any case,
    recursively, hidden files and folders skipped, sorted by path); a folder with none is a
    DataError naming it. A path named twice (or a file both named and inside a named folder)
    is kept once, with a :class:`Note` saying so, since results are keyed by path.
    A missing path is left for :func:`load_image` to report.
    """
    from edgesqueeze._io import once_each

    named: list[str] = []
    for arg in args:
        arg = os.fspath(arg)
        if os.path.isdir(arg):
            found, walked, others = [], set(), []
            for root, dirs, files in os.walk(arg, followlinks=True):
                walked.add(os.path.realpath(root))  # a link back up the tree is walked once
                dirs[:] = [d for d in dirs if not d.startswith(".")
                           and os.path.realpath(os.path.join(root, d)) not in walked]
                found += [os.path.join(root, f) for f in files
                          if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
                others += [os.path.join(root, f) for f in files if not f.startswith(".")]
            note_other_images(arg, sorted(others))
            if not found:
                kinds = "/".join(e[1:] for e in IMAGE_SUFFIXES)
                raise DataError(f"{arg}: a folder with no image files ({kinds}) in it or below it")
            paths = sorted(found)
        else:
            paths = [arg]
        named += paths
    out, repeats = once_each(named)
    if repeats:  # one file named four times was "3 image path(s) ... : a, a, a"
        from collections import Counter

        times = Counter(os.path.realpath(p) for p in named)
        twice = [(p, times[os.path.realpath(p)]) for p in out if times[os.path.realpath(p)] > 1]
        more = f" and {len(twice) - 3} more" if len(twice) > 3 else ""
        warnings.warn(f"{len(twice)} image file(s) given more than once, each classified once: "
                      f"{', '.join(f'{p} ({n} times)' for p, n in twice[:3])}{more}", Note, stacklevel=2)
    return out
