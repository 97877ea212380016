"""TensorFlow Lite Micro files end to end: export -f tflite-micro LUT-compresses a weight-shared
model's int8 filters, TFLite Micro's own interpreter runs the file (LiteRT cannot), and verify
reports its flash and arena bytes."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgesqueeze.checkpoint import load_model, save_checkpoint
from edgesqueeze.data import load_dataset
from edgesqueeze.errors import ExportError, FormatError, RuntimeBackendError
from edgesqueeze.evaluation import evaluate
from edgesqueeze.export import ExportConfig, export_artifacts

pytest.importorskip("tflite_micro")  # edgesqueeze[micro]: x86-64 Linux wheels only
pytest.importorskip("litert_torch")
from test_export_tflite import trained  # noqa: E402,F401 - the half-width digits SqueezeNet fixture
from test_packed_export import shared_ckpt  # noqa: E402,F401 - the shared checkpoint fixture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_pt(shared_ckpt):
    """The half-width digits SqueezeNet shared like an .esq (built once per session)."""
    return shared_ckpt


@pytest.fixture(scope="module")
def micro(shared_pt, tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    logs: list[str] = []
    written = export_artifacts(shared_pt, ExportConfig(formats=("tflite-int8", "tflite-micro")), out,
                               log=logs.append)
    return {p.name: p for p in written}, logs


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _files(micro):
    files, _ = micro
    return files["shared.int8.tflite"], files["shared.int8.micro.tflite"]


def test_value_tables_are_what_the_shared_filters_hold(micro):
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    from edgesqueeze.runtime._tflite_meta import read_tflite_metadata, tflite_custom_ops

    plain, small = _files(micro)
    assert tflite_custom_ops(plain.read_bytes()) == []
    assert tflite_custom_ops(small.read_bytes()) == ["TFLM_DECODE"]
    assert small.stat().st_size < plain.stat().st_size
    meta = read_tflite_metadata(small)
    assert meta["artifact_format"] == "tflite-micro"
    info = meta["micro"]
    assert info["compressed"] >= 1 and info["coded_weight_bytes"] < info["weight_bytes"]
    # the report, recomputed from the plain file's filters: 16 centroids and zero a layer need
    # 5-bit indices; a table pays off where indices, table and DECODE operator (~256 B: 220-290
    # measured; 64 was assumed until session 37) are smaller than the int8 tensor
    graph = model_editor.read(plain.read_bytes()).subgraphs[0]
    filters = [np.asarray(t.array) for t in graph.tensors
               if t.buffer is not None and np.asarray(t.array).dtype == np.int8 and np.asarray(t.array).ndim == 4]
    coded, done = 0, 0
    for arr in filters:
        distinct = np.unique(arr).size
        assert distinct <= 17
        size = math.ceil(arr.size * max(1, math.ceil(math.log2(distinct))) / 8)
        worth = size + distinct + 256 < arr.size
        coded += size if worth else arr.size
        done += worth
    assert (info["filters"], info["compressed"]) == (len(filters), done)
    assert info["weight_bytes"] == sum(a.size for a in filters) and info["coded_weight_bytes"] == coded
    line = next(m for m in micro[1] if "TFLite Micro value tables" in m)
    assert f"on {done} of {len(filters)} int8 filters" in line
    # the whole files and their arenas, as TFLite Micro allocates them (RAM the DECODE operators use)
    assert (f"flash {plain.stat().st_size:,} -> {small.stat().st_size:,} B against the tflite-int8 file "
            f"({plain.name})") in line
    assert re.search(r"arena \(RAM\) [\d,]+ -> [\d,]+ B", line), line


def test_micro_interpreter_runs_it_exactly_as_the_plain_file(micro, digits, shared_pt):
    from edgesqueeze import runtime

    plain, small = _files(micro)
    a = runtime.load(small)  # LiteRT refuses TFLM_DECODE: the loader goes to TFLite Micro
    assert a.backend == "tflite-micro" and a.meta["artifact_format"] == "tflite-micro"
    b = runtime.load(plain, backend="tflite-micro")
    c = runtime.load(plain)
    assert c.backend == "ai-edge-litert"
    x = digits.test_x[:200]
    sa, sb, sc = (art.predict_images(x) for art in (a, b, c))
    np.testing.assert_array_equal(sa, sb)  # value tables are lossless
    # TFLite Micro's reference kernels vs LiteRT's XNNPACK: the same int8 graph, rounded
    # differently in places; top-1 nearly always the same
    assert (sa.argmax(1) == sc.argmax(1)).mean() >= 0.97
    # as accurate as the float model it was exported from, within int8's few points (the
    # fixture's own accuracy depends on the CPU that trained it: share() does not retrain;
    # 77.5% on an AVX-512 Zen 5 VM, against over 80% on the AVX2 VM the test was written on)
    loaded = load_model(shared_pt)
    float_acc = evaluate(loaded.model, x, digits.test_y[:200], mean=loaded.meta["mean"],
                         std=loaded.meta["std"])["accuracy"]
    assert float_acc >= 0.5  # a real model, not chance (10 classes)
    assert (sa.argmax(1) == digits.test_y[:200]).mean() >= float_acc - 0.03
    arena = a.arena_bytes
    assert arena is not None and 0 < arena < 1 << 20
    assert b.arena_bytes is not None and b.arena_bytes <= arena  # decoded filters take arena space
    with pytest.raises(RuntimeBackendError, match="TFLM_DECODE"):
        runtime.load(small, backend="ai-edge-litert")


def test_per_channel_weights_get_per_channel_tables_and_decode_exactly(shared_pt, digits, tmp_path):
    """int8 weights with a scale per output channel (``int8_weights: per-channel``) get a
    value table per channel: with one table per tensor, TFLite Micro's decoder computed other
    numbers without any error (logits 0.40 away on a small RGB net, session 26)."""
    from edgesqueeze import runtime

    written = export_artifacts(shared_pt, ExportConfig(formats=("tflite-int8", "tflite-micro"),
                                                       int8_weights="per-channel"), tmp_path, log=lambda _: None)
    files = {p.name: p for p in written}
    plain, small = files["shared.int8.tflite"], files["shared.int8.micro.tflite"]
    rows = runtime.load(small).meta["micro"]
    assert rows["compressed"] >= 1 and "per channel" in rows["method"]
    x = digits.test_x[:100]
    a, b = runtime.load(small), runtime.load(plain, backend="tflite-micro")
    np.testing.assert_array_equal(a.predict_images(x), b.predict_images(x))  # value tables are lossless


def test_a_micro_file_with_other_float_layers_says_what_it_was_measured_against(shared_pt, tmp_path):
    """Audit: with a float stem in the tflite-int8 file (the demo's recipe), export compared the
    micro file with an int8-stem conversion made in memory, but said "against the tflite-int8
    file", which is another file with other bytes."""
    from edgesqueeze.config.export import ExportConfig as Config

    logs: list[str] = []
    config = Config.from_dict({"formats": ["tflite-int8", "tflite-micro"],
                               "float_layers_by_format": {"tflite-int8": ["features.0"], "tflite-micro": []}})
    written = export_artifacts(shared_pt, config, tmp_path, log=logs.append)
    plain = next(p for p in written if p.name == "shared.int8.tflite")
    line = next(m for m in logs if "TFLite Micro value tables" in m)
    assert "against its own tflite-int8 conversion (float layers none, not the tflite-int8 file's ['features.0'])" \
        in line, line
    assert f"{plain.stat().st_size:,} ->" not in line  # not the file written beside it


def test_damaged_micro_file_is_refused_in_one_line(micro, tmp_path):
    from edgesqueeze import runtime

    _, small = _files(micro)
    data = small.read_bytes()
    for n in (100, len(data) // 2, len(data) - 40):
        bad = tmp_path / f"cut{n}.int8.micro.tflite"
        bad.write_bytes(data[:n])
        for backend in (None, "tflite-micro"):
            with pytest.raises(FormatError, match=f"{bad.name}.*(damaged|truncated)") as err:
                runtime.load(bad, backend=backend)
            assert "\n" not in str(err.value)


def test_a_model_without_sharing_gets_no_micro_file(trained, tmp_path):
    path = tmp_path / "dense.pt"
    save_checkpoint(path, trained.model, trained.meta)
    with pytest.raises(ExportError, match="no int8 filter is worth a TFLite Micro value table"):
        export_artifacts(path, ExportConfig(formats=("tflite-micro",)), tmp_path / "out", log=lambda _m: None)
    assert not (tmp_path / "out" / "dense.int8.micro.tflite").exists()


def test_a_micro_file_no_smaller_than_the_plain_one_is_refused(shared_pt, tmp_path, monkeypatch):
    """Value tables on filters too small to pay for their DECODE operators made a file larger
    than the tflite-int8 one, written with exit 0 and a logged saving (micro audit, session 37):
    with the per-filter estimate made to take every filter, the whole-file check refuses it."""
    import edgesqueeze.export.tflm as tflm

    monkeypatch.setattr(tflm, "_DECODE_BYTES", -10**9)  # every filter "worth" a table, however small
    # per-channel int8 scales: a table per output channel, which costs more than 5-bit indices save
    config = ExportConfig(formats=("tflite-micro",), int8_weights="per-channel")
    with pytest.raises(ExportError, match=r"value tables do not pay off for this model: [\d,]+ B against the "
                                          r"tflite-int8 file's [\d,]+ B"):
        export_artifacts(shared_pt, config, tmp_path / "out", log=lambda _m: None)
    assert not (tmp_path / "out" / "shared.int8.micro.tflite").exists()


@pytest.mark.slow
def test_cli_export_verify_check(shared_pt, tmp_path):
    """The export in a real process, which prints the file lines and nothing of the converter
    stack (torchao's import warnings, deprecation warnings, absl's INFO records on file
    descriptor 2, LiteRT's XNNPACK note); verify and check in this one (click's runner)."""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    es = [sys.executable, "-m", "edgesqueeze"]
    r = subprocess.run([*es, "export", str(shared_pt), "-f", "tflite-micro", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    small = tmp_path / "shared.int8.micro.tflite"
    assert "value tables on" in r.stdout + r.stderr and small.is_file()
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    noise = [line for line in lines
             if not line.startswith((str(tmp_path), "wrote ", "note: ", "warning: ", "weight-shared model: "))]
    assert noise == [], lines
    assert not (tmp_path / "shared.int8.tflite").exists()  # made in memory, not left behind
    report = tmp_path / "verify.json"
    res = CliRunner().invoke(cli, ["verify", str(shared_pt), str(small), "--out", str(report)])
    assert res.exit_code == 0, res.output
    assert "| arena bytes |" in res.output  # the table verify prints
    row = next(x for x in json.loads(report.read_text())["artifacts"] if x["path"] == str(small))
    assert row["format"] == "tflite-micro" and row["runtime"] == "tflite-micro"
    assert row["bytes"] == small.stat().st_size and row["arena_bytes"] > 0
    assert "arena bytes" in (tmp_path / "verify.md").read_text()
    size = row["bytes"]
    for limit, want in ((size, 0), (size - 1, 1)):
        res = CliRunner().invoke(cli, ["check", str(report), f"--max-size-for=tflite-micro={limit}B"])
        assert res.exit_code == want, res.output


def test_inspect_describes_a_micro_file(micro):
    from edgesqueeze.runtime import inspect_artifact
    from edgesqueeze.runtime._tflite_meta import read_tflite_metadata

    plain, small = _files(micro)
    info, base = inspect_artifact(small), inspect_artifact(plain)
    assert info["backend"] == "tflite-micro" and info["arena_bytes"] > 0
    assert info["ops"]["TFLM_DECODE"] == read_tflite_metadata(small)["micro"]["compressed"]
    assert info["ops"]["CONV_2D"] == base["ops"]["CONV_2D"]
    assert info["file_bytes"] == small.stat().st_size
    # the text says what it is and its arena (the arena was in --json alone, and it read "tflite")
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(small)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{small}: tflite (TensorFlow Lite Micro), {small.stat().st_size:,} bytes")
    assert f"  arena  {info['arena_bytes']:,} bytes of RAM" in res.output
    import os

    threads = str(min(2, os.cpu_count() or 1))  # more threads than cores is refused
    res = CliRunner().invoke(cli, ["bench", str(small), "-b", "1", "--runs", "2", "--threads", threads, "--json", "-"])
    assert res.exit_code == 0, res.output  # TensorFlow Lite Micro runs one thread: its row says so
    assert [r["threads"] for r in json.loads(res.stdout)] == [1], res.stdout


def test_a_model_with_an_operator_tflite_micro_lacks_is_refused_naming_it(tmp_path):
    """A GELU net: export wrote the micro file with exit 0 after the interpreter's raw "Didn't
    find op for builtin opcode 'GELU'" lines, and verify then refused it ("failed to allocate
    tensors"). Its error names the operator, and export writes no file."""
    import torch

    from edgesqueeze.export import _micro_arenas
    from edgesqueeze.export.tflite import export_tflite_int8
    from edgesqueeze.runtime._tflm import MicroArtifact

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    meta = {"arch": "own", "input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25], "classes": None}
    calib = np.random.default_rng(0).integers(0, 256, (8, 1, 8, 8), dtype=np.uint8)
    data = export_tflite_int8(net, meta, tmp_path / "gelu.int8.tflite", calib, weight_rounding="nearest").read_bytes()
    with pytest.raises(RuntimeBackendError, match=r"TensorFlow Lite Micro cannot open it \(it has no GELU operator\)"):
        MicroArtifact(tmp_path / "gelu.tflite", data=data)
    with pytest.raises(ExportError, match="has no GELU operator.*not written"):
        _micro_arenas(tmp_path / "gelu.micro.tflite", data, data)
