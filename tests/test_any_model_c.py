"""Any user model (3 of 3): more of the zoo as torch.export programs through compression;
retraining Deep Compression, a recipe's ``model.import`` and ``compress.keep_layers`` on a
user class; post-training compression of TorchScript; and every bad input a user can bring,
each one ``error:`` line with exit code 2 and nothing written. See tests/zoo_forms.py."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from zoo_forms import KWARGS, ZOO, build, reference_logits, run, save_forms  # noqa: E402

from edgesqueeze.cli import cli  # noqa: E402

ARCH = ["--arch-kwargs", json.dumps(KWARGS)]


def logits(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(4, 1, 28, 28, generator=gen))


@pytest.mark.parametrize("cls", ["SEHardSwishNet"])
def test_programs_of_the_zoo_compress_losslessly_and_restore_as_programs(cls, tmp_path):
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.models.program import program_kind

    path, _ = save_forms(cls, tmp_path, ("program",))["program"]
    res = run("compress", path, "--data", "digits", "--out", tmp_path / "c", "--no-progress")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "report.json").read_text())["lossless"]["weights_identical"] is True
    restored = load_model(tmp_path / "c" / "model.esq").model
    assert program_kind(restored) == "exported_program"
    torch.testing.assert_close(logits(restored), reference_logits(cls), rtol=1e-4, atol=1e-5)


def test_torchscript_post_training_compression_keeps_it_torchscript(tmp_path):
    from edgesqueeze.checkpoint import load_model

    path, _ = save_forms("ConvLinearHead", tmp_path, ("torchscript",))["torchscript"]
    dense = sum(t.numel() * 4 for t in build("ConvLinearHead").state_dict().values() if t.is_floating_point())
    recipe = tmp_path / "ptq.yaml"
    target = dense * 3 // 4  # a tiny model: ~6 KB of its budget is the TorchScript code itself
    recipe.write_text(f"version: 1\ncompress:\n  ptq: {{target_bytes: {target}}}\n  calibration: {{images: 64}}\n")
    res = run("compress", path, "--data", "digits", "-r", recipe, "--out", tmp_path / "c", "--no-progress")
    assert res.exit_code == 0, res.output
    esq = tmp_path / "c" / "model.esq"
    assert esq.stat().st_size <= target
    restored = load_model(esq).model
    assert isinstance(restored, torch.jit.ScriptModule)
    weights = [t for k, t in restored.state_dict().items() if k.endswith("weight") and t.dim() == 4]
    assert max(int(torch.unique(w).numel()) for w in weights) <= 256  # shared: at most 8-bit codebooks
    # a target below the TorchScript code's own bytes is out of reach like any other (exit 1,
    # not 2), said before any work, and nothing is written
    recipe.write_text("version: 1\ncompress:\n  ptq: {target_bytes: 1000}\n  calibration: {images: 64}\n")
    res = run("compress", path, "--data", "digits", "-r", recipe, "--out", tmp_path / "small", "--no-progress")
    said = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 1 and len(said) == 1, res.output
    assert "1,000 B cannot hold even the model's code" in said[0] and "raise the target above" in said[0], said
    assert not (tmp_path / "small" / "model.esq").exists()


def test_retraining_deep_compression_of_a_user_class(tmp_path):
    """ShuffleNetV2 from its class and a state_dict: prune (grouped and depthwise convs), fold
    BatchNorm (through split, concat and shuffle), 3-bit sharing, retrained centroids; the
    stem and head listed in keep_layers stay as they were. The .esq names the class and
    rebuilds it."""
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.models.imports import UntrustedCode

    path, opts = save_forms("ShuffleNetV2", tmp_path, ())["state_dict"]
    recipe = tmp_path / "dc.yaml"
    recipe.write_text("""version: 1
data: {dataset: digits, limit: 400}
compress:
  keep_layers: [stem, fc]
  prune: {sparsity: 0.6, schedule: oneshot}
  prune_finetune: {epochs: 1, batch_size: 64, lr: 0.01}
  cluster: {bits: 3}
  cluster_finetune: {epochs: 1, batch_size: 64, lr: 0.001}
