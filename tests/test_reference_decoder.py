"""docs/FORMAT.md is enough to read every .esq file: tests/reference_decoder.py, written from
the document alone (standard library only, no edgesqueeze), decodes what edgesqueeze writes
to the same values and bytes as edgesqueeze's own decoder, and refuses damaged files."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import reference_decoder as ref  # noqa: E402

from edgesqueeze.errors import FormatError  # noqa: E402
from edgesqueeze.format import codec, container, packed  # noqa: E402

DATA = Path(__file__).parent / "data"


def _same_tensors(data: bytes) -> dict:
    """Both decoders give the same names, shapes, dtypes' values, bit for bit."""
    mine = ref.decode_tensors(data)
    theirs, _ = codec.loads_model(data)
    assert set(mine) == set(theirs)
    for name, arr in theirs.items():
        shape, values = mine[name]
        assert shape == list(arr.shape), name
        # the reference decoder's floats are exact float32 (or float16/float64) values, so
        # converting them to the array's dtype is exact; compare the bytes (-0.0, NaN included)
        assert np.array(values, dtype=arr.dtype).reshape(arr.shape).tobytes() == arr.tobytes(), name
    return mine


def _codings(data: bytes) -> set[tuple[str, int]]:
    """Which stream codings (FORMAT.md "Stream codings") an archive uses."""
    _, _, sections = ref.read_archive(data)
    out = set()
    for _, info in sections.values():
        if info.get("enc") == "shared":
            z = info.get("z", 0)
            out.add(("idx", z & 3))
            if info["w"]:
                out.add(("gap", z >> 2))
    return out


# --- the document's own examples ------------------------------------------------------------

def test_huffman_worked_example():
    """FORMAT.md "Huffman streams": codes 0, 10, 110, 111; symbols 0 1 0 3 2."""
    lengths = [1, 2, 3, 3]
    assert ref.decode_huffman_stream(bytes.fromhex("040001407b00"), lengths, 5, 2, 2) == [0, 1, 0, 3, 2]
    assert ref.decode_huffman_stream(bytes.fromhex("4f80"), lengths, 5, 256, 2) == [0, 1, 0, 3, 2]
    with pytest.raises(ValueError):  # non-zero padding
        ref.decode_huffman_stream(bytes.fromhex("4f81"), lengths, 5, 256, 2)
    with pytest.raises(ValueError):  # a byte too many
        ref.decode_huffman_stream(bytes.fromhex("040001407b0000"), lengths, 5, 2, 2)


def test_packed_worked_example():
    """FORMAT.md "Packed files" worked example, its section built by hand from the document
    (idx stream as bits, gap stream as DEFLATE); both decoders give the inner file back."""
    inner = b"HEAD" + np.array([0, 0, 3, 0, -2, 3], np.int8).tobytes() + b"TAIL"
    cb = struct.pack("<2e", -2.0, 3.0)
    idx = bytes([0b10100000])  # indices 1 0 1, one bit each
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    gap = c.compress(bytes([2, 1, 0])) + c.flush()
    body = cb + idx + gap
    info = {"enc": "shared", "shape": [6], "axis": None, "k": 2, "cb": "f16", "n": 3, "w": 2, "ng": 3,
            "sizes": [0, len(cb), 0, len(idx), len(gap)], "z": 2 | 1 << 2, "at": 4, "dtype": "int8",
            "offset": 0}
    skel = zlib.compress(b"HEADTAIL")
    meta = {"packed": {"name": "x.onnx", "format": "onnx-int8", "bytes": len(inner),
                       "sha256": hashlib.sha256(inner).hexdigest()}}
    blob = container.dumps(meta, [("skeleton", skel, {"enc": "skeleton", "codec": "zlib", "n": 8}),
                                  ("t0", body, info)])
    assert ref.unpack_packed(blob) == packed.unpack(blob) == inner


# --- checkpoint archives -----------------------------------------------------------------

@pytest.mark.parametrize("name, version", [("v1-small.esq", 1), ("v2-small.esq", 2)])
def test_checked_in_files(name, version):
    data = (DATA / name).read_bytes()
    assert ref.read_archive(data)[0] == version
    _same_tensors(data)
    assert ("idx", 0) in _codings(data)  # chunked Huffman with the version's chunk index


