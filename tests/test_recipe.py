"""Recipe validation: every refusal names the dotted field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgesqueeze.errors import RecipeError
from edgesqueeze.recipe import apply_overrides, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _raw(**sections):
    return {"version": 1, **sections}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.version == 1


def test_defaults_and_types():
    r = recipe_from_dict(_raw(train={"epochs": 3, "lr": 1}))
    assert r.train.epochs == 3.0 and isinstance(r.train.lr, float)
    assert r.data.dataset == "digits"


@pytest.mark.parametrize(
    "raw, message",
    [
        (_raw(train={"epohcs": 3}), "train.epohcs: unknown key; did you mean 'epochs'?"),
        (_raw(modle={}), "modle: unknown key; did you mean 'model'?"),
        (_raw(data={"augmentation": {"hflp": True}}), "data.augmentation.hflp: unknown key; did you mean 'hflip'?"),
        (_raw(train={"lr": -0.1}), "train.lr: must be > 0 and <= 10, got -0.1"),
        (_raw(train={"momentum": 1.0}), "train.momentum: must be >= 0 and < 1, got 1.0"),
        (_raw(train={"batch_size": "big"}), "train.batch_size: expected an integer, got 'big'"),
        (_raw(train={"batch_size": 3.5}), "train.batch_size: expected an integer"),
        (_raw(train={"nesterov": "yes"}), "train.nesterov: expected true or false"),
        (_raw(train={"optimizer": "sgdd"}), "train.optimizer: must be one of 'sgd', 'adamw', 'adam', got 'sgdd'; "
                                            "did you mean 'sgd'?"),
        (_raw(data={"val_fraction": 1.5}), "data.val_fraction: must be >= 0 and < 1, got 1.5"),
        (_raw(data={"image_size": 2}), "data.image_size: must be >= 4 and <= 1024, got 2"),
        (_raw(model={"kwargs": [1, 2]}), "model.kwargs: expected a mapping"),
        (_raw(train=[1, 2]), "train: expected a mapping of keys to values, got list"),
        ({"name": "x"}, "version: required key is missing"),
        ({"version": 2}, "version: this edgesqueeze reads recipe version 1, got 2"),
        ([1, 2], "a recipe is a YAML mapping"),
    ],
)
def test_errors_name_the_field(raw, message):
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(raw, source="r.yaml")
    assert message in str(exc.value)
    assert str(exc.value).startswith("r.yaml")
    assert exc.value.exit_code == 2


def test_overrides_parse_yaml_values():
    raw = apply_overrides(_raw(train={"epochs": 5}), ["train.epochs=1", "data.limit=300", "data.augment=false"])
    r = recipe_from_dict(raw)
    assert r.train.epochs == 1 and r.data.limit == 300 and r.data.augment is False


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train.epochs=[unclosed"])
def test_bad_overrides(bad):
    with pytest.raises(RecipeError, match="--set"):
        apply_overrides(_raw(), [bad])


@pytest.mark.parametrize("override, says", [
    ("trian.epochs=2", "--set trian.epochs=2: trian: unknown key; did you mean 'train'?"),
    ("train.epoch=2", "--set train.epoch=2: unknown key; did you mean 'epochs'?"),
    ("compress.prune.layers={features.0: 2.0}", "--set compress.prune.layers={features.0: 2.0}: layers.features.0: "
                                                "must be"),
])
def test_an_override_error_names_the_override_not_the_file(override, says):
    """A top-level typo or a field inside a --set mapping was blamed on the recipe file."""
    with pytest.raises(RecipeError) as exc:
        load_recipe("recipes/squeezenet-digits.yaml", [override])
    assert str(exc.value).startswith(says), str(exc.value)


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntrain: {epochs: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_name_defaults_to_file_stem_and_hash_is_stable(tmp_path):
    p = tmp_path / "my-run.yaml"
    p.write_text(yaml.safe_dump(_raw(train={"epochs": 2})))
    a, b = load_recipe(p), load_recipe(p)
    assert a.name == "my-run"
    assert a.hash() == b.hash()
    assert load_recipe(p, ["train.epochs=3"]).hash() != a.hash()
    assert str(a.out_dir()) == str(Path("artifacts") / "my-run")


def test_train_hash_ignores_threads_but_not_training_settings():
    """Resuming checks train_hash: a run started on 1 thread may continue on 2, but a changed
    learning rate, seed or model is a different run."""
    base = {"version": 1, "train": {"epochs": 3, "threads": 1}}
    h = recipe_from_dict(base).train_hash()
    assert recipe_from_dict({**base, "train": {"epochs": 3, "threads": 2}}).train_hash() == h
    assert recipe_from_dict({**base, "train": {"epochs": 3, "threads": 1, "lr": 0.05}}).train_hash() != h
    assert recipe_from_dict({**base, "seed": 7}).train_hash() != h
    assert recipe_from_dict({**base, "export": {"formats": ["onnx"]}}).train_hash() == h


def test_yaml_errors_are_one_line_with_where(tmp_path):
    """PyYAML's message spans several lines (the source line quoted, a caret under it):
    every error is one line, so it says where in words."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntrain: {epochs: 1\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(bad)
    assert "\n" not in str(exc.value)
    assert "line 3, column 1: expected ',' or '}'" in str(exc.value)
    assert "flow mapping at line 2, column 8" in str(exc.value)
    with pytest.raises(RecipeError) as exc:
        apply_overrides(_raw(), ["train.epochs=[1"])
    assert "\n" not in str(exc.value) and "line 1, column 3" in str(exc.value)


