"""Files a user did not make, and files that are not what a command takes: nothing in a model
file runs code unless the user says so, and every refusal is one ``error:`` line, exit 2.

* a torch.export ``.pt2`` whose weights or example inputs need unpickling (``torch.export.load``
  would unpickle them with ``weights_only=False``) is refused without ``--trust-pickle``;
* the code a checkpoint or ``.esq`` names as its architecture is imported only with ``--arch``
  or ``--trust-pickle``; ``info`` shows what the file stores without importing it, ``unpack``
  writes it without importing it;
* an ONNX, TFLite or text file given as a PyTorch model says what it is (never "pass
  --trust-pickle");
* a model returning a tuple, a trace with a fixed batch size and a model for other images are
  named as such by eval, export and verify.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgesqueeze.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def cli_run(*args, cwd: Path | None = None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def one_error(res, *fragments: str, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, res.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


class Touch:
    """Unpickling it creates ``path``: proof that code from the file ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


class Small(nn.Module):
    def __init__(self, channels: int = 1, bias: bool = False, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, stride=2, bias=bias)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _rewrite_pt2(src: bytes, edit) -> bytes:
    """The .pt2 zip ``src`` with ``edit(name, data) -> data`` applied to every member."""
    zin = zipfile.ZipFile(io.BytesIO(src))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return out.getvalue()


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """A clean .pt2, one whose first weight is a pickle, one whose example inputs are."""
    tmp = tmp_path_factory.mktemp("crafted")
    buf = io.BytesIO()
    torch.export.save(torch.export.export(Small().eval(), (torch.zeros(2, 1, 28, 28),)), buf)
    clean = buf.getvalue()
    (tmp / "clean.pt2").write_bytes(clean)
    files = {}
    for where in ("weight", "sample"):
        marker = tmp / f"ran-{where}"
        evil = io.BytesIO()
        torch.save(Touch(marker), evil)
        config = next(n for n in zipfile.ZipFile(io.BytesIO(clean)).namelist()
                      if n.endswith("model_weights_config.json"))
        cfg = json.loads(zipfile.ZipFile(io.BytesIO(clean)).read(config))
        first = next(iter(cfg["config"]))
        target = cfg["config"][first]["path_name"]

        def edit(name, data, where=where):
            if where == "weight" and name == config:
                cfg["config"][first]["use_pickle"] = True
                return json.dumps(cfg).encode()
            if where == "weight" and name.endswith("data/weights/" + target):
                return evil.getvalue()
            if where == "sample" and "data/sample_inputs/" in name:
                return evil.getvalue()
            return data

        path = tmp / f"{where}.pt2"
        path.write_bytes(_rewrite_pt2(clean, edit))
        files[where] = (path, marker)
    return tmp, files


@pytest.mark.parametrize("where", ["weight", "sample"])
@pytest.mark.parametrize("command", ["info", "inspect", "eval", "export"])
def test_a_pt2_that_needs_unpickling_is_refused_without_trust(crafted, where, command, tmp_path):
    _, files = crafted
    path, marker = files[where]
    extra = {"eval": ["--data", "digits", "--limit", "20"], "export": ["--data", "digits", "-f", "onnx",
                                                                       "--out", tmp_path / "x"]}.get(command, [])
    renamed = tmp_path / "model.pt"  # the name does not matter: the bytes do
    renamed.write_bytes(path.read_bytes())
    for candidate in (path, renamed):
        one_error(cli_run(command, candidate, *extra), "pickled Python object", "--trust-pickle")
    assert not marker.exists()
    assert not (tmp_path / "x").exists()


