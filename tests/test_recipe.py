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
        # checked on sight, without torch or data: train named the field but not the file, and
        # only once it came to read the data; eval, export and check never said it
        (_raw(data={"dataset": "digitz"}), "data.dataset: unknown dataset 'digitz' (did you mean 'digits'?)"),
        (_raw(data={"dataset": "imagefolder:"}), "data.dataset: dataset 'imagefolder:' needs a path"),
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
    ("data.dataset=mnistt", "--set data.dataset=mnistt: unknown dataset 'mnistt' (did you mean 'mnist'?)"),
    ("compress.prune.layers={features.0: 2.0}", "--set compress.prune.layers={features.0: 2.0}: "
                                                "compress.prune.layers.features.0: must be"),
    ("compress.prune.scan=[1.5]", "--set compress.prune.scan=[1.5]: compress.prune.scan[0]: must be"),
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


# --- the recipe audit of session 38: YAML 1.1 leftovers, empty stages, aliases, Python-built recipes


def _file(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_numbers_are_read_as_yaml_1_2_decimal(tmp_path):
    """YAML 1.1 read `seed: 0042` as octal 34 and `epochs: 1:30` as base-60 90, silently."""
    r = load_recipe(_file(tmp_path, "version: 1\nseed: 0042\ntrain: {batch_size: 0x40, epochs: 010}\n"))
    assert r.seed == 42 and r.train.batch_size == 64 and r.train.epochs == 10.0
    with pytest.raises(RecipeError, match=r"--set train.epochs=1:30: expected a number, got '1:30'"):
        load_recipe(_file(tmp_path, "version: 1\n"), ["train.epochs=1:30"])
    assert load_recipe(_file(tmp_path, "version: 1\n"), ["train.lr=1e-3"]).train.lr == 0.001


def test_an_empty_stage_is_refused_and_null_turns_it_off(tmp_path):
    """`prune:` with its keys commented out is null to YAML, which turned pruning off without
    a word, while an empty `train:` means train's defaults."""
    text = "version: 1\ncompress:\n  prune:\n    # sparsity: 0.8\n  cluster: {bits: 4}\n"
    with pytest.raises(RecipeError, match=r"r.yaml: compress.prune: left empty.*`prune: \{\}` for its defaults"):
        load_recipe(_file(tmp_path, text))
    r = load_recipe(_file(tmp_path, text.replace("  prune:\n", "  prune: null\n")))
    assert r.compress.prune is None and r.compress.cluster.bits == 4
    r = load_recipe(_file(tmp_path, text.replace("  prune:\n", "  prune: {}\n")))
    assert r.compress.prune is not None
    assert load_recipe(_file(tmp_path, "version: 1\ntrain:\n")).train.epochs == 10.0  # a section: its defaults
    with pytest.raises(RecipeError, match=r"--set 'compress.prune=': no value; write compress.prune=null"):
        load_recipe(_file(tmp_path, "version: 1\n"), ["compress.prune="])


def test_an_override_goes_into_a_section_left_empty(tmp_path):
    r = load_recipe(_file(tmp_path, "version: 1\ntrain:\ndata:\n"), ["train.epochs=3", "data.limit=100"])
    assert r.train.epochs == 3.0 and r.data.limit == 100


def test_overrides_keep_what_yaml_read(tmp_path):
    """--set went through a JSON round trip: a date anywhere in the file was a traceback, and
    an int layer key became the string '1' and passed."""
    dated = _file(tmp_path, "version: 1\nname: 2024-06-01\n")
    with pytest.raises(RecipeError, match=r"name: expected a string, got datetime.date\(2024, 6, 1\); YAML reads "
                                          r".* quote it"):
        load_recipe(dated, ["train.epochs=1"])
    keyed = _file(tmp_path, "version: 1\ncompress:\n  prune: {layers: {1: 0.5}}\n")
    for overrides in ([], ["train.epochs=1"]):
        with pytest.raises(RecipeError, match="keys must be layer names"):
            load_recipe(keyed, overrides)
    with pytest.raises(RecipeError, match=r"name: expected a string, got False; YAML reads yes/no"):
        load_recipe(_file(tmp_path, "version: 1\nname: no\n"))


def test_aliases_that_hold_themselves_or_explode_and_deep_nesting_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="refers to a section that holds it"):
        load_recipe(_file(tmp_path, "version: 1\nmodel: &m {kwargs: {x: *m}}\n"), ["seed=1"])
    bomb = "version: 1\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)) + "model: {kwargs: {y: *a8}}\n"
    with pytest.raises(RecipeError, match=r"expands to more than 200,000 values through its aliases"):
        load_recipe(_file(tmp_path, bomb), ["seed=1"])
    with pytest.raises(RecipeError, match="nested more than 100 levels deep"):
        load_recipe(_file(tmp_path, "version: 1\n"), ["model.kwargs={a: " + "[" * 900 + "]" * 900 + "}"])
    with pytest.raises(RecipeError, match="nested more than 100 levels deep"):
        load_recipe(_file(tmp_path, "version: 1\nmodel: {kwargs: {a: " + "[" * 5000 + "]" * 5000 + "}}\n"))
    # sharing a section through an alias or a merge is fine
    r = load_recipe(_file(tmp_path, "version: 1\ncompress:\n  prune: {}\n  prune_finetune: &ft {epochs: 2, lr: 0.01}\n"
                                    "  cluster_finetune: {<<: *ft, lr: 0.001}\n"), ["seed=1"])
    assert r.compress.prune_finetune.epochs == 2.0 and r.compress.cluster_finetune.lr == 0.001
    assert r.compress.cluster_finetune.epochs == 2.0


