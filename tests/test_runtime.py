"""The torch-free runtime: real onnxruntime and LiteRT sessions on tiny real model files.

Fixtures are made here with torch (the test process may import it; the runtime may not):
a tiny conv net exported to ONNX (dynamic batch with metadata; fixed batch 1 without),
an INT8 QDQ ONNX (onnxruntime.quantization), an fp32 TFLite whose flatten bakes batch 1
into a reshape (so LiteRT cannot resize it and the runtime loops), and an INT8 TFLite with
int8 input and output made with litert-torch PT2E (resizable). Outputs are checked against
torch at batch sizes 1, 7 and 32. Bad files are real bad files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgesqueeze.errors import (
    DataError,
    EdgesqueezeError,
    FormatError,
    RuntimeBackendError,
)
from edgesqueeze.runtime import (
    InputSpec,
    benchmark,
    compare,
    inspect_artifact,
    load,
    load_image,
    load_images,
    softmax,
    topk,
)
from edgesqueeze.runtime._base import dequantize, quantize, sniff

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.5]
CLASSES = ["zero", "one", "two", "three", "four"]
META = {
    "format": "edgesqueeze.artifact", "artifact_format": "onnx", "arch": "tiny", "arch_kwargs": None,
    "classes": CLASSES, "input_shape": [3, 16, 16], "layout": "NCHW", "mean": MEAN, "std": STD,
    "normalization": "caller", "input_dtype": "float32", "calibration": None,
    "source_sha256": "0" * 64, "recipe_hash": None, "edgesqueeze_version": "0.1.0",
}
BATCHES = (1, 7, 32)
# Tests on TFLite fixtures: converting with litert-torch costs ~15 s of setup.
slow = pytest.mark.slow


class TinyNet(torch.nn.Module):
    """3x16x16 -> 5 scores; global mean pooling, so every op resizes to any batch."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))).mean((2, 3))


class FlatNet(torch.nn.Module):
    """1x8x8 -> 3 scores through flatten + Linear: the exported reshape fixes batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c1(x)), 1))


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():
        net.c1.weight[:4] = 0.0  # exactly half of c1's weights are zero: a known sparsity
    return net


def rand(n: int, shape=(3, 16, 16), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def pixels(n: int, shape=(3, 16, 16), seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def torch_out(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def set_onnx_meta(src: Path, dst: Path, meta: dict | str | None) -> Path:
    import onnx

    model = onnx.load(str(src))
    del model.metadata_props[:]
    if meta is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "edgesqueeze", meta if isinstance(meta, str) else json.dumps(meta)
    onnx.save(model, str(dst))
    return dst


def add_tflite_meta(src: Path, dst: Path, meta: dict) -> Path:
    """Append a Model.metadata entry "edgesqueeze" (JSON in its own buffer), as export does."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(src.read_bytes()), 0)
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = "edgesqueeze", len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    dst.write_bytes(bytes(builder.Output()))
    return dst


