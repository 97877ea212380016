"""Packed files end to end: export --pack, the runtime runs them, verify / unpack / inspect /
bench / run take them; a weight-shared model keeps its sharing in int8."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesqueeze.checkpoint import save_checkpoint
from edgesqueeze.data import load_dataset
from edgesqueeze.errors import EdgesqueezeError, FormatError
from edgesqueeze.export import ExportConfig, export_artifacts, is_weight_shared

pytest.importorskip("onnxruntime")
pytest.importorskip("litert_torch")
from _shared_fixture import built_once  # noqa: E402
from test_export_tflite import trained  # noqa: E402,F401 - the half-width digits SqueezeNet fixture

FORMATS = ("onnx", "onnx-int8", "tflite", "tflite-int8")


def share(model: torch.nn.Module, sparsity: float = 0.3, levels: int = 16) -> torch.nn.Module:
    """Fold BatchNorm, prune each conv to ``sparsity`` by magnitude and share its other
    weights among ``levels`` k-means centroids: a model shaped like an .esq's, without the
    retraining (so it loses a few points)."""
    from sklearn.cluster import KMeans

    from edgesqueeze.models.fold import fold_batchnorm

    model = fold_batchnorm(model.eval())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight.flatten()
                keep = w.abs() > w.abs().quantile(sparsity)
                vals = w[keep].double().numpy().reshape(-1, 1)
                km = KMeans(n_clusters=levels, n_init=1, random_state=0).fit(vals)
                w[keep] = torch.from_numpy(km.cluster_centers_[km.labels_, 0]).float()
                w[~keep] = 0
                m.weight.copy_(w.view_as(m.weight))
    return model


@pytest.fixture(scope="module")
def shared_ckpt(trained, tmp_path_factory):
    def build(out: Path) -> None:
        assert not is_weight_shared(trained.model)
        shared = share(trained.model)
        assert is_weight_shared(shared)
        save_checkpoint(out / "shared.pt", shared, {**trained.meta, "folded_batchnorm": True})

    out, _ = built_once(tmp_path_factory, "shared-digits-checkpoint", build)  # test_seal's too
    return out / "shared.pt"


TRACED: dict[Path, list[str]] = {}  # what the exported fixture's export traced for ONNX


@pytest.fixture(scope="module")
def exported(shared_ckpt, tmp_path_factory):
    """The shared checkpoint exported to the four formats, packed: once per session (test_seal
    uses it too), each file gets its own copy, and the export's log lines."""
    import edgesqueeze.export.onnx as eo

    def build(out: Path) -> dict:
        logs: list[str] = []
        traced: list[str] = []
        real = eo._export_dynamo
        with pytest.MonkeyPatch.context() as mp:  # counts the torch.export + ONNX translations
            mp.setattr(eo, "_export_dynamo", lambda *a, **k: traced.append(a[2]) or real(*a, **k))
            written = export_artifacts(shared_ckpt, ExportConfig(formats=FORMATS, pack=True), out, log=logs.append)
        return {"written": [p.name for p in written], "logs": logs, "traced": traced}

    out, done = built_once(tmp_path_factory, "shared-digits-export", build)
    TRACED[out] = done["traced"]
    return out, [out / name for name in done["written"]], done["logs"]


def test_onnx_and_onnx_int8_share_one_fp32_conversion(exported):
    """The fp32 graph is converted once for both ONNX files (a torch.export trace and an
    ONNX translation each, about 3 s of a digits export); the int8 file quantizes a copy,
    and the fp32 file keeps no trace of the int8 one (its own metadata only)."""
    import onnx

    out, written, _ = exported
    assert TRACED[out] == ["SqueezeNet"]
    fp32 = onnx.load(str(out / "shared.onnx"))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in fp32.graph.node)
    assert "onnx" == json.loads({p.key: p.value for p in fp32.metadata_props}["edgesqueeze"])["artifact_format"]