def _state_dict(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def shared(shape, k, density, skew=0.0):
        cb = np.sort(rng.standard_normal(k)).astype(np.float32)
        p = np.arange(1, k + 1, dtype=float) ** -skew
        v = cb[rng.choice(k, size=shape, p=p / p.sum())]
        return np.where(rng.random(shape) < density, v, np.float32(0)).astype(np.float32)

    # slices along axis 1 with 100 values each, 400 in all: one codebook per slice
    per_slice = np.arange(4, dtype=np.float32)[None, :, None] * 8 + rng.integers(1, 100, (40, 4, 30)) / 64
    return {
        "conv1.weight": shared((16, 8, 3, 3), 16, 0.5),  # sparse, a few hundred symbols
        "conv2.weight": shared((64, 32, 3, 3), 64, 0.3, skew=1.5),  # sparse, larger
        "conv3.weight": shared((32, 32, 3, 3), 4, 0.05),  # very sparse: fillers
        "dense.weight": shared((20, 30), 8, 0.97),  # nearly dense: w = 0
        "big.weight": shared((64, 32, 3, 3), 200, 1.0, skew=1.0),
        "binary.weight": np.where(rng.random((64, 10)) < 0.5, np.float32(0.5), np.float32(0)),
        "slices.weight": per_slice.astype(np.float32),
        "many.weight": rng.standard_normal(500).astype(np.float32),  # every value distinct: raw
        "conv1.bias": rng.standard_normal(16).astype(np.float32),
        "zero.bias": np.zeros(8, np.float32),
        "half.bias": (rng.integers(-64, 64, 12) / 16).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "idx.buffer": rng.integers(-5, 5, (3, 4)).astype(np.int32),
        "mask.buffer": rng.random(10) < 0.5,
        "empty.weight": np.zeros((0, 3), np.float32),
    }


def test_version3_checkpoints():
    """Two archives: with the large tensors the writer drops Huffman for DEFLATE (it codes an
    archive again without Huffman and keeps that when at most 1/256 larger); without them it
    keeps a few Huffman streams beside DEFLATE and bits streams."""
    codings = set()
    for drop in ((), ("big.weight", "conv2.weight")):
        sd = _state_dict(np.random.default_rng(0))
        for name in drop:
            del sd[name]
        data, _ = codec.dumps_model(sd, {"arch": "reference-decoder-test"})
        version, _, sections = ref.read_archive(data)
        assert version == 3
        assert set(_same_tensors(data)) == set(sd)
        codings |= _codings(data)
        infos = [info for _, info in sections.values()]
        assert any(i.get("axis") is not None for i in infos)  # per-slice codebooks
        assert any(i.get("enc") == "shared" and i["w"] == 0 for i in infos)  # dense mode
        assert any(i.get("enc") == "raw" for i in infos)
    # every stream coding of both streams, including Huffman under the version-3 label
    assert codings == {(s, c) for s in ("idx", "gap") for c in (0, 1, 2)}, codings


# --- packed files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """A tiny conv net, its convs pruned to ~50% zeros and shared to 16 values, as float
    ONNX and as per-channel int8 (QDQ) ONNX, both packed by edgesqueeze."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from edgesqueeze.export.packed import pack_file

    tmp = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(32, 10)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight
                mag = torch.linspace(0.02, 0.3, 8)  # 16 shared values: +-mag
                idx = torch.randint(0, 8, w.shape, generator=g)
                top = torch.randint(3, 8, (w.shape[0], 1, 1, 1), generator=g)  # per-channel ranges
                idx = torch.minimum(idx, top)
                sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
                keep = torch.rand(w.shape, generator=g) < 0.5
                w.copy_(torch.where(keep, sign * mag[idx], torch.zeros(())))  # +0.0, never -0.0
    files = {}
    fp = tmp / "net.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(fp), dynamo=False, input_names=["x"],
                      output_names=["y"])
    files["onnx"] = fp
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError:
        pass
    else:
        class Reader(CalibrationDataReader):
            def __init__(self):
                rng = np.random.default_rng(0)
                self.it = iter([{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)])

            def get_next(self):
                return next(self.it, None)

        q8 = tmp / "net8.onnx"
        quantize_static(str(fp), str(q8), Reader(), per_channel=True, quant_format=QuantFormat.QDQ,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        files["onnx-int8"] = q8
    out = {}
    for fmt, path in files.items():
        esq, report = pack_file(path, tmp / (path.name + ".esq"), fmt=fmt)
        assert report["coded_tensors"] >= 1
        out[fmt] = (path.read_bytes(), esq.read_bytes())
    return out


@pytest.mark.parametrize("fmt", ["onnx", "onnx-int8"])
def test_packed_onnx(onnx_files, fmt):
    if fmt not in onnx_files:
        pytest.skip("onnxruntime.quantization is not installed")
    inner, blob = onnx_files[fmt]
    assert ref.unpack_packed(blob) == packed.unpack(blob) == inner


def _requantize(src, scales, offset, qmax):
    """FORMAT.md "Requantized tensors": clip(rint(v / scale[c]), -Q, Q) + offset, float32."""
    q = np.rint(src / scales.reshape(-1, *[1] * (src.ndim - 1)).astype(np.float32))
    return np.clip(q, -qmax, qmax) + offset


def _synthetic_files(rng: np.random.Generator):
    """Inner files packed with edgesqueeze's packed.pack: plain int8 / uint8 (+128) / float32
    tensors; requantized tensors with stored and derived scales; space-to-depth weights;
    products."""
    files = {}
    # plain tensors
    cb = np.array([-60, -45, -30, -15, 15, 30, 45, 60], np.int8)
    w8 = np.where(rng.random((64, 64)) < 0.7, 0, rng.choice(cb, (64, 64))).astype(np.int8)
    u8 = (np.where(rng.random(4096) < 0.7, 0, rng.choice(cb, 4096)).astype(np.int16) + 128).astype(np.uint8)
    f32 = np.where(rng.random((32, 128)) < 0.7, 0, rng.choice(cb / np.float32(64), (32, 128))).astype(np.float32)
    data = b"HEADER" * 7 + w8.tobytes() + b"\x00mid" + u8.tobytes() + f32.tobytes() + b"TAIL"
    files["plain"] = packed.pack(data, [packed.PackedTensor("w8", w8), packed.PackedTensor("u8", u8, offset=128),
                                        packed.PackedTensor("f32", f32)], name="plain.onnx", fmt="onnx-int8")[0]
    # requantized, scales stored in the file (each row's range widened at random), uint8 + 128
    fcb = np.float32(rng.standard_normal(48) * 0.1)
    src = np.where(rng.random((256, 24)) < 0.6, 0, rng.choice(fcb, (256, 24))).astype(np.float32)
    scales = (np.abs(src).max(1) / 127 * rng.uniform(1, 3, 256)).astype(np.float32)
    scales[scales == 0] = 1.0
    q = _requantize(src, scales, 128, 127).astype(np.uint8)
    data = b"HEAD" + scales.astype("<f4").tobytes() + b"mid" + q.tobytes() + b"TAIL"
    files["requant"] = packed.pack(data, [packed.PackedTensor("w", q, offset=128, source=src, scales=scales)],
                                   name="rq.onnx", fmt="onnx-int8")[0]
    # requantized, derived scales (max |v| / 127, an all-zero channel with scale 2**-12), int8
    src = np.where(rng.random((64, 40)) < 0.5, 0, rng.choice(fcb, (64, 40))).astype(np.float32)
    src[5] = 0
    scales = (np.abs(src).max(1) / np.float32(127)).astype(np.float32)
    scales[5] = 2.0 ** -12
    q = _requantize(src, scales, 0, 127).astype(np.int8)
    data = b"HEAD" + scales.astype("<f4").tobytes() + b"mid" + q.tobytes() + b"TAIL"
    files["derived"] = packed.pack(data, [packed.PackedTensor("w", q, source=src, scales=scales)],
                                   name="ds.tflite", fmt="tflite-int8")[0]
    # space-to-depth weights: a 7x5 kernel over 3 channels, held as [32, 4, 3, 12], derived scales
    src = np.where(rng.random((32, 7, 5, 3)) < 0.3, 0, rng.choice(fcb, (32, 7, 5, 3))).astype(np.float32)
    scales = (np.abs(src.reshape(32, -1)).max(1) / np.float32(127)).astype(np.float32)
    q = _requantize(packed.space_to_depth(src, 2), scales, 0, 127).astype(np.int8)
    data = b"HEAD" + scales.astype("<f4").tobytes() + b"mid" + q.tobytes() + b"TAIL"
    files["space_to_depth"] = packed.pack(
        data, [packed.PackedTensor("w", q, source=src, scales=scales, space_to_depth=2)],
        name="s2d.tflite", fmt="tflite-int8")[0]
    # the same, its integers coded as they are (the source given does not requantize to them)
    files["space_to_depth_ints"] = packed.pack(
        data, [packed.PackedTensor("w", q, source=src + np.float32(1e-3), scales=scales, space_to_depth=2)],
        name="s2d.tflite", fmt="tflite-int8")[0]
    # products: bias scales = input scale * weight scales
    w = np.float32(rng.uniform(1e-4, 1e-2, 64))
    s_in = np.float32(0.0173)
    b = (s_in * w).astype(np.float32)
    data = (b"HEAD" + np.array([s_in], "<f4").tobytes() + rng.bytes(40) + w.astype("<f4").tobytes()
            + rng.bytes(17) + b.astype("<f4").tobytes() + b"TAIL")
    files["product"] = packed.pack(data, [], name="p.tflite", fmt="tflite-int8", scale_arrays=[w, b])[0]
    return files


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic_files(np.random.default_rng(0))


def test_packed_synthetic(synthetic):
    for kind, blob in synthetic.items():
        assert ref.unpack_packed(blob) == packed.unpack(blob), kind
    # each file holds the feature it is meant to test
    infos = {k: [i for _, i in ref.read_archive(b)[2].values()] for k, b in synthetic.items()}
    assert {i.get("dtype") for i in infos["plain"]} >= {"int8", "uint8", "float32"}
    assert any("requant" in i and "scales" not in i["requant"] for i in infos["requant"])
    assert any("scales" in i.get("requant", {}) for i in infos["derived"])
    assert any(i.get("space_to_depth") == 2 for i in infos["space_to_depth"])
    assert any(i.get("space_to_depth") == 2 and "requant" not in i for i in infos["space_to_depth_ints"])
    assert any(i.get("enc") == "product" for i in infos["product"])


def _renamed(blob: bytes, edit) -> bytes:
    arc = container.loads(blob)
    meta, secs = json.loads(json.dumps(arc.meta)), {k: (d, dict(i)) for k, (d, i) in arc.sections.items()}
    edit(meta, secs)
    return container.dumps(meta, [(k, d, i) for k, (d, i) in secs.items()])


BAD_NAMES = (".", "..", "/", "sub/model.onnx", "..\\model.onnx", "model\0.tflite", "m" * 256)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_packed_name_that_is_not_a_plain_file_name_is_refused_by_both_readers(synthetic, bad):
    """``meta.packed.name`` is the name a reader writes the inner file under (unpack's
    default): FORMAT.md makes it a plain file name, and both readers refuse any other."""
    blob = _renamed(synthetic["plain"], lambda m, s: m["packed"].update(name=bad))
    with pytest.raises(ValueError, match="meta.packed.name"):
        ref.unpack_packed(blob)
    with pytest.raises(FormatError, match="meta.packed.name"):
        packed.unpack(blob)
    ok = _renamed(synthetic["plain"], lambda m, s: m["packed"].update(name="m" * 255))
    assert ref.unpack_packed(ok) == packed.unpack(ok)


def test_a_skeleton_section_of_another_enc_is_refused_by_both_readers(synthetic):
    blob = _renamed(synthetic["plain"], lambda m, s: s["skeleton"][1].update(enc="raw"))
    with pytest.raises(ValueError, match="skeleton"):
        ref.unpack_packed(blob)
    with pytest.raises(FormatError, match='info.enc must be "skeleton"'):
        packed.unpack(blob)


def test_checkpoint_is_not_a_packed_file():
    data = (DATA / "v2-small.esq").read_bytes()
    with pytest.raises(ValueError, match="meta.packed"):
        ref.unpack_packed(data)


# --- damaged files are refused -------------------------------------------------------------

@pytest.fixture(scope="module")
def samples(synthetic):
    return [(DATA / "v1-small.esq").read_bytes(), (DATA / "v2-small.esq").read_bytes(),
            synthetic["requant"], synthetic["product"]]


def _decode(data: bytes, kind: int):
    return ref.decode_tensors(data) if kind < 2 else ref.unpack_packed(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 3), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_is_refused(samples, which, where, bit):
    data = bytearray(samples[which])
    data[int(where * len(data))] ^= 1 << bit
    with pytest.raises(ValueError):
        _decode(bytes(data), which)
    with pytest.raises(FormatError):  # edgesqueeze agrees
        container.loads(bytes(data))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 3), keep=st.floats(0, 1, exclude_max=True))
