"""`edgesqueeze export` option combinations an audit found written wrong without a word, or
refused only after files were written: each is now right or refused before any file.
A real trained digits model, the real CLI, real onnxruntime and LiteRT sessions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgesqueeze.checkpoint import load_model
from edgesqueeze.cli import cli
from edgesqueeze.data import load_dataset
from edgesqueeze.recipe import recipe_from_dict
from edgesqueeze.train import fit

CAL = ["--calibration-images", "32"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A half-width digits SqueezeNet with BatchNorm, as `train` writes it (not folded)."""
    out = tmp_path_factory.mktemp("train")
    fit(recipe_from_dict({"version": 1, "seed": 1, "output_dir": str(out),
                          "model": {"arch": "squeezenet_mnist", "kwargs": {"width_mult": 0.5}},
                          "data": {"dataset": "digits", "limit": 400, "val_fraction": 0.2},
                          "train": {"epochs": 3, "batch_size": 32, "lr": 0.1, "threads": 1}}),
        progress=False, log=lambda _: None)
    return out / "model.pt"


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    from edgesqueeze import runtime

    return runtime.load(path).predict_images(x)


def test_a_model_that_records_no_normalization_is_not_exported_for_raw_pixels(trained, tmp_path):
    """A state_dict with --arch and no --data exported as if it took pixels / 255: the digits
    model's file scored 9.75% instead of 98.61%, exit 0."""
    loaded = load_model(trained)
    sd = tmp_path / "sd.pt"
    torch.save(loaded.model.state_dict(), sd)
    arch = ["--arch", "squeezenet_mnist", "--arch-kwargs", json.dumps(loaded.meta["arch_kwargs"])]
    res = run("export", sd, *arch, "-f", "onnx", "--out", tmp_path / "a")
    assert res.exit_code == 2, res.output
    assert "records no input normalization" in res.output and "--data NAME" in res.output
    assert not (tmp_path / "a").exists()
    res = run("export", sd, *arch, "-f", "onnx", "--data", "digits", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    res = run("export", sd, *arch, "-f", "onnx", "--mean", "0", "--std", "1", "--out", tmp_path / "c")
    assert res.exit_code == 0, res.output  # said outright: the file takes raw pixels / 255


def test_activation_equalization_changes_a_model_with_batchnorm(trained, tmp_path):
    """BatchNorm between two convs hid every pair from the equalization: the files of alpha 0,
    0.5 and 1 computed the same logits while their metadata said alpha 1 was applied."""
    x = load_dataset("digits").test_x[:16]
    logits = {}
    for alpha in ("0", "1"):
        res = run("export", trained, "-f", "onnx-int8", "--equalize-activations", alpha, *CAL,
                  "--out", tmp_path / alpha)
        assert res.exit_code == 0, res.output
        logits[alpha] = _logits(tmp_path / alpha / "model.int8.onnx", x)
    assert np.abs(logits["0"] - logits["1"]).max() > 1e-3
    assert (logits["0"].argmax(1) == logits["1"].argmax(1)).mean() >= 0.9  # the same model, requantized


@pytest.mark.parametrize("layers, says", [
    ("features.1", "'features.1' (BatchNorm2d) holds no conv, linear or pooling layer"),
    ("features.2", "'features.2' (ReLU) holds no conv, linear or pooling layer"),
    ("features,classifier", "hold every conv and linear layer of the model, so the file would have no int8 weight"),
])
def test_float_layers_that_keep_nothing_float_or_everything_are_refused_before_any_file(trained, tmp_path,
                                                                                       layers, says):
    """tflite-int8 recorded a BatchNorm or a ReLU as float and computed as before; onnx-int8
    refused a BatchNorm only after the fp32 file was written; every conv float made an "int8"
    file with no int8 weight."""
    res = run("export", trained, "-f", "onnx,onnx-int8,tflite-int8", "--float-layers", layers, *CAL,
              "--out", tmp_path / "o")
    assert res.exit_code == 2, res.output
    assert says in res.output
    assert not list((tmp_path / "o").glob("*")) if (tmp_path / "o").exists() else True


def test_per_tensor_weights_choose_their_rounding_and_say_the_conflict_up_front(trained, tmp_path):
    """--int8-weights per-tensor on a float model failed after the onnx-int8 file was written:
    tflite-int8's automatic rounding (GPTQ) needs per-channel weights."""
    res = run("export", trained, "-f", "onnx-int8,tflite-int8", "--int8-weights", "per-tensor", *CAL,
              "--out", tmp_path / "p")
    assert res.exit_code == 0, res.output
    from edgesqueeze import runtime

    meta = runtime.load(tmp_path / "p" / "model.int8.tflite").meta
    assert meta["calibration"]["weight_rounding"] == "nearest"
    assert meta["calibration"]["dataset"] == "digits"  # recorded as onnx-int8 records it
    res = run("export", trained, "-f", "onnx-int8", "--int8-weights", "per-tensor", "--weight-rounding", "gptq",
              *CAL, "--out", tmp_path / "q")
    assert res.exit_code == 2 and "gptq rounds onto the per-channel int8 grid" in res.output, res.output
    assert not (tmp_path / "q").exists()


def test_an_earlier_exports_other_formats_are_said_and_the_hint_names_this_exports_files(trained, tmp_path):
    """Exporting fewer formats into a folder left the earlier export's other files of the same
    name, and the suggested `verify OUT/*` judged both models' files together without a word."""
    out = tmp_path / "mix"
    assert run("export", trained, "-f", "tflite", "--out", out).exit_code == 0
    res = run("export", trained, "-f", "onnx", "--out", out)
    assert res.exit_code == 0, res.output
    assert f"note: {out}/ also holds model.tflite, which this export does not write" in res.output
    assert res.output.strip().splitlines()[-1].endswith(f"edgesqueeze verify {out / 'model.onnx'}")
    # another model's files (another stem) were not said at all
    (out / "pruned.onnx").write_bytes((out / "model.onnx").read_bytes())
    res = run("export", trained, "-f", "onnx", "--out", out)
    assert f"note: {out}/ also holds model.tflite, pruned.onnx, which this export does not write" in res.output


def test_tflite_micro_of_a_model_that_is_not_weight_shared_is_refused_before_any_file(trained, tmp_path):
    pytest.importorskip("tflite_micro")
    res = run("export", trained, "-f", "tflite-int8,tflite-micro", *CAL, "--out", tmp_path / "m")
    assert res.exit_code == 2, res.output
    assert "no int8 filter is worth a TFLite Micro value table" in res.output
    assert "(tflite-int8)" not in res.output  # it was converted and written first, then the run stopped
    assert not (tmp_path / "m").exists()


def test_files_exported_from_an_archive_record_the_float_models_accuracy(trained, tmp_path):
    res = run("compress", trained, "--out", tmp_path / "c", "--no-progress")  # lossless: an .esq of the model
    assert res.exit_code == 0, res.output
    esq_meta = load_model(tmp_path / "c" / "model.esq").meta
    assert esq_meta["reference_accuracy"] is not None
    res = run("export", tmp_path / "c" / "model.esq", "-f", "onnx", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    from edgesqueeze import runtime

    meta = runtime.load(tmp_path / "e" / "model.onnx").meta
    assert meta["reference_accuracy"] == pytest.approx(esq_meta["reference_accuracy"], abs=1e-6)


def test_calibration_on_fewer_images_or_another_dataset_is_said(trained, tmp_path):
    """--calibration-images above the pool was capped, and --data of another dataset than the
    model's calibrated on it, both without a word (only the metadata showed it)."""
    res = run("export", trained, "-f", "onnx-int8", "--calibration-images", "100000", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert "fewer than the 100,000 export.calibration.images asks for" in res.output
    assert "was trained on" not in res.output, res.output  # the model's own dataset: no other-dataset note
    res = run("export", trained, "-f", "onnx-int8", *CAL, "--data", "mnist", "--out", tmp_path / "b")
    if res.exit_code == 0:  # MNIST is here (../shared, or downloaded)
        assert "note: calibrating on mnist, but" in res.output and "was trained on digits" in res.output
    else:  # only an MNIST this machine does not have may stop it
        assert "MNIST not found" in res.output, res.output


class ConvGRU(torch.nn.Module):
    """A conv front and a GRU over the rows: most weights in a recurrent layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.gru = torch.nn.GRU(4 * 28, 24, batch_first=True)
        self.fc = torch.nn.Linear(24, num_classes)

    def forward(self, x):
        y = torch.relu(self.conv(x)).permute(0, 2, 1, 3).flatten(2)
        out, _ = self.gru(y)
        return self.fc(out[:, -1])


def test_int8_files_of_a_model_with_a_recurrent_layer_say_its_weights_stay_float(tmp_path):
    """An LSTM/GRU model exported to int8 (a user's audit): the onnx-int8 file was about its
    fp32 file's size and the tflite-int8 larger, and export said nothing. Now a note names the
    layer and its share; the file is read to check the note is true: the GRU's weights are
    float32 initializers in it, and the conv's and the linear layer's 8-bit."""
    import onnx

    torch.manual_seed(0)
    torch.save(ConvGRU().state_dict(), tmp_path / "m.pt")
    res = run("export", tmp_path / "m.pt", "--arch", f"{__name__}:ConvGRU", "--data", "digits", "-f", "onnx-int8",
              *CAL, "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    gru = sum(p.numel() for p in ConvGRU().gru.parameters())
    share = round(100 * gru / sum(p.numel() for p in ConvGRU().parameters()))
    notes = [ln for ln in res.output.splitlines() if "recurrent" in ln]
    assert notes == [f"note: m.int8.onnx: {share}% of the model's weights stay float32, in recurrent layers, which "
                     f"int8 export does not quantize (conv and linear layers only): gru (GRU, {gru:,} values)"], res.output
    inits = onnx.load(str(tmp_path / "e" / "m.int8.onnx")).graph.initializer
    floats = sum(int(np.prod(t.dims)) for t in inits if t.data_type == onnx.TensorProto.FLOAT)
    ints = sum(int(np.prod(t.dims)) for t in inits if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    assert floats >= gru - 2 * 3 * 24 and ints >= 4 * 9 + 24 * 10, (floats, ints)  # GRU float, conv and fc 8-bit


def test_float_layers_none_clears_the_recipes_and_int8_options_without_an_int8_format_are_said(trained, tmp_path):
    """--float-layers could not clear a recipe's float layers ('' "names nothing"): 'none' now
    makes every layer int8. And --weight-rounding gptq --calibration-images 5 with -f onnx was
    taken without a word; now a note says they apply to int8 formats only."""
    from edgesqueeze import runtime

    recipe = ["-r", "recipes/squeezenet-digits.yaml"]  # tflite-int8 keeps features.0 float
    res = run("export", trained, *recipe, "-f", "tflite-int8", "--no-pack", *CAL, "--float-layers", "none",
              "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert runtime.load(tmp_path / "a" / "model.int8.tflite").meta["calibration"]["float_layers"] == []
    res = run("export", trained, "-f", "onnx", "--weight-rounding", "gptq", "--calibration-images", "5",
              "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert ("note: --weight-rounding, --calibration-images only apply to the int8 formats, and this export writes "
            "none (onnx)") in res.output, res.output
