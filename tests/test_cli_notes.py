"""An option the command does not use is said, not silently dropped: ``--arch`` given for a
TorchScript archive or a ``.pt2`` (which carry their own code), or for a checkpoint that
records another architecture, prints one ``note:`` line; the command still runs. An exported
file does not record an ``--arch`` that did not build the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgesqueeze.cli import cli


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def notes(res) -> list[str]:
    return [line for line in res.output.splitlines() if line.startswith("note:")]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("notes")
    net = Small().eval()
    x = torch.zeros(2, 1, 28, 28)
    out = {"ts": tmp / "net.ts.pt", "pt2": tmp / "net.pt2"}
    torch.jit.save(torch.jit.script(net), str(out["ts"]))
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), str(out["pt2"]))
    return out


@pytest.mark.parametrize("kind", ["ts", "pt2"])
def test_arch_for_a_program_is_a_note_and_the_file_still_evaluates(files, kind):
    plain = run("eval", files[kind], "--data", "digits", "--limit", "40")
    assert plain.exit_code == 0, plain.output
    assert not any("--arch" in n for n in notes(plain)), plain.output
    res = run("eval", files[kind], "--data", "digits", "--limit", "40", "--arch", "squeezenet_mnist")
    assert res.exit_code == 0, res.output
    said = [n for n in notes(res) if "squeezenet_mnist" in n]
    assert len(said) == 1, res.output
    assert str(files[kind]) in said[0] and "not used" in said[0], said[0]
    # the same numbers: the file's own model ran, not a squeezenet
    acc = [line for line in plain.output.splitlines() if "top-1" in line]
    assert acc and acc == [line for line in res.output.splitlines() if "top-1" in line]


def test_export_of_a_program_does_not_record_an_arch_that_did_not_build_it(files, tmp_path):
    res = run("export", files["ts"], "--data", "digits", "-f", "onnx", "--out", tmp_path,
              "--arch", "squeezenet_mnist")
    assert res.exit_code == 0, res.output
    import onnx

    (path,) = tmp_path.glob("*.onnx")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta = json.loads(next(v for k, v in props.items() if "edgesqueeze" in k))
    assert meta["arch"] is None, meta


def test_bench_says_it_does_not_use_mean_std_or_classes(files):
    """They were accepted and dropped without a word; a timing does not depend on them."""
    args = ("bench", files["ts"], "--input-shape", "1,28,28", "--runs", "2", "--warmup", "0", "-b", "1")
    plain = run(*args)
    assert plain.exit_code == 0 and not notes(plain), plain.output
    res = run(*args, "--mean", "0.5", "--std", "0.25")
    said = [n for n in notes(res) if "--mean, --std" in n]
    assert res.exit_code == 0 and len(said) == 1 and "bench does not use them" in said[0], res.output


def test_arch_other_than_the_checkpoints_own_is_a_note(tmp_path):
    from edgesqueeze.checkpoint import save_checkpoint
    from edgesqueeze.models import build_model

    torch.manual_seed(0)
    net = build_model("squeezenet_mnist")
    model = save_checkpoint(tmp_path / "m.pt", net, {"arch": net.arch_name, "arch_kwargs": net.arch_kwargs,
                                                     "dataset": "digits"})
    same = run("eval", model, "--data", "digits", "--limit", "40", "--arch", "squeezenet_mnist")
    assert same.exit_code == 0, same.output
    assert not [n for n in notes(same) if "--arch" in n], same.output
    res = run("eval", model, "--data", "digits", "--limit", "40", "--arch", "resnet8")
    assert res.exit_code == 0, res.output
    (note,) = [n for n in notes(res) if "resnet8" in n]
    assert "squeezenet_mnist" in note and os.fspath(model) in note, note


@pytest.mark.parametrize("kind", ["ts", "pt2"])
def test_a_program_exports_without_torchs_own_warnings(files, kind, tmp_path):
    """Every copy of a lifted TorchScript / .pt2 model deep-copies torch's pytree specs, which
    printed torch's "`isinstance(treespec, LeafSpec)` is deprecated" FutureWarning (two lines,
    a path into copyreg.py) in the middle of the command's output."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-m", "edgesqueeze", "export", str(files[kind]), "--data", "digits",
                          "-f", "onnx", "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and "copyreg" not in res.stderr, res.stderr


def test_eval_of_a_three_channel_model_on_gray_images_repeats_the_channel(tmp_path):
    """A 3-channel model evaluated on digits (1 channel, 28x28) once told the user to "pass
    --image-size 28", which changes nothing; now the gray channel is repeated, with a note."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    path = tmp_path / "rgb.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 28, 28),)), str(path))
    res = run("eval", path, "--data", "digits", "--limit", "20", "--input-shape", "3,28,28")
    assert res.exit_code == 0, res.output
    assert "note: dataset 'digits' is grayscale" in res.output and "top-1" in res.output


def test_eval_of_a_gray_model_on_colour_images_makes_them_gray_as_run_does(tmp_path):
    """The other way round (colour images, a 1-channel model) was refused with one error line
    about channels; since session 37 each image is made gray as `edgesqueeze run` makes a
    colour file for such a model (Pillow's convert("L")), with a note, never an --image-size
    hint."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for where in ("rgb", "gray"):
            (tmp_path / where / cls).mkdir(parents=True)
        for i in range(5):
            img = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
            img.save(tmp_path / "rgb" / cls / f"{i}.png")
            img.convert("L").save(tmp_path / "gray" / cls / f"{i}.png")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    path = tmp_path / "gray.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 28, 28),)), str(path))
    res = run("eval", path, "--data", f"imagefolder:{tmp_path / 'rgb'}", "--input-shape", "1,28,28",
              "--mean", "0.5", "--std", "0.25")
    assert res.exit_code == 0, res.output
    assert "has colour images and" in res.output and "each is converted to gray" in res.output
    assert "--image-size" not in res.output
    same = run("eval", path, "--data", f"imagefolder:{tmp_path / 'gray'}", "--input-shape", "1,28,28",
               "--mean", "0.5", "--std", "0.25")
    assert same.exit_code == 0, same.output
    score = [ln.split(" test: ", 1)[1] for ln in (res.output + same.output).splitlines() if " test: top-1" in ln]
    assert len(score) == 2 and score[0] == score[1], score  # the same images, made gray here or stored gray
