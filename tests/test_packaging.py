"""The device install is torch-free: what `pip install edgesqueeze[runtime]` asks for, and what
the CLI's device commands import when they run a packed model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
from test_runtime import onnx_models  # noqa: E402,F401 - a tiny ONNX model with edgesqueeze metadata

ROOT = Path(__file__).resolve().parents[1]
# the training stack and the big things it pulls in: none may reach a device
HEAVY = {"torch", "torchvision", "torchaudio", "triton", "scikit-learn", "scipy", "matplotlib", "litert-torch",
         "onnx", "onnxscript", "tensorflow", "jax"}


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower()


def test_device_install_asks_for_no_training_stack():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    device = [*project["dependencies"], *extras["runtime"]]
    assert not [r for r in device if r.lower().startswith("edgesqueeze[")]  # no extra pulled in sideways
    names = {_name(r) for r in device}
    assert not names & HEAVY, names & HEAVY
    assert {"numpy", "onnxruntime", "ai-edge-litert"} <= names
    # and the full toolchain is still installable: the extras `make install` uses hold torch
    full = {_name(r) for key in ("train", "export") for r in extras[key]}
    assert {"torch", "scikit-learn", "litert-torch", "onnx"} <= full
    dev = next(r for r in extras["dev"] if r.startswith("edgesqueeze["))
    assert {"train", "export", "runtime"} <= set(dev[len("edgesqueeze["):-1].split(","))
    # the microcontroller extra is TensorFlow Lite Micro's package alone: nothing heavy either
    assert {_name(r) for r in extras["micro"]} == {"tflite-micro"}


_DEVICE = r"""
import sys
for m in ("torch", "torchvision", "sklearn", "matplotlib", "yaml", "tqdm", "litert_torch", "onnx", "scipy"):
    sys.modules[m] = None  # not installed on the device: any import fails
from edgesqueeze.cli import main
packed, out = sys.argv[1], sys.argv[2]
def cli(*args):
    sys.argv = ["edgesqueeze", *args]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
cli("inspect", packed)
cli("bench", packed, "-b", "1", "--runs", "2", "--warmup", "1")
cli("unpack", packed, "-o", out)
import numpy as np
import edgesqueeze.runtime as rt
art = rt.load(packed)
assert art.packed and art.predict(np.zeros((2, 3, 16, 16), np.float32)).shape[0] == 2
heavy = sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None}
               & {"torch", "sklearn", "matplotlib", "yaml", "tqdm", "litert_torch", "onnx", "scipy"})
assert not heavy, heavy
print("DEVICE OK")
"""


def test_device_commands_run_a_packed_model_without_the_training_stack(onnx_models, tmp_path):
    """A packed file made on the host (onnx is allowed here), then inspect, bench, unpack and
    runtime.load with torch, onnx, sklearn, matplotlib, yaml, tqdm made unimportable."""
    from edgesqueeze.export.packed import pack_file

    packed, _ = pack_file(onnx_models["fp32"], tmp_path / "tiny.onnx.esq", fmt="onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _DEVICE, str(packed), str(tmp_path / "out.onnx")],
                       capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0 and "DEVICE OK" in r.stdout, (r.stdout[-1500:], r.stderr[-3000:])
    assert (tmp_path / "out.onnx").read_bytes() == onnx_models["fp32"].read_bytes()


# the runtime install (`pip install .[runtime]`): none of these importable, PyYAML is there
_RUNTIME_INSTALL = r"""
import sys
for m in ("torch", "torchvision", "sklearn", "matplotlib", "tqdm", "litert_torch", "onnx", "scipy"):
    sys.modules[m] = None
from edgesqueeze.cli import main
"""

_GATE = _RUNTIME_INSTALL + r"""
sys.argv = ["edgesqueeze", "check", sys.argv[1], "-r", sys.argv[2]]
try:
    main()
except SystemExit as e:
    print("EXIT", e.code)
