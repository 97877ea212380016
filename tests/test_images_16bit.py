"""16-bit images read as 8-bit pixels, not clipped at 255.

Pillow's ``convert("L")`` / ``convert("RGB")`` saturates wider samples: every value above 255
becomes 255, so a normal 16-bit grayscale PNG turned nearly white and the model was fed
garbage without a word. Each test writes the same picture twice as real files, 16-bit and
8-bit (``round(v / 257)``), and checks that ``edgesqueeze run``'s image loading
(:mod:`edgesqueeze.runtime.images`), the image-folder datasets (in memory and streamed,
:mod:`edgesqueeze.data.stream`) and the ``run`` command itself see the same pixels. Float and
uninterpretable images are refused with one line naming the file.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgesqueeze.errors import DataError
from edgesqueeze.runtime.images import load_image, load_images, to_8bit


def _digit16(h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    """A "7"-like stroke on a dark background, uint16 over the full range (65535 included),
    with noise, so nearly every pixel is above 255 and a clipping reader makes it white."""
    rng = np.random.default_rng(seed)
    a = np.full((h, w), 3000.0)
    a[4:8, 5:w - 5] = 65535.0  # the bar
    for r in range(8, h - 3):  # the diagonal
        c = w - 6 - (r - 8) * (w - 12) // (h - 11)
        a[r, max(c - 2, 0):c + 2] = 60000.0
    a += np.linspace(0, 9000, w)[None, :]  # a gradient: values in between too
    a += rng.normal(0, 700, (h, w))
    return np.clip(np.round(a), 0, 65535).astype(np.uint16)


def _to8(a16: np.ndarray) -> np.ndarray:
    return np.round(a16.astype(np.float64) / 257).astype(np.uint8)


def _png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand: gray (H, W) or RGB (H, W, 3), big-endian samples."""
    h, w = a.shape[:2]
    ctype = 0 if a.ndim == 2 else 2
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _pair(tmp_path: Path, a16: np.ndarray, name: str = "digit") -> tuple[Path, Path]:
    """The picture as a 16-bit grayscale PNG (Pillow opens it as I;16) and as an 8-bit PNG."""
    p16, p8 = tmp_path / f"{name}16.png", tmp_path / f"{name}8.png"
    Image.fromarray(a16).save(p16)
    Image.fromarray(_to8(a16)).save(p8)
    with Image.open(p16) as im:
        assert im.mode == "I;16"
    return p16, p8


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """The same preprocessed pixels within 1/255."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# --------------------------------------------------------------------------- runtime.images

def test_reproduce_pillow_clips_16bit_gray_to_white(tmp_path):
    """The defect itself: Pillow's convert saturates, the fixed loader scales."""
    a16 = _digit16()
    p16, p8 = _pair(tmp_path, a16)
    with Image.open(p16) as im:
        clipped = np.asarray(im.convert("L"))
    assert (clipped == 255).mean() > 0.95  # what the model used to be fed
    fixed = load_image(p16, (1, 28, 28))[0]
    assert (fixed == 255).mean() < 0.2
    np.testing.assert_array_equal(fixed, load_image(p8, (1, 28, 28))[0])


@pytest.mark.parametrize("shape, resize", [((1, 28, 28), None), ((3, 28, 28), None), ((4, 28, 28), None),
                                           ((1, 16, 16), None), ((3, 20, 20), 24)])
