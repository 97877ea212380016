"""--classes and --input-shape given for a model file that does not describe its inputs (a
plain state_dict, TorchScript, a program) must fit the model: they were taken as given, so
`info` showed 3 classes and `inspect` a [None, 3] output for a 10-logit model, and `eval`
ran with them. Real files on disk, the real CLI."""

from __future__ import annotations

import json

import numpy as np
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
    names = "0123456789" if command[0] == "eval" else "abcdefghij"  # eval: the dataset's own names
    ok = _run(*command, state_dict_file, "--arch", "squeezenet_mnist", "--classes", ",".join(names))
    assert ok.exit_code == 0, ok.output
    if command[0] == "eval":  # ten names that are not the dataset's: labels would be matched by position
        other = _run(*command, state_dict_file, "--arch", "squeezenet_mnist", "--classes", ",".join("abcdefghij"))
        assert other.exit_code == 2 and "class 0 is '0' there, 'a' in the model" in other.output, other.output


def test_an_input_shape_the_model_does_not_run_on_is_refused(state_dict_file):
    res = _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--input-shape", "3,28,28",
               "--mean", "0.1,0.2,0.3", "--std", "0.1,0.1,0.1")
    assert res.exit_code == 2 and "does not run on inputs of shape [3, 28, 28]" in res.output, res.output
    res = _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--input-shape", "1,28,28",
               "--classes", "a,b")  # with a shape, the logits are counted by running it
    assert res.exit_code == 2 and "outputs 10 logits but 2 class names are given" in res.output, res.output
    assert _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--input-shape", "1,28,28").exit_code == 0


@pytest.mark.parametrize("extra", [[], ["--input-shape", "1,28,28"]])
def test_a_mean_or_std_with_the_wrong_channel_count_is_refused(state_dict_file, extra):
    """info took --mean 0.5,0.5 for a 1-channel model and showed it; eval/export would fail
    later (or normalise with a broadcast). The count is known from the architecture as built
    or from --input-shape, and mean and std must have the same count."""
    res = _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--mean", "0.5,0.5", "--std", "0.2,0.2", *extra)
    assert res.exit_code == 2, res.output
    assert "--mean gives 2 values for an input of 1 channel" in res.output and "Traceback" not in res.output
    res = _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--mean", "0.5", "--std", "0.2,0.2", *extra)
    assert res.exit_code == 2, res.output  # either message is right: with a shape, the channels first
    assert ("--mean gives 1 value but the std has 2" in res.output
            or "--std gives 2 values for an input of 1 channel" in res.output), res.output
    ok = _run("info", state_dict_file, "--arch", "squeezenet_mnist", "--mean", "0.5", "--std", "0.2", *extra)
    assert ok.exit_code == 0 and "[0.5]" in ok.output, ok.output


@pytest.mark.parametrize("given", [["--mean", "0.9"], ["--std", "0.05"], ["--mean", "0.3,0.3"]])
@pytest.mark.parametrize("command", [["eval", "--data", "digits", "--limit", "20"], ["info"],
                                     ["export", "-f", "onnx", "--data", "digits"]])
def test_a_mean_without_a_std_or_a_std_without_a_mean_is_refused(state_dict_file, tmp_path, command, given):
    """--mean alone was dropped without a word: the dataset's mean and std were used, and the
    note that said so asked for --mean/--std (eval at 98% with --mean 0.9 alone, 10% with
    --std 0.1 added; export recorded the dataset's values). Now one line, exit 2, nothing written."""
    out = ["--out", tmp_path / "e"] if command[0] == "export" else []
    res = _run(*command, state_dict_file, "--arch", "squeezenet_mnist", *given, *out)
    assert res.exit_code == 2, res.output
    said = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    other = "std" if given[0] == "--mean" else "mean"
    assert len(said) == 1 and f"{given[0]} is given but no {other}" in said[0], res.output
    assert "give --mean and --std together" in said[0] and "Traceback" not in res.output, res.output
    assert not (tmp_path / "e").exists()


