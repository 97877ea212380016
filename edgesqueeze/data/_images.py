"""Image folders, as a directory or a .zip: listing, layout, decoding with PIL.

Layouts: ``train/<class>/*`` + ``test/<class>/*``, or only ``<class>/*``. One common top
folder (``cifar10-jpeg/train/...`` inside ``cifar10-jpeg.zip``) is stepped into. Files with
other extensions, hidden files and ``__MACOSX/`` are ignored (images in formats not read,
such as ``.avif``, with a Note counting them); an image outside a class folder or nested
deeper is refused rather than guessed at. A zip's member names are read as UTF-8 when they
are (Info-ZIP and 7-Zip store UTF-8 without the flag that says so) and put in Unicode NFC
form (macOS stores decomposed names), so class names read as a folder's would.
"""

from __future__ import annotations

import io
import sys
import unicodedata
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgesqueeze._io import files_below
from edgesqueeze.errors import DataError
from edgesqueeze.runtime.images import IMAGE_SUFFIXES as IMAGE_EXTENSIONS  # what `run` reads from a folder
from edgesqueeze.runtime.images import note_other_images
_LAYOUT_HELP = "expected train/<class>/<image> and test/<class>/<image>, or <class>/<image>"


@dataclass(frozen=True)
class Source:
    """A directory or zip of images; ``read(rel)`` returns the bytes of one member."""

    path: Path
    files: tuple[str, ...]  # relative posix paths of image files, sorted
    read: Callable[[str], bytes]
    close: Callable[[], None] = lambda: None

    def describe(self, rel: str) -> str:
        return f"{self.path}:{rel}" if self.path.suffix.lower() == ".zip" else str(self.path / rel)


def _visible(rel: str) -> bool:
    return not any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


def _is_image(rel: str) -> bool:
    return _visible(rel) and rel.lower().endswith(IMAGE_EXTENSIONS)


def zip_name(info: zipfile.ZipInfo) -> str:
    """A member's name as a folder would give it: without the UTF-8 flag (bit 11) zipfile
    reads the name as cp437, but Info-ZIP's ``zip`` and 7-Zip store UTF-8 bytes there (a
    class folder ``Ärger`` read as ``├ärger``), so bytes that are valid UTF-8 are read so;
    then NFC, as macOS's decomposed ``A`` + diaeresis is the one character ``Ä``."""
    name = info.filename
    if not info.flag_bits & 0x800:
        try:
            name = name.encode("cp437").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass  # really cp437 (or another code page): as zipfile read it
    return unicodedata.normalize("NFC", name)


def open_source(path: Path, *, listing: bool = True) -> Source:
    """A folder or zip of images; ``listing=False`` skips listing a folder's files (a
    streaming worker reads the files it is given)."""
    if path.is_dir():
        def read_file(rel: str) -> bytes:
            try:
                return (path / rel).read_bytes()
            except OSError as e:
                raise DataError(f"{path / rel} cannot be read ({e.strerror or e}); restore it or remove it") from e

        if not listing:
            return Source(path, (), read_file)
        broken: list[Path] = []
        files = sorted(p.relative_to(path).as_posix() for p in files_below(path, broken))
        broken = [b for b in broken if _is_image(b.name)]
        if broken:  # left out like a missing file, but not silently (run refuses such a link)
            from edgesqueeze.errors import Note

            warnings.warn(f"{path}: {len(broken)} symbolic link(s) to images lead nowhere and are left out "
                          f"({', '.join(str(b.relative_to(path)) for b in broken[:3])}"
                          f"{', ...' if len(broken) > 3 else ''})", Note, stacklevel=2)
        note_other_images(str(path), [f for f in files if _visible(f)])
        return Source(path, tuple(f for f in files if _is_image(f)), read_file)
    if path.is_file() and path.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(path)
            members = {zip_name(i): i for i in zf.infolist() if not i.is_dir()}
            names = sorted(members)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{path} is not a readable zip file ({e}); replace it") from e
        if listing:
            note_other_images(str(path), [n for n in names if _visible(n)])

        def read(rel: str) -> bytes:
            try:
                return zf.read(members.get(rel, rel))
            except (zipfile.BadZipFile, OSError, zlib.error) as e:
                raise DataError(f"{path}:{rel} cannot be read from the zip ({e}); replace the zip") from e
            except RuntimeError as e:  # zipfile's "is encrypted, password required for extraction"
                raise DataError(f"{path}:{rel} is encrypted ({e}); zip the images again without a password") from e
            except NotImplementedError as e:  # a compression method zipfile lacks (e.g. Deflate64)
                raise DataError(f"{path}:{rel} uses a compression method Python cannot read ({e}); zip the "
                                "images again with plain deflate (zip -r) or store them") from e

        return Source(path, tuple(f for f in names if _is_image(f)), read, zf.close)
    if not path.exists():
        raise DataError(f"image folder {path} does not exist")
    raise DataError(f"{path} is neither a folder nor a .zip of images")


