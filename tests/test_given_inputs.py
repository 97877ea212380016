"""--classes and --input-shape given for a model file that does not describe its inputs (a
plain state_dict, TorchScript, a program) must fit the model: they were taken as given, so
`info` showed 3 classes and `inspect` a [None, 3] output for a 10-logit model, and `eval`
ran with them. Real files on disk, the real CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edgesqueeze.cli import cli
from edgesqueeze.models.registry import build_model


@pytest.fixture(scope="module")
def state_dict_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "sd.pt"
    torch.save(build_model("squeezenet_mnist", num_classes=10).state_dict(), path)
    return path


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("command", [["info"], ["inspect"], ["eval", "--data", "digits", "--limit", "20"]])
def test_class_names_that_do_not_match_the_outputs_are_refused(state_dict_file, command):
    res = _run(*command, state_dict_file, "--arch", "squeezenet_mnist", "--classes", "a,b,c")
    assert res.exit_code == 2, res.output
    assert "outputs 10 logits" in res.output and "3 class names are given" in res.output
    ok = _run(*command, state_dict_file, "--arch", "squeezenet_mnist", "--classes", ",".join("abcdefghij"))
    assert ok.exit_code == 0, ok.output


def test_an_input_shape_the_model_does_not_run_on_is_refused(state_dict_file):
    res = _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--input-shape", "3,28,28",
               "--mean", "0.1,0.2,0.3", "--std", "0.1,0.1,0.1")
    assert res.exit_code == 2 and "does not run on inputs of shape [3, 28, 28]" in res.output, res.output
    res = _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--input-shape", "1,28,28",
               "--classes", "a,b")  # with a shape, the logits are counted by running it
    assert res.exit_code == 2 and "outputs 10 logits but 2 class names are given" in res.output, res.output
    assert _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--input-shape", "1,28,28").exit_code == 0
