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
