"""The CLI through click's CliRunner, and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgesqueeze.cli import cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--set", "data.limit=300", "--set", "train.epochs=2", "--set", "train.threads=1",
         "--set", "model.kwargs={width_mult: 0.5}", "--no-progress"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = run("train", "--recipe", ROOT / "recipes/squeezenet-digits.yaml", "--out", out, *QUICK)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("args, path", [
    (["train"], "edgesqueeze train"),                         # a missing option
    (["train", "--set"], "edgesqueeze train"),                # an option without its value
    (["verify", "--limit", "0", "m.onnx"], "edgesqueeze verify"),  # a value out of range
    (["bench"], "edgesqueeze bench"),                         # a missing argument
    (["trian"], "edgesqueeze"),                               # an unknown command
    (["--bogus"], "edgesqueeze"),                             # an unknown option of the group
])
def test_a_usage_error_is_one_error_line_pointing_at_help(args, path):
    """click printed four lines ("Usage: ...", "Try ...", a blank, "Error: ..."), unlike every
    other error."""
    res = CliRunner().invoke(cli, args, prog_name="edgesqueeze")
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: ") and lines[0].endswith((f"; see '{path} --help'",
                                                                  f"? (see '{path} --help')")), lines


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["models"], ["info"]])
def test_help_has_an_example(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0
    assert "Example" in res.output or "Start here" in res.output


def test_models_lists_every_architecture():
    res = run("models", "--json")
    rows = json.loads(res.output)
    names = {r["name"] for r in rows}
    assert {"squeezenet1_0", "squeezenet1_1", "squeezenet_mnist", "squeezenet_cifar", "resnet8"} <= names
    assert all(r["params"] > 0 and r["macs"] > 0 for r in rows)
    assert "squeezenet1_0" in run("models").output


def test_train_eval_info(trained):
    assert (trained / "model.pt").is_file() and (trained / "curves.png").is_file()
    res = run("eval", trained / "model.pt", "--json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert metrics["dataset"] == "digits" and metrics["split"] == "test" and 0 <= metrics["accuracy"] <= 1
    saved = torch.load(trained / "model.pt", weights_only=True)
    assert json.loads(saved["meta_json"])["metrics"]["test"]["accuracy"] == metrics["accuracy"]
    res = run("eval", trained / "model.pt", "--split", "val")
    assert res.exit_code == 0 and "digits val: top-1" in res.output
    res = run("info", trained / "model.pt")
    assert res.exit_code == 0 and "squeezenet_mnist" in res.output and "recipe_hash" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "nope.yaml"], "recipe file not found"),
        (["train", "--recipe", ROOT / "recipes/squeezenet-digits.yaml", "--set", "train.epohcs=1"],
         "--set train.epohcs=1: unknown key; did you mean 'epochs'?"),
        (["train", "--recipe", ROOT / "recipes/squeezenet-digits.yaml", "--set", "model.arch=squeezenet2"],
         "unknown model 'squeezenet2'"),
        (["train", "--recipe", ROOT / "recipes/squeezenet-digits.yaml", "--set", "data.dataset=mnits"],
         "mnits"),
        (["eval", "missing.pt"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    res = CliRunner().invoke(cli, [str(a) for a in args] + (["--out", str(tmp_path / "o")] if args[0] == "train"
                                                          else []))
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o" / "model.pt").exists()


@pytest.mark.parametrize("args", [["compress", "{m}", "--out", ""], ["export", "{m}", "--out", ""],
                                  ["verify", "{m}", "--out", ""], ["unpack", "{m}", "-o", ""], ["info", ""],
                                  ["train", "-r", "", "--out", "{d}"], ["eval", "{m}", "--data-dir", " "]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(trained, tmp_path, monkeypatch, args):
    """``Path("")`` is ``.``: ``--out "$DIR"`` with DIR unset wrote into the current folder,
    and ``verify --out ''`` over the default report beside the first file."""
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in trained.iterdir())
    res = CliRunner().invoke(cli, [a.format(m=trained / "model.pt", d=tmp_path / "t") for a in args])
    assert res.exit_code == 2, res.output
    assert "an empty path; name a file or folder" in res.output and "Traceback" not in res.output
    assert not list(tmp_path.iterdir()) and sorted(p.name for p in trained.iterdir()) == before


def test_eval_image_size_the_model_cannot_take_is_refused_before_any_decoding(trained, monkeypatch):
    """--image-size 2000 decoded and cached the whole dataset at that size (3 GB for 800
    MNIST images) before saying the model takes 28x28."""
    import edgesqueeze.evaluation as evaluation

    def no_loading(*args, **kwargs):
        raise AssertionError("the dataset was loaded")

    monkeypatch.setattr(evaluation, "training_data", no_loading)
    res = CliRunner().invoke(cli, ["eval", str(trained / "model.pt"), "--image-size", "64"])
    assert res.exit_code == 2, res.output
    assert "--image-size 64 gives images of 64x64, but" in res.output and "pass --image-size 28" in res.output


def test_eval_limit_of_the_validation_split_takes_images_of_that_split(trained, monkeypatch):
    """`eval --split val --limit 500` limited the dataset to 500 images and carved a new
    validation split from them: 33 of its 50 images were images the model trained on, and at
    most a tenth of N were measured."""
    import edgesqueeze.evaluation as evaluation
    from edgesqueeze.checkpoint import load_model

    seen = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda model, x, y, **kw: seen.append(np.asarray(x)) or real(
        model, x, y, **kw))
    _, _, (val_x, _) = evaluation.training_data(load_model(trained / "model.pt").meta, source="m")
    res = CliRunner().invoke(cli, ["eval", str(trained / "model.pt"), "--split", "val", "--limit", "20"])
    assert res.exit_code == 0 and "(20 images)" in res.output, res.output
    val = {x.tobytes() for x in np.asarray(val_x)}
    assert len(val) > 20 and len(seen[0]) == 20 and all(x.tobytes() in val for x in seen[0])


def test_eval_wrong_dataset_class_count(trained, tmp_path):
    # a 3-class image folder vs a 10-class model
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b", "c"):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("L", (28, 28), color=40 * i).save(d / f"{i}.png")
    res = run("eval", trained / "model.pt", "--dataset", f"imagefolder:{tmp_path / 'folder'}")
    assert res.exit_code == 2
    assert "3 classes" in res.output and "outputs 10" in res.output


def test_real_subprocess_train_on_a_few_hundred_digits(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "edgesqueeze", "train", "--recipe", str(ROOT / "recipes/squeezenet-digits.yaml"),
         "--out", str(out), *QUICK],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and (out / "model.pt").is_file()
    # a second run into the same directory is refused (exit 2) and leaves the first intact
    before = (out / "model.pt").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "edgesqueeze", "train", "--recipe", str(ROOT / "recipes/squeezenet-digits.yaml"),
         "--out", str(out), *QUICK], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "--resume" in proc.stderr
    assert (out / "model.pt").read_bytes() == before


# os.fsync made slow (a slow disk) and announced, so that a signal lands inside an atomic write
_SLOW_FSYNC = ("import os, sys, time\n"
               "fsync = os.fsync\n"
               "def slow(fd):\n    print('FSYNC', flush=True)\n    time.sleep(30)\n    fsync(fd)\n"
               "os.fsync = slow\n"
               "from edgesqueeze.cli import cli\n"
               "cli(prog_name='edgesqueeze')\n")


def test_sigterm_is_an_interrupt_that_removes_its_temporary_file(trained, tmp_path):
    """SIGTERM (a CI runner cancelling a job) ended a command with status 143, no word, and the
    hidden temporary file of the atomic write it was in left behind for good. It now stops the
    command as Ctrl-C does, with one line and status 143; a temporary file a killed run
    (SIGKILL) left is removed by the next run into that folder."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_FSYNC, "export", str(trained / "model.pt"), "-f", "onnx",
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("FSYNC"):
                assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "no write under way"
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated", (proc.returncode, err)
    assert not out.exists()  # neither the model nor a hidden .tmp: the folder it made is gone again
    out.mkdir()
    stale = out / ".model.onnx.k1ll3d9x.tmp"  # what a SIGKILL inside the write leaves
    stale.write_bytes(b"half a model")
    # another tool's temporary file, named as mkstemp names them: not export's to remove (it was)
    others = out / ".notes.txt.ab12cd34.tmp"
    others.write_bytes(b"an editor's save under way")
    res = run("export", trained / "model.pt", "-f", "onnx", "--out", out)
    assert res.exit_code == 0 and f"removed {stale.name}, left by an interrupted write" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == [others.name, "model.onnx"]