"""


@pytest.mark.parametrize("accuracy,code", [(0.99, 0), (0.5, 1)])
def test_the_gate_reads_a_recipe_on_the_device(tmp_path, accuracy, code):
    """`check verify.json -r RECIPE` with the runtime install: the recipe's budget is read
    without torch (it asked for torch after PyYAML), and the verdict is the budget's."""
    import json

    rows = [{"path": f"m.{fmt}", "format": fmt, "bytes": 10_000, "accuracy": accuracy, "agreement": 1.0,
             "reference_accuracy": 0.99, "n": 359, "error": None} for fmt in ("onnx-int8", "tflite-int8")]
    report = tmp_path / "verify.json"
    report.write_text(json.dumps({"artifacts": rows}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _GATE, str(report), str(ROOT / "recipes" / "squeezenet-digits.yaml")],
                       capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert f"EXIT {code}" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    assert "accuracy" in r.stdout and ("FAIL" in r.stdout) == bool(code)


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.13"])
def test_no_extra_allows_an_onnxruntime_that_computes_int8_wrongly(python):
    """onnxruntime 1.21-1.24 gave the demo's int8 file 92.5-93.6% top-1 on an x86 with VNNI
    and AMX, against 98.33% with 1.19, 1.20 and 1.25 on (session 35); 1.18 does not import
    under numpy 2. Python 3.10, which has no wheel of 1.25, resolved 1.23.2."""
    from packaging.requirements import Requirement

    from edgesqueeze.runtime._onnx import _bad_int8_release

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    env = {"python_version": python, "python_full_version": python + ".0"}
    for extra in ("runtime", "export"):
        specs = [Requirement(r) for r in extras[extra] if _name(r) == "onnxruntime"]
        specs = [r.specifier for r in specs if r.marker is None or r.marker.evaluate(env)]
        assert len(specs) == 1, (extra, python, specs)
        allowed = [v for v in ("1.18.0", "1.19.2", "1.20.1", "1.21.1", "1.22.1", "1.23.2", "1.24.4", "1.25.1", "1.32.0")
                   if specs[0].contains(v)]
        assert allowed and not any(_bad_int8_release(v) or v.startswith("1.18") for v in allowed), (extra, allowed)
    assert [v for v in ("1.20.1", "1.21.0", "1.24.4", "1.25.0") if _bad_int8_release(v)] == ["1.21.0", "1.24.4"]


_BENCH_PT = r"""
import sys
sys.modules["torch"] = None  # a device install
from edgesqueeze.cli import main
sys.argv = ["edgesqueeze", "bench", sys.argv[1], sys.argv[2], "-b", "1", "--runs", "1"]
main()
"""


def test_bench_on_a_device_refuses_a_pt_file_before_timing_the_others(onnx_models, tmp_path):
    """``bench model.onnx model.pt`` without torch timed the ONNX file's cold loads, then said
    that the .pt needs torch."""
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"PK\x03\x04 not read: torch is needed first")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _BENCH_PT, str(onnx_models["fp32"]), str(pt)],
                       capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    # and which file: it said only "this needs the Python package 'torch'"
    assert f"{pt}: a PyTorch file (.pt), which bench times in PyTorch, not installed here" in r.stderr, r.stderr
    assert "timing loads" not in r.stderr


_VERIFY = _RUNTIME_INSTALL + r"""
sys.argv = ["edgesqueeze", "verify", sys.argv[1], "--data", "digits", "--out", sys.argv[2]]
main()
"""


def test_verify_on_a_device_says_what_it_needs_before_removing_the_earlier_report(onnx_models, tmp_path):
    """On the runtime install verify removed verify.json, verify.md and both plots, then
    stopped with "needs torch" (device-install audit, session 37)."""
    earlier = {name: f"the earlier {name}" for name in
               ("verify.json", "verify.md", "size_by_format.png", "accuracy_vs_size.png")}
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _VERIFY, str(onnx_models["fp32"]), str(tmp_path / "verify.json")],
                       capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert r.returncode == 2 and "needs the Python package 'torch'" in r.stderr, (r.stdout, r.stderr)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == earlier