def test_trusting_a_pickled_pt2_runs_its_code_and_a_clean_one_needs_no_trust(crafted):
    """The check refuses what torch.export.load would unpickle, not every program: the clean
    archive loads as it is, and --trust-pickle really does hand the file to torch (the marker)."""
    tmp, files = crafted
    res = cli_run("info", tmp / "clean.pt2", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["kind"] == "exported_program"
    path, marker = files["weight"]
    cli_run("info", path, "--trust-pickle")
    assert marker.exists()


MODULE = """
from pathlib import Path
Path(__file__).with_name("imported").touch()
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
"""


@pytest.fixture()
def named_code(tmp_path):
    """A checkpoint naming ``net.py:Net``, a file that leaves a marker when imported."""
    from edgesqueeze.checkpoint import save_checkpoint

    (tmp_path / "net.py").write_text(MODULE)
    torch.manual_seed(0)
    model = Small(bias=True)
    meta = {"arch": "net.py:Net", "arch_kwargs": {"num_classes": 10, "in_channels": 1}, "dataset": "digits",
            "input_shape": [1, 28, 28], "classes": [str(i) for i in range(10)]}
    save_checkpoint(tmp_path / "model.pt", model, meta)
    return tmp_path, tmp_path / "imported"


def test_a_checkpoint_does_not_make_edgesqueeze_import_the_code_it_names(named_code):
    tmp, marker = named_code
    res = cli_run("info", "model.pt", "--json", cwd=tmp)
    assert res.exit_code == 0, res.output
    desc = json.loads(res.output)
    assert desc["arch"] == "net.py:Net" and "not imported" in desc["note"]
    assert desc["parameters"] == sum(p.numel() for p in Small(bias=True).parameters())
    one_error(cli_run("eval", "model.pt", "--data", "digits", cwd=tmp), "names your code net.py:Net",
              "--arch net.py:Net")
    assert not marker.exists()
    for asked in (["--arch", "net.py:Net"], ["--trust-pickle"]):  # (a file is imported once per process)
        res = cli_run("eval", "model.pt", *asked, "--data", "digits", "--limit", "30", cwd=tmp)
        assert res.exit_code == 0, res.output
    assert marker.exists()


def test_unpack_writes_a_user_model_archive_without_importing_its_code(named_code):
    tmp, marker = named_code
    res = cli_run("compress", "model.pt", "--arch", "net.py:Net", "--data", "digits", "--out", "c",
                  "--no-progress", cwd=tmp)
    assert res.exit_code == 0, res.output
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.esq").write_bytes((tmp / "c" / "model.esq").read_bytes())
    net = tmp / "net.py"
    net.rename(tmp / "away.py")  # unpack needs no code: it writes what the archive stores
    res = cli_run("unpack", "model.esq", "-o", "back.pt", cwd=elsewhere)
    assert res.exit_code == 0, res.output
    one_error(cli_run("unpack", "model.esq", "-o", "back.pt", cwd=elsewhere), "exists", "--force")
    assert cli_run("unpack", "model.esq", "-o", "back.pt", "--force", cwd=elsewhere).exit_code == 0
    from edgesqueeze.checkpoint import stored_weights

    state, meta, _ = stored_weights(elsewhere / "back.pt")
    original = torch.load(tmp / "model.pt", weights_only=True)["state_dict"]
    assert meta["arch"] == "net.py:Net" and state.keys() == original.keys()
    for key, value in original.items():  # lossless compression: the same bits
        assert torch.equal(state[key], value), key
    one_error(cli_run("unpack", tmp / "model.pt"), "not an .esq archive")


@pytest.fixture(scope="module")
def not_torch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("not-torch")
    onnx_like = tmp / "model.onnx"
    onnx_like.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))
    tflite_like = tmp / "model.tflite"
    tflite_like.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    text = tmp / "notes.pt"
    text.write_text("hello\n")
    short = tmp / "abc.pt"
    short.write_bytes(b"abc")
    return {"onnx": (onnx_like, "looks like an ONNX model"), "tflite": (tflite_like, "is a TFLite model"),
            "text": (text, "no zip or pickle header"), "short": (short, "no zip or pickle header")}


@pytest.mark.parametrize("kind", ["onnx", "tflite", "text", "short"])
@pytest.mark.parametrize("command", ["info", "eval", "compress", "export"])
def test_a_file_that_is_not_a_pytorch_model_says_what_it_is(not_torch, kind, command, tmp_path):
    path, fragment = not_torch[kind]
    out = ["--out", tmp_path / "o"] if command in ("compress", "export") else []
    line = one_error(cli_run(command, path, "--data", "digits", *out) if command != "info"
                     else cli_run(command, path), "not a PyTorch model file", fragment)
    assert "trust-pickle" not in line
    assert not (tmp_path / "o").exists()


class Tuple(Small):
    def forward(self, x):
        out = super().forward(x)
        return out, out.softmax(-1)


class FixedBatch(Small):
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)).view(2, -1))


