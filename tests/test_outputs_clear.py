"""No command writes over what it reads, and bad input is refused before an earlier run's
files are removed or the work starts. Each case was found by an audit of the CLI with
real files: verify's report written over the model it scored, check deleting its
--reference before reading it, compress removing the last run's results and then failing
on a misspelt layer. Real files on disk, the real CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgesqueeze.cli import cli
from edgesqueeze.recipe import recipe_from_dict
from edgesqueeze.train import fit

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes/squeezenet-digits.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small trained digits model and its fp32 ONNX export."""
    out = tmp_path_factory.mktemp("model")
    recipe = recipe_from_dict({
        "version": 1, "seed": 0, "output_dir": str(out),
        "model": {"arch": "squeezenet_mnist", "kwargs": {"width_mult": 0.5}},
        "data": {"dataset": "digits", "limit": 400, "val_fraction": 0.2},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "threads": 1},
    })
    fit(recipe, progress=False, log=lambda _: None)
    res = CliRunner().invoke(cli, ["export", str(out / "model.pt"), "-f", "onnx", "--out", str(out / "export")])
    assert res.exit_code == 0, res.output
    return out / "model.pt", out / "export" / "model.onnx"


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copies(files, tmp_path):
    pt, onnx = (Path(shutil.copy(f, tmp_path / f.name)) for f in files)
    return pt, onnx


@pytest.mark.parametrize("case", ["verify-out", "verify-recipe", "bench-json", "check-reference", "check-report",
                                  "check-twice"])
def test_no_output_replaces_an_input(files, tmp_path, case):
    pt, onnx = _copies(files, tmp_path)
    recipe = Path(shutil.copy(DIGITS, tmp_path / "r.yaml"))
    report = tmp_path / "report.json"
    if case == "check-report":
        res = _run("verify", pt, onnx, "--limit", "20", "--out", report)
        assert res.exit_code == 0, res.output
    args, message = {
        "verify-out": (["verify", onnx, "--limit", "20", "--out", onnx], "--out {onnx}: is also an input"),
        "verify-recipe": (["verify", onnx, "--limit", "20", "-r", recipe, "--out", recipe],
                          "--out {recipe}: is also an input (--recipe)"),
        "bench-json": (["bench", onnx, "--runs", "1", "-b", "1", "--json", onnx], "--json {onnx}: is also an input"),
        "check-reference": (["check", onnx, "--reference", pt, "--min-accuracy", "0.5", "--json", pt],
                            "--json {pt}: is also an input (--reference)"),
        "check-report": (["check", report, "--min-accuracy", "0.5", "--markdown", report],
                         "--markdown {report}: is also an input"),
        "check-twice": (["check", onnx, "--min-accuracy", "0.5", "--json", tmp_path / "o", "--junit", tmp_path / "o"],
                        "--json and --junit both name"),
    }[case]
    before = {p: _digest(p) for p in (pt, onnx, recipe) + ((report,) if report.exists() else ())}
    res = _run(*args)
    assert res.exit_code == 2, res.output
    assert message.format(onnx=onnx, recipe=recipe, pt=pt, report=report) in res.output, res.output
    assert "Traceback" not in res.output
    assert {p: _digest(p) for p in before} == before  # every input as it was
    assert not (tmp_path / "o").exists()


def test_train_does_not_write_over_its_recipe_and_checks_its_outputs_first(tmp_path):
    run = tmp_path / "t"
    run.mkdir()
    recipe = Path(shutil.copy(DIGITS, run / "recipe.json"))  # YAML is JSON's superset: a recipe named so
    before = _digest(recipe)
    res = _run("train", "-r", recipe, "--out", run, "--set", "train.epochs=0.05")
    assert res.exit_code == 2 and f"{run}/recipe.json: is also an input (--recipe)" in res.output, res.output
    assert _digest(recipe) == before
    (tmp_path / "u" / "summary.json").mkdir(parents=True)  # a folder in the way: said before training
    res = _run("train", "-r", DIGITS, "--out", tmp_path / "u", "--set", "train.epochs=0.05", "--no-progress")
    assert res.exit_code == 2 and "summary.json: cannot write: a folder is in the way" in res.output, res.output
    assert "epoch" not in res.output and not (tmp_path / "u" / "last.pt").exists()
    res = _run("train", "-r", DIGITS, "--set", "name=../escaped", "--set", "train.epochs=0.05")
    assert res.exit_code == 2 and "'../escaped' is not a plain name" in res.output, res.output