_INFO = _RUNTIME_INSTALL + r"""
sys.argv = ["edgesqueeze", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("command", ["info", "eval"])
def test_info_and_eval_on_a_device_name_inspect_for_an_exported_file(onnx_models, tmp_path, command):
    """They said to install the training stack ('needs torch'); the toolchain says what reads the file."""
    from edgesqueeze.export.packed import pack_file

    packed, _ = pack_file(onnx_models["fp32"], tmp_path / "tiny.onnx.esq", fmt="onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for path, says in ((onnx_models["fp32"], "not a PyTorch model file: it looks like an ONNX model (edgesqueeze "
                                             "inspect, verify, run and bench read it"),
                       (packed, "a packed onnx file (tiny.onnx), not a model archive: run, verify, bench and inspect")):
        r = subprocess.run([sys.executable, "-c", _INFO, command, str(path)], capture_output=True, text=True, env=env,
                           cwd=str(ROOT), timeout=300)
        assert r.returncode == 2 and says in r.stderr and "needs the Python package" not in r.stderr, r.stderr


def test_the_cli_imports_no_numpy_or_runtime_until_a_command_needs_them():
    """`edgesqueeze --help` and `--version` spent 44 ms of their 89 importing numpy and the
    runtime package for the --threads option's limit; check imported xml.sax (12 ms) for
    JUnit it was not asked to write (device-install audit, session 37)."""
    code = ("import sys, edgesqueeze.cli, edgesqueeze.budget; "
            "print(sorted(m for m in ('numpy', 'edgesqueeze.runtime', 'xml.sax.saxutils', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_check_of_a_report_imports_no_numpy(tmp_path):
    """check reads JSON and compares numbers: it imported numpy (44 ms) through verify."""
    import json

    rows = [{"path": "m.onnx", "format": "onnx-int8", "bytes": 10_000, "accuracy": 0.99, "agreement": 1.0,
             "reference_accuracy": 0.99, "n": 359, "error": None}]
    (tmp_path / "verify.json").write_text(json.dumps({"artifacts": rows}))
    code = ("import sys, atexit; atexit.register(lambda: print('NUMPY', 'numpy' in sys.modules)); "
            "from edgesqueeze.cli import main; sys.argv = ['edgesqueeze', 'check', sys.argv[1], '--min-accuracy', "
            "'0.9', '--junit', sys.argv[2]]; main()")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "verify.json"), str(tmp_path / "gate.xml")],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "PASS" in r.stdout and "NUMPY False" in r.stdout, (r.stdout, r.stderr)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The wheel and the sdist built from the tracked files (as a clean clone holds them)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    code = ("import sys; from pathlib import Path; from setuptools import build_meta as b; "  # build_meta edits argv
            "out, names = sys.argv[1:3]; Path(names).write_text(b.build_wheel(out) + ' ' + b.build_sdist(out))")
    names = src.parent / f"{src.name}-built.txt"
    out = subprocess.run([sys.executable, "-c", code, str(dist), str(names)], cwd=src, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "SOURCE_DATE_EPOCH": _EPOCH})
    assert out.returncode == 0, out.stderr[-3000:]
    wheel, sdist = names.read_text().split()
    return src, dist / wheel, dist / sdist


_EPOCH = "1767225600"  # 2026-01-01: README's `SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)` in a test


def test_the_wheel_is_byte_reproducible_with_source_date_epoch(built, tmp_path):
    """Two builds of one commit gave two wheels (the zip records each file's mtime, which a
    clone sets to the time it was made): README says how to build the same bytes."""
    src, wheel, _ = built
    for f in src.rglob("*"):  # another clone, made at another time
        if f.is_file():
            os.utime(f, (1_000_000_000, 1_000_000_000))
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=src, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "SOURCE_DATE_EPOCH": _EPOCH})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / out.stdout.split()[-1]).read_bytes() == wheel.read_bytes()


def _tracked(prefix: str) -> set[str]:
    names = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True, check=True)
    return {n for n in names.stdout.splitlines() if (ROOT / n).is_file()}


def test_the_wheel_ships_the_recipes_licence_and_types_and_finds_a_recipe_by_name(built, tmp_path):
    """A wheel install had no recipes: `train -r recipes/squeezenet-digits.yaml` said "shipped
    recipes are in recipes/", a folder only a checkout has. The wheel holds them where
    `-r squeezenet-digits` finds them, from any folder."""
    import zipfile

    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    recipes = {Path(n).name for n in _tracked("recipes") if n.endswith(".yaml")}
    assert {n for n in names if n.startswith("edgesqueeze/recipes/")} == {f"edgesqueeze/recipes/{r}" for r in recipes}
    assert "edgesqueeze/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)[-8:]
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    meta = next(z for z in names if z.endswith(".dist-info/METADATA"))
    text = (tmp_path / "site" / meta).read_text()
    import edgesqueeze

    assert f"\nVersion: {edgesqueeze.__version__}\n" in text and "License-Expression: Apache-2.0" in text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    found = subprocess.run([sys.executable, "-c", "from edgesqueeze.recipe import find_recipe, load_recipe; "
                            "p = find_recipe('squeezenet-digits'); print(p); print(load_recipe('recipes/"
                            "squeezenet-digits.yaml').model.arch)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    path, arch = found.stdout.split()
    assert Path(path) == tmp_path / "site" / "edgesqueeze" / "recipes" / "squeezenet-digits.yaml" and arch


def test_the_sdist_holds_what_rebuilding_and_testing_need(built):
    """The sdist held tests/test_*.py alone: 16 collection errors (no _shared_fixture.py, no
    tests/data, no recipes, tools or examples)."""
    import tarfile

    _, _, sdist = built
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        names = {n[len(top) + 1:] for n in t.getnames()}
    need = set().union(*(_tracked(p) for p in ("edgesqueeze", "tests", "recipes", "examples", "tools", "docs",
                                               "benchmarks"))) | {"Makefile", "README.md", "LICENSE",
                                                                  "pyproject.toml", "MANIFEST.in"}
    assert not need - names, sorted(need - names)[:10]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_package_list_is_every_package_folder():
    """pyproject.toml names the packages (to map recipes/ into the wheel): a new subpackage left
    out of the list would be missing from every wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgesqueeze").rglob("__init__.py")}
    assert listed == folders | {"edgesqueeze.recipes"}


