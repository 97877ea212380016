"""Safe model I/O: round trips, every accepted input kind, and every refusal."""

from __future__ import annotations

import torch

import pytest

from edgesqueeze.checkpoint import load_model, model_meta, save_checkpoint
from edgesqueeze.errors import CheckpointError, ModelError
from edgesqueeze.models import build_model


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model("squeezenet_mnist", num_classes=10).eval()


def test_round_trip_is_bitwise(tmp_path, small_model):
    meta = model_meta(small_model, classes=[str(i) for i in range(10)], input_shape=[1, 28, 28])
    path = save_checkpoint(tmp_path / "m.pt", small_model, meta)
    loaded = load_model(path)
    assert loaded.kind == "checkpoint"
    assert loaded.meta["classes"][3] == "3"
    assert not loaded.model.training
    for (k, a), (k2, b) in zip(small_model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # it is plain data: the safe loader reads it
    assert isinstance(torch.load(path, weights_only=True), dict)


def test_save_is_deterministic(tmp_path, small_model):
    meta = model_meta(small_model)
    a = save_checkpoint(tmp_path / "a.pt", small_model, meta).read_bytes()
    b = save_checkpoint(tmp_path / "b.pt", small_model, meta).read_bytes()
    assert a == b


def test_plain_state_dict_needs_arch(tmp_path, small_model):
    path = tmp_path / "sd.pt"
    torch.save(small_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(path)
    loaded = load_model(path, arch="squeezenet_mnist", arch_kwargs={"num_classes": 10})
    assert loaded.kind == "state_dict"
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.model(x), small_model(x))


def test_wrong_architecture_names_the_layer(tmp_path, small_model):
    path = tmp_path / "sd.pt"
    torch.save(small_model.state_dict(), path)
    with pytest.raises(ModelError, match="do not fit architecture 'resnet8'"):
        load_model(path, arch="resnet8")
    with pytest.raises(ModelError, match=r"shape \(10, .*pass --num-classes 10"):
        load_model(path, arch="squeezenet_mnist", arch_kwargs={"num_classes": 7})


def test_pickled_module_refused_unless_trusted(tmp_path, small_model):
    path = tmp_path / "pickled.pt"
    torch.save(small_model, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "pickle"


def test_torchscript_and_exported_program(tmp_path, small_model):
    x = torch.randn(1, 1, 28, 28)
    ts = tmp_path / "m.ts.pt"
    torch.jit.save(torch.jit.trace(small_model, x), str(ts))
    loaded = load_model(ts)
    assert loaded.kind == "torchscript"
    assert torch.allclose(loaded.model(x), small_model(x), atol=1e-5)

    ep = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(small_model, (x,)), str(ep))
    loaded = load_model(ep)
    assert loaded.kind == "exported_program"
    assert torch.allclose(loaded.model(x), small_model(x), atol=1e-5)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_garbage_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_model(path)


def test_truncated_checkpoint_is_refused(tmp_path, small_model):
    good = save_checkpoint(tmp_path / "m.pt", small_model, model_meta(small_model)).read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(good[: len(good) // 2])
    # said "cannot read as a PyTorch file ([Errno 22] Invalid argument)"
    with pytest.raises(CheckpointError, match=r"trunc.pt: truncated: a PyTorch zip archive without its end"):
        load_model(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.pt")


def test_failed_save_leaves_old_file(tmp_path, small_model):
    path = save_checkpoint(tmp_path / "m.pt", small_model, model_meta(small_model))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(path, small_model, {"arch": "x", "bad": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