def test_duplicate_keys_are_refused(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: the first value was ignored."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("version: 1\ntrain:\n  epochs: 30\n  lr: 0.1\n  epochs: 2\n")
    with pytest.raises(RecipeError, match=r"line 5, column 3: duplicate key 'epochs' \(first on line 3\)"):
        load_recipe(dup)
    merged = tmp_path / "merged.yaml"  # a << merge may be overridden, as YAML intends
    merged.write_text("version: 1\ntrain:\n  <<: {epochs: 1, lr: 0.5}\n  epochs: 2\n")
    r = load_recipe(merged)
    assert (r.train.epochs, r.train.lr) == (2, 0.5)


@pytest.mark.parametrize("text, what", [("", "is empty"), ("- a\n- b\n", "holds a list, not a mapping")])
def test_set_on_a_recipe_that_is_not_a_mapping(tmp_path, text, what):
    """--set on an empty or list recipe said 'version: required key is missing': the file was
    silently replaced by an empty mapping."""
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=f"r.yaml: {what}; a recipe is a YAML mapping"):
        load_recipe(p, ["train.epochs=1"])


@pytest.mark.parametrize("raw, match", [
    ({"formats": ["onnx", "onnx"]}, r"export\.formats: 'onnx' is listed twice"),  # exported twice, counted twice
    ({"opset": 17}, r"export\.opset"),  # torch.onnx wrote opset 18 for it without a word
])
def test_export_section_refuses_what_it_cannot_do(raw, match):
    from edgesqueeze.config.export import ExportConfig

    with pytest.raises(RecipeError, match=match):
        ExportConfig.from_dict(raw)
    assert ExportConfig.from_dict({"opset": 18, "formats": ["onnx", "onnx-int8"]}).opset == 18


@pytest.mark.parametrize("args, match", [
    (["--calibration-images", "100001"], "--calibration-images"),  # the recipe field's range, as --set has it
    (["--equalize-activations", "nan"], "--equalize-activations"),
])
def test_export_options_are_checked_like_the_recipe_fields(tmp_path, args, match):
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    res = CliRunner().invoke(cli, ["export", str(tmp_path / "missing.pt"), "-f", "onnx-int8", *args,
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and match in res.output, res.output