def test_a_damaged_file_is_not_offered_the_trust_pickle_advice(tmp_path):
    """A file starting with a pickle protocol byte but no pickle after it, or an .esq cut after
    its first bytes: torch's safe unpickler refuses both as it refuses a whole-model pickle,
    and the user was told to pass --trust-pickle (which then failed to unpickle)."""
    import pickle

    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"\x80\x02garbage")
    cut = tmp_path / "cut.esq"
    cut.write_bytes(b"\x89ESQ")
    whole = tmp_path / "whole.pt"  # a real whole-model pickle keeps the advice
    with open(whole, "wb") as fh:
        pickle.dump(torch.nn.Linear(2, 2), fh)
    for command in ("info", "eval"):
        res = _run(command, fake)
        assert res.exit_code == 2 and "does not parse as one (truncated or damaged?)" in res.output, res.output
        res = _run(command, cut)
        assert res.exit_code == 2 and "shorter than" in res.output and "pickle" not in res.output, res.output
        res = _run(command, whole)
        assert res.exit_code == 2 and "--trust-pickle" in res.output and "Warning" not in res.output, res.output


def test_inspect_of_a_pt_file_that_is_not_one_says_so(tmp_path):
    j = tmp_path / "j.pt"
    j.write_text('{"a": 1}\n')
    res = _run("inspect", j)
    assert res.exit_code == 2 and "not a PyTorch model file" in res.output and "ONNX" not in res.output, res.output


def test_eval_json_is_strict_json_when_the_loss_is_nan(state_dict_file, tmp_path):
    import json

    sd = torch.load(state_dict_file, weights_only=True)
    for key in [k for k in sd if k.endswith("weight")]:  # finite weights (NaN ones are refused at
        sd[key].mul_(3e37)  # load) whose activations overflow: inf - inf, a nan loss
    nan = tmp_path / "nan.pt"
    torch.save(sd, nan)
    res = _run("eval", nan, "--arch", "squeezenet_mnist", "--data", "digits", "--limit", "10", "--json")
    assert res.exit_code == 0, res.output

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    out = json.loads(res.output[res.output.index("{"):], parse_constant=refuse)
    assert out["loss"] is None


def test_sensitivity_without_validation_images_says_why_and_what_to_do(state_dict_file):
    """The ImageNet sample has only a test split: the scan refused with "its dataset has no
    validation split", and the earlier hint (--data imagenet-sample) led straight there."""
    from pathlib import Path

    shared = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    if not (shared / "imagenet-sample-100.zip").exists():
        pytest.skip("needs ../shared/datasets/imagenet-sample-100.zip beside the repository")
    path = shared.parent / "models" / "squeezenet1_0-imagenet.pt"
    res = _run("sensitivity", path, "--arch", "squeezenet1_0", "--data", "imagenet-sample", "--data-dir", shared,
               "--sparsities", "0.5", "--layers", "classifier.1")
    assert res.exit_code == 2, res.output
    assert "'imagenet-sample' has no training images to hold them out of" in res.output
    assert "pass --data a dataset with a training split" in res.output


def test_an_arch_the_esq_does_not_use_is_said(tmp_path):
    """--arch on an .esq of a registered architecture was dropped without a word (a checkpoint
    says so); the archive's own architecture is still the one built."""
    from edgesqueeze.checkpoint import esq_dumps
    from edgesqueeze.errors import Note

    model = build_model("squeezenet_mnist", num_classes=10)
    data, _ = esq_dumps(model.state_dict(), {"format": "edgesqueeze.esq-model", "arch": "squeezenet_mnist",
                                             "arch_kwargs": {"num_classes": 10}})
    path = tmp_path / "m.esq"
    path.write_bytes(data)
    from edgesqueeze.checkpoint import load_model

    with pytest.warns(Note, match="records its architecture 'squeezenet_mnist', which is used: 'resnet8'"):
        loaded = load_model(path, arch="resnet8")
    assert loaded.meta["arch"] == "squeezenet_mnist"