""")
    res = run("compress", path, *opts, "-r", recipe, "--out", tmp_path / "dc", "--no-progress")
    assert res.exit_code == 0, res.output
    with pytest.raises(UntrustedCode, match="names your code"):  # a file alone imports nothing
        load_model(tmp_path / "dc" / "model.esq")
    loaded = load_model(tmp_path / "dc" / "model.esq", arch=f"{ZOO}:ShuffleNetV2")
    assert loaded.meta["arch"] == f"{ZOO}:ShuffleNetV2" and loaded.meta["arch_kwargs"] == KWARGS
    original = build("ShuffleNetV2")
    convs = {n: m for n, m in loaded.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())  # folded
    depthwise = [n for n, m in convs.items() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise
    for name, m in convs.items():
        kept = name.startswith("stem") or name == "fc"
        values = torch.unique(m.weight)
        if kept:  # untouched: as many distinct values as the original (folding rescales, not shares)
            assert float((m.weight == 0).float().mean()) == 0.0
            assert values.numel() > 8
        else:
            assert values.numel() <= 2 ** 3 + 1, name  # 8 centroids and the zero
            assert float((m.weight == 0).float().mean()) > 0.4, name
    assert convs["fc"].weight.shape == original.fc.weight.shape


def test_a_recipe_trains_a_user_class(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""version: 1
model: {{import: {ZOO}:ConvLinearHead, kwargs: {{width: 0.25}}}}
data: {{dataset: digits, limit: 300}}
train: {{epochs: 1, batch_size: 32, threads: 1}}
""")
    res = run("train", "-r", recipe, "--out", tmp_path / "t", "--no-progress")
    assert res.exit_code == 0, res.output
    res = run("info", tmp_path / "t" / "model.pt", "--json")
    desc = json.loads(res.output)
    # the class took num_classes and in_channels from the data, its own kwargs from the recipe
    assert desc["arch"] == f"{ZOO}:ConvLinearHead"
    assert desc["arch_kwargs"] == {"num_classes": 10, "in_channels": 1, "width": 0.25}


# ------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written

