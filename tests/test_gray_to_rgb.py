"""A grayscale dataset for a model that takes 3-channel images: `data.channels: 3` when
training, and every command that reads a dataset for a file recording a 3-channel input
repeats the gray channel with a note, as `edgesqueeze run` does with a gray image file; and
the other way, an image folder of colour files for a 1-channel model is made gray, as `run`
makes each colour file gray."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from edgesqueeze.data import fit_channels, load_dataset, with_channels
from edgesqueeze.errors import DataError, Note


def test_with_channels_repeats_gray_and_refuses_colour():
    ds = load_dataset("digits", limit=40)
    rgb = with_channels(ds, 3)
    assert rgb.input_shape == (3, *ds.input_shape[1:])
    for c in range(3):
        assert np.array_equal(rgb.train_x[:, c], ds.train_x[:, 0]) and np.array_equal(rgb.test_x[:, c], ds.test_x[:, 0])
    assert rgb.mean == ds.mean * 3 and rgb.std == ds.std * 3
    assert np.array_equal(rgb.train_y, ds.train_y) and with_channels(rgb, 3) is rgb
    with pytest.raises(DataError, match="3-channel images; only grayscale ones"):
        with_channels(rgb, 1)


def test_a_streamed_gray_folder_decodes_as_rgb(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(tmp_path / "f" / cls / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path / 'f'}", stream=True)
    assert ds.input_shape[0] == 1
    rgb = with_channels(ds, 3)
    assert ds.test_x.shape[1] == 1  # the original is untouched
    got, gray = np.asarray(rgb.test_x), np.asarray(ds.test_x)
    assert got.shape[1] == 3 and all(np.array_equal(got[:, c], gray[:, 0]) for c in range(3))


@pytest.mark.parametrize("stream", [False, True])
def test_a_colour_folder_for_a_gray_model_is_made_gray_as_run_makes_each_file(tmp_path, stream):
    """verify refused it ("pass the dataset it was made for (--data)", though it was), while
    run converted each file with Pillow's convert("L") (audit, session 37)."""
    from PIL import Image

    from edgesqueeze.runtime import load_image

    rng = np.random.default_rng(0)
    expected = set()
    for cls in ("a", "b"):
        for split in ("train", "test"):
            (tmp_path / "f" / split / cls).mkdir(parents=True)
            for i in range(5):
                path = tmp_path / "f" / split / cls / f"{i}.png"
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
                if split == "test":
                    expected.add(load_image(path, (1, 12, 12)).tobytes())
    ds = load_dataset(f"imagefolder:{tmp_path / 'f'}", stream=stream)
    assert ds.input_shape == (3, 12, 12)
    with pytest.warns(Note, match="has colour images and net.onnx takes 1-channel ones: each is converted to gray"):
        gray = fit_channels(ds, [1, 12, 12], source="net.onnx")
    got = np.asarray(gray.test_x)
    assert got.shape == (10, 1, 12, 12) and {img.tobytes() for img in got} == expected
    assert np.array_equal(gray.test_y, ds.test_y) and len(gray.mean) == len(gray.std) == 1
    assert fit_channels(ds, [3, 12, 12], source="net.onnx") is ds


NET = textwrap.dedent('''
    from torch import nn


    class RGBNet(nn.Module):
        """Built for colour images only: no in_channels argument."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(8, num_classes))

        def forward(self, x):
            return self.net(x)
''')


def test_a_3_channel_model_trained_and_verified_on_gray_digits(tmp_path, monkeypatch):
    from edgesqueeze.cli import cli
    from edgesqueeze.runtime import load, load_image

    (tmp_path / "rgbnet.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: rgb\nmodel: {import: rgbnet.py:RGBNet}\n"
                      "data: {dataset: digits, limit: 200}\ntrain: {epochs: 1, batch_size: 32}\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "-r", str(recipe), "--out", "plain", "--no-progress"])
    assert res.exit_code == 2 and "does not run on 'digits' images of shape [1, 28, 28]" in res.output, res.output
    assert "or data.channels: 3 to repeat the gray channel" in res.output
    res = runner.invoke(cli, ["train", "-r", str(recipe), "--set", "data.channels=3", "--out", "run",
                              "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    model = tmp_path / "run" / "model.pt"
    res = runner.invoke(cli, ["verify", str(model), "--arch", "rgbnet.py:RGBNet", "--data", "digits",
                              "--out", "v.json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "note: dataset 'digits' is grayscale" in res.output and "repeated in the 3 channels" in res.output
    row = json.loads((tmp_path / "v.json").read_text())["artifacts"][0]
    assert row["error"] is None and row["n"] > 0
    res = runner.invoke(cli, ["export", str(model), "--arch", "rgbnet.py:RGBNet", "-f", "onnx", "--out", "e"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    art = load(tmp_path / "e" / "model.onnx")
    assert list(art.meta["input_shape"]) == [3, 28, 28] and len(art.meta["mean"]) == 3
    # the device feeds a gray image file the same way: its value in each channel
    from PIL import Image

    Image.fromarray(np.full((28, 28), 77, np.uint8)).save(tmp_path / "g.png")
    px = load_image(tmp_path / "g.png", art.meta["input_shape"])
    assert px.shape == (3, 28, 28) and (px == 77).all()
    res = runner.invoke(cli, ["train", "-r", str(recipe), "--set", "data.channels=1", "--out", "bad", "--no-progress"])
    assert res.exit_code == 2 and "data.channels" in res.output
