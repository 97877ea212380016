"""The top-level Python API on wrong arguments: edgesqueeze's own errors naming what to give,
not an AttributeError or TypeError from deep inside (API audit, session 34)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgesqueeze as es
from edgesqueeze.errors import CheckpointError, DataError, RecipeError
from edgesqueeze.runtime import topk

DIGITS = "recipes/squeezenet-digits.yaml"


def test_wrong_arguments_are_edgesqueeze_errors(tmp_path):
    with pytest.raises(RecipeError, match="fit takes a Recipe"):
        es.fit(DIGITS)
    with pytest.raises(CheckpointError, match="meta must be a dict"):
        es.save_checkpoint(tmp_path / "x.pt", torch.nn.Linear(2, 2), None)
    with pytest.raises(CheckpointError, match="takes an nn.Module"):
        es.save_checkpoint(tmp_path / "x.pt", "not a model", {})
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(RecipeError, match="list of 'KEY=VALUE' strings"):
        es.load_recipe(DIGITS, [1])
    with pytest.raises(DataError, match="k must be a positive integer"):
        topk([1.0, 2.0], 0)
    with pytest.raises(CheckpointError, match="load_model takes the path of a model file, got NoneType"):
        es.load_model(None)  # was a bare TypeError from inside pathlib


def test_a_checkpoint_saved_without_an_architecture_is_one_line_or_takes_arch(tmp_path):
    """save_checkpoint(path, model, {}) wrote a file on which load_model, info and eval failed
    with a bare KeyError: 'arch' (a traceback, exit 1), --arch or not."""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    torch.manual_seed(0)
    model = es.build_model("squeezenet_mnist")
    path = es.save_checkpoint(tmp_path / "m.pt", model, {})
    with pytest.raises(CheckpointError, match="names no architecture .*; pass --arch NAME"):
        es.load_model(path)
    loaded = es.load_model(path, arch="squeezenet_mnist")
    assert loaded.meta["arch"] == "squeezenet_mnist"
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    res = CliRunner().invoke(cli, ["info", str(path)])
    assert res.exit_code == 2 and "names no architecture" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("value", [None, 3, b"\x89ESQ"])
def test_runtime_load_names_what_it_takes(value):
    from edgesqueeze import runtime
    from edgesqueeze.errors import FormatError

    with pytest.raises(FormatError, match="load takes the path of a model file"):
        runtime.load(value)


def test_one_string_is_one_item_not_its_characters():
    assert es.load_recipe(DIGITS, "train.epochs=1").train.epochs == 1  # was: --set 't': expected KEY=VALUE
    assert "recipe_from_dict" in es.__all__ and callable(es.recipe_from_dict)


def test_evaluate_checks_its_inputs_and_keeps_the_training_flag():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).train()
    x = np.zeros((5, 1, 2, 2), np.uint8)
    with pytest.raises(DataError, match="5 images but 4 labels"):
        es.evaluate(model, x, np.zeros(4, np.int64), mean=[0.5], std=[0.5])
    with pytest.raises(DataError, match=r"labels must be in 0\.\.2"):
        es.evaluate(model, x, np.full(5, 7), mean=[0.5], std=[0.5])
    with pytest.raises(DataError, match="give mean and std"):
        es.evaluate(model, x, np.zeros(5, np.int64), mean=None, std=[0.5])
    out = es.evaluate(model, x, np.zeros(5, np.int64), mean=[0.5], std=[0.5])
    assert 0.0 <= out["accuracy"] <= 1.0 and model.training


def test_input_meta_strings_are_refused_and_evaluate_takes_load_models_result(tmp_path):
    """load_model(input_meta={"classes": "abcdefghij"}) split the string into ten one-letter
    classes without a word (and "1,28,28" into characters); evaluate(load_model(p), ...) failed
    with AttributeError: 'LoadedModel' object has no attribute 'training'."""
    from edgesqueeze.errors import ModelError

    torch.manual_seed(0)
    torch.save(es.build_model("squeezenet_mnist").state_dict(), tmp_path / "sd.pt")
    for given, what in (({"classes": "abcdefghij"}, "classes"), ({"input_shape": "1,28,28"}, "input_shape"),
                        ({"mean": 0.5, "std": 0.5}, "mean")):
        with pytest.raises(ModelError, match=rf"input_meta\['{what}'\] takes a list"):
            es.load_model(tmp_path / "sd.pt", arch="squeezenet_mnist", input_meta=given)
    loaded = es.load_model(tmp_path / "sd.pt", arch="squeezenet_mnist")
    x = np.zeros((4, 1, 28, 28), np.uint8)
    y = np.zeros(4, np.int64)
    assert es.evaluate(loaded, x, y, mean=[0.1], std=[0.3]) == es.evaluate(loaded.model, x, y, mean=[0.1], std=[0.3])
    with pytest.raises(DataError, match="evaluate takes an nn.Module"):
        es.evaluate("model.pt", x, y, mean=[0.1], std=[0.3])


def test_fit_with_log_none_is_silent(tmp_path, capsys):
    """fit(log=None) failed with TypeError: 'NoneType' object is not callable after writing
    recipe.json; None now means silent, and a log that is not a function is refused first."""
    from edgesqueeze.errors import EdgesqueezeError

    recipe = es.load_recipe(DIGITS, ["train.epochs=0.1", "data.limit=200", "train.threads=1"])
    with pytest.raises(EdgesqueezeError, match="fit: log: expected a function"):
        es.fit(recipe, out_dir=tmp_path / "bad", log="x")
    assert not (tmp_path / "bad").exists()
    es.fit(recipe, out_dir=tmp_path / "run", log=None, progress=False)
    assert capsys.readouterr().out == "" and (tmp_path / "run" / "model.pt").is_file()


def test_library_stages_take_log_none_keep_the_callers_random_state_and_refuse_a_missing_section(tmp_path):
    """Library use (audit): compress, export_artifacts and evaluate_artifacts took log=None with
    a TypeError (fit takes it); compress left torch's generator seeded to a constant and export
    numpy's and Python's (the converters' imports reseed them); a recipe without a compress or
    export section (None) was "'NoneType' object has no attribute 'mode'"; and some error
    classes the library raises could not be reached from the package."""
    import random

    import numpy as np
    import torch

    import edgesqueeze
    from edgesqueeze.compress.pipeline import compress
    from edgesqueeze.config.compress import CompressConfig
    from edgesqueeze.config.export import ExportConfig
    from edgesqueeze.errors import RecipeError
    from edgesqueeze.export import export_artifacts
    from edgesqueeze.models import build_model
    from edgesqueeze.verify import evaluate_artifacts

    for name in ("ExportError", "OutputError", "RuntimeBackendError", "Note"):
        assert issubclass(getattr(edgesqueeze, name), Exception)
    model = tmp_path / "m.pt"
    edgesqueeze.save_checkpoint(model, build_model("squeezenet_mnist", num_classes=10, width_mult=0.25),
                                {"arch": "squeezenet_mnist", "arch_kwargs": {"width_mult": 0.25}, "dataset": "digits",
                                 "input_shape": [1, 28, 28], "mean": [0.3], "std": [0.3]})
    with pytest.raises(RecipeError, match="compress takes a CompressConfig"):
        compress(model, None, out_dir=tmp_path / "c")
    with pytest.raises(RecipeError, match="export_artifacts takes an ExportConfig"):
        export_artifacts(model, None, tmp_path / "e")
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    expected = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    compress(model, CompressConfig(), out_dir=tmp_path / "c", log=None)
    export_artifacts(model, ExportConfig(formats=("tflite",)), tmp_path / "e", log=None)
    evaluate_artifacts([tmp_path / "e" / "m.tflite"], log=None, limit=20)
    assert (torch.rand(1), np.random.rand(), random.random()) == expected