def test_load_image_16bit_gray_png_equals_8bit(tmp_path, shape, resize):
    p16, p8 = _pair(tmp_path, _digit16())
    _close(load_image(p16, shape, resize=resize), load_image(p8, shape, resize=resize))
    # exact here: the 8-bit file holds round(v / 257), which is what the 16-bit one scales to
    np.testing.assert_array_equal(load_image(p16, shape, resize=resize), load_image(p8, shape, resize=resize))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_load_image_16bit_modes_equal_8bit(tmp_path, mode):
    """I;16 (little-endian), I;16B (big-endian TIFF) and 32-bit I holding 0..65535 (as Pillow
    opens 16-bit PGM and some TIFFs) all scale by 257."""
    a16 = _digit16(seed=3)
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (a16.shape[1], a16.shape[0]), a16.astype(">u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(a16.astype(np.int32))
    else:
        img = Image.fromarray(a16)
    p = tmp_path / "wide.tif"
    img.save(p)
    with Image.open(p) as im:
        assert im.mode == mode
    p8 = tmp_path / "narrow.png"
    Image.fromarray(_to8(a16)).save(p8)
    np.testing.assert_array_equal(load_image(p, (1, 28, 28)), load_image(p8, (1, 28, 28)))
    np.testing.assert_array_equal(load_image(p, (3, 14, 14)), load_image(p8, (3, 14, 14)))


def test_16bit_pgm_scales_like_16bit_png(tmp_path):
    a16 = _digit16(seed=4)
    pgm = tmp_path / "d.pgm"
    pgm.write_bytes(b"P5\n28 28\n65535\n" + a16.astype(">u2").tobytes())
    p16, _ = _pair(tmp_path, a16)
    np.testing.assert_array_equal(load_image(pgm, (1, 28, 28)), load_image(p16, (1, 28, 28)))


def test_16bit_rgb_png_equals_8bit_within_one_level(tmp_path):
    """Pillow opens 16-bit-per-channel RGB PNGs as 8-bit RGB itself (the high byte)."""
    rng = np.random.default_rng(5)
    rgb16 = np.stack([_digit16(seed=5), _digit16(seed=6)[::-1], rng.integers(0, 65536, (28, 28))], -1)
    rgb16 = rgb16.astype(np.uint16)
    p16, p8 = tmp_path / "rgb16.png", tmp_path / "rgb8.png"
    p16.write_bytes(_png16(rgb16))
    Image.fromarray(_to8(rgb16)).save(p8)
    _close(load_image(p16, (3, 28, 28)), load_image(p8, (3, 28, 28)))
    _close(load_image(p16, (1, 28, 28)), load_image(p8, (1, 28, 28)))
    batch = load_images([p16, p8], (3, 28, 28))
    _close(batch[0], batch[1])


def test_load_image_refuses_what_it_cannot_read_as_8bit(tmp_path):
    a16 = _digit16()
    f = tmp_path / "float.tif"
    Image.fromarray(a16.astype(np.float32) / 65535).save(f)
    with pytest.raises(DataError, match=r"float\.tif: 32-bit floating-point pixels \(Pillow mode F\)"):
        load_image(f, (1, 28, 28))
    wide = tmp_path / "wide.tif"
    Image.fromarray(a16.astype(np.int32) * 4).save(wide)  # beyond 65535: no fixed 8-bit scale
    with pytest.raises(DataError, match=r"wide\.tif: 32-bit integer pixels range \d+\.\.\d+, outside"):
        load_image(wide, (3, 28, 28))
    neg = tmp_path / "neg.tif"
    arr = a16.astype(np.int32)
    arr[0, 0] = -100
    Image.fromarray(arr).save(neg)
    with pytest.raises(DataError, match=r"neg\.tif: 32-bit integer pixels range -100\.\."):
        load_image(neg, (1, 28, 28))
    lab = tmp_path / "lab.tif"
    Image.new("LAB", (8, 8), (50, 10, 10)).save(lab)
    assert load_image(lab, (3, 8, 8)).shape == (3, 8, 8)  # Pillow converts LAB to RGB ...
    with pytest.raises(DataError, match=r"lab\.tif: cannot convert its LAB pixels to L"):
        load_image(lab, (1, 8, 8))  # ... but not to L


def test_to_8bit_leaves_8bit_images_alone():
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK"):
        img = Image.new(mode, (3, 2))
        assert to_8bit(img, "x") is img
    edge = Image.fromarray(np.array([[0, 128, 129, 385, 65406, 65535]], np.uint16))
    np.testing.assert_array_equal(np.asarray(to_8bit(edge, "x")), [[0, 0, 1, 1, 254, 255]])


# --------------------------------------------------------------------------- edgesqueeze.data

def _folders(tmp_path: Path) -> tuple[Path, Path]:
    """The same image folder twice: 16-bit grayscale PNGs, and their 8-bit versions."""
    roots = tmp_path / "f16", tmp_path / "f8"
    for split, n in (("train", 4), ("test", 2)):
        for ci, c in enumerate(("a", "b")):
            for i in range(n):
                a16 = _digit16(seed=100 * ci + 10 * (split == "test") + i)
                for root, arr in zip(roots, (a16, _to8(a16))):
                    (root / split / c).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return roots


def test_imagefolder_16bit_equals_8bit_in_memory_and_streamed(tmp_path):
    pytest.importorskip("torch")
    from edgesqueeze.data import load_dataset

    f16, f8 = _folders(tmp_path)
    for stream in (False, True):
        for size in (None, 20):
            d16 = load_dataset(f"imagefolder:{f16}", stream=stream, image_size=size)
            d8 = load_dataset(f"imagefolder:{f8}", stream=stream, image_size=size)
            x16, x8 = np.asarray(d16.train_x), np.asarray(d8.train_x)
            assert x16.shape[1] == 1 and x16.mean() < 200  # grayscale, and not clipped white
            np.testing.assert_array_equal(x16, x8)
            np.testing.assert_array_equal(np.asarray(d16.test_x), np.asarray(d8.test_x))
            assert d16.mean == pytest.approx(d8.mean) and d16.std == pytest.approx(d8.std)


@pytest.mark.parametrize("channels, preprocess", [(1, "resize"), (3, "resize"), (3, "imagenet"), (1, "imagenet")])
def test_lazy_images_decode_16bit_equals_8bit(tmp_path, channels, preprocess):
    pytest.importorskip("torch")
    from edgesqueeze.data.stream import LazyImages

    f16, f8 = _folders(tmp_path)
    files = [f"{s}/{c}/{i}.png" for s in ("train", "test") for c in ("a", "b") for i in range(2)]
    x16 = LazyImages(f16, files, size=24, channels=channels, preprocess=preprocess).decode(range(len(files)))
    x8 = LazyImages(f8, files, size=24, channels=channels, preprocess=preprocess).decode(range(len(files)))
    assert x16.shape == (len(files), channels, 24, 24)
    _close(x16, x8)
    np.testing.assert_array_equal(x16, x8)


def test_16bit_big_endian_and_rgb_in_a_folder(tmp_path):
    """A big-endian 16-bit file (I;16B) is grayscale too, and a 16-bit RGB PNG decodes like
    its 8-bit version within one level."""
    pytest.importorskip("torch")
    from edgesqueeze.data._images import decode_image
    from edgesqueeze.data.stream import LazyImages

    a16 = _digit16(seed=8)
    be = Image.frombytes("I;16B", (28, 28), a16.astype(">u2").tobytes())
    img = decode_image(_tiff_bytes(be), "x/be.tif")
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), _to8(a16))
    rgb16 = np.stack([a16, a16[::-1], a16[:, ::-1]], -1)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "rgb16.png").write_bytes(_png16(rgb16))
    Image.fromarray(_to8(rgb16)).save(tmp_path / "c" / "rgb8.png")
    x = LazyImages(tmp_path, ["c/rgb16.png", "c/rgb8.png"], size=28, channels=3).decode([0, 1])
    _close(x[0], x[1])