def has_tflite_meta_reader() -> bool:
    try:
        from edgesqueeze.runtime._tflite_meta import read_tflite_metadata  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    net = tiny_net()
    x = torch.from_numpy(rand(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(d / "raw.onnx"), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                          dynamo=False)
        torch.onnx.export(net, (x,), str(d / "static.onnx"), input_names=["input"],
                          output_names=["logits"], dynamo=False)
    set_onnx_meta(d / "raw.onnx", d / "tiny.onnx", META)

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": rand(1, seed=s)} for s in range(16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(d / "raw.onnx"), str(d / "tiny.int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    return {"net": net, "dir": d, "fp32": d / "tiny.onnx", "static": d / "static.onnx",
            "int8": d / "tiny.int8.onnx", "raw": d / "raw.onnx"}


@pytest.fixture(scope="session")
def tflite_models(tmp_path_factory):
    litert_torch = pytest.importorskip("litert_torch")
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    d = tmp_path_factory.mktemp("tflite")
    torch.manual_seed(1)
    flat = FlatNet().eval()
    fx = torch.from_numpy(rand(1, (1, 8, 8)))
    litert_torch.convert(flat, (fx,)).export(str(d / "raw.tflite"))
    flat_meta = {**META, "artifact_format": "tflite", "classes": ["a", "b", "c"],
                 "input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}
    add_tflite_meta(d / "raw.tflite", d / "flat.tflite", flat_meta)

    net = tiny_net()
    x = torch.from_numpy(rand(1))
    # A foreign channels-last file (NHWC input, no metadata), as other converters write.
    nhwc = litert_torch.to_channel_last_io(net, args=[0])
    litert_torch.convert(nhwc, (x.permute(0, 2, 3, 1).contiguous(),)).export(str(d / "nhwc.tflite"))
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    pm = quantize_pt2e.prepare_pt2e(torch.export.export(net, (x,)).module(), quantizer)
    for s in range(8):
        pm(torch.from_numpy(rand(1, seed=100 + s)))
    pm = quantize_pt2e.convert_pt2e(pm, fold_quantize=False)
    litert_torch.convert(pm, (x,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)
                         ).export(str(d / "tiny.int8.tflite"))
    return {"flat_net": flat, "flat": d / "flat.tflite", "flat_meta": flat_meta, "raw": d / "raw.tflite",
            "net": net, "qnet": pm, "int8": d / "tiny.int8.tflite", "nhwc": d / "nhwc.tflite", "dir": d}


# --------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize("n", BATCHES)
def test_onnx_fp32_matches_torch_at_any_batch(onnx_models, n):
    art = load(onnx_models["fp32"])
    assert (art.kind, art.backend) == ("onnx", "onnxruntime")
    x = rand(n, seed=n)
    y = art.predict(x)
    assert y.shape == (n, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, torch_out(onnx_models["net"], x), rtol=1e-4, atol=1e-5)


def test_onnx_fixed_batch_one_runs_any_batch(onnx_models):
    art = load(onnx_models["static"])
    assert art.input_spec.shape == (1, 3, 16, 16)
    for n in BATCHES:
        x = rand(n, seed=n)
        np.testing.assert_allclose(art.predict(x), torch_out(onnx_models["net"], x), rtol=1e-4, atol=1e-5)


def test_onnx_int8_qdq_close_to_torch(onnx_models):
    art = load(onnx_models["int8"])
    x = rand(32, seed=7)
    y, ref = art.predict(x), torch_out(onnx_models["net"], x)
    assert y.shape == (32, 5) and y.dtype == np.float32
    span = float(ref.max() - ref.min())
    assert np.abs(y - ref).max() < 0.1 * span  # INT8 error, far below the spread of scores
    assert not np.allclose(y, ref, atol=1e-6)  # and it really is the quantized graph


def test_onnx_metadata_and_input_spec(onnx_models):
    art = load(onnx_models["fp32"])
    assert art.meta == META and art.has_metadata
    assert art.classes == CLASSES
    spec = art.input_spec
    assert isinstance(spec, InputSpec)
    assert spec == InputSpec(name="input", shape=(None, 3, 16, 16), dtype="float32", quantization=None,
                             normalization="caller", mean=tuple(MEAN), std=tuple(STD), layout="NCHW")
    assert spec.image_shape == (3, 16, 16)
    with pytest.raises(AttributeError):
        spec.name = "x"  # frozen


def test_predict_images_applies_caller_normalization(onnx_models):
    art = load(onnx_models["fp32"])
    u8 = pixels(9)
    x = (u8.astype(np.float32) / 255 - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(STD, (1, 3, 1, 1))
    x = x.astype(np.float32)
    y = art.predict_images(u8, batch_size=4)  # 4 + 4 + 1
    np.testing.assert_allclose(y, torch_out(onnx_models["net"], x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y, art.predict(x), rtol=1e-6, atol=1e-6)


def test_predict_images_in_graph_feeds_pixels_over_255(onnx_models, tmp_path):
    path = set_onnx_meta(onnx_models["raw"], tmp_path / "ingraph.onnx", {**META, "normalization": "in-graph"})
    art = load(path)
    assert art.input_spec.normalization == "in-graph"
    u8 = pixels(3)
    np.testing.assert_allclose(art.predict_images(u8), art.predict(u8.astype(np.float32) / 255), atol=1e-6)


def test_file_without_metadata_runs_and_says_so(onnx_models):
    art = load(onnx_models["raw"])
    assert art.meta == {} and not art.has_metadata and art.classes is None
    spec = art.input_spec
    assert spec.normalization is None and spec.mean is None and spec.std is None
    assert spec.shape == (None, 3, 16, 16)
    u8 = pixels(2)
    np.testing.assert_allclose(art.predict_images(u8), art.predict(u8.astype(np.float32) / 255), atol=1e-6)


def test_threads_reach_the_session(onnx_models):
    art = load(onnx_models["fp32"], threads=2)
    assert art.threads == 2
    assert art.session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(RuntimeBackendError, match="threads must be a positive integer"):
        load(onnx_models["fp32"], threads=0)
    # far more threads than cores: onnxruntime made 11,257 of 100,000 asked for (16 GB) and hung
    from edgesqueeze.runtime._base import max_threads

    with pytest.raises(RuntimeBackendError, match=f"threads={max_threads() + 1}: at most {max_threads()} \\(8 per core"):
        load(onnx_models["fp32"], threads=max_threads() + 1)
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    res = CliRunner().invoke(cli, ["bench", str(onnx_models["fp32"]), "--threads", str(max_threads() + 1)])
    assert res.exit_code == 2 and "--threads" in res.output, res.output


def test_metadata_that_does_not_fit_is_refused(onnx_models, tmp_path):
    wrong = set_onnx_meta(onnx_models["raw"], tmp_path / "wrong.onnx", {**META, "input_shape": [1, 16, 16]})
    with pytest.raises(FormatError, match=r"wrong\.onnx: metadata says one input is \[1, 16, 16\]"):
        load(wrong)
    broken = set_onnx_meta(onnx_models["raw"], tmp_path / "broken.onnx", '{"classes": [')
    with pytest.raises(FormatError, match=r"broken\.onnx: the 'edgesqueeze' metadata is not valid JSON"):
        load(broken)
    # a class list of another model: `run` stopped in topk, naming no file
    extra = set_onnx_meta(onnx_models["raw"], tmp_path / "extra.onnx", {**META, "classes": [*CLASSES, "more"]})
    with pytest.raises(FormatError, match=rf"extra\.onnx: its metadata names {len(CLASSES) + 1} classes but "
                                          rf"the model outputs {len(CLASSES)} scores"):
        load(extra)


def test_tflite_metadata_with_another_class_count_is_refused(tflite_models, tmp_path):
    art = load(tflite_models["flat"])
    n = len(art.classes)
    extra = add_tflite_meta(tflite_models["raw"], tmp_path / "extra.tflite",
                            {**art.meta, "classes": [*art.classes, "more"]})
    with pytest.raises(FormatError, match=rf"its metadata names {n + 1} classes but the model outputs {n} scores"):
        load(extra, check=False)


def test_a_model_that_fails_while_running_is_one_clear_error(tmp_path):
    """A file onnxruntime opens but cannot run (here a Reshape to a shape the input cannot
    take, as a damaged file can hold): one RuntimeBackendError naming the file, not the
    runtime's own exception."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["logits"])], "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 5])])  # 768 values: no whole rows of 5
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no edgesqueeze metadata
        art = load(path)
    with pytest.raises(RuntimeBackendError, match=r"broken\.onnx: onnxruntime failed running the model \(.*Reshape"):
        art.predict(rand(2))


def test_predict_refuses_wrong_input(onnx_models):
    art = load(onnx_models["fp32"])
    with pytest.raises(DataError, match=r"takes images of shape \[3, 16, 16\], got \[3, 8, 8\]"):
        art.predict(rand(2, (3, 8, 8)))
    with pytest.raises(DataError, match="use predict_images"):
        art.predict(pixels(1))
    with pytest.raises(DataError, match=r"shaped \[N, 3, 16, 16\]"):
        art.predict(rand(1)[0])
    with pytest.raises(DataError, match="takes uint8 pixels"):
        art.predict_images(rand(1))
    assert art.predict(rand(0)).shape == (0, 5)


def test_non_finite_input_and_scores_are_refused_not_answered(onnx_models):
    """An int8 file answered an all-NaN image "1" at 99.998% (one NaN pixel gave the same), and
    topk ranked NaN scores as class 0 with probability nan (audit, session 37)."""
    for key in ("fp32", "int8"):
        art = load(onnx_models[key])
        x = rand(2)
        x[1, 0, 3, 3] = np.nan
        with pytest.raises(DataError, match=r"holds 1 NaN or infinite value\(s\) of 1536"):
            art.predict(x)
        x[1, 0, 3, 3] = -np.inf
        with pytest.raises(DataError, match="give finite input"):
            art.predict(x)
        assert np.isfinite(art.predict(rand(2))).all()
    with pytest.raises(DataError, match="scores hold NaN or infinity"):
        topk(np.array([0.1, np.nan, 0.5], np.float32))
    with pytest.raises(DataError, match=r"batch_size must be an integer >= 1, got 2\.5"):
        art.predict_images(pixels(3), batch_size=2.5)  # a TypeError from range() before


# --------------------------------------------------------------------------- TFLite

@slow
def test_tflite_fp32_unresizable_loops_over_batch(tflite_models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the metadata reader may not be there yet
        art = load(tflite_models["flat"], threads=2)
    assert (art.kind, art.backend, art.threads) == ("tflite", "ai-edge-litert", 2)
    assert art.input_spec.shape == (1, 1, 8, 8) and art.input_spec.quantization is None
    for n in (*BATCHES, 1, 7):  # back and forth between sizes
        x = rand(n, (1, 8, 8), seed=n)
        np.testing.assert_allclose(art.predict(x), torch_out(tflite_models["flat_net"], x),
                                   rtol=1e-4, atol=1e-5)
    assert art._resizable is False  # the flatten's reshape pinned batch 1: looped


@slow
def test_packed_tflite_unresizable_loops_from_its_decoded_bytes(tflite_models, tmp_path):
    """A failed resize rebuilds the interpreter; for a packed file it must come from the
    decoded bytes (the ``.esq`` itself is no flatbuffer)."""
    from edgesqueeze.export.packed import pack_file

    packed, _ = pack_file(tflite_models["flat"], tmp_path / "flat.tflite.esq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = load(packed)
    for n in (3, 1, 2):
        x = rand(n, (1, 8, 8), seed=20 + n)
        np.testing.assert_allclose(art.predict(x), torch_out(tflite_models["flat_net"], x),
                                   rtol=1e-4, atol=1e-5)
    assert art._resizable is False


@slow
@slow
def test_a_tflite_artifact_shared_by_threads_gives_each_call_its_own_scores(tflite_models, tmp_path):
    """LiteRT's interpreter holds one input and one arena: four threads sharing an artifact got
    "There is at least 1 reference to internal data" (said as a damaged file) on 90% of calls
    and, silently, other calls' scores on some. And a rebuilt interpreter read the file again,
    which may have been replaced since."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    path = shutil.copy(tflite_models["int8"], tmp_path / "m.tflite")
    art = load(path)
    x = np.concatenate([rand(1, seed=s) for s in range(7)])
    ref = [art.predict(x[:1]), art.predict(x)]

    def call(i):
        y = art.predict(x[:1] if i % 2 == 0 else x)
        return np.array_equal(y, ref[i % 2])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(call, range(200)))
    (tmp_path / "m.tflite").write_bytes(b"\0" * 64)  # replaced on disk after the load
    art._reset()  # what a failed resize does
    assert np.array_equal(art.predict(x), ref[1])


def test_tflite_int8_io_quantized_and_resized(tflite_models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = load(tflite_models["int8"])
    spec = art.input_spec
    assert spec.dtype == "int8" and spec.quantization is not None
    scale, zp = spec.quantization
    assert scale > 0 and -128 <= zp <= 127
    out_scale = art._out_q[0]
    for n in BATCHES:
        x = rand(n, seed=10 + n)
        y = art.predict(x)
        assert y.shape == (n, 5) and y.dtype == np.float32
        # Against torch's own simulation of the same INT8 graph: a couple of output steps.
        ref = np.concatenate([torch_out(tflite_models["qnet"], x[i:i + 1]) for i in range(n)])
        assert np.abs(y - ref).max() <= 3 * out_scale + 1e-6
        # And against the float model: quantization error, not garbage.
        fref = torch_out(tflite_models["net"], x)
        assert np.abs(y - fref).max() < 0.1 * float(fref.max() - fref.min())
    assert art._resizable is True  # mean pooling resizes: one invoke per batch


@slow
def test_tflite_channels_last_file_takes_nchw(tflite_models):
    art = load(tflite_models["nhwc"])
    spec = art.input_spec
    assert spec.shape == (1, 16, 16, 3) and spec.layout == "NHWC" and spec.image_shape == (3, 16, 16)
    for n in (1, 7):
        x = rand(n, seed=20 + n)
        np.testing.assert_allclose(art.predict(x), torch_out(tflite_models["net"], x), rtol=1e-4, atol=1e-5)


@slow
@pytest.mark.skipif(not has_tflite_meta_reader(), reason="edgesqueeze.runtime._tflite_meta not written yet")
def test_tflite_metadata_read(tflite_models):
    art = load(tflite_models["flat"])
    assert art.meta == tflite_models["flat_meta"]
    assert art.classes == ["a", "b", "c"]
    assert art.input_spec.normalization == "caller"
    assert art.input_spec.mean == (0.5,) and art.input_spec.std == (0.25,)
    u8 = pixels(5, (1, 8, 8))
    x = ((u8.astype(np.float32) / 255 - 0.5) / 0.25).astype(np.float32)
    np.testing.assert_allclose(art.predict_images(u8, batch_size=2), torch_out(tflite_models["flat_net"], x),
                               rtol=1e-4, atol=1e-4)


@slow
def test_tflite_backend_choice(tflite_models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load(tflite_models["int8"], backend="ai-edge-litert").backend == "ai-edge-litert"
    with pytest.raises(RuntimeBackendError, match="is a TFLite model; backend 'onnxruntime' runs ONNX"):
        load(tflite_models["int8"], backend="onnxruntime")


def test_onnx_backend_choice(onnx_models):
    assert load(onnx_models["fp32"], backend="onnxruntime").backend == "onnxruntime"
    with pytest.raises(RuntimeBackendError, match="is an ONNX model; backend 'ai-edge-litert' runs TFLITE"):
        load(onnx_models["fp32"], backend="ai-edge-litert")
    with pytest.raises(RuntimeBackendError, match="unknown backend 'tensorrt'"):
        load(onnx_models["fp32"], backend="tensorrt")


def test_input_spec_layouts():
    from edgesqueeze.runtime._base import build_spec

    nhwc = build_spec(Path("x.tflite"), {}, name="in", shape=[1, 32, 32, 3], dtype="float32", quantization=None)
    assert nhwc.layout == "NHWC" and nhwc.image_shape == (3, 32, 32) and nhwc.normalization is None
    meta = {"input_shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    spec = build_spec(Path("x.tflite"), meta, name="in", shape=[1, 32, 32, 3], dtype="int8", quantization=(0.1, 2))
    assert spec.layout == "NHWC" and spec.normalization == "caller" and spec.quantization == (0.1, 2)
    dyn = build_spec(Path("x.onnx"), meta, name="in", shape=[-1, 3, "h", "w"], dtype="float32", quantization=None)
    assert dyn.shape == (None, 3, 32, 32) and dyn.layout == "NCHW"
    with pytest.raises(FormatError, match=r"x\.onnx: metadata std has a zero"):
        build_spec(Path("x.onnx"), {**meta, "std": [0, 1, 1]}, name="in", shape=[1, 3, 32, 32],
                   dtype="float32", quantization=None)
    with pytest.raises(FormatError, match="normalization 'sometimes' is neither"):
        build_spec(Path("x.onnx"), {**meta, "normalization": "sometimes"}, name="in", shape=[1, 3, 32, 32],
                   dtype="float32", quantization=None)


def test_quantize_dequantize_math():
    # The docstring's worked example: scale 0.5, zero point -3.
    q = quantize(np.array([1.2, 0.25, -0.25, 1000.0, -1000.0], np.float32), 0.5, -3, np.int8)
    np.testing.assert_array_equal(q, [-1, -2, -4, 127, -128])  # half away from zero; clipped
    np.testing.assert_allclose(dequantize(np.array([-1, 127], np.int8), 0.5, -3), [1.0, 65.0])
    q8 = quantize(np.array([0.0, 1.0], np.float32), 1 / 255, 0, np.uint8)
    np.testing.assert_array_equal(q8, [0, 255])


# --------------------------------------------------------------------------- bad files

def _damaged(src: Path, dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


def test_truncated_onnx(onnx_models, tmp_path):
    blob = onnx_models["fp32"].read_bytes()
    for cut in (len(blob) // 2, len(blob) - 7, 100):
        p = _damaged(onnx_models["fp32"], tmp_path / f"cut{cut}.onnx", blob[:cut])
        with pytest.raises(FormatError, match=rf"cut{cut}\.onnx: ONNX file is damaged or truncated"):
            load(p)


def test_every_prefix_of_an_onnx_file_is_refused_cleanly(onnx_models, tmp_path):
    blob = onnx_models["fp32"].read_bytes()
    cuts = sorted({*range(1, len(blob), max(1, len(blob) // 50)), *range(len(blob) - 6, len(blob))})
    p = tmp_path / "prefix.onnx"
    for cut in cuts:
        p.write_bytes(blob[:cut])
        with pytest.raises(FormatError, match=r"prefix\.onnx: (ONNX file is damaged or truncated|only \d+ bytes)"):
            load(p)


def test_garbage_with_onnx_extension(tmp_path):
    p = tmp_path / "garbage.onnx"
    p.write_bytes(b"this is not a model, just some text someone saved as .onnx\n" * 4)
    with pytest.raises(FormatError, match=r"garbage\.onnx: not an ONNX or TFLite model"):
        load(p)


def test_garbage_with_tflite_extension(tmp_path):
    p = tmp_path / "garbage.tflite"
    p.write_bytes(b"\x00\x01\x02" * 50)
    with pytest.raises(FormatError, match=r"garbage\.tflite: not a TFLite file \(no 'TFL3' identifier"):
        load(p)


@slow
def test_truncated_tflite(tflite_models, tmp_path):
    blob = tflite_models["int8"].read_bytes()
    for cut in (len(blob) // 2, len(blob) - 9, 12):
        p = tmp_path / f"cut{cut}.tflite"
        p.write_bytes(blob[:cut])
        with pytest.raises(FormatError, match=rf"cut{cut}\.tflite: TFLite file is damaged or truncated"):
            load(p)


@slow
def test_every_prefix_of_a_tflite_file_is_refused_cleanly(tflite_models, tmp_path):
    blob = tflite_models["int8"].read_bytes()
    cuts = sorted({*range(1, len(blob), max(1, len(blob) // 50)), *range(len(blob) - 6, len(blob))})
    p = tmp_path / "prefix.tflite"
    for cut in cuts:
        p.write_bytes(blob[:cut])
        with pytest.raises(FormatError, match=r"prefix\.tflite: (TFLite file is damaged or truncated|only \d+ bytes)"):
            load(p)


@slow
def test_tflite_renamed_onnx_is_refused(tflite_models, tmp_path):
    p = tmp_path / "actually_tflite.onnx"
    p.write_bytes(tflite_models["int8"].read_bytes())
    with pytest.raises(FormatError, match=r"has a \.onnx extension but holds a TFLite model; rename"):
        load(p)
    ok = tmp_path / "actually_tflite.bin"  # an extension that claims nothing is fine
    ok.write_bytes(tflite_models["int8"].read_bytes())
    assert load(ok).kind == "tflite"


def test_onnx_renamed_tflite_is_refused(onnx_models, tmp_path):
    p = tmp_path / "actually_onnx.tflite"
    p.write_bytes(onnx_models["fp32"].read_bytes())
    with pytest.raises(FormatError, match=r"has a \.tflite extension but holds an ONNX model; rename"):
        load(p)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty\.onnx: file is empty \(0 bytes\)"):
        load(tmp_path / "empty.onnx")
    with pytest.raises(FormatError, match=r"nothere\.tflite: no such file"):
        load(tmp_path / "nothere.tflite")
    with pytest.raises(FormatError, match="is a folder, not a model file"):
        load(tmp_path)


def test_esq_and_checkpoint_are_not_runnable_here(tmp_path):
    from edgesqueeze.format.container import dumps

    esq = tmp_path / "model.esq"
    esq.write_bytes(dumps({"model": "demo"}, [("w", b"\x01\x02", {"shape": [2]})]))
    with pytest.raises(RuntimeBackendError, match=r"model\.esq: is an edgesqueeze \.esq checkpoint.*"
                                                  r"--pack.*edgesqueeze unpack"):
        load(esq)
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    with pytest.raises(RuntimeBackendError, match=r"model\.pt: is a PyTorch checkpoint.*edgesqueeze export"):
        load(ckpt)
    renamed = tmp_path / "model_pt.onnx"  # a checkpoint with the wrong extension
    renamed.write_bytes(ckpt.read_bytes())
    with pytest.raises(RuntimeBackendError, match="is a PyTorch checkpoint"):
        load(renamed)


def test_sniff():
    assert sniff(b"") == "empty"
    assert sniff(b"\x18\x00\x00\x00TFL3rest") == "tflite"
    assert sniff(b"\x89ESQ\r\n\x1a\n\x01\x00") == "esq"
    assert sniff(b"PK\x03\x04....") == "zip"
    assert sniff(b"\x08\x07\x12\x07pytorch") == "unknown"  # ONNX: confirmed by parsing


# --------------------------------------------------------------------------- no torch

def _run_py(code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], check=False, capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=120)


def _no_torch_script(path: Path, shape: tuple[int, ...]) -> str:
    return f"""
import sys, warnings
warnings.simplefilter("ignore")
import numpy as np
import edgesqueeze.runtime as rt
art = rt.load({str(path)!r}, threads=1)
y = art.predict(np.zeros((3, *{shape!r}), np.float32))
assert y.shape[0] == 3 and y.dtype == np.float32, y.shape
info = rt.inspect_artifact({str(path)!r})
assert info["ops"], info
rt.benchmark(art, warmup=1, runs=2)
bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
assert not bad, bad
print("OK", art.kind)
"""


def test_runtime_never_imports_torch_onnx(onnx_models):
    r = _run_py(_no_torch_script(onnx_models["fp32"], (3, 16, 16)))
    assert r.returncode == 0 and "OK onnx" in r.stdout, r.stderr[-2000:]


@slow
def test_runtime_never_imports_torch_tflite(tflite_models):
    r = _run_py(_no_torch_script(tflite_models["int8"], (3, 16, 16)))
    assert r.returncode == 0 and "OK tflite" in r.stdout, r.stderr[-2000:]


def test_no_torch_import_in_runtime_sources():
    import re

    forbidden = re.compile(r"^\s*(import|from)\s+(torch|edgesqueeze\.(export|checkpoint|models|compress|"
                           r"data|train|config|recipe))\b", re.MULTILINE)
    files = [*(ROOT / "edgesqueeze" / "runtime").glob("*.py"), *(ROOT / "edgesqueeze" / "format").glob("*.py")]
    assert len(files) > 8
    for f in files:
        assert not forbidden.findall(f.read_text()), f.name


_FORMAT_NO_TORCH = """
import sys
sys.modules["torch"] = None  # as on a device without torch: any import of it fails
import numpy as np
from edgesqueeze.format import codec, container
from edgesqueeze.errors import RuntimeBackendError
import edgesqueeze.runtime as rt
data = open(sys.argv[1], "rb").read()
arc = container.read_esq(sys.argv[1])
state, meta = codec.loads_model(data)
assert meta == {"arch": "x"}, meta
assert state["w"].dtype == np.float32 and state["w"].tobytes() == np.load(sys.argv[2]).tobytes()
assert state["steps"].shape == () and int(state["steps"]) == 7
assert codec.dumps_model(state, meta)[0] == data  # re-encoding gives the same bytes
try:
    rt.load(sys.argv[1])
except RuntimeBackendError as e:
    assert "edgesqueeze .esq checkpoint" in str(e), e
bad = [m for m in sys.modules if (m == "torch" or m.startswith("torch.")) and sys.modules[m] is not None]
assert not bad, bad
print("OK", len(arc.sections))
"""


def test_format_reads_and_writes_esq_without_torch(tmp_path):
    """The format layer (and the runtime's sniffing of .esq) with torch made unimportable."""
    from edgesqueeze.format import codec

    rng = np.random.default_rng(0)
    w = np.where(rng.random((16, 3, 3, 3)) < 0.3, rng.choice(np.float32([-0.5, 0.25, 0.75]), (16, 3, 3, 3)),
                 np.float32(0)).astype(np.float32)
    path, ref = tmp_path / "m.esq", tmp_path / "w.npy"
    np.save(ref, w)
    path.write_bytes(codec.dumps_model({"w": w, "b": np.ones(16, np.float32), "steps": np.array(7)},
                                       {"arch": "x"})[0])
    r = _run_py(_FORMAT_NO_TORCH, path, ref)
    assert r.returncode == 0 and r.stdout.startswith("OK 2"), r.stderr[-2000:]


_BLOCK_RUNTIMES = """
import sys, warnings
warnings.simplefilter("ignore")
for m in ("onnxruntime", "ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime",
          "tflite_runtime.interpreter"):
    sys.modules[m] = None  # as on a device where the package is not installed
from edgesqueeze.errors import RuntimeBackendError
import edgesqueeze.runtime as rt
try:
    rt.load(sys.argv[1])
except RuntimeBackendError as e:
    print("ERR", e)
"""


def test_missing_onnxruntime_gives_one_clear_line(onnx_models):
    r = _run_py(_BLOCK_RUNTIMES, onnx_models["fp32"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\n") == 1, r.stdout
    assert "tiny.onnx: is an ONNX model but onnxruntime is not installed" in r.stdout
    # a release the runtime extra allows, on Python 3.10 too (a plain `pip install onnxruntime` there
    # gave 1.23, one of the releases that compute int8 files wrongly)
    assert "pip install 'onnxruntime>=1.25' (on Python 3.10" in r.stdout and "'onnxruntime>=1.19,<1.21'" in r.stdout


@slow
def test_missing_tflite_runtime_gives_one_clear_line(tflite_models):
    r = _run_py(_BLOCK_RUNTIMES, tflite_models["int8"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("\n") == 1, r.stdout
    assert "tiny.int8.tflite: is a TFLite model but no TFLite runtime is installed" in r.stdout
    assert "pip install ai-edge-litert" in r.stdout and "tflite-runtime" in r.stdout


@slow
def test_tflite_runs_without_onnxruntime(tflite_models):
    code = f"""
import sys, warnings
warnings.simplefilter("ignore")
sys.modules["onnxruntime"] = None
import numpy as np, edgesqueeze.runtime as rt
print(rt.load({str(tflite_models['int8'])!r}).predict(np.zeros((2, 3, 16, 16), np.float32)).shape)
"""
    r = _run_py(code)
    assert r.returncode == 0 and "(2, 5)" in r.stdout, r.stderr[-2000:]


# --------------------------------------------------------------------------- inspect

def test_inspect_onnx(onnx_models):
    info = inspect_artifact(onnx_models["fp32"])
    assert info["kind"] == "onnx" and info["detail"] == "full"
    assert info["metadata"] == META
    assert info["inputs"] == [{"name": "input", "shape": ["n", 3, 16, 16], "dtype": "float32",
                               "quantization": None}]
    assert info["outputs"][0]["name"] == "logits"
    assert info["ops"]["Conv"] == 2 and info["ops"]["Relu"] == 1
    w = next(t for t in info["tensors"] if t["shape"] == [8, 3, 3, 3])
    assert w["dtype"] == "float32" and w["bytes"] == 216 * 4 and w["sparsity"] == 0.5
    params = sum(p.numel() for p in onnx_models["net"].parameters())
    assert info["bytes_by_dtype"]["float32"] >= params * 4
    assert info["file_bytes"] == onnx_models["fp32"].stat().st_size
    json.dumps(info)  # JSON-able


def test_inspect_onnx_int8(onnx_models):
    info = inspect_artifact(onnx_models["int8"])
    assert info["ops"]["QuantizeLinear"] >= 1 and info["ops"]["DequantizeLinear"] >= 1
    w = next(t for t in info["tensors"] if t["shape"] == [8, 3, 3, 3])
    assert w["dtype"] == "int8" and w["bytes"] == 216 and w["sparsity"] >= 0.5


def test_inspect_onnx_without_onnx_package(onnx_models):
    code = f"""
import sys, json
sys.modules["onnx"] = None
import edgesqueeze.runtime as rt
info = rt.inspect_artifact({str(onnx_models['fp32'])!r})
print(json.dumps([info["detail"], info["ops"], info["inputs"][0]["shape"], info["metadata"]["classes"]]))
"""
    r = _run_py(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == ["io-only", None, ["n", 3, 16, 16], CLASSES]


@slow
def test_inspect_tflite(tflite_models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = inspect_artifact(tflite_models["int8"])
        flat = inspect_artifact(tflite_models["flat"])
    assert info["kind"] == "tflite"
    assert info["ops"]["CONV_2D"] == 2 and "DELEGATE" not in info["ops"]
    assert info["inputs"][0]["dtype"] == "int8" and info["inputs"][0]["quantization"]["scale"] > 0
    w = next(t for t in info["tensors"] if t["elements"] == 216)
    assert w["dtype"] == "int8" and w["sparsity"] >= 0.5 and w["quantization"]["per_channel"] == 8
    # fp32 weights: exactly the parameters of the torch model, read back from the file.
    params = sum(p.numel() for p in tflite_models["flat_net"].parameters())
    assert flat["bytes_by_dtype"]["float32"] == params * 4
    assert flat["ops"]["FULLY_CONNECTED"] == 1
    json.dumps(info)


def test_inspect_bad_files(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x032.1:")  # cut mid-graph
    with pytest.raises(FormatError, match=r"x\.onnx: ONNX file is damaged or truncated"):
        inspect_artifact(tmp_path / "x.onnx")
    (tmp_path / "e.tflite").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        inspect_artifact(tmp_path / "e.tflite")


# --------------------------------------------------------------------------- bench

def test_benchmark_and_compare(onnx_models):
    art = load(onnx_models["fp32"], threads=1)
    r = benchmark(art, batch_size=4, warmup=1, runs=5)
    assert r["runs"] == 5 and r["batch_size"] == 4 and r["threads"] == 1
    assert 0 < r["p50_ms"] <= r["p90_ms"] and r["mean_ms"] > 0
    rows = compare([art, onnx_models["int8"]], warmup=1, runs=3, threads=1)
    assert [row["kind"] for row in rows] == ["onnx", "onnx"]
    assert rows[0]["p50_ratio"] == 1.0 and rows[0]["size_ratio"] == 1.0
    assert rows[1]["size_bytes"] == onnx_models["int8"].stat().st_size
    with pytest.raises(DataError, match="runs >= 1"):
        benchmark(art, runs=0)


# --------------------------------------------------------------------------- images, topk

def _coord_image(w: int, h: int) -> np.ndarray:
    """HWC uint8 where R = column, G = row: a crop's position can be read from its pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
    a[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
    a[..., 2] = 77
    return a


def test_the_runtime_api_refuses_or_takes_odd_arguments_clearly(onnx_models, tmp_path):
    """From an audit of the runtime API in a long-running service: load_image(None) was an
    AttributeError; load(os.fsencode(path)) read the name as a model's bytes; threads=np.int64(2)
    was refused; a dangling link was "no such file"; softmax of -inf rows gave NaN; float64 input
    beyond float32's range was "holds NaN or infinite values"; pickling said "cannot pickle
    'module' object", naming no file."""
    import pickle

    from edgesqueeze.runtime import load_image, softmax

    with pytest.raises(DataError, match="load_image takes the path of an image file, got NoneType"):
        load_image(None, (1, 28, 28))
    art = load(os.fsencode(onnx_models["fp32"]), threads=np.int64(2))
    assert art.threads == 2
    (tmp_path / "gone.onnx").symlink_to(tmp_path / "moved.onnx")
    with pytest.raises(FormatError, match="a symbolic link to .*moved.onnx, which does not exist"):
        load(tmp_path / "gone.onnx")
    with pytest.raises(DataError, match="softmax: the scores hold NaN or infinity"):
        softmax(np.array([[-np.inf, -np.inf]]))
    assert softmax(np.array([[0.0, 0.0]])).tolist() == [[0.5, 0.5]]
    with pytest.raises(DataError, match="beyond float32's"):
        art.predict(np.full((1, 3, 16, 16), 1e300))
    with pytest.raises(TypeError, match="tiny.onnx: a loaded model cannot be pickled"):
        pickle.dumps(art)


def test_load_images_takes_one_path_and_numpy_sizes(tmp_path):
    """A path string given to load_images was read one character at a time ("/: cannot read as
    an image"); a resize of numpy's int64 (a size read from an array) was refused."""
    from PIL import Image

    from edgesqueeze.runtime import load_images

    p = tmp_path / "coords.png"
    Image.fromarray(_coord_image(30, 20)).save(p)
    one = load_image(p, (3, 16, 16), resize=20)
    for given in (str(p), p):
        assert np.array_equal(load_images(given, (3, 16, 16), resize=20), one[None])
    assert np.array_equal(load_image(p, (3, 16, 16), resize=np.int64(20)), one)
    with pytest.raises(DataError, match="resize must be a positive integer"):
        load_image(p, (3, 16, 16), resize=np.float64(20))


def test_a_dangling_link_among_images_says_it_is_one(tmp_path):
    """A folder given to run with a link whose file moved said only "no such image file"."""
    (tmp_path / "a.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(DataError, match=r"a\.png: a symbolic link to .*moved\.png, which does not exist; fix or "
                                        "remove the link"):
        load_image(tmp_path / "a.png", (3, 8, 8))
    with pytest.raises(DataError, match="no such image file"):
        load_image(tmp_path / "none.png", (3, 8, 8))


def test_load_image_center_crop_like_torchvision(tmp_path):
    from PIL import Image

    p = tmp_path / "coords.png"
    Image.fromarray(_coord_image(30, 20)).save(p)
    # Shorter side already 20: no resampling; crop 16x16 from top round(2)=2, left round(7)=7.
    chw = load_image(p, (3, 16, 16), resize=20)
    assert chw.dtype == np.uint8 and chw.shape == (3, 16, 16)
    np.testing.assert_array_equal(chw[0, 0], np.arange(7, 23))
    np.testing.assert_array_equal(chw[1, :, 0], np.arange(2, 18))
    # With resampling: 30x20 -> resize 10 -> int(10 * 30 / 20) = 15 x 10, then crop 8x8.
    chw = load_image(p, (3, 8, 8), resize=10)
    ref = np.asarray(Image.open(p).convert("RGB").resize((15, 10), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(chw, ref[1:9, 4:12].transpose(2, 0, 1))  # top round(1), left round(3.5)=4
    # Straight resize without "resize".
    chw = load_image(p, (3, 5, 6))
    ref = np.asarray(Image.open(p).convert("RGB").resize((6, 5), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(chw, ref.transpose(2, 0, 1))


def _full_resize_then_crop(path, short: int, out: int) -> np.ndarray:
    """The reference: the whole image resized, then centre-cropped (zeros where it pads)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    a = np.asarray(img.resize(size, Image.Resampling.BILINEAR))
    pad = [((max(out - n, 0)) // 2, (max(out - n + 1, 0)) // 2) for n in a.shape[:2]]
    a = np.pad(a, (*pad, (0, 0)))
    top, left = (round((n - out) / 2.0) for n in a.shape[:2])
    return a[top:top + out, left:left + out].transpose(2, 0, 1)


@pytest.mark.parametrize("size, short", [((40, 1800), 64), ((1800, 40), 64), ((12, 2000), 20), ((333, 250), 64)])
def test_load_image_of_an_extreme_aspect_ratio_resizes_only_what_the_crop_keeps(tmp_path, size, short):
    """A 117-byte 12000 x 1 PNG took 7.7 GB and 8 s in `run` (its 3,072,000 x 256 resize came
    before the crop); now only the crop's region is resized, at most 1 from the full resize
    (Pillow's box; an ordinary image, the last case, stays exact)."""
    from PIL import Image

    p = tmp_path / "strip.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
    got = load_image(p, (3, 32, 32), resize=short).astype(int)
    ref = _full_resize_then_crop(p, short, 32).astype(int)
    assert got.shape == ref.shape == (3, 32, 32)
    assert np.abs(got - ref).max() <= (0 if size == (333, 250) else 1)
    if short < 32:  # padded: the zero border where the crop lies outside the image, as before
        assert (got == 0).sum() == (ref == 0).sum() and (got[:, :, :6] == 0).all()


def test_load_image_of_a_long_strip_fits_in_little_memory(tmp_path):
    from PIL import Image

    Image.new("RGB", (12000, 1), (200, 10, 10)).save(tmp_path / "strip.png")
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from edgesqueeze.runtime.images import load_image; "
            f"a = load_image({str(tmp_path / 'strip.png')!r}, (3, 224, 224), resize=256); "
            "print(a.shape, a[:, 100, 100].tolist())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(3, 224, 224) [200, 10, 10]"


def _sideways(tmp_path, name: str, upright: np.ndarray, tag: int = 6):
    """``upright`` stored as a phone stores a portrait photo: turned a quarter, with the EXIF
    orientation that turns it back (6: rotate 90 degrees clockwise to view)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = tag
    path = tmp_path / name
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(path, exif=exif)
    return path


@pytest.mark.parametrize("resize", [None, 20])
def test_load_image_reads_a_photo_upright_as_its_exif_orientation_says(tmp_path, resize):
    """Digits stored sideways with orientation 6 (as a phone saves them) scored 8.36% in `run`
    against 98.33% upright, exit 0 (audit, session 37)."""
    from PIL import Image

    r, c = np.mgrid[0:24, 0:18]  # smooth (JPEG keeps it) and not square: the turn shows
    upright = np.stack([r * 10, c * 14, (r + c) * 6], -1).astype(np.uint8)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    path = _sideways(tmp_path, "sideways.jpg" if resize else "sideways.png", upright)
    if resize is None:
        np.testing.assert_array_equal(load_image(path, (3, 24, 18)), load_image(tmp_path / "upright.png", (3, 24, 18)))
    else:  # through JPEG: the same picture, upright (near, not equal)
        got = load_image(path, (3, 16, 16), resize=resize).astype(int)
        ref = load_image(tmp_path / "upright.png", (3, 16, 16), resize=resize).astype(int)
        assert np.abs(got - ref).mean() < 4 < 20 < np.abs(np.rot90(got, 1, (1, 2)) - ref).mean()


def test_an_image_folder_reads_its_images_upright(tmp_path):
    from PIL import Image

    from edgesqueeze.data import load_dataset
    from edgesqueeze.data.datasets import folder_test_image

    rng = np.random.default_rng(4)
    ups = []
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "f" / split / cls).mkdir(parents=True)
            for i in range(3):
                up = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                _sideways(tmp_path / "f" / split / cls, f"{i}.png", up)
                if split == "test":
                    ups.append(up.transpose(2, 0, 1).tobytes())
    for stream in (False, True):
        ds = load_dataset(f"imagefolder:{tmp_path / 'f'}", stream=stream)
        assert sorted(x.tobytes() for x in np.asarray(ds.test_x)) == sorted(ups)
    for cls in ("a", "b"):  # verify's resize note: the size as viewed (a <class>/<image> folder)
        (tmp_path / "g" / cls).mkdir(parents=True)
        _sideways(tmp_path / "g" / cls, "0.png", rng.integers(0, 256, (14, 10, 3), dtype=np.uint8))
    assert Image.open(tmp_path / "g" / "a" / "0.png").size == (14, 10)  # stored sideways
    assert folder_test_image(f"imagefolder:{tmp_path / 'g'}")[1] == (10, 14)


def test_load_image_modes_and_batch(tmp_path):
    from PIL import Image

    from edgesqueeze.runtime.images import _resized_size

    assert _resized_size(640, 480, 256) == (341, 256)  # the docstring's example
    assert _resized_size(480, 641, 256) == (256, 341)
    p = tmp_path / "c.jpg"
    Image.fromarray(_coord_image(12, 9)).save(p)
    g = load_image(p, (1, 9, 12))
    assert g.shape == (1, 9, 12)
    batch = load_images([p, p], (3, 4, 4))
    assert batch.shape == (2, 3, 4, 4) and batch.dtype == np.uint8
    # Small image, large crop: zero padding like torchvision's CenterCrop.
    Image.fromarray(_coord_image(4, 4)).save(tmp_path / "small.png")
    padded = load_image(tmp_path / "small.png", (3, 8, 8), resize=4)
    assert padded[2, 0, 0] == 0 and padded[2, 2, 2] == 77


def test_load_image_errors(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png: cannot read as an image"):
        load_image(bad, (3, 8, 8))
    with pytest.raises(DataError, match=r"gone\.jpg: no such image file"):
        load_image(tmp_path / "gone.jpg", (3, 8, 8))
    with pytest.raises(DataError, match="input_shape must be"):
        load_image(bad, (8, 8))
    with pytest.raises(DataError, match="resize must be a positive integer"):
        load_image(bad, (3, 8, 8), resize=0)


def test_topk_and_softmax():
    res = topk(np.array([2.0, 1.0, 0.1]), 2, ["a", "b", "c"])
    assert [(i, n) for i, n, _ in res] == [(0, "a"), (1, "b")]
    assert res[0][2] == pytest.approx(0.659, abs=1e-3) and res[1][2] == pytest.approx(0.242, abs=1e-3)
    assert topk(np.array([[0.0, 5.0]]), 10) == [(1, "1", pytest.approx(0.9933, abs=1e-4)),
                                                (0, "0", pytest.approx(0.0067, abs=1e-4))]
    assert topk([0.2, 0.7, 0.1], 1, logits=False) == [(1, "1", pytest.approx(0.7))]
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0]])), [[0.5, 0.5]])
    with pytest.raises(DataError, match="2 class names for 3 scores"):
        topk([1.0, 2.0, 3.0], 1, ["a", "b"])
    with pytest.raises(DataError, match="one image's scores"):
        topk(np.zeros((2, 3)), 1)


def test_errors_are_edgesqueeze_errors():
    assert issubclass(FormatError, EdgesqueezeError) and issubclass(RuntimeBackendError, EdgesqueezeError)


def test_onnx_metadata_is_read_before_the_session(onnx_models):
    """``metadata_props`` walks the protobuf's top-level fields (no onnx package, the graph
    skipped): the same entries as onnx.load; garbage or a truncated file gives {}."""
    import onnx

    from edgesqueeze.runtime._onnx import metadata_props

    path = onnx_models["fp32"]
    want = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert want and metadata_props(path) == want == metadata_props(path.read_bytes())
    assert metadata_props(b"\xff" * 64) == {}
    assert metadata_props(path.read_bytes()[:100]) == {}


def test_any_cpu_int8_files_open_without_the_x86_nchwc_kernels(onnx_models, tmp_path):
    """A file quantized for every CPU (onnx-int8, target any-cpu) gets a session without
    onnxruntime's NchwcTransformer, whose x86-only float kernels round differently from ARM's:
    bit for bit what onnxruntime computes with every other optimization (ORT_ENABLE_EXTENDED).
    Other files keep onnxruntime's default; portable= overrides either way."""
    import onnxruntime as ort

    meta = {**META, "artifact_format": "onnx-int8", "calibration": {"target": "any-cpu"}}
    path = set_onnx_meta(onnx_models["raw"], tmp_path / "anycpu.onnx", meta)
    x = rand(8)
    art = load(path, threads=1)
    assert art.portable is True
    assert load(path, threads=1, portable=False).portable is False
    assert load(onnx_models["fp32"], threads=1).portable is False
    assert load(onnx_models["fp32"], threads=1, portable=True).portable is True
    vnni = set_onnx_meta(onnx_models["raw"], tmp_path / "vnni.onnx",
                         {**meta, "calibration": {"target": "vnni-or-arm"}})
    assert load(vnni, threads=1).portable is False
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    extended = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    want = extended.run(None, {"input": x})[0]
    np.testing.assert_array_equal(art.predict(x), want)


def test_bench_says_which_onnx_session_it_timed(onnx_models, tmp_path):
    """`bench` opens an any-cpu onnx-int8 file portable unless --x86-nchwc, and its rows say so."""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    meta = {**META, "artifact_format": "onnx-int8", "calibration": {"target": "any-cpu"}}
    path = set_onnx_meta(onnx_models["raw"], tmp_path / "anycpu.onnx", meta)
    for flag, want in (([], True), (["--x86-nchwc"], False)):
        out = tmp_path / f"b{len(flag)}.json"
        res = CliRunner().invoke(cli, ["bench", str(path), str(onnx_models["fp32"]), "-b", "1", "--runs", "2",
                                       "--warmup", "0", "--json", str(out), *flag])
        assert res.exit_code == 0, res.output
        rows = json.loads(out.read_text())
        assert [r["portable"] for r in rows] == [want, False]


def test_inspect_counts_a_uint8_weights_zero_point_as_zero(tmp_path):
    """A pruned model's uint8 ONNX weights store their zeros as the zero point (128): inspect
    called an 80%-zero layer 0.0% sparse."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgesqueeze.runtime.inspect import inspect_artifact

    w = np.full((4, 1, 1, 5), 128, np.uint8)
    w[:, 0, 0, :2] = [[1, 200], [3, 250], [129, 127], [0, 255]]  # 8 of 20 not zero
    zp_per_channel = np.array([128, 128, 128, 128], np.uint8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.1), "s"),
             numpy_helper.from_array(np.uint8(128), "zp"),
             numpy_helper.from_array(w.copy(), "w2"), numpy_helper.from_array(np.full(4, 0.1, np.float32), "s2"),
             numpy_helper.from_array(zp_per_channel, "zp2")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["wf"]),
             helper.make_node("DequantizeLinear", ["w2", "s2", "zp2"], ["wf2"], axis=0),
             helper.make_node("Add", ["wf", "wf2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1, 1, 5])],
                              initializer=inits)
    path = tmp_path / "dq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    rows = {t["name"]: t for t in inspect_artifact(path)["tensors"]}
    assert rows["w"]["zeros"] == 12 and rows["w"]["sparsity"] == pytest.approx(0.6)
    assert rows["w2"]["zeros"] == 12  # per-channel zero points, along axis 0
    assert rows["s"]["zeros"] == 0  # a float tensor without a zero point: its zeros as stored


def test_a_file_without_metadata_is_described_by_the_users_mean_and_std(tmp_path):
    """verify refused a file another tool exported even when --mean/--std (which its help
    offers "for a file that does not record it") were given; now they describe its input."""
    import torch
    from click.testing import CliRunner

    from edgesqueeze.cli import cli
    from edgesqueeze.data import load_dataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False)
    art = load(path)
    assert not art.has_metadata
    art.describe({"mean": [0.3], "std": [0.2]})
    pixels = load_dataset("digits").test_x[:16]
    with torch.no_grad():
        want = model(torch.from_numpy((pixels.astype(np.float32) / 255 - 0.3) / 0.2)).numpy()
    np.testing.assert_allclose(art.predict_images(pixels), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(FormatError, match="records its own input description"):
        art.describe({"mean": [0.0], "std": [1.0]})
    out = tmp_path / "v.json"
    res = CliRunner().invoke(cli, ["verify", str(path), "--data", "digits", "--limit", "20", "--mean", "0.3",
                                   "--std", "0.2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["artifacts"][0]
    assert row["error"] is None and row["n"] == 20 and row["input_described_by"] == ["--mean", "--std"]


def test_a_checkpoint_archive_is_refused_with_a_command_that_can_be_pasted(tmp_path):
    """``run d/model.esq`` advised `edgesqueeze export model.esq --pack`: the bare name, which
    does not name the file from where the user stands; now the path as given, shell-quoted."""
    import shlex
    import shutil

    path = tmp_path / "my models" / "model.esq"
    path.parent.mkdir()
    shutil.copyfile(Path(__file__).parent / "data" / "v2-small.esq", path)
    with pytest.raises(RuntimeBackendError) as exc:
        load(path)
    assert f"`edgesqueeze export {shlex.quote(str(path))} --pack`" in str(exc.value), str(exc.value)
