"""``--device`` and mixed precision: what this machine has is taken, what it lacks is one
``error:`` line with exit 2 before anything is read or written, and a run on the CPU is the
run it was before devices existed."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edgesqueeze.cli import cli
from edgesqueeze.device import DeviceError, check_precision, resolve_device
from edgesqueeze.recipe import recipe_from_dict

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:64", "mps", "tpu", "cuda:x", "gpu"])
def test_devices_this_machine_lacks_are_refused_in_one_line(spec):
    present = (spec in ("cuda", "cuda:0") and HAS_CUDA) or (spec == "mps" and HAS_MPS)
    if present:
        assert resolve_device(spec).type == spec.partition(":")[0]
        return
    with pytest.raises(DeviceError) as err:
        resolve_device(spec)
    msg = str(err.value)
    assert "\n" not in msg and spec in msg and "--device" in msg


def test_mixed_precision_is_for_cuda_only():
    check_precision("fp32", torch.device("cpu"))
    for precision in ("bf16", "fp16"):
        with pytest.raises(DeviceError, match="CUDA only"):
            check_precision(precision, torch.device("cpu"))
    with pytest.raises(DeviceError, match="use one of"):
        check_precision("int4", torch.device("cpu"))


def test_where_a_run_computes_is_not_what_it_computes():
    """The device is left out of the recipe's hashes (a run started on a GPU resumes on the
    CPU), and fp32 is too (recipes hash as before devices existed); mixed precision is not."""
    base = {"version": 1, "train": {"epochs": 1}, "compress": {"prune": {"sparsity": 0.5}}}
    plain = recipe_from_dict(base)
    on_gpu = recipe_from_dict({**base, "train": {"epochs": 1, "device": "cuda:1", "precision": "fp32"},
                               "compress": {"prune": {"sparsity": 0.5}, "prune_finetune": {"device": "cuda"}}})
    assert (plain.hash(), plain.train_hash()) == (on_gpu.hash(), on_gpu.train_hash())
    bf16 = recipe_from_dict({**base, "train": {"epochs": 1, "precision": "bf16"}})
    assert bf16.train_hash() != plain.train_hash()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: --device cuda is not an error here")
def test_every_command_refuses_a_missing_gpu_before_it_reads_anything(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "missing.pt"  # never read: the device is checked first
    for args in (["train", "-r", "recipes/squeezenet-digits.yaml", "--out", out],
                 ["compress", missing, "--set", "compress.prune.sparsity=0.5", "--out", out],
                 ["eval", missing], ["sensitivity", missing, "--out", out]):
        res = CliRunner().invoke(cli, [*map(str, args), "--device", "cuda"])
        assert res.exit_code == 2, res.output
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: --device cuda:"), res.output
    assert not out.exists()


def test_device_cpu_trains_the_same_weights_as_auto_without_a_gpu(tmp_path):
    """On the CPU, --device changes nothing: same seed, same weights (and a resumable state)."""
    runs = {}
    for device in ("cpu", "auto"):
        out = tmp_path / device
        res = CliRunner().invoke(cli, ["train", "-r", "recipes/squeezenet-digits.yaml", "--set", "train.epochs=1",
                                       "--set", "data.limit=300", "--set", "train.threads=1", "--out", str(out),
                                       "--device", device, "--no-progress"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        runs[device] = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    if HAS_CUDA:  # auto took the GPU: close, not equal
        return
    assert all(torch.equal(runs["cpu"][k], runs["auto"][k]) for k in runs["cpu"])
