"""Progress bars over test images (``verify``, ``check``, ``eval``: --progress/--no-progress):
drawn on standard error, per file, without changing a single score."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _shared_fixture import half_width_digits  # noqa: E402

from edgesqueeze.cli import cli  # noqa: E402


def _recorder():
    """A progress factory (:mod:`edgesqueeze._progress`) that records its bars' labels, totals and updates."""
    bars = []

    @contextlib.contextmanager
    def factory(label, total):
        bars.append((label, total, []))
        yield bars[-1][2].append

    return factory, bars


def test_runtime_scores_in_parts_are_the_scores_of_one_call(tmp_path):
    """A real onnxruntime session over 1,100 images: in parts of whole batches, with a bar's
    updates adding up to every image, the scores are those of one predict_images call."""
    from edgesqueeze import runtime
    from edgesqueeze.verify import _PART, _runtime_scores

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    art = runtime.load(path)
    x = np.random.default_rng(0).integers(0, 256, (2 * _PART + 76, 1, 8, 8), dtype=np.uint8)
    factory, bars = _recorder()
    scores = _runtime_scores(art, x, path, factory)
    np.testing.assert_array_equal(scores, art.predict_images(x))
    assert bars == [("tiny.onnx", len(x), [_PART, _PART, 76])]
    np.testing.assert_array_equal(_runtime_scores(art, x), scores)  # no bar: the same
    assert _runtime_scores(art, x[:0]).shape[0] == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return half_width_digits(tmp_path_factory)


def test_verify_draws_a_bar_per_file_on_stderr_and_the_report_is_the_same(model, tmp_path):
    runs = {}
    for flag in ("--progress", "--no-progress"):
        out = tmp_path / flag.strip("-") / "verify.json"
        res = CliRunner().invoke(cli, ["verify", str(model), "--out", str(out), flag], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        runs[flag] = (res, json.loads(out.read_text())["artifacts"])
    shown, quiet = runs["--progress"][0], runs["--no-progress"][0]
    # off a terminal click draws a bar as its label alone, once
    assert "model.pt" in shown.stderr.splitlines() and "model.pt" not in quiet.stderr.splitlines(), shown.stderr
    assert "model.pt" not in shown.stdout.splitlines() and "accuracy" in shown.stdout  # not among the report lines
    assert [r["accuracy"] for r in runs["--progress"][1]] == [r["accuracy"] for r in runs["--no-progress"][1]]


def test_eval_and_check_take_the_option_too(model):
    res = CliRunner().invoke(cli, ["eval", str(model), "--progress"], catch_exceptions=False)
    assert res.exit_code == 0 and "model.pt (test)" in res.stderr.splitlines() and "top-1" in res.stdout, res.output
    quiet = CliRunner().invoke(cli, ["eval", str(model), "--no-progress"], catch_exceptions=False)
    assert quiet.exit_code == 0 and "model.pt (test)" not in quiet.stderr.splitlines()
    assert quiet.stdout.splitlines()[-1] == res.stdout.splitlines()[-1]  # the same metrics
    gates = {flag: CliRunner().invoke(cli, ["check", str(model), "--min-accuracy", "0.5", flag],
                                      catch_exceptions=False) for flag in ("--progress", "--no-progress")}
    assert all(g.exit_code == 0 for g in gates.values()), gates["--progress"].output
    assert "model.pt" in gates["--progress"].stderr.splitlines()
    assert "model.pt" not in gates["--no-progress"].stderr.splitlines()


def test_docstring_example():
    import doctest

    import edgesqueeze._progress as progress

    result = doctest.testmod(progress)
    assert result.attempted > 0 and result.failed == 0


def test_run_draws_its_bar_when_asked_and_classifies_the_same(tmp_path):
    """``run`` over more images than one batch: --progress draws its bar on stderr (off a
    terminal, its label), --no-progress none; the classes printed are the same."""
    from PIL import Image

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    model = tmp_path / "tiny.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(model), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    rng = np.random.default_rng(1)
    images = []
    for i in range(40):
        images.append(tmp_path / f"img{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(images[-1])
    runs = {flag: CliRunner().invoke(cli, ["run", str(model), *map(str, images), "-b", "16", "--json", flag],
                                     catch_exceptions=False) for flag in ("--progress", "--no-progress")}
    assert all(r.exit_code == 0 for r in runs.values()), runs["--progress"].output
    assert "classifying" in runs["--progress"].stderr.splitlines()
    assert "classifying" not in runs["--no-progress"].stderr.splitlines()
    assert json.loads(runs["--progress"].stdout) == json.loads(runs["--no-progress"].stdout)
    assert len(json.loads(runs["--progress"].stdout)) == 40


def test_export_names_each_format_before_it_on_stderr_when_asked(model, tmp_path):
    """export printed nothing while it converted (seconds to minutes a format): --progress names
    each format on standard error before it; the files are the same bytes either way."""
    runs = {flag: CliRunner().invoke(cli, ["export", str(model), "-f", "onnx", "--pack", "--out",
                                           str(tmp_path / flag.strip("-")), flag], catch_exceptions=False)
            for flag in ("--progress", "--no-progress")}
    assert all(r.exit_code == 0 for r in runs.values()), runs["--progress"].output
    assert [line for line in runs["--progress"].stderr.splitlines() if line.startswith("[")] == [
        "[1/1] onnx: model.onnx and its packed copy"]
    assert not [line for line in runs["--no-progress"].stderr.splitlines() if line.startswith("[")]
    assert not [line for line in runs["--progress"].stdout.splitlines() if line.startswith("[")]
    for name in ("model.onnx", "model.onnx.esq"):
        assert (tmp_path / "progress" / name).read_bytes() == (tmp_path / "no-progress" / name).read_bytes()


def test_verify_of_a_folder_a_second_time_leaves_out_its_earlier_report(model, tmp_path):
    """`verify out/*` wrote verify.json, verify.md and two plots into out/; the same command a
    second time took verify.json as an input ("is also an input", exit 2), and with --out
    elsewhere the .md and plots were models that could not be measured."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model, run / "model.pt")
    first = CliRunner().invoke(cli, ["verify", str(run / "model.pt"), "--limit", "40"])
    assert first.exit_code == 0 and (run / "verify.json").is_file(), first.output
    files = sorted(str(p) for p in run.iterdir())
    assert len(files) >= 3  # the model, the report, its markdown (and plots where matplotlib draws)
    for extra in ([], ["--out", str(tmp_path / "elsewhere.json")]):
        again = CliRunner().invoke(cli, ["verify", *files, "--limit", "40", *extra])
        assert again.exit_code == 0, again.output
        assert "not model files (reports, plots, logs)" in again.stderr
        assert [a["path"] for a in json.loads(Path(extra[1] if extra else run / "verify.json").read_text())[
            "artifacts"]] == [str(run / "model.pt")]


def test_verify_says_a_recipes_dataset_is_not_used_for_a_file_that_records_one(model, tmp_path):
    """`verify model.pt --set data.dataset=mnist` measured on digits (the file's own) without a
    word; eval said so."""
    res = CliRunner().invoke(cli, ["verify", str(model), "--limit", "20", "--set", "data.dataset=mnist", "--out",
                                   str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    assert "note: the recipe's data.dataset 'mnist' is not used: the model records its dataset 'digits'" in res.stderr