@pytest.mark.slow
def test_every_file_is_packed_and_runs_as_the_plain_one(exported):
    from edgesqueeze import runtime

    out, written, logs = exported
    assert any("weight-shared model: int8 weights get one scale per tensor" in line for line in logs)
    # the digits SqueezeNet's 1-channel stem is int8 in the tflite-int8 file: the export says what that costs where
    assert any(line.startswith("note: the first conv (features.0, 1 input channel) is int8") for line in logs), logs
    names = {p.name for p in written}
    assert len(names) == 8 and {n + ".esq" for n in names if not n.endswith(".esq")} <= names
    digits = load_dataset("digits")
    sizes = {}
    for plain in (p for p in written if p.suffix != ".esq"):
        packed = plain.with_name(plain.name + ".esq")
        a, b = runtime.load(plain), runtime.load(packed)
        assert b.packed["name"] == plain.name and b.packed["bytes"] == plain.stat().st_size
        assert b.decode_seconds > 0 and a.packed is None
        assert np.array_equal(a.predict_images(digits.test_x), b.predict_images(digits.test_x))
        sizes[plain.name] = (plain.stat().st_size, packed.stat().st_size)
    for name, (plain, packed) in sizes.items():
        # pruned 70% and 16 values a layer; the graph's share is large in a model this small
        gz = len(gzip.compress((out / name).read_bytes(), 9))
        assert packed < 0.5 * plain and packed < gz, (name, plain, gz, packed)
    # sharing survives int8: the int8 files pack about as small as the float ones
    fp32 = min(v[1] for k, v in sizes.items() if "int8" not in k)
    int8 = max(v[1] for k, v in sizes.items() if "int8" in k)
    assert int8 < 1.15 * fp32, sizes