def test_compress_checks_layer_names_and_outputs_before_removing_the_last_run(files, tmp_path):
    pt, _ = files
    out = tmp_path / "c"
    out.mkdir()
    earlier = {name: f"earlier {name}" for name in ("model.esq", "report.json", "report.md")}
    for name, text in earlier.items():
        (out / name).write_text(text)
    res = _run("compress", pt, "-r", DIGITS, "--out", out, "--no-progress",
               "--set", "compress.prune.layers={nosuch: 0.5}")
    assert res.exit_code == 2 and "compress.prune.layers.nosuch: no Conv2d or Linear layer" in res.output, res.output
    assert {n: (out / n).read_text() for n in earlier} == earlier  # the last run's results kept
    (tmp_path / "d" / "report.md").mkdir(parents=True)
    res = _run("compress", pt, "-r", DIGITS, "--out", tmp_path / "d", "--no-progress")
    assert res.exit_code == 2 and "report.md: cannot write: a folder is in the way" in res.output, res.output
    assert "[float]" not in res.output and not (tmp_path / "d" / "model.esq").exists()


def test_export_checks_every_output_and_the_data_before_the_first_file(files, tmp_path):
    pt, _ = files
    out = tmp_path / "e"
    (out / "model.int8.onnx").mkdir(parents=True)
    (out / "model.onnx").write_text("earlier")
    res = _run("export", pt, "-f", "onnx,onnx-int8", "--out", out)
    assert res.exit_code == 2 and "model.int8.onnx: cannot write: a folder is in the way" in res.output, res.output
    assert (out / "model.onnx").read_text() == "earlier"
    res = _run("export", pt, "-f", "onnx,onnx-int8", "--out", tmp_path / "f", "--data", "digts")
    assert res.exit_code == 2 and "unknown dataset 'digts' (did you mean 'digits'?)" in res.output, res.output
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("case", ["export", "export-recipe", "sensitivity", "compress-recipe"])
def test_an_output_that_links_to_an_input_is_refused(files, tmp_path, case):
    """An output file that is a symbolic link to an input got the input written over (atomic
    writes replace the file a link names), exit 0: export's packed file over its model.esq,
    sensitivity.png over the model, compress's report.md over the recipe."""
    pt, _ = files
    pt = Path(shutil.copy(pt, tmp_path / "model.pt"))
    recipe = Path(shutil.copy(DIGITS, tmp_path / "recipe.yaml"))
    out = tmp_path / "out"
    out.mkdir()
    output, target, args, message = {
        "export": ("model.onnx", pt, ["export", pt, "-f", "onnx"], "is also an input (the model"),
        "export-recipe": ("model.onnx", recipe, ["export", pt, "-f", "onnx", "-r", recipe],
                          "is also an input (--recipe"),
        "sensitivity": ("sensitivity.png", pt, ["sensitivity", pt, "--sparsities", "0.5", "--layers", "classifier.1"],
                        "is also an input (the model"),
        "compress-recipe": ("report.md", recipe, ["compress", pt, "-r", recipe, "--no-progress"],
                            "report.md there is the recipe compress reads"),
    }[case]
    (out / output).symlink_to(Path("..") / target.name)
    before = {p: _digest(p) for p in (pt, recipe)}
    res = _run(*args, "--out", out)
    assert res.exit_code == 2 and message in res.output, res.output
    assert {p: _digest(p) for p in before} == before
    assert sorted(p.name for p in out.iterdir()) == [output]