@pytest.mark.parametrize("recipe, resumable", [([], False), (["-r", ROOT / "recipes/squeezenet-digits.yaml"], True),
                                               (["--set", "compress.ptq.target_bytes=20000"], False)])
def test_an_interrupt_advises_resume_only_where_a_run_has_epochs(trained, tmp_path, monkeypatch, recipe, resumable):
    """Every interrupted compress advised --resume, a lossless or ptq run too, which has no
    epochs to go on from (and took --resume without a word)."""
    import edgesqueeze.compress.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compress", interrupted)
    res = run("compress", trained / "model.pt", *recipe, "--out", tmp_path / "c", "--resume")
    hint = "interrupted (the same command with --resume goes on from the last finished epoch)"
    assert res.exit_code == 130 and (hint in res.output) == resumable, res.output
    assert ("has no epochs to go on from; it runs from the start" in res.output) != resumable, res.output


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_interrupted_train_with_overwrite_advises_resume_in_its_place(tmp_path, monkeypatch, overwrite):
    """`make demo` trains with --overwrite; Ctrl-C there advised "the same command with
    --resume", which refuses --overwrite ("give one of them")."""
    import edgesqueeze.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgesqueeze.train, "fit", interrupted)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "last.pt").write_bytes(b"state")  # an epoch had finished: there is something to resume
    res = run("train", "-r", ROOT / "recipes/squeezenet-digits.yaml", "--out", tmp_path / "t",
              *(["--overwrite"] if overwrite else []))
    instead = " in place of --overwrite" if overwrite else ""
    assert res.exit_code == 130, res.output
    assert f"interrupted (the same command with --resume{instead} goes on from the last finished epoch)" in res.output