def layout(src: Source) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """``({'train': [(class, rel)], 'test': [...]}, classes)``; ``test`` absent when the
    folder holds only ``<class>/*``."""
    if not src.files:
        raise DataError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in {src.path}; "
                        f"{_LAYOUT_HELP}")
    parts = [f.split("/") for f in src.files]
    prefix = 0
    while (all(len(p) - prefix >= 3 for p in parts) and parts[0][prefix] not in ("train", "test")
           and all(p[prefix] == parts[0][prefix] for p in parts)):
        prefix += 1  # step into a single top folder
    splits: dict[str, list[tuple[str, str]]] = {}
    has_split = any(p[prefix] in ("train", "test") and len(p) - prefix == 3 for p in parts)
    for rel, p in zip(src.files, parts):
        q = p[prefix:]
        if has_split:
            if len(q) != 3 or q[0] not in ("train", "test"):
                raise DataError(f"{src.describe(rel)} is not in train/<class>/ or test/<class>/; "
                                f"{_split_hint(q)}{_LAYOUT_HELP}")
            splits.setdefault(q[0], []).append((q[1], rel))
        else:
            if len(q) != 2:
                where = "not inside a class folder" if len(q) < 2 else "nested too deep"
                raise DataError(f"{src.describe(rel)} is {where}; {_split_hint(q)}{_LAYOUT_HELP}")
            splits.setdefault("all", []).append((q[0], rel))
    if has_split and "train" not in splits:
        raise DataError(f"{src.path} has test/ but no train/ images; {_LAYOUT_HELP}")
    if has_split and "test" in splits:
        unknown = sorted({c for c, _ in splits["test"]} - {c for c, _ in splits["train"]})
        if unknown:
            rel = next(r for c, r in splits["test"] if c == unknown[0])
            where = src.describe(rel).rsplit("/", 1)[0]
            raise DataError(f"{where}: class '{unknown[0]}' has test images but no train/{unknown[0]}/ folder "
                            f"({len(unknown)} such class(es)); add its training images or remove the folder")
        lacking = sorted({c for c, _ in splits["train"]} - {c for c, _ in splits["test"]})
        if lacking:  # its accuracy is measured on the other classes alone: say so
            import warnings

            from edgesqueeze.errors import Note

            warnings.warn(f"{src.path}: test/ has no images of {len(lacking)} class(es) that train/ has "
                          f"({', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''}): test accuracy leaves "
                          "them out", Note, stacklevel=2)
    classes = sorted({c for items in splits.values() for c, _ in items})
    if len(classes) == 1:  # a classifier of one class learns nothing (accuracy 100% by construction)
        raise DataError(f"{src.path}: holds one class folder ('{classes[0]}'); a classifier needs images of "
                        "two or more classes, one folder each (PATH/<class>/*.jpg)")
    return splits, classes


_SPLIT_NAMES = ("train", "test", "val", "valid", "validation")


def _split_hint(q: list[str]) -> str:
    """What to say when a misplaced image's first folder looks like a split (``Train/``,
    ``val/``): the folder reader knows lowercase ``train/`` and ``test/`` only."""
    if not q or q[0].lower() not in _SPLIT_NAMES or q[0] in ("train", "test"):
        return ""
    return (f"'{q[0]}/' looks like a split folder, but only train/ and test/ (lowercase) are splits; a validation "
            "split is held out of train/ (data.val_fraction): rename it; ")


def note_empty_classes(root: Path, classes) -> None:
    """A class folder without images is not a class (there is nothing to learn it from), as
    everywhere; but say so (a :class:`~edgesqueeze.errors.Note`), or a model silently gets
    one output fewer than the folder has class folders. Cheap: it lists folders (of a zip, its
    directory), not files, so it runs on every load, cached or not."""
    import warnings

    from edgesqueeze.errors import Note

    try:
        subfolders = _zip_folders(root) if root.is_file() else _dir_folders(root) if root.is_dir() else None
        if subfolders is None:
            return

        def folders(rel: str) -> list[str]:
            return sorted(d for d in subfolders(rel) if not d.startswith(".") and d != "__MACOSX")

        where = ""
        while "train" not in folders(where):  # step into a single top folder, as layout() does
            subs = folders(where)
            if len(subs) != 1 or subs[0] in classes:
                break
            where = f"{where}{subs[0]}/"
        if "train" in folders(where):
            where = f"{where}train/"
        empty = [d for d in folders(where) if d not in classes and d != "test"]
    except (OSError, zipfile.BadZipFile):
        return
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        shown_where = f"{root}:{where.rstrip('/')}" if root.is_file() and where else root / where
        warnings.warn(f"{shown_where}: {len(empty)} class folder(s) hold no images and are not classes ({shown}); "
                      f"the dataset has {len(classes)} classes. Add their images or remove the folders",
                      Note, stacklevel=2)


