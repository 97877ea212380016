"""Image folders streamed from disk (edgesqueeze.data.stream): real JPEG files, decoded in
real DataLoader worker processes. The streamed path must give the batches the in-memory path
gives, train the same weights, and stop on a broken file or an unknown class with one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgesqueeze.data import batches, default_augment, load_dataset, split_train_val
from edgesqueeze.data.stream import LazyImages
from edgesqueeze.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _write_images(root: Path, classes: list[str], per_class: int, size: int = 20, seed: int = 0,
                  ext: str = ".jpg") -> None:
    """Per class a different mean colour plus noise, so a small net can tell them apart."""
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([(ci * 80) % 256, (255 - ci * 60) % 256, (ci * 37 + 90) % 256])
            img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i:03d}{ext}", quality=90)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    classes = ["cat", "dog", "eel"]
    _write_images(tmp_path / "imgs" / "train", classes, 30, seed=0)
    _write_images(tmp_path / "imgs" / "test", classes, 8, seed=1)
    return tmp_path / "imgs"


def _all(it) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(it))
    return torch.cat(xs), torch.cat(ys)


def test_streamed_folder_gives_the_in_memory_batches(folder):
    """Same images, labels, statistics (fewer than 2,000 images: the sample is all of them),
    and, drawn with the same generator, the same augmented batches, with 2 workers or none."""
    spec = f"imagefolder:{folder}"
    mem = load_dataset(spec)
    lazy = load_dataset(spec, stream=True)
    assert isinstance(lazy.train_x, LazyImages) and not isinstance(mem.train_x, LazyImages)
    assert lazy.train_x.shape == mem.train_x.shape and lazy.classes == mem.classes
    np.testing.assert_array_equal(lazy.train_y, mem.train_y)
    np.testing.assert_array_equal(np.asarray(lazy.test_x), mem.test_x)
    assert lazy.mean == mem.mean and lazy.std == mem.std
    (mx, my), _ = split_train_val(mem, 0.2, seed=3)
    (lx, ly), _ = split_train_val(lazy, 0.2, seed=3)
    assert isinstance(lx, LazyImages) and len(lx) == len(mx)
    kw = dict(batch_size=16, shuffle=True, mean=mem.mean, std=mem.std, augment=default_augment("cifar10"),
              drop_last=True)
    want = _all(batches(mx, my, generator=torch.Generator().manual_seed(5), **kw))
    for workers in (2, 0):
        got = _all(batches(lx, ly, generator=torch.Generator().manual_seed(5), workers=workers, **kw))
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), workers
    # a torchrun rank decodes only the images it keeps of each batch, and gets them as they are in one process
    gen_part, gen_all = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for (xb, yb), (wx, wy) in zip(batches(lx, ly, generator=gen_part, part=(1, 2), **kw),
                                  batches(mx, my, generator=gen_all, **kw), strict=True):
        assert torch.equal(xb[1::2], wx[1::2]) and torch.equal(yb, wy)
        assert not torch.equal(xb[0::2], wx[0::2])  # left undecoded
    assert torch.equal(gen_part.get_state(), gen_all.get_state())  # the same draws: the next epoch's order too


def test_training_streamed_gives_the_same_weights(folder, tmp_path):
    """One epoch with data.stream on and off: bit-identical weights (same batches, same order),
    for a model with dropout too: the DataLoader drew its workers' seed from torch's global
    generator, which moved every later dropout mask (weights up to 4e-3 apart)."""
    from edgesqueeze.recipe import recipe_from_dict
    from edgesqueeze.train import fit

    def run(stream: bool):
        raw = {"version": 1, "name": "s", "seed": 0, "model": {"import": "tests/ddp_net.py:DropoutNet"},
               "data": {"dataset": f"imagefolder:{folder}", "val_fraction": 0.1, "stream": stream},
               "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "threads": 1}}
        cwd = os.getcwd()
        os.chdir(Path(__file__).resolve().parents[1])
        try:
            return fit(recipe_from_dict(raw), out_dir=tmp_path / f"run-{stream}", progress=False, log=lambda _m: None)
        finally:
            os.chdir(cwd)

    a, b = run(False), run(True)
    assert b.meta.get("data_stream") is True
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.test == b.test

    # the streamed model's own data, read back the same way: INT8 calibration and verification
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    arch = ["--arch", "tests/ddp_net.py:DropoutNet"]  # the code the checkpoint names, imported as asked
    exp = CliRunner().invoke(cli, ["export", str(b.out_dir / "model.pt"), *arch, "-f", "onnx-int8", "--out",
                                   str(tmp_path / "exp")], catch_exceptions=False)
    assert exp.exit_code == 0, exp.output
    ver = CliRunner().invoke(cli, ["verify", str(b.out_dir / "model.pt"), str(tmp_path / "exp" / "model.int8.onnx"),
                                   *arch], catch_exceptions=False)
    assert ver.exit_code == 0 and "agreement" in ver.output, ver.output
    assert "streamed from disk" in ver.output, ver.output  # trained streamed: verified streamed

    # verify runs a streamed test split through the runtime batch by batch (decoded in
    # workers): the scores of the whole split decoded at once
    from edgesqueeze import runtime
    from edgesqueeze.data.stream import uint8_batches
    from edgesqueeze.verify import _runtime_scores

    lazy = load_dataset(f"imagefolder:{folder}", stream=True).test_x
    art = runtime.load(tmp_path / "exp" / "model.int8.onnx")
    assert [len(b) for b in uint8_batches(lazy, batch_size=3)] == [3] * (len(lazy) // 3) + (
        [len(lazy) % 3] if len(lazy) % 3 else [])
    np.testing.assert_array_equal(_runtime_scores(art, lazy), art.predict_images(np.asarray(lazy)))


def test_a_corrupt_jpeg_stops_the_stream_with_one_line_naming_it(folder):
    """Broken before loading (mean/std read it) or while streaming (read in a worker). The
    workers are stopped when the error is raised: the iterator was left in a reference cycle,
    and when the garbage collector freed it, each worker waited out DataLoader's 5 s join
    timeout (10 s more for the error, at whatever point the collector ran)."""
    import gc
    import multiprocessing

    bad = folder / "train" / "dog" / "007.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:40])  # a truncated file
    with pytest.raises(DataError, match=r"^cannot decode image .*007\.jpg .*delete or replace it$"):
        load_dataset(f"imagefolder:{folder}", stream=True)
    bad.write_bytes(good)
    ds = load_dataset(f"imagefolder:{folder}", stream=True, image_size=20)
    bad.write_bytes(good[:40])
    before = {p.pid for p in multiprocessing.active_children()}
    it = batches(ds.train_x, ds.train_y, batch_size=8, shuffle=False, generator=None, mean=ds.mean, std=ds.std,
                 workers=2)
    gc.disable()  # only reference counts free things here, as between two collections
    try:
        with pytest.raises(DataError) as e:
            list(it)
        left = {p.pid for p in multiprocessing.active_children()} - before
    finally:
        gc.enable()
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "delete or replace it" in msg, msg
    assert not left, f"decoding workers still running after the error: {left}"


def test_a_test_class_without_training_images_is_refused_in_one_line(folder):
    _write_images(folder / "test", ["fox"], 2)
    for stream in (True, False):
        with pytest.raises(DataError, match=r"test/fox: class 'fox' has test images but no train/fox/ folder"):
            load_dataset(f"imagefolder:{folder}", stream=stream)


@pytest.mark.skipif(not (SHARED / "imagenet_classes.txt").is_file(), reason="needs ../shared's ImageNet class list")
def test_imagenet_layout_streams_and_refuses_an_unknown_class(tmp_path):
    root = tmp_path / "inet"
    _write_images(root / "train", ["n01440764", "n01443537"], 6, size=40, ext=".JPEG")
    _write_images(root / "val", ["n01440764", "n01443537"], 3, size=40, seed=2, ext=".JPEG")
    ds = load_dataset(f"imagenet:{root}", data_dir=SHARED, image_size=32)
    assert isinstance(ds.train_x, LazyImages) and ds.train_x.shape == (12, 3, 32, 32)
    assert ds.num_classes == 1000 and ds.classes[1] == "goldfish"
    assert sorted(set(ds.train_y.tolist())) == [0, 1] and len(ds.test_y) == 6
    x = np.asarray(ds.test_x[:2])
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.uint8

    (root / "val" / "n99999999").mkdir()
    with pytest.raises(DataError, match=r"n99999999: 'n99999999' is not a class \(wnid\) listed in .*imagenet_classes"):
        load_dataset(f"imagenet:{root}", data_dir=SHARED)
    with pytest.raises(DataError, match=r"no train/ folder"):
        load_dataset(f"imagenet:{tmp_path / 'nothing'}", data_dir=SHARED)


@pytest.mark.skipif(not (SHARED / "imagenet_classes.txt").is_file(), reason="needs ../shared's ImageNet class list")
def test_train_on_an_imagenet_folder_stops_at_a_corrupt_jpeg_in_one_line(tmp_path):
    """Nothing reads pixels before training (ImageNet's mean/std are fixed), so a worker finds
    the broken file mid-epoch: one error line naming it, exit 2, no model written."""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    root = tmp_path / "inet"
    _write_images(root / "train", ["n01440764", "n01443537"], 8, size=40, ext=".JPEG")
    _write_images(root / "val", ["n01440764"], 2, size=40, seed=2, ext=".JPEG")
    bad = root / "train" / "n01443537" / "005.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])
    args = ["train", "-r", "recipes/squeezenet-mnist.yaml", "--set", f"data.dataset=imagenet:{root}",
            "--set", f"data.data_dir={SHARED}", "--set", "data.image_size=32", "--set", "model.arch=resnet8",
            "--set", "train.batch_size=4", "--set", "train.epochs=1", "--out", str(tmp_path / "run"), "--no-progress"]
    cwd = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        os.chdir(cwd)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and str(bad) in errors[0], res.output
    assert "Traceback" not in res.output and not (tmp_path / "run" / "model.pt").exists()


def test_a_corrupt_test_image_after_streamed_training_says_resume_evaluates_without_training(folder, tmp_path,
                                                                                            monkeypatch):
    """A streamed test/ split outside the up-front sample is decoded only after the last epoch:
    the error names the file and says the training is kept; with the file fixed, --resume
    writes model.pt without training again. (The sample is the whole of a folder this small,
    so it is made empty here, as it is for all but 200 images of a large folder.)"""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli
    from edgesqueeze.data import datasets

    monkeypatch.setattr(datasets, "_STREAM_SAMPLE", 0)

    bad = folder / "test" / "dog" / "003.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:100])
    out = tmp_path / "run"
    args = ["train", "-r", "recipes/squeezenet-digits.yaml", "--set", f"data.dataset=imagefolder:{folder}",
            "--set", "data.stream=true", "--set", "data.image_size=16", "--set", "train.epochs=1",
            "--set", "train.batch_size=16", "--out", str(out), "--no-progress"]
    cwd = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])
    try:
        res = CliRunner().invoke(cli, args)
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1, res.output
        assert str(bad) in errors[0] and "--resume" in errors[0] and str(out / "last.pt") in errors[0]
        assert not (out / "model.pt").exists()
        bad.write_bytes(good)
        res = CliRunner().invoke(cli, [*args, "--resume"])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    assert "epoch   1/1" not in res.output and (out / "model.pt").is_file()


def test_a_streamed_folder_reads_its_channels_and_size_from_more_than_the_first_file(tmp_path):
    """The first class gray, the others in colour: streamed, every image became gray (the
    model recorded 1 channel), where in memory the folder is RGB. One image of another size
    was stretched silently, where in memory it is refused."""
    root = tmp_path / "mix"
    _write_images(root, ["b", "c"], 4, size=16)
    (root / "a").mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(root / "a" / f"{i}.png")
    spec = f"imagefolder:{root}"
    assert load_dataset(spec, stream=True).input_shape == load_dataset(spec).input_shape == (3, 16, 16)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "c" / "odd.png")
    for stream in (False, True):
        with pytest.raises(DataError, match="differ in size"):
            load_dataset(spec, stream=stream)
    assert load_dataset(spec, stream=True, image_size=16).input_shape == (3, 16, 16)  # asked for: resized

    gray = LazyImages(root, ["a/0.png", "b/000.jpg"], size=16, channels=1, check_gray=True)
    with pytest.raises(DataError, match=r"b/000\.jpg is in colour \(RGB\), but the folder was read as grayscale"):
        gray.decode([0, 1])  # an image outside the sample: refused as it is decoded, not made gray


def test_an_image_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """imagefolder:base was recorded as given, so a model was later scored on whatever
    ./base held where the command ran."""
    _write_images(tmp_path / "base", ["x", "y"], 3, size=16)
    monkeypatch.chdir(tmp_path)
    assert load_dataset("imagefolder:base").name == f"imagefolder:{tmp_path / 'base'}"


def test_verify_limit_takes_every_class_and_a_non_square_model_is_verified(tmp_path):
    """verify --limit 2 on a folder (its test split ordered by class) measured the first
    class alone; a model trained on 20x16 images was refused by verify ("gives [3, 20, 20]")
    because the folder was resized to a square."""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli
    from edgesqueeze.verify import _Data

    root = tmp_path / "wide"
    for split, n in (("train", 6), ("test", 3)):
        rng = np.random.default_rng(len(split))
        for ci, c in enumerate(["a", "b", "c"]):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = np.clip(ci * 90 + rng.normal(0, 20, (16, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    _, _, y = _Data(f"imagefolder:{root}", None, 3, print).get(None, [3, 16, 20], "m")
    assert sorted(y.tolist()) == [0, 1, 2]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: {{arch: squeezenet_mnist, kwargs: {{width_mult: 0.25}}}}\n"
                      f"data: {{dataset: 'imagefolder:{root}'}}\ntrain: {{epochs: 1, batch_size: 6, threads: 1}}\n")
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])  # noqa: E731
    assert run("train", "-r", recipe, "--out", tmp_path / "m", "--no-progress").exit_code == 0
    assert run("export", tmp_path / "m" / "model.pt", "-f", "onnx", "--out", tmp_path / "e").exit_code == 0
    res = run("verify", tmp_path / "m" / "model.pt", tmp_path / "e" / "model.onnx", "--out", tmp_path / "v.json")
    assert res.exit_code == 0 and "NOT evaluated" not in res.output, res.output


def test_verify_notes_a_folder_resized_to_the_model_input(tmp_path):
    """eval refuses a folder of another size than the model's input; verify (whose exported
    files record no training image size) resizes it, and now says so, naming a file."""
    from edgesqueeze.verify import _Data

    _write_images(tmp_path / "f" / "train", ["a", "b"], 3, size=24, ext=".png")
    _write_images(tmp_path / "f" / "test", ["a", "b"], 2, size=24, seed=1, ext=".png")
    for shape, noted in (([3, 16, 16], True), ([3, 24, 24], False)):
        lines: list[str] = []
        _, x, _ = _Data(f"imagefolder:{tmp_path / 'f'}", None, None, lines.append).get(None, shape, "m.onnx")
        assert x.shape[-2:] == tuple(shape[1:])
        notes = [ln for ln in lines if "resized" in ln]
        assert bool(notes) == noted, lines
        if noted:
            assert "is 24x24" in notes[0] and "16x16, the input of m.onnx" in notes[0]
            assert str(tmp_path / "f" / "test" / "a") in notes[0]


def test_an_encrypted_zip_is_one_line(tmp_path):
    """zipfile raises RuntimeError for an encrypted member: it escaped as a traceback."""
    import zipfile

    _write_images(tmp_path / "src", ["a", "b"], 2, size=16, ext=".png")
    archive = tmp_path / "enc.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "src").rglob("*.png")):
            zf.write(f, f.relative_to(tmp_path / "src").as_posix())
    data = bytearray(archive.read_bytes())  # mark every member encrypted (bit 0), as zip -P does
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
    for info in infos:
        data[info.header_offset + 6] |= 1
    central = data.find(b"PK\x01\x02")
    while central != -1:
        data[central + 8] |= 1
        central = data.find(b"PK\x01\x02", central + 4)
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"enc\.zip:a/000\.png is encrypted .*zip the images again without a password"):
        load_dataset(f"imagefolder:{archive}")


def test_a_bad_workers_variable_stops_a_streamed_run_before_it_writes_anything(folder, tmp_path, monkeypatch):
    """$EDGESQUEEZE_WORKERS=abc stopped a streamed run after its first lines, recipe.json
    written; an empty one (`EDGESQUEEZE_WORKERS=`) was refused rather than taken as unset."""
    from edgesqueeze.data.stream import default_workers
    from edgesqueeze.errors import DataError
    from edgesqueeze.recipe import recipe_from_dict
    from edgesqueeze.train import fit

    monkeypatch.setenv("EDGESQUEEZE_WORKERS", "")
    assert default_workers() == 2
    monkeypatch.setenv("EDGESQUEEZE_WORKERS", "abc")
    raw = {"version": 1, "name": "w", "model": {"arch": "squeezenet_mnist"},
           "data": {"dataset": f"imagefolder:{folder}", "stream": True}, "train": {"epochs": 1}}
    with pytest.raises(DataError, match="EDGESQUEEZE_WORKERS='abc' is not a number"):
        fit(recipe_from_dict(raw), out_dir=tmp_path / "w", progress=False, log=lambda _m: None)
    assert not (tmp_path / "w").exists()