@pytest.mark.slow
def test_verify_unpack_inspect_bench_run_take_packed_files(exported, tmp_path):
    out, written, _ = exported
    packed = sorted(p for p in written if p.suffix == ".esq")
    es = [sys.executable, "-m", "edgesqueeze"]
    res = subprocess.run([*es, "verify", *map(str, sorted(written)), "--out", str(tmp_path / "v.json")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = {Path(r["path"]).name: r for r in json.loads((tmp_path / "v.json").read_text())["artifacts"]}
    assert sorted(r["format"] for n, r in rows.items() if n.endswith(".esq")) == [
        "onnx-int8.esq", "onnx.esq", "tflite-int8.esq", "tflite.esq"]
    for p in packed:  # measured through decode + the same runtime: what the plain file gives
        row, plain = rows[p.name], rows[p.name[:-4]]
        assert row["runtime"] == "edgesqueeze unpack + " + plain["runtime"]
        assert row["format"] == plain["format"] + ".esq" and row["accuracy"] == plain["accuracy"]
        assert row["bytes"] == p.stat().st_size < plain["bytes"]
    target = packed[0]
    res = subprocess.run([*es, "unpack", str(target), "-o", str(tmp_path / "inner")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "inner").read_bytes() == (out / target.name[:-4]).read_bytes()
    res = subprocess.run([*es, "inspect", str(target), "--json"], capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["packed"]["name"] == target.name[:-4]
    from edgesqueeze.format import container

    p = json.loads(res.stdout)["packed"]  # what the archive codes, as its header says
    arc = container.read_esq(target)
    assert p["coded_tensors"] == sum(i.get("enc") == "shared" for _, i in arc.sections.values()) >= 1
    assert p["skeleton_bytes"] == len(arc.sections["skeleton"][0])
    res = subprocess.run([*es, "inspect", str(target)], capture_output=True, text=True)
    assert f"packed {p['coded_tensors']} coded tensors" in res.stdout
    res = subprocess.run([*es, "bench", str(target), str(out / target.name[:-4]), "-b", "1", "--runs", "3",
                          "--json", str(tmp_path / "b.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    bench = json.loads((tmp_path / "b.json").read_text())
    assert all(r["cold_load_ms"] > 0 for r in bench) and bench[0]["decode_ms"] > 0 and bench[1]["decode_ms"] == 0
    table = res.stdout.splitlines()
    assert table[0].split()[-2:] == ["decode", "ms"] and table[2].split()[-1] == "-"  # the plain file decodes nothing


@pytest.mark.slow
def test_damaged_packed_file_is_refused_before_the_runtime(exported, tmp_path):
    from edgesqueeze import runtime

    out, written, _ = exported
    good = next(p for p in written if p.name.endswith(".int8.tflite.esq")).read_bytes()
    for name, data in {"cut.esq": good[:-7], "pad.esq": good + b"\0", "flip.esq": good[:200] + bytes([good[200] ^ 4])
                       + good[201:]}.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(FormatError, match=str(bad)):
            runtime.load(bad)
        res = subprocess.run([sys.executable, "-m", "edgesqueeze", "run", str(bad), "x.png"],
                             capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and str(bad) in res.stderr


def test_int8_weights_resolution():
    cfg = ExportConfig()
    assert cfg.int8_per_channel("onnx-int8", shared=False) and cfg.int8_per_channel("tflite-int8", shared=False)
    assert not cfg.int8_per_channel("onnx-int8", shared=True) and not cfg.int8_per_channel("tflite-int8", shared=True)
    assert cfg.weight_rounding_for("tflite-int8", shared=True) == "nearest"
    assert cfg.weight_rounding_for("tflite-int8") == "gptq"
    # settings that change the weights keep per-channel scales, as asked
    assert ExportConfig(weight_rounding="gptq").int8_per_channel("tflite-int8", shared=True)
    assert ExportConfig(equalize_activations=0.5).int8_per_channel("onnx-int8", shared=True)
    assert not ExportConfig(int8_weights="per-tensor").int8_per_channel("onnx-int8")
    assert ExportConfig(int8_weights="per-channel").int8_per_channel("onnx-int8", shared=True)


def test_is_weight_shared():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    assert not is_weight_shared(conv)  # 216 random floats
    with torch.no_grad():
        conv[0].weight.copy_(torch.randint(-3, 4, conv[0].weight.shape) * 0.1)
    assert is_weight_shared(conv)
    with torch.no_grad():  # 256 values crammed into a tenth of the range: per tensor, int8 merges them
        vals = torch.cat([torch.linspace(0, 0.1, 255), torch.tensor([1.0])])
        big = torch.nn.Conv2d(256, 1, 1)
        big.weight.copy_(vals.view(1, 256, 1, 1))
    assert not is_weight_shared(torch.nn.Sequential(big))
    from edgesqueeze.export import why_not_weight_shared

    assert why_not_weight_shared(torch.nn.Sequential(big)) == (
        "0's 256 shared values would be 15 int8 values under one scale per tensor (fewer than 90% kept)")
    assert why_not_weight_shared(conv) is None


def test_a_weight_shared_model_exported_per_channel_says_why(shared_ckpt, tmp_path):
    """One layer of an .esq losing 2 of its 17 values under a per-tensor scale made every int8
    file per-channel with GPTQ rounding (96 KB instead of 81 KB; 8 bits a weight packed), and
    export said nothing: README and --help say an .esq gets one scale per tensor."""
    from edgesqueeze.checkpoint import load_model, save_checkpoint

    loaded = load_model(shared_ckpt)
    conv = loaded.model.features[0]
    with torch.no_grad():  # two of its values a hundredth of an int8 step apart: one int8 value
        w = conv.weight
        top = w.abs().max()
        nonzero = w[w != 0].unique()
        w[w == nonzero[0]] = nonzero[1] + top / 127 / 100
        w[w == nonzero[2]] = nonzero[1] + top / 127 / 50
    save_checkpoint(tmp_path / "merged.pt", loaded.model, loaded.meta)
    logs: list[str] = []
    export_artifacts(tmp_path / "merged.pt", ExportConfig(formats=("onnx-int8",)), tmp_path / "out", log=logs.append)
    notes = [m for m in logs if "the model's layers are weight-shared, but features.0's" in m]
    assert len(notes) == 1 and "onnx-int8 get per-channel int8 weights" in notes[0], logs


@pytest.mark.slow
def test_per_channel_int8_of_a_shared_model_is_requantized_on_the_device(shared_ckpt, tmp_path):
    """Per-channel int8 scales spread each shared value over many int8 levels; the packer
    codes the float codebook instead and the decoder requantizes: the same bytes, fewer of
    them than coding the integers."""
    from edgesqueeze import runtime
    from edgesqueeze.format import container

    cfg = ExportConfig(formats=("onnx-int8",), int8_weights="per-channel", pack=True)
    plain, packed = export_artifacts(shared_ckpt, cfg, tmp_path, log=lambda _: None)
    sections = container.read_esq(packed).sections
    requant = [k for k, (_, info) in sections.items() if "requant" in info]
    assert len(requant) >= 10  # the quantized convs (the classifier and stem may stay float)
    # onnxruntime's symmetric scales are max|w| / 127: the decoder derives them too
    assert sum("scales" in sections[k][1]["requant"] for k in requant) >= 10
    a, b = runtime.load(plain), runtime.load(packed)
    x = load_dataset("digits").test_x
    assert np.array_equal(a.predict_images(x), b.predict_images(x))
    from edgesqueeze.export.packed import pack_file

    _, without = pack_file(plain, tmp_path / "no-requant.esq", fmt="onnx-int8")  # no float sources given
    assert packed.stat().st_size < without["packed_bytes"]


@pytest.mark.slow
def test_decoded_bytes_with_another_sha256_are_refused(exported, tmp_path):
    """The SHA-256 of the decoded bytes is checked while the runtime builds its session
    from them: a file whose recorded digest is not its content's (valid as a container, as
    a buggy or hostile writer could make it) gives no artifact, one line naming the file."""
    from edgesqueeze import runtime
    from edgesqueeze.format import container

    out, written, _ = exported
    for good in sorted(p for p in written if p.suffix == ".esq"):
        arc = container.loads(good.read_bytes())
        meta = json.loads(json.dumps(arc.meta))
        meta["packed"]["sha256"] = "0" * 64
        bad = tmp_path / good.name
        bad.write_bytes(container.dumps(meta, [(k, d, i) for k, (d, i) in arc.sections.items()]))
        with pytest.raises(FormatError, match=rf"{bad}: decoded bytes have SHA-256 .*recorded 0000"):
            runtime.load(bad)
        res = subprocess.run([sys.executable, "-m", "edgesqueeze", "unpack", str(bad), "-o", str(tmp_path / "x")],
                             capture_output=True, text=True)
        assert res.returncode == 2 and "SHA-256" in res.stderr and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_gptq_on_a_shared_model_keeps_the_codebook_in_the_packed_file(shared_ckpt, tmp_path):
    """weight_rounding gptq on a weight-shared model: the named layers' int8 weights are
    GPTQ's (not nearest's), yet every one is a requantized codebook value, so the packer
    still codes the float codebook for them (at least as many requantized tensors as with
    nearest rounding); the file runs as its plain twin. A name that is no module is refused first."""
    from edgesqueeze import runtime
    from edgesqueeze.errors import ExportError
    from edgesqueeze.format import container

    def requantized(packed) -> set[str]:
        return {k for k, (_, info) in container.read_esq(packed).sections.items() if "requant" in info}

    base = ExportConfig(formats=("onnx-int8",), int8_weights="per-channel", pack=True)
    _, near = export_artifacts(shared_ckpt, base, tmp_path / "nearest", log=lambda _: None)
    cfg = dataclasses.replace(base, weight_rounding="gptq", gptq_layers=("features.0", "features.3"))
    plain, packed = export_artifacts(shared_ckpt, cfg, tmp_path / "gptq", log=lambda _: None)
    # as many as nearest rounding's, give or take one either way, never fewer than 10 (GPTQ
    # smearing the codebooks of its layers' four convs would leave at most 9): the count moves
    # by one with the exact bytes. Under AVX2 kernels in a full suite run the nearest file once
    # had 12 against GPTQ's 13 (a calibration that computed another rounding tie, so that
    # tensor's int8 values were coded as they are, still exact), and GPTQ's once 12 against 13
    # (features.3.squeeze, 256 B, went back into the skeleton, where it compressed smaller)
    assert len(requantized(packed)) >= max(10, len(requantized(near)) - 1)
    from edgesqueeze.export.onnx import read_onnx_meta

    cal = read_onnx_meta(plain)["calibration"]
    assert cal["weight_rounding"] == "gptq" and cal["gptq_layers"] == ["features.0", "features.3"]
    # (with 16 values a layer GPTQ's choices here are nearest's: two values are many int8 steps
    # apart; test_export_prepare shows it moving weights among closer values)
    x = load_dataset("digits").test_x
    assert np.array_equal(runtime.load(plain).predict_images(x), runtime.load(packed).predict_images(x))
    with pytest.raises(ExportError, match="export.gptq_layers.*did you mean 'features.0'"):
        export_artifacts(shared_ckpt, dataclasses.replace(cfg, gptq_layers=("features.O",)), tmp_path / "bad",
                         log=lambda _: None)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_per_channel_tflite_int8_of_a_shared_model_is_requantized_too(shared_ckpt, tmp_path, rounding):
    """TFLite files get the same treatment as ONNX ones: litert-torch names each weight after
    its module (``features.3.squeeze:2``, OHWI), the packer finds its float source and
    per-channel scales, and the int8 values come back exactly (LiteRT computes the same)."""
    from edgesqueeze import runtime
    from edgesqueeze.export.packed import pack_file
    from edgesqueeze.format import container

    cfg = ExportConfig(formats=("tflite-int8",), int8_weights="per-channel", weight_rounding=rounding, pack=True)
    plain, packed = export_artifacts(shared_ckpt, cfg, tmp_path, log=lambda _: None)
    sections = container.read_esq(packed).sections
    requant = [k for k, (_, info) in sections.items() if "requant" in info]
    assert len(requant) >= 10
    # litert-torch's weight scales are max|w| / 127 too, and each conv's bias scales are its
    # input's scale times its weight's: both are left for the decoder to compute
    assert sum("scales" in sections[k][1]["requant"] for k in requant) >= 10
    assert sum(info.get("enc") == "product" for _, info in sections.values()) >= 10
    x = load_dataset("digits").test_x
    assert np.array_equal(runtime.load(plain).predict_images(x), runtime.load(packed).predict_images(x))
    _, without = pack_file(plain, tmp_path / "no-requant.esq")  # no float sources given
    assert packed.stat().st_size < without["packed_bytes"]


def _earlier_export(exported, folder: Path) -> None:
    """The exported fixture's fp32 ONNX and TFLite files and their packed copies, copied into
    ``folder``: what `export -f onnx,tflite --pack` writes there (the same bytes: tested below)."""
    out, _, _ = exported
    for name in ("shared.onnx", "shared.onnx.esq", "shared.tflite", "shared.tflite.esq"):
        shutil.copyfile(out / name, folder / name)


def test_a_reexport_without_pack_removes_the_old_packed_copy(shared_ckpt, exported, tmp_path):
    """A re-export without --pack left the earlier model's packed file beside the new plain one,
    and `verify export/*` judged it as this export's. It is removed, with a note; a file of that
    name that is not a packed copy is left alone."""
    _earlier_export(exported, tmp_path)
    (tmp_path / "shared.tflite.esq").write_bytes(b"someone else's file")
    logs: list[str] = []
    written = export_artifacts(shared_ckpt, ExportConfig(formats=("onnx", "tflite")), tmp_path, log=logs.append)
    assert [p.name for p in written] == ["shared.onnx", "shared.tflite"]
    out, _, _ = exported  # an export of two of the formats writes the same bytes as one of all four
    assert all((tmp_path / n).read_bytes() == (out / n).read_bytes() for n in ("shared.onnx", "shared.tflite"))
    assert not (tmp_path / "shared.onnx.esq").exists()
    assert any("removed shared.onnx.esq" in m for m in logs), logs
    assert (tmp_path / "shared.tflite.esq").read_bytes() == b"someone else's file"
    assert any("shared.tflite.esq is not from this export" in m for m in logs), logs


def test_a_failed_export_leaves_no_empty_out_folder(shared_ckpt, tmp_path):
    """A calibration dataset that does not exist stops the export after its --out folder was made:
    the folder (and the parents it made) are gone again; an existing folder stays."""
    out = tmp_path / "new" / "export"
    cfg = ExportConfig(formats=("onnx-int8",))
    with pytest.raises(EdgesqueezeError):
        export_artifacts(shared_ckpt, cfg, out, dataset="no-such-data", log=lambda _: None)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(EdgesqueezeError):
        export_artifacts(shared_ckpt, cfg, tmp_path / "kept", dataset="no-such-data", log=lambda _: None)
    assert (tmp_path / "kept").is_dir()


def test_packed_files_are_named_and_checked_as_what_they_hold(exported, tmp_path):
    """A packed TFLite file named .onnx.esq ran without a word (a plain file so misnamed is
    refused); a damaged packed file's verify row read format 'esq'; a good one decode_check
    null although its SHA-256 was checked; a file given twice was measured twice."""
    from click.testing import CliRunner

    from edgesqueeze import runtime
    from edgesqueeze.cli import cli

    out, written, _ = exported
    tfl = next(p for p in written if p.name.endswith(".int8.tflite.esq"))
    onnx = next(p for p in written if p.name.endswith(".int8.onnx.esq"))
    wrong = tmp_path / "model.int8.onnx.esq"
    wrong.write_bytes(tfl.read_bytes())
    with pytest.raises(FormatError, match=r"named as a packed ONNX file but holds a packed TFLite model; rename it "
                                          r"to model\.int8\.tflite\.esq"):
        runtime.load(wrong)
    for name, holds in (("as.onnx", "TFLite"), ("as.tflite", "ONNX")):  # a plain extension: ran as what it held
        misnamed = tmp_path / name
        misnamed.write_bytes((tfl if holds == "TFLite" else onnx).read_bytes())
        with pytest.raises(FormatError, match=rf"named as an? {'ONNX' if holds == 'TFLite' else 'TFLite'} file but "
                                              rf"holds a packed {holds} model; rename it to as\.{holds.lower()}\.esq"):
            runtime.load(misnamed)
    cut = tmp_path / "cut.int8.onnx.esq"
    cut.write_bytes(onnx.read_bytes()[:-9])
    report = tmp_path / "v.json"
    res = CliRunner().invoke(cli, ["verify", str(onnx), str(onnx), str(cut), "--limit", "20", "--out", str(report)])
    assert res.exit_code == 2 and "given more than once, measured once" in res.output, res.output
    rows = json.loads(report.read_text())["artifacts"]
    assert [r["format"] for r in rows] == ["onnx-int8.esq", "onnx-int8.esq"]
    assert rows[0]["decode_check"] is True and rows[1]["error"] and rows[1]["decode_check"] is None


def test_the_packer_reads_only_constant_tflite_tensors(exported):
    """The input and output tensors of an allocated interpreter hold whatever its arena held:
    as zeros they matched a run of zeros inside a pruned weight, which then packed another
    way, so one file packed to other bytes from run to run (an audit saw 5,410 B once, 4,194 B
    otherwise). Only tensors the file stores are read now; packing twice gives one result."""
    from edgesqueeze.export.packed import pack_file, tflite_tensors
    from edgesqueeze.runtime._tflite import import_interpreter

    out, _, _ = exported
    (path,) = out.glob("*.int8.tflite")
    data = path.read_bytes()
    cls, _, _ = import_interpreter(str(path))
    interp = cls(model_content=data)
    io_names = {d["name"] for d in interp.get_input_details() + interp.get_output_details()}
    names = {t.name for t in tflite_tensors(data)}
    assert names and not names & io_names, names & io_names
    a, _ = pack_file(path, out / "a.esq", fmt="tflite-int8")
    b, _ = pack_file(path, out / "b.esq", fmt="tflite-int8")
    assert a.read_bytes() == b.read_bytes()


def test_an_interrupted_reexport_leaves_none_of_the_earlier_exports_files(shared_ckpt, exported, tmp_path,
                                                                         monkeypatch):
    """An export into a folder holding an earlier one, interrupted after its first file, left
    the earlier model's other files (and packed copies) beside its new ones, and verify and
    check judged them as this export's. Every file this export writes is removed first."""
    import edgesqueeze.export.tflite as tflite

    cfg = ExportConfig(formats=("onnx", "tflite"), pack=True)
    _earlier_export(exported, tmp_path)
    names = ["shared.onnx", "shared.onnx.esq", "shared.tflite", "shared.tflite.esq"]
    earlier = {n: (tmp_path / n).read_bytes() for n in names}
    for n in names:  # an earlier model's files, told apart by their bytes
        (tmp_path / n).write_bytes(earlier[n] + b"earlier")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tflite, "export_tflite", interrupted)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        export_artifacts(shared_ckpt, cfg, tmp_path, log=logs.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.onnx", "shared.onnx.esq"]
    assert {n: (tmp_path / n).read_bytes() for n in names[:2]} == {n: earlier[n] for n in names[:2]}  # the new ones
    assert any("held an earlier export's shared.onnx, shared.onnx.esq, shared.tflite, shared.tflite.esq: removed"
               in m for m in logs), logs


@pytest.fixture(scope="module")
def c_decoder(tmp_path_factory):
    """tools/esq-decoder-c built, or a skip where no C compiler with zlib and liblzma headers is
    found (Debian: apt-get install zlib1g-dev liblzma-dev)."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: tools/esq-decoder-c is not built")
    src = Path(__file__).resolve().parents[1] / "tools" / "esq-decoder-c"
    exe = tmp_path_factory.mktemp("cdec") / "esqdecode"
    from emulated_x86 import without_cpuid_mask

    # without tools/with-avx2-cpuid.sh's preload: gcc's cc1 takes SIGSEGV for itself, so a
    # CPUID it runs under the mask was an "internal compiler error: Segmentation fault"
    r = subprocess.run([cc, "-std=c11", "-O2", "-o", str(exe), *(str(src / f) for f in ("esqdecode.c", "json.c",
                        "sha256.c")), "-lz", "-llzma", "-lm"], capture_output=True, text=True, env=without_cpuid_mask())
    if r.returncode != 0 and ("zlib.h" in r.stderr or "lzma.h" in r.stderr or "cannot find -l" in r.stderr):
        pytest.skip(f"zlib or liblzma headers missing (apt-get install zlib1g-dev liblzma-dev): {r.stderr[:200]}")
    assert r.returncode == 0, r.stderr  # any other compile error is the decoder's own
    return exe


def test_the_c_decoder_written_from_format_md_gives_every_packed_file_back(exported, c_decoder, tmp_path):
    """tools/esq-decoder-c (C11, from docs/FORMAT.md alone) decodes each packed export to the
    plain file's exact bytes, and refuses a truncated, a padded and a bit-flipped copy with exit 2."""
    out, written, _ = exported
    packed = [p for p in written if p.suffix == ".esq"]
    assert len(packed) == 4
    for p in packed:
        r = subprocess.run([str(c_decoder), str(p), str(tmp_path / "out")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out").read_bytes() == p.with_suffix("").read_bytes(), p.name
        data = p.read_bytes()
        for name, bad in (("cut", data[:-7]), ("padded", data + b"\0"),
                          ("flipped", data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 4]) + data[len(data) // 2 + 1:])):
            (tmp_path / name).write_bytes(bad)
            r = subprocess.run([str(c_decoder), str(tmp_path / name), str(tmp_path / "bad")], capture_output=True,
                               text=True)
            assert r.returncode == 2 and r.stderr.startswith("FormatError: "), (p.name, name, r.stderr)
            assert not (tmp_path / "bad").exists()
    from test_reference_decoder import BAD_NAMES, _renamed

    for bad in BAD_NAMES:  # the name a reader writes the inner file under: a plain file name
        (tmp_path / "named").write_bytes(_renamed(packed[0].read_bytes(), lambda m, s: m["packed"].update(name=bad)))
        r = subprocess.run([str(c_decoder), str(tmp_path / "named"), str(tmp_path / "bad")], capture_output=True,
                           text=True)
        assert r.returncode == 2 and "meta.packed.name must be a plain file name" in r.stderr, (bad, r.stderr)
    (tmp_path / "sk").write_bytes(_renamed(packed[0].read_bytes(), lambda m, s: s["skeleton"][1].update(enc="raw")))
    r = subprocess.run([str(c_decoder), str(tmp_path / "sk"), str(tmp_path / "bad")], capture_output=True, text=True)
    assert r.returncode == 2 and 'enc must be "skeleton"' in r.stderr, r.stderr