def _one_error_line(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, res.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files a user may bring that edgesqueeze must refuse (with what each needs)."""
    tmp = tmp_path_factory.mktemp("bad")
    files = {}
    sd = tmp / "resnet.pt"
    torch.save(build("ResNet10").state_dict(), sd)
    files["no_module"] = (sd, ["--arch", "nosuchpackage.models:Net"], "cannot import module 'nosuchpackage.models'")
    files["no_class"] = (sd, ["--arch", f"{ZOO}:ResNet11"], "has no 'ResNet11'")
    files["bad_kwargs"] = (sd, ["--arch", f"{ZOO}:ResNet10", "--arch-kwargs", "{depth: 18}"], "does not take kwargs")
    files["does_not_build"] = (sd, ["--arch", f"{ZOO}:ResNet10", "--arch-kwargs", "{width: -1}"],
                               "building it with kwargs")
    files["does_not_fit"] = (sd, ["--arch", f"{ZOO}:MobileNetV2", *ARCH], "missing")
    pickled = tmp / "pickle.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), pickled)
    files["pickle_untrusted"] = (pickled, [], "--trust-pickle")
    # a pickle whose class is gone (its module does not exist here)
    lost = tmp / "lost.pt"
    with zipfile.ZipFile(pickled) as src, zipfile.ZipFile(lost, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():  # written again, so that its CRC-32s hold: a file, not a damaged one
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"torch.nn.modules.container", b"gone.nn.modules.container_")
            dst.writestr(info.filename, data)
    files["pickle_class_gone"] = (lost, ["--trust-pickle"], "class cannot be found")
    truncated = tmp / "truncated.pt2"
    program = tmp / "ok.pt2"
    torch.export.save(torch.export.export(build("ConvLinearHead"), (torch.zeros(2, 1, 28, 28),)), str(program))
    truncated.write_bytes(program.read_bytes()[:4000])
    files["truncated_program"] = (truncated, [], "truncated.pt2")
    return files


COMMANDS = {  # command and what it needs beyond the model
    "info": [],
    "inspect": [],
    "eval": ["--data", "digits", "--limit", "20"],
    "compress": ["--data", "digits", "--no-progress"],
    "export": ["--data", "digits", "-f", "onnx"],
    "sensitivity": ["--data", "digits"],
    "verify": ["--data", "digits", "--limit", "20"],
    "check": ["--data", "digits", "--limit", "20", "--max-size", "1MB"],
    "bench": ["--input-shape", "1,28,28", "-b", "1", "--runs", "2", "--warmup", "0"],
}


@pytest.mark.parametrize("case", ["no_module", "no_class", "bad_kwargs", "does_not_build", "does_not_fit",
                                  "pickle_untrusted", "pickle_class_gone", "truncated_program"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_bad_input_with_one_line(bad, case, command, tmp_path):
    path, opts, fragment = bad[case]
    out = tmp_path / "out"
    where = {"compress": ["--out", out], "export": ["--out", out], "sensitivity": ["--out", out],
             "verify": ["--out", out / "v.json"]}.get(command, [])
    res = CliRunner().invoke(cli, [command, str(path), *map(str, opts), *COMMANDS[command], *map(str, where)])
    if command in ("verify", "check"):
        # a file that cannot be evaluated is a row with an error, never a pass: exit 2, the reason shown
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and fragment in res.output, res.output
    else:
        _one_error_line(res, fragment)
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == [] or command == "verify", written


def test_every_command_takes_the_model_and_data_from_set_as_from_options(tmp_path):
    """``--set model.import=... --set model.kwargs=... --set data.dataset=...`` (a recipe's
    sections, without a recipe file) reads a plain state_dict on every command exactly as
    ``--arch``/``--arch-kwargs``/``--data`` do."""
    path, opts = save_forms("ConvLinearHead", tmp_path, ())["state_dict"]
    model_set = [f"--set=model.import={ZOO}:ConvLinearHead", f"--set=model.kwargs={json.dumps(KWARGS)}"]
    via_set = [*model_set, "--set=data.dataset=digits"]
    accuracy = {}
    for how, given in (("set", via_set), ("options", [*opts, "--data", "digits"])):
        res = run("eval", path, *given, "--limit", "40", "--json")
        assert res.exit_code == 0, res.output
        accuracy[how] = json.loads(res.output[res.output.index("{"):])["accuracy"]
    assert accuracy["set"] == accuracy["options"]
    out = tmp_path / "out"  # the other commands (tested with the options throughout tests/test_any_model_*)
    for command, extra in (("info", []), ("inspect", []),
                           ("compress", ["--out", out / "c", "--no-progress"]),
                           ("export", ["-f", "onnx", "--out", out / "e"]),
                           ("verify", ["--limit", "20", "--out", out / "v.json"]),
                           ("check", ["--limit", "20", "--max-size-for", "pt=1MB"])):  # --max-size skips a .pt
        res = run(command, path, *(model_set if command in ("info", "inspect") else via_set), *extra)
        assert res.exit_code == 0, (command, res.output)
    assert (out / "c" / "model.esq").is_file() and (out / "e" / "ConvLinearHead.onnx").is_file()
    assert json.loads((out / "v.json").read_text())["artifacts"][0]["error"] is None
    # the options win over the recipe where both are given: --data names the split used
    res = run("eval", path, *via_set, "--data", "mnist-missing", "--limit", "40")
    assert res.exit_code == 2 and "mnist-missing" in res.output, res.output


class DataDependentLoop(torch.nn.Module):
    """Loops as many times as its input says: TorchScript scripts it, torch.export cannot (an
    ``if`` on a tensor would convert, as torch.cond, when both branches return new tensors of
    one shape, like examples/zoo.py's DataDependentNet)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv(x)
        for _ in range(int(x.abs().sum().item()) % 3):
            y = torch.relu(y) * 0.5
        return self.fc(y.mean((2, 3)))


def test_conversion_failures_and_nothing_to_compress_are_one_line(tmp_path):
    from edgesqueeze.models import build_model

    bad_ts = tmp_path / "loopy.torchscript.pt"
    torch.jit.save(torch.jit.script(DataDependentLoop()), str(bad_ts))
    for command in (["export", bad_ts, "--data", "digits", "-f", "onnx", "--out", tmp_path / "e"],
                    ["compress", bad_ts, "--data", "digits", "--out", tmp_path / "c", "--no-progress"]):
        res = CliRunner().invoke(cli, [str(a) for a in command])
        _one_error_line(res, "cannot be converted to a torch.export program")
    # a model with no conv or linear layer
    sd = tmp_path / "noweights.pt"
    torch.save(build_model(f"{ZOO}:NoWeightsNet", num_classes=10, in_channels=1).state_dict(), sd)
    res = CliRunner().invoke(cli, ["compress", str(sd), "--arch", f"{ZOO}:NoWeightsNet", "--arch-kwargs",
                                   "{in_channels: 1}", "--data", "digits", "--out", str(tmp_path / "n")],
                             catch_exceptions=False)
    _one_error_line(res, "no Conv2d or Linear layer")
    assert not (tmp_path / "e").exists() and not (tmp_path / "c").exists() and not (tmp_path / "n").exists()


def test_a_file_may_name_a_class_but_not_call_a_function(tmp_path):
    """A checkpoint names the code that rebuilds it; that code is imported only when the user
    asks (--arch, --trust-pickle), and a builder function it names is called only when the
    user names it too (a file must not make edgesqueeze call an arbitrary function)."""
    from edgesqueeze.checkpoint import load_model, save_checkpoint
    from edgesqueeze.errors import ModelError
    from edgesqueeze.models import build_model
    from edgesqueeze.models.imports import UntrustedCode

    model = build_model(f"{ZOO}:mobilenet_v2", **KWARGS)
    path = save_checkpoint(tmp_path / "m.pt", model, {"arch": model.arch_name, "arch_kwargs": model.arch_kwargs})
    with pytest.raises(UntrustedCode, match="names your code"):
        load_model(path)
    with pytest.raises(ModelError, match="names the builder function"):
        load_model(path, trust_pickle=True)
    assert load_model(path, arch=f"{ZOO}:mobilenet_v2").model is not None
    evil = save_checkpoint(tmp_path / "evil.pt", torch.nn.Linear(1, 1), {"arch": "os:system",
                                                                         "arch_kwargs": {"command": "true"}})
    with pytest.raises(ModelError, match="names the builder function"):
        load_model(evil, trust_pickle=True)
    res = run("info", evil)  # what the file stores, the code it names not imported
    assert res.exit_code == 0, res.output
    assert "os:system was not imported" in res.output
    _one_error_line(run("eval", evil, "--data", "digits"), "Pass --arch os:system")


def test_inspect_gives_every_forms_input_output_and_layer_kinds(tmp_path):
    """inspect of a TorchScript archive, a .pt2 or a state_dict showed no input or output shape,
    and its ops as 'RecursiveScriptModule x53' or 'Module x33'. Now: the program's own input
    shape (a .pt2), --input-shape's (TorchScript), the output from one run, and the layer
    kinds (a program's aten operators)."""
    forms = save_forms("ConvLinearHead", tmp_path, ("torchscript", "program"))
    conv_count = sum(isinstance(m, torch.nn.Conv2d) for m in build("ConvLinearHead").modules())
    given = ["--input-shape", "1,28,28"]  # your own class records no shape; a .pt2 does
    expect = {"state_dict": given, "torchscript": given, "program": []}
    for form, extra in expect.items():
        path, opts = forms[form]
        res = run("inspect", path, *opts, *extra, "--json")
        assert res.exit_code == 0, (form, res.output)
        desc = json.loads(res.output[res.output.index("{"):])
        assert desc["inputs"][0]["shape"] == [None, 1, 28, 28], (form, desc["inputs"])
        assert desc["outputs"][0]["shape"] == [None, KWARGS.get("num_classes", 10)], (form, desc["outputs"])
        ops = desc["ops"]
        assert not {"RecursiveScriptModule", "Module"} & set(ops), (form, ops)
        assert ops.get("Conv2d", ops.get("conv2d")) == conv_count, (form, ops)
        assert desc["macs"] > 0
        # the program's batch is fixed at 1 (None above is edgesqueeze's reading): said (audit)
        assert ("exported for batch 1 (a static batch)" in desc.get("note", "")) == (form == "program"), desc
    res = run("inspect", forms["torchscript"][0])  # no shape given: said, not shown as None
    assert res.exit_code == 0 and "shape not recorded" in res.output and "--input-shape" in res.output, res.output
    from edgesqueeze.models import build_model  # a registered architecture's state_dict: its spec's shape

    sd = tmp_path / "sd.pt"
    torch.save(build_model("squeezenet_mnist").state_dict(), sd)
    res = run("inspect", sd, "--arch", "squeezenet_mnist", "--json")
    desc = json.loads(res.output[res.output.index("{"):])
    assert desc["inputs"][0]["shape"] == [None, 1, 28, 28] and desc["outputs"][0]["shape"] == [None, 10]


class ConvAppliedTwice(torch.nn.Module):
    """One conv applied twice in a row (weight tying), as some small nets do to save weights."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 48, 3, padding=1)
        self.block = torch.nn.Conv2d(48, 48, 3, padding=1)
        self.fc = torch.nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block(x))
        x = torch.relu(self.block(x))
        return self.fc(x.mean((2, 3)))


def test_a_conv_applied_twice_is_int8_at_both_calls_of_the_tflite_int8_file(tmp_path):
    """The quantizer skipped every call of a conv after its first (its weight node was already
    annotated), so the second call ran in float inside the int8 file: its float weights, a
    dequantize and a quantize. Both calls are int8 now, from one int8 weight tensor."""
    from edgesqueeze.runtime.inspect import inspect_artifact

    torch.manual_seed(0)
    model = ConvAppliedTwice().eval()
    path = _tflite_int8_of(model, tmp_path)
    desc = inspect_artifact(path)
    assert "DEQUANTIZE" not in desc["ops"] or desc["ops"]["DEQUANTIZE"] == 1, desc["ops"]  # the output's only
    weights = [t for t in desc["tensors"] if len(t["shape"]) == 4]
    assert weights and all(t["dtype"] == "int8" for t in weights), weights
    assert path.stat().st_size < sum(p.numel() for p in model.parameters()) * 2  # int8, not float32
    _assert_computes_the_float_model(path, model)


def _tflite_int8_of(model: torch.nn.Module, tmp_path: Path) -> Path:
    """``model``'s tflite-int8 file, exported from its torch.export program on digits."""
    from edgesqueeze.export import ExportConfig, export_artifacts

    program = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 28, 28),)), str(program))
    (path,) = export_artifacts(program, ExportConfig(formats=("tflite-int8",)), tmp_path / "out", dataset="digits",
                               log=lambda _: None)
    return path