@pytest.mark.parametrize("args, message", [
    (["verify", "{onnx}", "--data", "nosuch", "--out", "{tmp}/v.json"], "unknown dataset 'nosuch'"),
    (["eval", "{pt}", "--data", ""], "unknown dataset ''"),
    (["eval", "{pt}", "--data", "imagefolder:"], "dataset 'imagefolder:' needs a path"),
    (["eval", "{pt}", "--mean", "nan", "--limit", "5"], "give one finite number per channel"),
    (["eval", "{pt}", "--std", "inf", "--limit", "5"], "give one finite positive number per channel"),
    (["sensitivity", "{pt}", "--max-drop", "nan", "--out", "{tmp}/s"], "'nan' is not a number"),
    (["bench", "{onnx}", "-b", "1", "-b", "100000000000", "--runs", "1"], "does not fit in memory"),
])
def test_bad_values_are_usage_errors_before_any_work(files, tmp_path, args, message):
    pt, onnx = files
    res = _run(*[a.format(pt=pt, onnx=onnx, tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output, res.output
    assert "timing batch" not in res.output and not list(tmp_path.iterdir())


def test_a_pt_file_with_a_changed_byte_is_refused(files, tmp_path):
    """torch.load does not check a zip member's CRC-32: a flipped byte in a weight loaded and
    scored."""
    pt, _ = files
    bad = Path(shutil.copy(pt, tmp_path / "flip.pt"))
    with zipfile.ZipFile(bad) as zf:
        member = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(bad.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len + 8] ^= 0x10  # inside the tensor's bytes
    bad.write_bytes(bytes(data))
    for command in (["eval", bad, "--limit", "5"], ["info", bad], ["export", bad, "-f", "onnx", "--out", tmp_path / "x"]):
        res = _run(*command)
        assert res.exit_code == 2, res.output
        assert f"its member {member.filename} fails its CRC-32 check" in res.output, res.output
    assert _run("eval", pt, "--limit", "5").exit_code == 0


def test_a_pipe_is_named_as_one_and_a_reseal_of_a_misnamed_file_is_refused(files, tmp_path):
    """``inspect <(cat model.onnx)`` said "no such file" (run: "not the bytes exported"; unpack
    and bench: a damaged file, "copy the file again"), and
    reseal said a TFLite file named .onnx "already matches" where run refuses it."""
    import os

    _, onnx = files
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # unpack and bench read a file's first bytes to tell its kind, then the file again: from a
    # pipe the second read got later bytes, and a good file was called damaged
    for command in (["inspect", fifo], ["info", fifo], ["run", fifo, onnx], ["verify", fifo, "--out", tmp_path / "v.json"],
                    ["unpack", fifo, "-o", tmp_path / "u.onnx"], ["bench", fifo, "--runs", "1"]):
        res = _run(*command)
        assert res.exit_code == 2 and "is a pipe or a device, not a file" in res.output, (command, res.output)
    tflite = tmp_path / "m.tflite"
    res = _run("export", files[0], "-f", "tflite", "--out", tmp_path / "t")
    assert res.exit_code == 0, res.output
    shutil.copy(tmp_path / "t" / "model.tflite", tmp_path / "wrong.onnx")
    res = _run("reseal", tmp_path / "wrong.onnx")
    assert res.exit_code == 2 and "holds a TFLite model" in res.output, res.output
    assert not tflite.exists()
    res = _run("eval", files[0], "--device", " ")
    assert res.exit_code == 2 and "an empty device" in res.output, res.output


@pytest.mark.parametrize("command", ["verify", "sensitivity"])
def test_a_run_stopped_after_its_first_file_leaves_no_earlier_report_beside_it(files, tmp_path, monkeypatch, command):
    """verify wrote verify.json, then the markdown and plots; sensitivity its json, md, png.
    Interrupted or stopped by a full disk in between, the new JSON sat beside the previous
    run's markdown and plots. An earlier run's report files are removed before the work."""
    import edgesqueeze._io as io
    import edgesqueeze.verify_report as verify_report
    from edgesqueeze.errors import OutputError

    pt, onnx = files
    out = tmp_path / "out"
    out.mkdir()
    if command == "verify":
        names = ["verify.json", "verify.md", "size_by_format.png", "accuracy_vs_size.png"]
        args = ["verify", pt, onnx, "--limit", "20", "--out", out / "verify.json"]

        def full(*a, **k):  # the disk fills after the JSON
            raise OutputError(f"{out}/verify.md: cannot write (No space left on device)")

        monkeypatch.setattr(verify_report, "write_report", full)
    else:
        names = ["sensitivity.json", "sensitivity.md", "sensitivity.png"]
        args = ["sensitivity", pt, "--sparsities", "0.5", "--layers", "classifier.1", "--out", out]
        write = io.write_bytes_atomic

        def full(path, data):
            if str(path).endswith(".md"):
                raise OutputError(f"{path}: cannot write (No space left on device)")
            write(path, data)

        monkeypatch.setattr(io, "write_bytes_atomic", full)
    for name in names:
        (out / name).write_text("an earlier run's")
    res = _run(*args)
    assert res.exit_code == 2 and "No space left on device" in res.output, res.output
    left = {p.name: p.read_bytes() for p in out.iterdir()}
    assert list(left) == [names[0]] and left[names[0]] != b"an earlier run's", left


@pytest.mark.parametrize("name", ["model.int8.tflite.esq", "model.esq", "model.pt"])
def test_an_empty_file_says_what_to_do_in_every_command(tmp_path, name):
    """unpack, inspect, bench, info and export said only "X: empty file"; run said to re-export
    it or copy it again. Every command now says what to do, in one line."""
    empty = tmp_path / name
    empty.write_bytes(b"")
    for command in (["unpack", empty, "-o", tmp_path / "u"], ["inspect", empty], ["bench", empty, "--runs", "1"],
                    ["info", empty], ["export", empty, "-f", "onnx", "--out", tmp_path / "x"],
                    ["eval", empty, "--data", "digits", "--limit", "5"]):
        res = _run(*command)
        said = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(said) == 1, (command, res.output)
        assert f"{empty}: file is empty (0 bytes);" in said[0] and "again" in said[0], (command, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_damaged_checkpoint_archive_says_what_to_do_in_every_command(tmp_path):
    """info, eval and export of a .esq with a flipped byte said what was wrong but not what to
    do, where unpack, inspect, bench and run said to copy the file again."""
    data = bytearray((Path(__file__).parent / "data" / "v2-small.esq").read_bytes())
    data[len(data) // 2] ^= 0x04
    bad = tmp_path / "flip.esq"
    bad.write_bytes(bytes(data))
    for command in (["info", bad], ["eval", bad, "--data", "digits", "--limit", "5"],
                    ["export", bad, "-f", "onnx", "--out", tmp_path / "x"], ["unpack", bad, "-o", tmp_path / "u.pt"]):
        res = _run(*command)
        said = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(said) == 1, (command, res.output)
        assert said[0].startswith(f"error: {bad}: ") and said[0].endswith(
            "a damaged or cut copy: copy the file again, or write it again"), (command, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flip.esq"]


def test_verify_on_another_dataset_measures_no_drop_against_the_recorded_accuracy(files, tmp_path):
    """verify --data mnist of a digits model's file paired its MNIST accuracy with the float
    model's recorded digits accuracy, and check --max-drop then failed it by ~60 points (or
    passed an equal mix). As with --limit, no drop is measured from a number of other images."""
    _, onnx = files
    out = tmp_path / "v.json"
    res = _run("verify", onnx, "--data", "mnist", "--limit", "50", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["artifacts"][0]
    assert row["reference_accuracy"] is None and row["n"] == 50, row
    assert (f"note: {onnx}: the float model's recorded accuracy" in res.output
            and "is on digits, not mnist (--data), so no drop is measured" in res.output), res.output
    res = _run("verify", onnx, "--limit", "50", "--out", out, "--no-progress")  # its own dataset: the same note
    assert "is on digits, not" not in res.output, res.output


def test_a_reference_that_is_not_the_files_model_is_said(files, tmp_path):
    """verify took any .pt as the reference without a word: agreement 33.7% and a drop of
    -65.7 points (a PASS of --max-drop 3) against a 2-epoch model the files never came from.
    The files record their float model's test accuracy: a reference far from it is named."""
    from edgesqueeze.checkpoint import save_state, stored_weights

    pt, onnx = files
    state, meta, _ = stored_weights(pt)
    for name in state:  # another model: the same architecture, its classifier turned around
        if name.endswith("weight") and state[name].dim() == 4 and state[name].shape[0] == 10:
            state[name] = -state[name]
    other = tmp_path / "other.pt"
    save_state(other, state, meta)
    res = _run("verify", other, onnx, "--out", tmp_path / "v.json", "--no-progress")
    assert res.exit_code == 0, res.output
    assert f"note: {onnx} records its float model at" in res.output and (
        f"but the reference {other} scores") in res.output and "is it the model this file came from?" in res.output
    res = _run("verify", pt, onnx, "--out", tmp_path / "w.json", "--no-progress")
    assert res.exit_code == 0 and "is it the model" not in res.output, res.output


def test_a_prune_only_archive_larger_than_xz_says_what_to_add(files, tmp_path):
    """A recipe with pruning and no weight sharing wrote an .esq larger than xz of the same
    weights (75 KB against 60 KB: one codebook entry per non-zero) without a word; and the
    outputs line left out weights_histogram.png, which compress writes."""
    pt, _ = files
    res = _run("compress", pt, "-r", "recipes/squeezenet-digits.yaml", "--set", "compress.cluster=null",
               "--set", "compress.cluster_finetune=null", "--set", "compress.prune_finetune.epochs=0.1",
               "--out", tmp_path / "c", "--no-progress")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    esq, xz = report["totals"]["esq_bytes"], report["baselines"]["xz_9e"]
    said = f"note: without weight sharing the .esq ({esq:,} B) is larger than xz -9e of the same weights ({xz:,} B)"
    assert (said in res.output) == (esq > xz), res.output
    assert esq > xz  # what the note is for: a pruned, unshared layer
    assert f"outputs: {tmp_path / 'c'}/ (model.esq, report.md, report.json, accuracy_vs_size.png, " \
           "weights_histogram.png)" in res.output


def test_a_classes_file_in_the_output_folder_is_never_replaced(files, tmp_path):
    """export --classes @ex/model.onnx --out ex said "held an earlier export's model.onnx:
    removed" and replaced the class list; compress did the same to a report.md class list."""
    pt, _ = files
    for command, name in ((["export", pt, "-f", "onnx", "--out", tmp_path / "ex"], "ex/model.onnx"),
                          (["compress", pt, "--out", tmp_path / "c"], "c/report.md")):
        names = tmp_path / name
        names.parent.mkdir()
        names.write_text("\n".join(str(i) for i in range(10)) + "\n")
        res = _run(*command, "--classes", f"@{names}")
        assert res.exit_code == 2 and "is also an input (--classes" in res.output, (command, res.output)
        assert names.read_text().startswith("0\n1\n") and sorted(p.name for p in names.parent.iterdir()) == [
            names.name]