def test_a_huge_recipe_file_is_refused_before_parsing(tmp_path):
    with pytest.raises(RecipeError, match=r"characters; a recipe is a few sections"):
        load_recipe(_file(tmp_path, "version: 1\n" + "# padding\n" * 150_000))


def test_a_stage_error_names_its_full_path(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml: compress.cluster.layers.features.0: must be >= 1 and <= 8, got 9"):
        load_recipe(_file(tmp_path, "version: 1\ncompress: {cluster: {layers: {features.0: 9}}}\n"))
    with pytest.raises(RecipeError, match=r"r.yaml: compress.ptq.min_bits"):
        load_recipe(_file(tmp_path, "version: 1\ncompress: {ptq: {min_bits: 8, max_bits: 5}}\n"))


def test_a_recipe_built_in_python_is_held_to_the_same_rules():
    """Recipe(...) and its sections built directly checked nothing: optimizer 'SGD' trained
    with Adam, epochs 0 trained a step, and lr -1 or a dict section was a traceback later."""
    import dataclasses

    from edgesqueeze.config.compress import FinetuneConfig
    from edgesqueeze.config.export import CalibrationConfig, ExportConfig
    from edgesqueeze.recipe import DataConfig, ModelConfig, Recipe, TrainConfig

    for build, says in [
        (lambda: TrainConfig(optimizer="SGD"), r"optimizer: must be one of 'sgd', 'adamw', 'adam', got 'SGD'; did you "
                                               r"mean 'sgd'\?"),
        (lambda: TrainConfig(epochs=0), "epochs: must be > 0"),
        (lambda: TrainConfig(lr=-1.0), "lr: must be > 0"),
        (lambda: TrainConfig(batch_size=0), "batch_size: must be >= 1"),
        (lambda: TrainConfig(epochs=float("nan")), "epochs: must be > 0"),
        (lambda: TrainConfig(lr="0.1"), "lr: expected a number, got '0.1'"),
        (lambda: DataConfig(val_fraction=2), "val_fraction: must be >= 0 and < 1"),
        (lambda: DataConfig(channels=3.0), "channels: must be one of 3, got 3.0"),
        (lambda: ModelConfig(kwargs=None), "kwargs: expected a mapping"),
        (lambda: FinetuneConfig(lr=0), "lr: must be > 0"),
        (lambda: ExportConfig(calibration=CalibrationConfig(method="MINMAX")), "method: must be one of"),
        (lambda: Recipe(version=99), "version: this edgesqueeze reads recipe version 1, got 99"),
        (lambda: Recipe(version=1, seed=-5), "seed: must be >= 0"),
        (lambda: Recipe(version=1, train={"epochs": "ten"}), "train.epochs: expected a number, got 'ten'"),
        (lambda: dataclasses.replace(Recipe(version=1), train=TrainConfig(lr=-1.0)), "lr: must be > 0"),
    ]:
        with pytest.raises(RecipeError, match=says):
            build()
    r = Recipe(version=1, train={"epochs": 2})  # a mapping for a section: built as the file's would be
    assert isinstance(r.train, TrainConfig) and r.train.epochs == 2.0
    assert r.hash() == recipe_from_dict({"version": 1, "train": {"epochs": 2}}).hash()


def test_train_data_dir_and_device_are_not_read_as_yaml(tmp_path, monkeypatch):
    """train's --data-dir became the override text `data.data_dir=VALUE`: "d #1" lost "#1"
    (a comment), "~" was null (the option dropped), "2024" a number (refused as a --set)."""
    from click.testing import CliRunner

    import edgesqueeze.train
    from edgesqueeze.cli import cli

    seen = []

    class Stop(Exception):
        pass

    def fit(recipe, **kwargs):  # the recipe the command built; the training itself is not under test
        seen.append(recipe)
        raise Stop

    monkeypatch.setattr(edgesqueeze.train, "fit", fit)
    recipe = _file(tmp_path, "version: 1\ndata:\ntrain:\n")  # empty sections: the options still go in
    for folder in ("d #1", "~", "2024", "a: b"):
        res = CliRunner().invoke(cli, ["train", "-r", str(recipe), "--data-dir", folder, "--device", "cpu",
                                       "--out", str(tmp_path / "out")])
        assert isinstance(res.exception, Stop), res.output
        assert seen[-1].data.data_dir == folder and seen[-1].train.device == "cpu"


def test_a_mapping_override_that_drops_the_files_keys_says_so(tmp_path):
    from edgesqueeze.recipe import replaced_by_overrides

    path = _file(tmp_path, "version: 1\ntrain: {epochs: 5, batch_size: 64, channels_last: true}\n")
    notes = replaced_by_overrides(path, ["train={epochs: 2}", "train.lr=0.01", "data={limit: 100}"])
    assert len(notes) == 1 and "replaces the recipe's whole train section: batch_size, channels_last" in notes[0]
    assert load_recipe(path, ["train={epochs: 2}"]).train.batch_size == 128  # what the note warns of


def test_a_misspelt_format_gets_a_suggestion(tmp_path):
    with pytest.raises(RecipeError, match=r"export.formats: unknown format 'tflite_int8'; did you mean 'tflite-int8'\?"):
        load_recipe(_file(tmp_path, "version: 1\nexport: {formats: [tflite_int8]}\n"))
    with pytest.raises(RecipeError, match=r"budget.max_size_per_format.TFLite-INT8: unknown format; did you mean "
                                          r"'tflite-int8'\?"):
        load_recipe(_file(tmp_path, "version: 1\nbudget: {max_size_per_format: {TFLite-INT8: 1KB}}\n"))


def test_a_size_budget_on_a_file_the_export_does_not_write_is_noted(tmp_path):
    base = "version: 1\nexport: {formats: [onnx, tflite-int8]%s}\nbudget: {max_size_per_format: %s}\n"
    r = load_recipe(_file(tmp_path, base % ("", "{tflite-int8.esq: 1KB, onnx-int8: 1KB, esq: 1KB, onnx: 1KB}")))
    assert r.budget_formats_not_written() == ["onnx-int8", "tflite-int8.esq"]
    r = load_recipe(_file(tmp_path, base % (", pack: true", "{tflite-int8.esq: 1KB, onnx.esq: 1KB}")))
    assert r.budget_formats_not_written() == []
    assert load_recipe(_file(tmp_path, "version: 1\nbudget: {max_size: 1KB}\n")).budget_formats_not_written() == []


def test_a_recipe_built_in_python_takes_numpy_scalars_and_paths():
    """recipe_from_dict refused np.float32(0.1) ("expected a number, got np.float32(0.1)"),
    np.int64(2) and output_dir=Path(...) ("expected a string, got PosixPath"): the values a
    script computes. They are read as the numbers and the path they are."""
    import numpy as np

    r = recipe_from_dict({"version": 1, "output_dir": Path("/tmp/out"),
                          "train": {"lr": np.float32(0.25), "epochs": np.int64(2), "batch_size": np.int32(16)}})
    assert (r.train.lr, r.train.epochs, r.train.batch_size, r.output_dir) == (0.25, 2.0, 16, "/tmp/out")
    assert type(r.train.batch_size) is int and type(r.train.lr) is float and type(r.output_dir) is str
    with pytest.raises(RecipeError, match="train.batch_size: expected an integer"):
        recipe_from_dict({"version": 1, "train": {"batch_size": np.float32(3.5)}})


def test_override_keys_under_a_mapping_of_names_keep_their_dots():
    """`--set budget.max_size_per_format.tflite-int8.esq=20KB` said "tflite-int8 is not a
    section", and a layer name such as features.0 could not be set at all."""
    raw = apply_overrides(_raw(budget={"max_size_per_format": {"onnx": "1MB"}}),
                          ["budget.max_size_per_format.tflite-int8.esq=20KB", "compress.prune.layers.features.0=0.3",
                           "compress.cluster.layers.features.3.squeeze=4"])
    assert raw["budget"]["max_size_per_format"] == {"onnx": "1MB", "tflite-int8.esq": "20KB"}
    assert raw["compress"]["prune"]["layers"] == {"features.0": 0.3}
    assert raw["compress"]["cluster"]["layers"] == {"features.3.squeeze": 4}
    for bad in (".train=5", "train..epochs=3", "train.=3"):
        with pytest.raises(RecipeError, match="has an empty part"):
            apply_overrides(_raw(), [bad])


def test_model_import_set_replaces_the_recipes_arch_and_the_other_way_round():
    """`--set model.import=nets.py:Net` (README: the same as --arch nets.py:Net) failed on every
    recipe naming model.arch: "give either 'arch' or 'import', not both"."""
    assert apply_overrides(_raw(model={"arch": "squeezenet_mnist", "kwargs": {}}), ["model.import=nets.py:Net"])[
        "model"] == {"import": "nets.py:Net", "kwargs": {}}
    assert apply_overrides(_raw(model={"import": "nets.py:Net"}), ["model.arch=resnet8"])["model"] == {
        "arch": "resnet8"}


def test_a_key_set_inside_a_stage_the_recipe_leaves_off_says_it_turns_it_on():
    """--set compress.prune.max_drop=3 on a recipe with cluster only pruned to the default 50%
    (95% -> 79% test accuracy) without a word."""
    import warnings

    from edgesqueeze.errors import Note

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_overrides(_raw(compress={"cluster": {"bits": 4}}), ["compress.prune.max_drop=3", "compress.cluster.bits=5"])
    said = [str(w.message) for w in caught if issubclass(w.category, Note)]
    assert said == ["--set compress.prune.max_drop=3: turns on compress.prune, which the recipe leaves off, with its "
                    "defaults for the keys not set (sparsity 0.5, oneshot); compress.prune=null turns it off"], said


@pytest.mark.parametrize("command, used, unused", [
    (["info"], "data.dataset=digits", "train.epochs=3"),
    (["check", "--max-size", "1MB"], "budget.min_accuracy=0.1", "compress.cluster.bits=2"),
    (["export", "-f", "onnx"], "export.opset=18", "budget.min_accuracy=0.9"),
])
def test_each_command_names_the_set_keys_it_does_not_read(command, used, unused, tmp_path):
    """README: a note "for any --set key the command does not read"; only eval and sensitivity
    said so (info, check, export, compress, verify took `--set train.epochs=3` without a word)."""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    model = tmp_path / "m.pt"
    from edgesqueeze.checkpoint import save_checkpoint
    from edgesqueeze.models import build_model

    save_checkpoint(model, build_model("squeezenet_mnist", num_classes=10, width_mult=0.25),
                    {"arch": "squeezenet_mnist", "arch_kwargs": {"width_mult": 0.25}, "dataset": "digits",
                     "input_shape": [1, 28, 28], "mean": [0.3], "std": [0.3]})
    args = [command[0], str(model), *command[1:], "--set", used, "--set", unused]
    if command[0] == "export":
        args += ["--out", str(tmp_path / "e")]
    res = CliRunner().invoke(cli, args)
    key = unused.split("=")[0]
    assert f"note: --set {unused}: {command[0]} does not read {key}; it changes nothing here" in res.stderr, res.output
    assert f"--set {used}:" not in res.stderr


def test_the_stage_note_only_where_the_recipe_names_another_stage_and_once(tmp_path):
    """`compress: {fold_batchnorm: true}` names no stage, so --set compress.ptq.target_bytes is
    how one turns ptq on: it was noted (twice, as load_recipe and given_sections read it)."""
    import json
    import warnings

    from edgesqueeze.errors import Note
    from edgesqueeze.recipe import given_sections

    for compress, said in (({"fold_batchnorm": True}, 0), ({"cluster": {"bits": 4}}, 1)):
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps({"version": 1, "compress": compress}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sets = ["compress.prune.sparsity=0.6"]
            load_recipe(path, sets)
            given_sections(path, sets)
        assert len([w for w in caught if issubclass(w.category, Note)]) == said, [str(w.message) for w in caught]