def test_an_export_that_fails_after_some_formats_names_the_files_it_wrote(trained, tmp_path, monkeypatch):
    """A multi-format export failing on a later format kept the earlier files (each whole)
    without a word on which this run wrote. (`-f onnx -f tflite` was tflite alone.)"""
    import edgesqueeze.export.tflite as tflite
    from edgesqueeze.errors import ExportError

    def fails(*args, **kwargs):
        raise ExportError("the converter gave up")

    monkeypatch.setattr(tflite, "export_tflite", fails)
    out = tmp_path / "e"
    res = run("export", trained / "model.pt", "-f", "onnx", "-f", "tflite", "--out", out)  # both, as onnx,tflite
    assert res.exit_code == 2 and "the converter gave up" in res.output, res.output
    assert ("note: written before the export stopped, each file whole: model.onnx; the other formats were not"
            in res.output), res.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    res = run("export", trained / "model.pt", "-f", "", "-f", "", "--out", tmp_path / "none")  # said as given
    assert res.exit_code == 2 and "--format: '' names nothing" in res.output, res.output


def test_state_dict_compressed_with_a_recipe_records_its_normalization(tmp_path):
    """A state_dict (no metadata) compressed with a recipe that names its dataset: the .esq
    records the normalization compress evaluated with, and its exports carry it, so they
    are fed as the model was (a regression: the recipe's dataset once kept compress from
    recording mean/std, and the exports took pixels / 255 unnormalized). An .esq that names
    its dataset but no normalization is exported with the dataset's."""
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.data import load_dataset
    from edgesqueeze.format import container
    from edgesqueeze.models import build_model
    from edgesqueeze.runtime import load

    torch.manual_seed(0)
    sd = tmp_path / "plain.pt"
    torch.save(build_model("squeezenet_mnist", num_classes=10).state_dict(), sd)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: sd\nmodel: {arch: squeezenet_mnist}\ndata: {dataset: digits}\n"
                      "compress: {cluster: {}}\n")
    res = run("compress", sd, "--arch", "squeezenet_mnist", "-r", recipe, "--out", tmp_path / "c", "--no-progress")
    assert res.exit_code == 0, res.output
    ds = load_dataset("digits")
    esq = tmp_path / "c" / "model.esq"
    meta = load_model(esq).meta
    assert meta["mean"] == pytest.approx(ds.mean) and meta["std"] == pytest.approx(ds.std)
    res = run("export", esq, "-f", "onnx", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    spec = load(tmp_path / "e" / "model.onnx").input_spec
    assert spec.mean == pytest.approx(ds.mean) and spec.std == pytest.approx(ds.std)

    archive = container.loads(esq.read_bytes())  # as written before the fix: no mean / std
    old = tmp_path / "old.esq"
    old.write_bytes(container.dumps({k: v for k, v in archive.meta.items() if k not in ("mean", "std")},
                                    [(name, blob, info) for name, (blob, info) in archive.sections.items()]))
    res = run("export", old, "-f", "onnx", "--out", tmp_path / "e2")
    assert res.exit_code == 0, res.output
    spec = load(tmp_path / "e2" / "old.onnx").input_spec
    assert spec.mean == pytest.approx(ds.mean) and spec.std == pytest.approx(ds.std)


def test_verify_takes_a_plain_state_dict_with_arch(tmp_path):
    """A state_dict (no metadata) is the float reference with --arch/--num-classes and --data,
    like eval, compress and export; without --arch its row is an error naming the option."""
    from edgesqueeze.models import build_model

    torch.manual_seed(0)
    sd = tmp_path / "plain.pt"
    torch.save(build_model("squeezenet_mnist", num_classes=10).state_dict(), sd)
    out = tmp_path / "v.json"
    res = run("verify", sd, "--arch", "squeezenet_mnist", "--num-classes", 10, "--data", "digits",
              "--limit", 60, "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    (row,) = report["artifacts"]
    assert row["format"] == "pt" and row["error"] is None and row["n"] == 60 and row["agreement"] == 1.0
    assert report["reference"] == str(sd)
    assert report["machine"]["arch"] and "int8_kernels" in report["machine"]  # what it ran on
    assert "int8 kernels:" in (tmp_path / "v.md").read_text()
    res = run("verify", sd, "--arch", "squeezenet_mnist", "--num-classes", 10, "--data", "digits",
              "--limit", 20, "--out", f"{tmp_path / 'reports'}/")  # a folder: verify.json in it
    assert res.exit_code == 0 and json.loads((tmp_path / "reports" / "verify.json").read_text())["artifacts"]
    assert (tmp_path / "reports" / "verify.md").is_file()
    res = run("verify", sd, "--arch", "squeezenet_mnist", "--num-classes", 10, "--data", "digits",
              "--limit", 20, "--out", tmp_path / "v.json" / "x.json")  # under a file: refused before evaluating
    assert res.exit_code == 2 and "is a file, not a folder" in res.output and len(res.output.strip().splitlines()) == 1
    res = run("verify", sd, "--data", "digits", "--limit", 60, "--out", out)
    assert res.exit_code == 2
    assert "pass --arch" in res.output
    res = run("verify", sd, "--num-classes", 10, "--data", "digits", "--out", out)
    assert res.exit_code == 2 and "give --arch too" in res.output


def test_a_limited_verify_measures_no_drop_against_the_whole_test_splits_accuracy(trained, tmp_path):
    """Audit: `verify model.onnx --limit 50 --max-drop 0.5` judged the 50 images' accuracy
    against the 98.61% the file recorded on all 359, and FAILED "0 of 50 test images"."""
    exp = tmp_path / "e"
    assert run("export", trained / "model.pt", "-f", "onnx", "--out", exp).exit_code == 0
    out = tmp_path / "v.json"
    res = run("verify", exp / "model.onnx", "--limit", 50, "--max-drop", "0.5", "--out", out)
    assert res.exit_code == 2 and "no drop is measured" in res.output, res.output
    (row,) = json.loads(out.read_text())["artifacts"]
    assert row["n"] == 50 and row["reference_accuracy"] is None
    res = run("verify", trained / "model.pt", exp / "model.onnx", "--limit", 50, "--max-drop", "0.5", "--out", out)
    assert res.exit_code == 0 and "no drop is measured" not in res.output, res.output  # measured on the same 50
    res = run("verify", exp / "model.onnx", "--max-drop", "0.5", "--out", out)  # all the images: the recorded one
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["artifacts"]
    assert row["reference_accuracy"] is not None and row["n"] > 50


def test_bench_says_when_its_runtimes_ran_on_their_own_thread_counts(trained, tmp_path):
    """Audit: without --threads, onnxruntime took a thread per core, LiteRT 1 and PyTorch its
    own, with nothing in the table but ratios between them ("vs first")."""
    exp = tmp_path / "e"
    assert run("export", trained / "model.pt", "-f", "onnx", "--out", exp).exit_code == 0
    files = (trained / "model.pt", exp / "model.onnx")
    res = run("bench", *files, "-b", 1, "--runs", 2, "--warmup", 0)
    assert res.exit_code == 0 and "threads: each runtime's default" in res.output, res.output
    res = run("bench", *files, "-b", 1, "--runs", 2, "--warmup", 0, "--threads", 1)
    assert res.exit_code == 0 and "threads: each runtime's default" not in res.output, res.output


def test_info_gives_the_weight_density_pruning_reports_beside_the_density_of_all_parameters(tmp_path):
    """Audit: `info pruned.pt` printed density 0.2165 (every parameter, biases and BatchNorm
    included) beside metrics.density 0.2013 (conv and linear weights) with one label."""
    from edgesqueeze.evaluation import describe_file
    from edgesqueeze.models import build_model

    torch.manual_seed(0)
    model = build_model("squeezenet_mnist", num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    sd = tmp_path / "half.pt"
    torch.save(model.state_dict(), sd)
    info = describe_file(sd, arch="squeezenet_mnist")
    weights = [p for p in model.parameters() if p.dim() >= 2]
    want = sum(int((p != 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert info["weight_density"] == round(want, 4) and 0.45 < want < 0.55
    params = list(model.parameters())
    assert info["density"] == round(sum(int((p != 0).sum()) for p in params) / sum(p.numel() for p in params), 4)
    res = run("info", sd, "--arch", "squeezenet_mnist")
    assert res.exit_code == 0 and f"weight_density: {round(want, 4)}" in res.output, res.output


_DATA_DEPENDENT = """
import torch
from torch import nn


class Untraceable(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.c2(x) if x.sum() > 0 else self.c2(-x)  # data-dependent: torch.export cannot trace it
        return self.fc(x.mean((2, 3)))
"""


def test_export_of_a_model_torch_export_cannot_trace_is_one_line_with_what_to_do(tmp_path):
    """torch.export sets up its own log handlers during a trace, bound to the real stderr: a
    warning and the partial graph (about 40 lines, twice) came before the error line."""
    (tmp_path / "untr.py").write_text(_DATA_DEPENDENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import untr; "
            f"torch.save(untr.Untraceable().state_dict(), {str(tmp_path / 'sd.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    proc = subprocess.run(
        [sys.executable, "-m", "edgesqueeze", "export", str(tmp_path / "sd.pt"), "--arch",
         f"{tmp_path / 'untr.py'}:Untraceable", "--data", "digits", "-f", "onnx", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: torch.export cannot trace Untraceable") and "torch.where" in lines[0]


def test_no_command_prints_the_help_as_it_is():
    """`edgesqueeze` alone printed its whole help as one `error: Usage: ...` line and 33 more,
    the last cut off ("... through their own; see 'edgesqueeze --help'")."""
    res = CliRunner().invoke(cli, [])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("Usage: ") and "[OPTIONS] COMMAND" in res.output.splitlines()[0], res.output
    assert "error:" not in res.output, res.output
    assert "  verify  " in res.output and "; see 'edgesqueeze --help'" not in res.output