def _assert_computes_the_float_model(path: Path, model: torch.nn.Module) -> None:
    """The file's outputs on 64 digits test images are within 10% of the float model's range."""
    import numpy as np

    from edgesqueeze.data import load_dataset
    from edgesqueeze.runtime import load

    ds = load_dataset("digits")
    art = load(path)
    x = ((ds.test_x[:64].astype(np.float32) / 255 - art.meta["mean"][0]) / art.meta["std"][0]).astype(np.float32)
    got = art.predict(x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max(), (np.abs(got - want).max(), np.abs(want).max())


class TiedConvEachWithItsBN(torch.nn.Module):
    """One conv applied twice, each call followed by its own BatchNorm; outputs the features
    pooled 7x7, ten of them (an untrained classifier's logits hardly depend on the image)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 16, 3, 2, 1)
        self.block = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bna = torch.nn.BatchNorm2d(16)
        self.bnb = torch.nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bna(self.block(x)))
        x = torch.relu(self.bnb(self.block(x)))
        return torch.nn.functional.avg_pool2d(x, 7).flatten(1)[:, :10]


class TiedConvBNPair(TiedConvEachWithItsBN):
    """One conv+BatchNorm pair applied twice."""

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bna(self.block(x)))
        x = torch.relu(self.bna(self.block(x)))
        return torch.nn.functional.avg_pool2d(x, 7).flatten(1)[:, :10]


class ConvTappedBeforeItsBN(TiedConvEachWithItsBN):
    """A conv whose output feeds its BatchNorm and, unnormalized, an addition."""

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.block(x)
        x = torch.relu(self.bna(y)) + y
        x = torch.relu(self.bnb(self.block(x)))
        return torch.nn.functional.avg_pool2d(x, 7).flatten(1)[:, :10]


class TiedLinearEachWithItsBN(torch.nn.Module):
    """One Linear applied twice, each call followed by its own BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 16, 3, 2, 1)
        self.block = torch.nn.Linear(16, 16)
        self.bna = torch.nn.BatchNorm1d(16)
        self.bnb = torch.nn.BatchNorm1d(16)

    def forward(self, x):
        x = torch.relu(self.stem(x)).mean((2, 3))
        x = torch.relu(self.bna(self.block(x)))
        return torch.relu(self.bnb(self.block(x)))[:, :10]


@pytest.mark.parametrize("cls", [TiedConvEachWithItsBN, TiedConvBNPair, ConvTappedBeforeItsBN,
                                 TiedLinearEachWithItsBN])
def test_a_conv_applied_twice_with_batchnorms_after_it_folds_each_in_the_tflite_int8_file(tmp_path, cls):
    """PT2E folded each BatchNorm into the one weight both calls read: the second BN was
    dropped (the first's fold served both calls), or the bias folded from it was overwritten
    by zeros, and the file computed something else (a trained digits net: 11%, float 91%).
    Each call gets its own copy of the weight now, and the file computes the float model.
    The same for a Linear applied twice, and for a conv whose output also goes past its BN
    (PT2E folded the BN into what the other reader got too: it now gets its own conv call)."""
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # statistics far from the identity, and unlike each other
        for bn in (model.bna, model.bnb):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 4)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 0.5)
    _assert_computes_the_float_model(_tflite_int8_of(model, tmp_path), model)