@pytest.fixture(scope="module")
def misfits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("misfits")
    x = torch.zeros(2, 1, 28, 28)
    files = {}
    with torch.no_grad():
        files["tuple"] = (torch.jit.trace(Tuple().eval(), x), "returns a tuple, not one tensor of logits")
        files["fixed_batch"] = (torch.jit.trace(FixedBatch().eval(), x), "runs on a batch of 2 but not of 1")
        files["rgb"] = (torch.jit.script(Small(channels=3).eval()), "does not run on 'digits' images")
    out = {}
    for name, (module, fragment) in files.items():
        path = tmp / f"{name}.pt"
        torch.jit.save(module, str(path))
        out[name] = (path, fragment)
    return out


@pytest.mark.parametrize("case", ["tuple", "fixed_batch", "rgb"])
@pytest.mark.parametrize("command", ["eval", "export", "verify", "compress"])
def test_a_model_that_does_not_give_logits_for_these_images_is_one_line(misfits, case, command, tmp_path):
    path, fragment = misfits[case]
    out = {"export": ["--out", tmp_path / "o"], "compress": ["--out", tmp_path / "o", "--no-progress"],
           "verify": ["--out", tmp_path / "o" / "v.json"]}.get(command, [])
    res = cli_run(command, path, "--data", "digits", "--limit", "20", *out) if command in ("eval", "verify") \
        else cli_run(command, path, "--data", "digits", *out)
    if command == "verify":  # a file that cannot be evaluated is a row with its reason: never a pass
        assert res.exit_code == 2 and fragment in res.output and "Traceback" not in res.output, res.output
    else:
        one_error(res, fragment)
        assert not (tmp_path / "o").exists()


def test_post_training_compression_of_torchscript_with_conv_bias_and_batchnorm(tmp_path):
    """BatchNorm folded into a conv that already had a bias keeps every name the TorchScript
    archive has: the archive must then hold the folded model's skeleton, not the user's (which
    would apply the BatchNorm a second time, on folded weights). The restored model computes
    what the original does."""
    from edgesqueeze.checkpoint import load_model

    torch.manual_seed(0)
    model = Small(bias=True, bn=True)
    with torch.no_grad():  # statistics far from the identity, so applying them twice shows
        model.bn.running_mean.uniform_(-2, 2)
        model.bn.running_var.uniform_(0.2, 4)
        model.bn.weight.uniform_(0.5, 2)
    model.eval()
    path = tmp_path / "bn.script.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    dense = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    res = cli_run("compress", path, "--data", "digits", "--set", f"compress.ptq.target_bytes={dense + 8000}",
                  "--set", "compress.calibration.images=64", "--out", tmp_path / "c", "--no-progress")
    assert res.exit_code == 0, res.output
    restored = load_model(tmp_path / "c" / "model.esq").model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in restored.modules())
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), restored(x)
    assert float((want - got).abs().max()) < 0.1 * float(want.abs().max()), (want - got).abs().max()


