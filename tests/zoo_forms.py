"""Shared by the any-model tests: the zoo's classes (examples/zoo.py, as a user writes them)
saved in the four forms a user brings, and the commands each form goes through.

Models are tiny (width 0.25, one grey 28x28 channel: the digits images) and untrained: these
tests check that every form gets through every command and that what comes out computes what
went in, not accuracy (benchmarks/zoo_cifar.py measures that on CIFAR-10).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from edgesqueeze.cli import cli

ROOT = Path(__file__).resolve().parents[1]
ZOO = "examples/zoo.py"
KWARGS = {"num_classes": 10, "in_channels": 1, "width": 0.25}
FORMS = ("state_dict", "torchscript", "program", "pickle")
FORMATS = ("onnx", "onnx-int8", "tflite", "tflite-int8")


def run(*args, cwd: Path = ROOT):
    """The CLI in-process, from the repo root (``--arch examples/zoo.py:...`` is relative)."""
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def build(cls: str) -> torch.nn.Module:
    from edgesqueeze.models import build_model

    torch.manual_seed(0)
    return build_model(f"{ZOO}:{cls}", **KWARGS).eval()


def save_forms(cls: str, out: Path, forms=FORMS, script: bool = False) -> dict[str, tuple[Path, list[str]]]:
    """``{form: (file, options the commands need to read it)}`` for ``cls``, the ``forms`` asked;
    TorchScript by tracing (or ``script``)."""
    model = build(cls)
    x = torch.zeros(1, 1, 28, 28)  # batch 1, as users export: the program's batch is fixed
    files = {
        "state_dict": out / f"{cls}.pt",
        "torchscript": out / f"{cls}.torchscript.pt",
        "program": out / f"{cls}.pt2",
        "pickle": out / f"{cls}.pickle.pt",
    }
    torch.save(model.state_dict(), files["state_dict"])
    if "torchscript" in forms:
        torch.jit.save(torch.jit.script(model) if script else torch.jit.trace(model, x), str(files["torchscript"]))
    if "program" in forms:
        torch.export.save(torch.export.export(model, (x,)), str(files["program"]))
    if "pickle" in forms:  # a whole pickled model, its class importable as users' are (examples.zoo)
        sys.path.insert(0, str(ROOT))
        try:
            import examples.zoo as zoo_module
        finally:
            sys.path.remove(str(ROOT))
        pickled = getattr(zoo_module, cls)(**KWARGS)
        pickled.load_state_dict(model.state_dict())
        torch.save(pickled.eval(), files["pickle"])
    arch = ["--arch", f"{ZOO}:{cls}", "--arch-kwargs", json.dumps(KWARGS)]
    return {"state_dict": (files["state_dict"], arch), "torchscript": (files["torchscript"], []),
            "program": (files["program"], []),
            # the pickle holds the class but not its constructor's arguments: an .esq needs them
            "pickle": (files["pickle"], ["--trust-pickle", "--arch-kwargs", json.dumps(KWARGS)])}


def reference_logits(cls: str) -> torch.Tensor:
    """The eager model's logits on a fixed batch of digits-like inputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return build(cls)(torch.randn(4, 1, 28, 28, generator=gen))


def through_every_command(cls: str, form: str, index: int | None, tmp: Path, script: bool = False) -> None:
    """One model in one form through info, inspect, eval, compress (lossless: the archive
    restores a model of the same kind), and, unless ``index`` is None, export (format
    ``FORMATS[index % 4]``), verify and check; each must exit 0 and what comes out must
    compute what went in."""
    path, opts = save_forms(cls, tmp, (form,), script)[form]
    data = ["--data", "digits"]

    res = run("info", path, *opts, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["kind"] == {"state_dict": "state_dict", "torchscript": "torchscript",
                            "program": "exported_program", "pickle": "pickle"}[form]
    assert info["parameters"] == sum(p.numel() for p in build(cls).parameters())

    assert run("inspect", path, *opts).exit_code == 0
    res = run("eval", path, *opts, "--data", "digits", "--limit", "60", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["n"] == 60

    # lossless: bit-identical weights, and the archive restores a model of the same kind
    res = run("compress", path, *opts, *data, "--out", tmp / f"{form}-esq", "--no-progress")
    assert res.exit_code == 0, res.output
    esq = tmp / f"{form}-esq" / "model.esq"
    report = json.loads((tmp / f"{form}-esq" / "report.json").read_text())
    assert report["lossless"]["weights_identical"] is True
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.models.program import program_kind

    # the code the archive names is imported as the user asked for the source (--arch, --trust-pickle)
    arch = opts[opts.index("--arch") + 1] if "--arch" in opts else None
    restored = load_model(esq, arch=arch, trust_pickle="--trust-pickle" in opts).model
    assert program_kind(restored) == {"torchscript": "torchscript", "program": "exported_program"}.get(form)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        got = restored(torch.randn(4, 1, 28, 28, generator=gen))
    torch.testing.assert_close(got, reference_logits(cls), rtol=1e-4, atol=1e-5)

    if index is None:
        return
    fmt = FORMATS[index % len(FORMATS)]
    out = tmp / f"{form}-export"
    res = run("export", path, *opts, *data, "-f", fmt, "--calibration-images", "32", "--out", out)
    assert res.exit_code == 0, res.output
    stem = cls  # named after the model, not its container (X.torchscript.pt -> X.onnx)
    files = sorted(p for p in out.iterdir() if p.suffix in (".onnx", ".tflite"))
    assert [p.name.split(".")[0] for p in files] == [stem], files
    res = run("verify", path, *files, *opts, *data, "--limit", "40", "--out", out / "verify.json")
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "verify.json").read_text())["artifacts"]
    assert all(r["error"] is None for r in rows), rows
    if not fmt.endswith("int8"):  # fp32 files compute what the model computes
        assert rows[-1]["agreement"] == 1.0, rows
    # the gate on the file that ships (from verify's report, as CI runs it): the float
    # reference .pt is not judged by --max-size, the exported file is
    report = out / "verify.json"
    res = run("check", report, "--max-size", f"{files[0].stat().st_size}B")
    assert res.exit_code == 0, res.output
    res = run("check", report, "--max-size", f"{files[0].stat().st_size - 1}B")
    assert res.exit_code == 1, res.output
