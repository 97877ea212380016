"""Image files -> uint8 CHW pixels the way the training transforms made them (Pillow, no torch).

With ``resize`` (the metadata's ``"resize"``, an int) this is torchvision's
``Resize(resize)`` + ``CenterCrop((H, W))``: the shorter side becomes ``resize``, the longer
one ``int(resize * long / short)`` (truncated, as torchvision does), bilinear; then the
centre ``H x W`` is cut out (``top = round((h - H) / 2)``), zero-padded if the image is
smaller. Example: a 640x480 photo with resize 256 and input 224x224 becomes 341x256, then
the crop starts at column 58, row 16. Without ``resize`` the image is resized straight to
``W x H``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from edgesqueeze.errors import DataError, RuntimeBackendError

__all__ = ["load_image", "load_images"]

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeBackendError("reading image files needs Pillow; pip install Pillow") from None
    return Image


def _chw(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = [int(v) for v in input_shape]
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


def _center_crop(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torchvision's CenterCrop on an HWC array (zero padding when the image is smaller)."""
    h, w = a.shape[:2]
    if out_h > h or out_w > w:
        top, left = max(out_h - h, 0) // 2, max(out_w - w, 0) // 2
        bottom, right = max(out_h - h + 1, 0) // 2, max(out_w - w + 1, 0) // 2
        a = np.pad(a, ((top, bottom), (left, right), (0, 0)))
        h, w = a.shape[:2]
    top = round((h - out_h) / 2.0)
    left = round((w - out_w) / 2.0)
    return a[top:top + out_h, left:left + out_w]


def load_image(path: str | os.PathLike, input_shape: Sequence[int], *,
               resize: int | None = None) -> np.ndarray:
    """One image file as uint8 ``[C, H, W]`` for a model whose input is ``input_shape``.

    ``C`` picks the colour mode: 1 grayscale, 3 RGB (alpha and palettes dropped), 4 RGBA.
    Raises :class:`DataError` when the file is missing or not a readable image.
    """
    c, h, w = _chw(input_shape)
    if c not in _MODES:
        raise DataError(f"input_shape {list(input_shape)}: {c} channels; images have 1, 3 or 4")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise DataError(f"resize must be a positive integer (the shorter side), got {resize!r}")
    Image = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert(_MODES[c])
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read as an image ({text}); is it a damaged or "
                        f"non-image file?") from None
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    if resize is not None:
        size = _resized_size(img.width, img.height, resize)
        if size != img.size:
            img = img.resize(size, bilinear)
        a = np.asarray(img, dtype=np.uint8)
        a = a.reshape(a.shape[0], a.shape[1], -1)
        a = _center_crop(a, h, w)
    else:
        if img.size != (w, h):
            img = img.resize((w, h), bilinear)
        a = np.asarray(img, dtype=np.uint8)
        a = a.reshape(a.shape[0], a.shape[1], -1)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def load_images(paths: Sequence[str | os.PathLike], input_shape: Sequence[int], *,
                resize: int | None = None) -> np.ndarray:
    """Several image files as one uint8 ``[N, C, H, W]`` batch."""
    c, h, w = _chw(input_shape)
    out = np.empty((len(paths), c, h, w), np.uint8)
    for i, p in enumerate(paths):
        out[i] = load_image(p, (c, h, w), resize=resize)
    return out