def _dir_folders(root: Path) -> Callable[[str], list[str]]:
    return lambda rel: [d.name for d in (root / rel).iterdir() if d.is_dir()]


def _zip_folders(root: Path) -> Callable[[str], list[str]] | None:
    """The folders a zip holds below each folder, from its member names (a folder is there
    when a member names it, as a directory entry or as part of a file's path)."""
    if root.suffix.lower() != ".zip":
        return None
    with zipfile.ZipFile(root) as zf:
        names = [zip_name(i) for i in zf.infolist()]
    below: dict[str, set[str]] = {}
    for name in names:
        parts = name.split("/")[:-1]  # the folders on the way (a directory entry ends with "/")
        for i, part in enumerate(parts):
            if part:
                below.setdefault("".join(f"{p}/" for p in parts[:i]), set()).add(part)
    return lambda rel: list(below.get(rel, ()))


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not sys.stderr.isatty(),
                leave=False, mininterval=0.5)


def decode_image(data: bytes, where: str):
    """A PIL image, fully decoded, upright as its EXIF orientation says, with 8-bit samples: 16-bit grayscale (``I;16*``, and ``I``
    on the 0..65535 scale) becomes ``L`` scaled by ``round(v / 257)`` rather than clipped at
    255 as Pillow's ``convert`` would; ``F`` (float) images and ``I`` values outside 0..65535
    are refused (:func:`edgesqueeze.runtime.images.to_8bit`, shared with ``edgesqueeze run``).
    Any decoder failure or such pixels become a DataError naming the file."""
    from PIL import Image

    from edgesqueeze.runtime.images import replay_warnings, to_8bit, upright

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            upright(img)  # as run reads an image file: what a viewer shows
        replay_warnings(caught, where, img)
    except Image.UnidentifiedImageError as e:  # its text names a BytesIO object, not the file
        raise DataError(f"cannot decode image {where} (not an image file Pillow recognizes); delete or "
                        "replace it") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {where} ({e}); delete or replace it") from e
    return to_8bit(img, where)


_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def is_gray(img) -> bool:
    """Whether a decoded image is grayscale: a gray mode, or a palette image (every GIF, a
    PNG-8) whose colours in use are all gray. By mode alone, one gray GIF among gray PNGs made
    a folder's model take 3 channels, and a streamed folder refused it as "in colour"."""
    if img.mode in _GRAY_MODES:
        return True
    if img.mode not in ("P", "PA"):
        return False
    palette = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    used = np.unique(np.asarray(img.getchannel(0) if img.mode == "PA" else img))
    colours = palette[used[used < len(palette)]]
    return bool((colours[:, 0] == colours[:, 1]).all() and (colours[:, 1] == colours[:, 2]).all())


def imagenet_crop(img, crop: int):
    """torchvision's evaluation transform of a PIL image: resize the shorter side to
    ``round(crop * 256 / 224)`` (bilinear), then a centred ``crop`` x ``crop``."""
    from edgesqueeze.runtime.images import resize_crop

    short = int(round(crop * 256 / 224))
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return resize_crop(img, (nw, nh), left, top, crop, crop)


def decode_all(src: Source, items: list[tuple[str, str]], *, image_size: int | None,
               desc: str) -> tuple[np.ndarray, bool]:
    """Decode ``items`` into uint8 (N, H, W, 3) plus "all grayscale?".

    Without ``image_size`` all images must share the first one's size; with it, each is
    resized (PIL bilinear, which low-pass filters when shrinking) to image_size squared.
    Grayscale images fill all three channels so that a mixed folder still stacks.
    """
    from PIL import Image

    from edgesqueeze.runtime.images import convert_8bit

    out = None
    all_gray = True
    bar = _progress(len(items), desc)
    for i, (_, rel) in enumerate(items):
        where = src.describe(rel)
        img = decode_image(src.read(rel), where)
        gray = is_gray(img)
        img = convert_8bit(img, "L" if gray else "RGB", where)
        all_gray &= gray
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BILINEAR)
        if out is None:
            w, h = img.size
            out = np.empty((len(items), h, w, 3), dtype=np.uint8)
        elif img.size != (out.shape[2], out.shape[1]):
            first = src.describe(items[0][1])
            raise DataError(f"images differ in size: {first} is {out.shape[2]}x{out.shape[1]}, {where} is "
                            f"{img.size[0]}x{img.size[1]}; set data.image_size (--set data.image_size=N, or --image-size N) to resize them all")
        arr = np.asarray(img)
        out[i] = arr[..., None] if gray else arr
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if out is None:
        out = np.empty((0, image_size or 0, image_size or 0, 3), dtype=np.uint8)
    return out, all_gray


def to_nchw(hwc: np.ndarray, gray: bool) -> np.ndarray:
    x = hwc[..., :1] if gray else hwc
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
