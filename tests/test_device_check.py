"""tools/device_check.py and tools/device-check.sh, without a chroot: every step on the host.

The artifacts are tiny real ONNX models built with ``onnx.helper`` (Conv + GlobalAveragePool +
Flatten on the 1x28x28 digits images, ten classes) carrying edgesqueeze metadata, plus an
INT8 QDQ copy from onnxruntime.quantization. ``run`` on the host must agree with ``prepare``'s
host logits 100%; a tampered device logit file makes ``compare`` exit 1, a missing one 2.
The arm64 run itself (``make device-check``) needs root, qemu and a 6-8 minute chroot build,
so it is not part of the test suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from emulated_x86 import AVX2_CPUID, X86_64_HOST, requires_avx2_cpuid, requires_haswell

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "device_check.py"
SHELL = ROOT / "tools" / "device-check.sh"
LIMIT = 60


def _tool():
    spec = importlib.util.spec_from_file_location("device_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = mod
    spec.loader.exec_module(mod)
    return mod


dc = _tool()


def tiny_digits_onnx(path: Path, seed: int = 0) -> Path:
    """[N, 1, 28, 28] float -> [N, 10] logits: Conv 3x3 (10 filters) + GlobalAveragePool + Flatten."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((10, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]),
         helper.make_node("Flatten", ["g"], ["logits"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {"format": "edgesqueeze.artifact", "artifact_format": "onnx", "arch": "tiny",
            "classes": [str(i) for i in range(10)], "input_shape": [1, 28, 28], "layout": "NCHW",
            "mean": [0.3], "std": [0.3], "normalization": "caller", "input_dtype": "float32",
            "dataset": "digits"}
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgesqueeze", json.dumps(meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def int8_copy(src: Path, dst: Path) -> Path:
    """An INT8 QDQ model of ``src`` (onnxruntime.quantization), metadata carried over."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(3)
            self.it = iter([{"input": rng.standard_normal((1, 1, 28, 28)).astype(np.float32)}
                            for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    raw = dst.with_suffix(".raw.onnx")
    quantize_static(str(src), str(raw), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    model, meta = onnx.load(str(raw)), onnx.load(str(src)).metadata_props
    del model.metadata_props[:]
    model.metadata_props.extend(meta)
    onnx.save(model, str(dst))
    raw.unlink()
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("models")
    fp32 = tiny_digits_onnx(d / "tiny.onnx")
    return [fp32, int8_copy(fp32, d / "tiny.int8.onnx")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, models) -> Path:
    """prepare + run (on the host, in a fresh process) once; tests copy the folder."""
    out = tmp_path_factory.mktemp("check")
    assert dc.main(["prepare", "--out", str(out), "--limit", str(LIMIT), *map(str, models)]) == 0
    r = subprocess.run([sys.executable, str(TOOL), "run", "--dir", str(out), "--out", "device",
                        "--require-no-torch"], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture
def check_dir(prepared, tmp_path) -> Path:
    dst = tmp_path / "check"
    shutil.copytree(prepared, dst)
    return dst


def test_prepare_writes_inputs_models_host_logits_and_manifest(prepared, models):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["format"] == "edgesqueeze.device-check"
    assert set(manifest["artifacts"]) == {"tiny.onnx", "tiny.int8.onnx"}
    assert list(manifest["inputs"]) == ["inputs-digits.npz"]  # once per dataset
    with np.load(prepared / "inputs-digits.npz") as z:
        x, y = z["x"], z["y"]
    assert x.dtype == np.uint8 and x.shape == (LIMIT, 1, 28, 28) and y.shape == (LIMIT,)
    for src in models:
        entry = manifest["artifacts"][src.name]
        assert entry["inputs"] == "inputs-digits.npz" and entry["dataset"] == "digits"
        assert entry["sha256"] == dc.sha256_file(src) == dc.sha256_file(prepared / entry["file"])
        logits = np.load(prepared / "host" / f"{src.name}.npy")
        assert logits.shape == (LIMIT, 10) and logits.dtype == np.float32
    # the host logits are the runtime's on the same images
    from edgesqueeze.runtime import load

    ref = load(models[0], threads=1).predict_images(x)
    np.testing.assert_array_equal(np.load(prepared / "host" / "tiny.onnx.npy"), ref)


def test_run_on_host_is_torch_free_and_compare_agrees_100(check_dir, tmp_path):
    env = json.loads((check_dir / "device" / "env.json").read_text())
    assert env["torch_imported"] is False and env["errors"] == {}
    assert env["packages"]["onnxruntime"] and env["machine"]
    js, md = tmp_path / "c.json", tmp_path / "c.md"
    assert dc.main(["compare", "--dir", str(check_dir), "--json", str(js), "--markdown", str(md)]) == 0
    report = json.loads(js.read_text())
    assert report["ok"] is True
    assert [r["artifact"] for r in report["artifacts"]] == ["tiny.onnx", "tiny.int8.onnx"]
    for row in report["artifacts"]:
        assert row["n"] == LIMIT and row["agreement"] == 1.0 and row["disagree"] == 0
        assert row["max_abs_diff"] <= 1e-6
        assert row["host_accuracy"] == row["device_accuracy"]
    assert "| `tiny.int8.onnx` | 60 | 100.00% |" in md.read_text()


def test_compare_exits_1_when_a_device_logit_disagrees(check_dir, tmp_path, capsys):
    p = check_dir / "device" / "tiny.int8.onnx.npy"
    d = np.load(p)
    other = (d[3].argmax() + 1) % d.shape[1]
    d[3, other] = d[3].max() + 5.0  # image 3 now votes for another class
    np.save(p, d)
    js = tmp_path / "c.json"
    assert dc.main(["compare", "--dir", str(check_dir), "--json", str(js)]) == 1
    rows = {r["artifact"]: r for r in json.loads(js.read_text())["artifacts"]}
    assert rows["tiny.onnx"]["ok"] is True
    bad = rows["tiny.int8.onnx"]
    assert bad["ok"] is False and bad["disagree"] == 1 and bad["disagreeing_images"] == [3]
    assert bad["agreement"] == pytest.approx(1 - 1 / LIMIT) and bad["max_abs_diff"] >= 5.0
    assert bad["rows_differing"] == pytest.approx(1 / LIMIT) and len(bad["host_margins"]) == 1
    assert "DIFFERS on 1 image(s)" in capsys.readouterr().out


def test_compare_exits_2_on_missing_or_foreign_files(check_dir, capsys):
    (check_dir / "device" / "tiny.onnx.npy").unlink()
    assert dc.main(["compare", "--dir", str(check_dir)]) == 2
    assert "tiny.onnx.npy: no such file" in capsys.readouterr().err
    assert dc.main(["compare", "--dir", str(check_dir / "nowhere")]) == 2
    # device results left by another prepare are refused, not compared
    env = json.loads((check_dir / "device" / "env.json").read_text())
    env["manifest_id"] = "0" * 32
    (check_dir / "device" / "env.json").write_text(json.dumps(env))
    np.save(check_dir / "device" / "tiny.onnx.npy", np.load(check_dir / "host" / "tiny.onnx.npy"))
    assert dc.main(["compare", "--dir", str(check_dir)]) == 2
    assert "another `prepare`" in capsys.readouterr().err


def test_run_records_a_device_failure_and_compare_reports_it(check_dir, capsys):
    """A model the device runtime cannot run is a failed check (1), not a crash."""
    bad = check_dir / "models" / "tiny.onnx"
    bad.write_bytes(b"\x08" + bytes(100))
    manifest = json.loads((check_dir / "manifest.json").read_text())
    manifest["artifacts"]["tiny.onnx"]["sha256"] = dc.sha256_file(bad)
    (check_dir / "manifest.json").write_text(json.dumps(manifest))
    assert dc.main(["run", "--dir", str(check_dir), "--out", "device"]) == 1
    assert dc.main(["compare", "--dir", str(check_dir)]) == 1
    assert "ERROR: did not run on the device" in capsys.readouterr().out


def test_run_refuses_a_damaged_copy(check_dir, capsys):
    with open(check_dir / "models" / "tiny.onnx", "ab") as fh:
        fh.write(b"x")
    assert dc.main(["run", "--dir", str(check_dir), "--out", "device"]) == 2
    assert "the copy is damaged" in capsys.readouterr().err


def test_prepare_refuses_missing_files_and_unknown_data(tmp_path, models, capsys):
    assert dc.main(["prepare", "--out", str(tmp_path / "o"), str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert dc.main(["prepare", "--out", str(tmp_path / "o"), "--data", "nosuchdata", str(models[0])]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def _bare_path(tmp_path: Path) -> str:
    """A PATH with only what the script needs before its tool check: no qemu, no mmdebstrap."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname", "id", "sed"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    return str(bin_dir)


def test_shell_exits_2_naming_the_packages_when_the_tools_are_missing(tmp_path):
    env = {"PATH": _bare_path(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run([shutil.which("bash"), str(SHELL)], env=env, check=False, capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "qemu-user-static" in r.stderr and "mmdebstrap" in r.stderr
    assert "apt-get install qemu-user-static binfmt-support mmdebstrap" in r.stderr
    # the same through the overridable tool paths
    env = {**os.environ, "QEMU": str(tmp_path / "no-qemu"), "MMDEBSTRAP": str(tmp_path / "no-mmdebstrap")}
    r = subprocess.run(["bash", str(SHELL), "whatever.onnx"], env=env, check=False, capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "Debian package qemu-user-static" in r.stderr
    assert not (tmp_path / ".cache").exists()  # nothing was built


def test_shell_help_and_bad_option():
    r = subprocess.run(["bash", str(SHELL), "--help"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "device-check.sh" in r.stdout
    r = subprocess.run(["bash", str(SHELL), "--bogus"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    r = subprocess.run(["bash", str(SHELL), "--cpu", "pi3"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--cpu: unknown CPU 'pi3'; choose pi4" in r.stderr


def test_shell_x86_avx2_needs_qemu_x86_64_only(tmp_path):
    env = {**os.environ, "QEMU_X86": str(tmp_path / "no-qemu"), "MMDEBSTRAP": str(tmp_path / "no-mmdebstrap")}
    r = subprocess.run(["bash", str(SHELL), "--cpu", "x86-avx2", "whatever.onnx"], env=env, check=False,
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "no-qemu (Debian package qemu-user-static)" in r.stderr, r.stderr
    assert "mmdebstrap" not in r.stderr  # the chroot's tools are not asked for
    r = subprocess.run(["bash", str(SHELL), "--cpu", "x86-avx2", "--setup-only"], check=False, capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "nothing to set up" in r.stderr


@pytest.mark.skipif(not X86_64_HOST, reason="--cpu x86-avx2 needs an x86-64 host")
def test_shell_exits_1_when_the_device_run_fails(models, tmp_path):
    """A device that cannot run (here a qemu that fails at once) is a failed check, and no
    logits of an earlier run are compared in its place."""
    out = tmp_path / "out"
    (out / "device").mkdir(parents=True)
    (out / "device" / "env.json").write_text("{}")  # an earlier run's leftovers
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "QEMU_X86": shutil.which("false")}
    r = subprocess.run(["bash", str(SHELL), "--cpu", "x86-avx2", "--limit", "5", str(models[0])], env=env,
                       check=False, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the device run exited 1" in r.stdout and not (out / "device").exists()


@requires_haswell
@pytest.mark.parametrize("masked", [False, pytest.param(True, marks=requires_avx2_cpuid)])
def test_shell_x86_avx2_runs_the_files_on_an_emulated_cpu_without_vnni(models, tmp_path, masked):
    """No root, no chroot: the host's Python on qemu-x86_64 -cpu Haswell. The device side
    reads its CPU as the runtimes do (AVX2, no VNNI), not the host's /proc/cpuinfo. Run under
    tools/with-avx2-cpuid.sh (as `tools/with-avx2-cpuid.sh make test` runs it), the mask stays
    on the host's side: CPUID cannot fault inside qemu, which answers it as its own Haswell."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    r = subprocess.run([*([str(AVX2_CPUID)] if masked else []), "bash", str(SHELL), "--cpu", "x86-avx2",
                        "--limit", str(LIMIT), *map(str, models)], env=env,
                       check=False, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TCG doesn't support" not in r.stderr
    report = json.loads((out / "compare.json").read_text())
    assert report["ok"] and {a["artifact"] for a in report["artifacts"]} == {"tiny.onnx", "tiny.int8.onnx"}
    assert all(a["agreement"] == 1.0 and a["n"] == LIMIT for a in report["artifacts"])
    device_cpu = report["device"]["cpu"]
    assert "avx2" in device_cpu["features"] and "avx512_vnni" not in device_cpu["features"]
    assert "CPUID masked" not in device_cpu["cpu"]
    assert report["device"]["torch_imported"] is False
    assert "AVX2 (no VNNI)" in (out / "compare.md").read_text()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the script wants root first")
def test_shell_exits_2_when_the_artifacts_are_missing(tmp_path):
    """No files named and no demo exports: say `make demo`, and build nothing."""
    (tmp_path / "tools").mkdir()
    shutil.copy(SHELL, tmp_path / "tools" / SHELL.name)
    env = {**os.environ, "QEMU": shutil.which("true"), "MMDEBSTRAP": shutil.which("true"),
           "PYTHON": sys.executable, "DEVICE_ROOT": str(tmp_path / "root"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(tmp_path / "tools" / SHELL.name)], env=env, check=False, capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "run `make demo` first" in r.stderr, r.stdout + r.stderr
    r = subprocess.run(["bash", str(SHELL), str(tmp_path / "missing.onnx")], env=env, check=False,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "missing.onnx: no such file" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "root").exists() and not (tmp_path / "out").exists()