def test_other_layer_types_left_raw_are_named(tmp_path):
    """Only Conv2d and Linear weights are pruned and shared: compress says which others stay
    float32 in the archive."""
    class Deconv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3, stride=2)
            self.up = nn.ConvTranspose2d(16, 16, 3)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(self.up(torch.relu(self.conv(x))).mean((2, 3)))

    path = tmp_path / "deconv.pt"
    torch.jit.save(torch.jit.script(Deconv().eval()), str(path))
    res = cli_run("compress", path, "--data", "digits", "--out", tmp_path / "c", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "stay raw float32" in res.output and "up.weight (2,304 values)" in res.output, res.output
    assert "__program__" not in res.output and "conv.weight" not in res.output.split("raw float32")[1]


@pytest.mark.parametrize("layout", ["state_dict", "model", "model_state_dict", "dataparallel", "lightning"])
def test_common_checkpoint_layouts_load_with_arch(layout, tmp_path):
    from edgesqueeze.checkpoint import load_model

    model = Small()
    sd = model.state_dict()
    saved = {"state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd, "optimizer": {"lr": 0.1}},
             "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {}},
             "dataparallel": {f"module.{k}": v for k, v in sd.items()},
             "lightning": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "global_step": 7}}[layout]
    torch.save(saved, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", arch=f"{__name__}:Small")
    for key, value in sd.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_a_dict_that_is_no_state_dict_names_its_keys(tmp_path):
    torch.save({"epoch": 3, "weights_path": "elsewhere.bin"}, tmp_path / "m.pt")
    one_error(cli_run("info", tmp_path / "m.pt"), "with keys 'epoch', 'weights_path'")


def test_scientific_numbers_and_glued_kwargs_in_recipes_and_options(tmp_path):
    from edgesqueeze.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\ntrain: {lr: 1e-3, weight_decay: 5E-4, epochs: 2}\n")
    got = load_recipe(recipe, ["train.momentum=9e-1"]).train
    assert (got.lr, got.weight_decay, got.momentum) == (0.001, 0.0005, 0.9)
    one_error(cli_run("train", "-r", recipe, "--set", "train.epochs=abc", "--out", tmp_path / "t"),
              "--set train.epochs=abc: expected a number")
    one_error(cli_run("eval", tmp_path / "x.pt", "--arch", "squeezenet_mnist", "--arch-kwargs", "{width:24}"),
              "put a space after the colon")


def test_outputs_that_cannot_be_written_are_one_line(tmp_path):
    """A file where a folder should be, a folder where the file should be: the path and why."""
    (tmp_path / "a-file").write_text("")
    res = cli_run("train", "-r", ROOT / "recipes" / "squeezenet-digits.yaml", "--set", "train.epochs=0.02",
                  "--set", "data.limit=200", "--out", tmp_path / "a-file" / "run", "--no-progress")
    one_error(res, "a-file")


def test_a_model_pickled_from_a_script_loads_with_arch_naming_the_script(tmp_path):
    """``torch.save(model)`` in a script records ``__main__.Net``, which no other program has;
    ``--arch script.py:Net`` says where the class is (with --trust-pickle: it is a pickle)."""
    import subprocess

    script = tmp_path / "script.py"
    script.write_text(MODULE.replace('Path(__file__).with_name("imported").touch()', "") + """
if __name__ == "__main__":
    torch.manual_seed(0)
    torch.save(Net(), "whole.pt")
""")
    subprocess.run([sys.executable, script.name], cwd=tmp_path, check=True)
    one_error(cli_run("eval", "whole.pt", "--trust-pickle", "--data", "digits", cwd=tmp_path),
              "pickled from a script (__main__)", "--arch path/to/script.py:Class")
    res = cli_run("eval", "whole.pt", "--trust-pickle", "--arch", "script.py:Net", "--data", "digits",
                  "--limit", "20", "--json", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n"] == 20


def test_a_model_pickled_from_a_module_not_importable_here_loads_with_arch_naming_its_file(tmp_path):
    """``nets.Net`` pickled beside ``nets.py`` and read from another folder: ``--arch
    path/to/nets.py:Net`` was ignored (only ``__main__`` classes were relocated). Its other
    classes (``nets.Block``, a submodule of ``Net``) were not looked up there either, so the
    advice the error gave (pass --arch) failed with the same error."""
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    (src / "nets.py").write_text(MODULE.replace('Path(__file__).with_name("imported").touch()', "") + """

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class Deep(Net):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return super().forward(self.block(x))
""")
    subprocess.run([sys.executable, "-c", "import torch, nets; torch.manual_seed(0); torch.save(nets.Net(), 'whole.pt');"
                    " torch.save(nets.Deep(), 'deep.pt')"], cwd=src, check=True)
    one_error(cli_run("eval", src / "whole.pt", "--trust-pickle", "--data", "digits", cwd=tmp_path),
              "No module named 'nets'", "--arch path/to/file.py:Class")
    for name, cls in (("whole.pt", "Net"), ("deep.pt", "Deep")):
        res = cli_run("eval", src / name, "--trust-pickle", "--arch", f"{src / 'nets.py'}:{cls}", "--data", "digits",
                      "--limit", "20", "--json", cwd=tmp_path)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["n"] == 20


def test_a_run_that_does_not_prune_says_an_old_pruned_pt_is_not_its_own(tmp_path):
    path = tmp_path / "small.pt"
    torch.jit.save(torch.jit.script(Small().eval()), str(path))
    out = tmp_path / "c"
    out.mkdir()
    (out / "pruned.pt").write_bytes(b"from an earlier run")
    res = cli_run("compress", path, "--data", "digits", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "pruned.pt is from an earlier run" in res.output
    assert (out / "pruned.pt").read_bytes() == b"from an earlier run"  # not the user's to lose