def test_the_installed_version_is_the_packages():
    from importlib.metadata import version

    import edgesqueeze

    assert version("edgesqueeze") == edgesqueeze.__version__


def test_unpack_of_a_checkpoint_archive_on_a_device_says_first_that_it_needs_torch(tmp_path):
    """It asked for -o model.pt, and only then, given one, said that it needs torch (device audit)."""
    esq = ROOT / "tests" / "data" / "v2-small.esq"
    r = subprocess.run([sys.executable, "-c", _INFO, "unpack", str(esq)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 2 and "writes a PyTorch checkpoint, which needs torch" in r.stderr, r.stderr
    assert "pass -o model.pt" not in r.stderr and not list(tmp_path.iterdir())


_SIZE_GATE = _RUNTIME_INSTALL + r"""
sys.argv = ["edgesqueeze", "check", *sys.argv[1:]]
main()
"""


def test_a_size_gate_on_a_device_opens_the_files_without_torch_or_data(onnx_models, tmp_path):
    """`check model.int8.tflite.esq --max-size 20KB` on a device said "this needs the Python
    package 'torch'": a size budget alone evaluated every file on its dataset. It opens each file
    through its runtime (a damaged one is an ERROR, exit 2) and judges its bytes."""
    from edgesqueeze.export.packed import pack_file

    packed, _ = pack_file(onnx_models["fp32"], tmp_path / "tiny.onnx.esq", fmt="onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    size = packed.stat().st_size

    def gate(*args):
        return subprocess.run([sys.executable, "-c", _SIZE_GATE, *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=str(tmp_path), timeout=300)

    r = gate(packed, onnx_models["fp32"], "--max-size", f"{size}B", "--max-size-for", "onnx=1MB")
    assert r.returncode == 0 and "2 passed" in r.stdout, (r.stdout, r.stderr)
    assert "size budget only, not evaluated" in r.stderr
    r = gate(packed, "--max-size", f"{size - 1}B")
    assert r.returncode == 1 and "1 B over the budget" in r.stdout, (r.stdout, r.stderr)
    broken = tmp_path / "broken.onnx.esq"
    broken.write_bytes(packed.read_bytes()[:-9])
    r = gate(broken, "--max-size", "1MB")
    assert r.returncode == 2 and "ERROR" in r.stdout and "PASS" not in r.stdout, (r.stdout, r.stderr)