def test_eval_on_another_image_folder_resizes_to_the_models_input(tmp_path):
    """eval --data imagefolder:OTHER of a model whose input is 3x16x16 said "images differ in
    size" and asked for --image-size, which the model records; verify resized them. Now eval
    resizes another folder's images to the model's input, as verify does."""
    from PIL import Image

    from ddp_net import PlainNet

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):  # two sizes in one folder
            side = 20 if i % 2 else 24
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    torch.manual_seed(0)
    torch.save(PlainNet(num_classes=2, in_channels=3).state_dict(), tmp_path / "m.pt")
    res = _run("eval", tmp_path / "m.pt", "--arch", "tests/ddp_net.py:PlainNet", "--arch-kwargs",
               "{num_classes: 2, in_channels: 3}", "--input-shape", "3,16,16", "--mean", "0.5,0.5,0.5", "--std",
               "0.2,0.2,0.2", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n"] >= 2


@pytest.mark.parametrize("size", [160, 224])
def test_run_prepares_an_image_as_the_dataset_the_file_was_measured_on(tmp_path, size, monkeypatch):
    """export chose run's crop by the input size alone: a 160 px model of an image folder
    (which stretches each image to the square) was fed centre crops by `run` while `verify`
    measured stretched images, 83 grey levels apart on average for 2:1 images; and an ImageNet
    crop's shorter side was int(160 * 256 / 224) = 182, the dataset's round() 183."""
    from PIL import Image

    from edgesqueeze.data import load_dataset
    from edgesqueeze.data._images import imagenet_crop
    from edgesqueeze.export._common import artifact_meta
    from edgesqueeze.runtime import load_image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (size // 2, size * 2, 3), dtype=np.uint8)).save(
                tmp_path / "f" / split / c / "x.png")
    ds = load_dataset(f"imagefolder:{tmp_path / 'f'}", image_size=size)
    meta = {"input_shape": [3, size, size], "dataset": f"imagefolder:{tmp_path / 'f'}"}
    resize = artifact_meta(meta, "onnx")["resize"]
    assert resize is None
    files = sorted((tmp_path / "f" / "test").glob("*/x.png"))
    assert np.array_equal(np.stack([load_image(f, (3, size, size), resize=resize) for f in files]), ds.test_x)

    for name in ("imagenet-sample", "ImageNet:/data/imagenet"):
        resize = artifact_meta({**meta, "dataset": name}, "onnx")["resize"]
        with Image.open(files[0]) as im:
            want = np.asarray(imagenet_crop(im.convert("RGB"), size)).transpose(2, 0, 1)
        assert np.array_equal(load_image(files[0], (3, size, size), resize=resize), want), (name, resize)
    # a model that records no dataset: an ImageNet-style crop from 160 px up, as before
    assert artifact_meta({"input_shape": [3, size, size]}, "onnx")["resize"] == round(size * 256 / 224)
    assert artifact_meta({"input_shape": [3, 32, 32]}, "onnx")["resize"] is None


def test_export_reads_an_image_folder_at_the_models_input_as_verify_does(tmp_path):
    """export of a 16x16 model on a folder of 32x16 images said the folder "gives images of shape
    [3, 16, 32]" and to pass another --data; verify and eval resize a folder to the input."""
    from PIL import Image

    from ddp_net import PlainNet

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    torch.manual_seed(0)
    torch.save(PlainNet(num_classes=2, in_channels=3).state_dict(), tmp_path / "m.pt")
    data = f"imagefolder:{tmp_path / 'imgs'}"
    res = _run("export", tmp_path / "m.pt", "--arch", "tests/ddp_net.py:PlainNet", "--arch-kwargs",
               "{num_classes: 2, in_channels: 3}", "--input-shape", "3,16,16", "--data", data, "-f", "onnx,onnx-int8",
               "--calibration-images", "4", "--out", tmp_path / "x")
    assert res.exit_code == 0, res.output
    meta = json.loads(__import__("onnx").load(str(tmp_path / "x" / "m.int8.onnx")).metadata_props[0].value)
    assert meta["input_shape"] == [3, 16, 16] and meta["resize"] is None and meta["calibration"]["images"] == 4
    res = _run("verify", tmp_path / "x" / "m.onnx", tmp_path / "x" / "m.int8.onnx", "--out", tmp_path / "v.json")
    assert res.exit_code == 0, res.output


def test_info_and_inspect_json_are_strict_json_when_the_metadata_holds_nan(tmp_path):
    """A checkpoint whose recorded metrics hold NaN (a diverged run): `info --json` and `inspect
    --json` printed `"loss": NaN`, which strict JSON parsers refuse (eval --json wrote null)."""
    import json

    from edgesqueeze.checkpoint import save_checkpoint
    from edgesqueeze.models import build_model

    path = tmp_path / "nan.pt"
    save_checkpoint(path, build_model("squeezenet_mnist", num_classes=10, width_mult=0.25),
                    {"arch": "squeezenet_mnist", "arch_kwargs": {"width_mult": 0.25}, "dataset": "digits",
                     "metrics": {"test": {"accuracy": 0.1, "loss": float("nan")}, "best": float("inf")}})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    for command in ("info", "inspect"):
        res = _run(command, path, "--json")
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout, parse_constant=refuse)
        assert "NaN" not in res.stdout and "Infinity" not in res.stdout, (command, res.stdout)
        assert isinstance(out, dict)