def _tiff_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def test_data_refuses_float_images_naming_the_file():
    from edgesqueeze.data._images import decode_image

    f = Image.fromarray(np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match=r"^x/f\.tif: 32-bit floating-point pixels"):
        decode_image(_tiff_bytes(f), "x/f.tif")


# --------------------------------------------------------------------------- edgesqueeze run

def _tiny_onnx(path: Path) -> Path:
    """1x28x28 -> 3 scores (flatten, matmul with fixed random weights), with metadata."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal((784, 3))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = {"format": "edgesqueeze.artifact", "artifact_format": "onnx", "classes": ["x", "y", "z"],
            "input_shape": [1, 28, 28], "layout": "NCHW", "mean": [0.5], "std": [0.25],
            "normalization": "caller", "input_dtype": "float32"}
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgesqueeze", json.dumps(meta)
    onnx.save(model, str(path))
    return path


def test_run_gives_the_same_prediction_for_16bit_and_8bit_png(tmp_path):
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    model = _tiny_onnx(tmp_path / "tiny.onnx")
    rows = {}
    for seed in range(4):
        p16, p8 = _pair(tmp_path, _digit16(seed=seed), name=f"d{seed}_")
        res = CliRunner().invoke(cli, ["run", str(model), str(p16), str(p8), "-k", "3", "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out[str(p16)] == out[str(p8)]
        rows[seed] = out[str(p16)]
    # the pixels are not all white any more: different digits, different scores, and not
    # what the picture clipped at 255 (the old reading) scores
    assert len({json.dumps(r) for r in rows.values()}) > 1
    p16 = tmp_path / "d0_16.png"
    with Image.open(p16) as im:
        Image.fromarray(np.asarray(im.convert("L"))).save(tmp_path / "clipped.png")
    res = CliRunner().invoke(cli, ["run", str(model), str(tmp_path / "clipped.png"), "-k", "3", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)[str(tmp_path / "clipped.png")] != rows[0]


def test_run_refuses_a_float_image_in_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    model = _tiny_onnx(tmp_path / "tiny.onnx")
    f = tmp_path / "float.tif"
    Image.fromarray(np.ones((28, 28), np.float32)).save(f)
    res = CliRunner().invoke(cli, ["run", str(model), str(f)])
    assert res.exit_code == 2, res.output
    assert str(f) in res.output and "Traceback" not in res.output
    assert "floating-point" in res.output