def test_a_truncated_file_is_refused(samples, which, keep):
    data = samples[which]
    with pytest.raises(ValueError):
        _decode(data[:int(keep * len(data))], which)


def _craft(header, payload: bytes = b"", *, version: int = 3, flags: int = 0, magic: bytes = ref.MAGIC) -> bytes:
    """An archive with valid checksums around any header (to reach the later checks)."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = magic + struct.pack("<HHQ", version, flags, len(h)) + h + payload
    return body + hashlib.sha256(body).digest()


def _sec(name, data, offset=None, **kw):
    s = {"name": name, "offset": 0 if offset is None else offset, "length": len(data),
         "crc32": zlib.crc32(data), "info": {}}
    s.update(kw)
    return s


@pytest.mark.parametrize("case", [
    "valid", "text-mode", "version", "flags", "dup-key", "nan", "extra-key", "bool-offset",
    "hole", "overlap", "trailing", "crc", "dup-name", "header-past-end",
])
def test_listed_checks(case):
    """FORMAT.md "Checks a reader must make", each on a file whose checksums are right."""
    a, b = b"abc", b"defg"
    secs = [_sec("a", a), _sec("b", b, offset=3)]
    top = {"format": "esq", "version": 3, "meta": {}, "sections": secs}
    payload = a + b
    kw = {}
    if case == "text-mode":
        kw["magic"] = b"\x89ESQ\n\x1a\n\n"
    elif case == "version":
        kw["version"] = 4
    elif case == "flags":
        kw["flags"] = 2
    elif case == "extra-key":
        top["extra"] = 1
    elif case == "bool-offset":
        secs[0]["offset"] = False
    elif case == "hole":
        payload = a + b"x" + b
        secs[1]["offset"] = 4
    elif case == "overlap":
        secs[1]["offset"] = 2
    elif case == "trailing":
        payload += b"x"
    elif case == "crc":
        secs[1]["crc32"] ^= 1
    elif case == "dup-name":
        secs[1]["name"] = "a"
    h = json.dumps(top).encode()
    if case == "dup-key":
        h = h.replace(b'"meta": {}', b'"meta": {}, "meta": {}')
    elif case == "nan":
        h = h.replace(b'"meta": {}', b'"meta": {"x": NaN}')
    data = _craft(h, payload, **kw)
    if case == "header-past-end":
        data = data[:12] + struct.pack("<Q", len(data)) + data[20:]
    if case == "valid":
        assert set(ref.read_archive(data)[2]) == {"a", "b"}
        container.loads(data)
        return
    with pytest.raises(ValueError):
        ref.read_archive(data)
    with pytest.raises(FormatError):
        container.loads(data)


def test_a_deflated_header_with_trailing_bytes_is_refused():
    h = json.dumps({"format": "esq", "version": 3, "meta": {}, "sections": []}).encode()
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    d = c.compress(h) + c.flush()
    assert ref.read_archive(_craft(d, flags=1))[0] == 3
    for bad in (d + b"\x00", d[:-1]):
        with pytest.raises(ValueError, match="header"):
            ref.read_archive(_craft(bad, flags=1))
