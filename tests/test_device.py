"""``--device`` and mixed precision: what this machine has is taken, what it lacks is one
``error:`` line with exit 2 before anything is read or written, and a run on the CPU is the
run it was before devices existed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from edgesqueeze.cli import cli
from edgesqueeze.device import DeviceError, check_precision, native_bf16, resolve_device
from edgesqueeze.recipe import recipe_from_dict

from emulated_x86 import AVX2_CPUID, requires_avx2_cpuid

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
NATIVE_BF16 = native_bf16() is not None


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


def test_mixed_precision_on_the_cpu_is_bf16_where_the_cpu_computes_it():
    check_precision("fp32", torch.device("cpu"))
    with pytest.raises(DeviceError, match="fp16 runs on CUDA only"):
        check_precision("fp16", torch.device("cpu"))
    if NATIVE_BF16:
        check_precision("bf16", torch.device("cpu"))
    else:
        with pytest.raises(DeviceError, match="does not compute bfloat16 natively"):
            check_precision("bf16", torch.device("cpu"))
    with pytest.raises(DeviceError, match="use one of"):
        check_precision("int4", torch.device("cpu"))


@requires_avx2_cpuid
def test_bf16_on_a_cpu_without_native_bf16_is_one_line_before_anything_is_written(tmp_path):
    """Under an AVX2-only CPUID (tools/with-avx2-cpuid.sh: no AMX, no AVX512_BF16, as torch
    and oneDNN see it) bf16 training is refused, exit 2, one line naming the field."""
    out = tmp_path / "out"
    res = subprocess.run([str(AVX2_CPUID), sys.executable, "-m", "edgesqueeze", "train", "-r",
                          "recipes/squeezenet-digits.yaml", "--set", "train.precision=bf16", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: train.precision bf16: this CPU does not compute"), lines
    assert not out.exists()


@pytest.mark.skipif(not NATIVE_BF16, reason="needs a CPU with native bfloat16 (AMX-BF16, AVX512_BF16, ARM BF16)")
def test_bf16_training_on_the_cpu_computes_in_bf16_keeps_float32_weights_and_repeats(tmp_path):
    """bf16 on the CPU: the run says so, its convs really ran in bf16 (other weights than the
    fp32 run of the same seed), the weights it writes stay float32, and the same seed gives
    the same weights again."""
    runs = {}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16-again", "bf16")):
        out = tmp_path / name
        res = CliRunner().invoke(cli, ["train", "-r", "recipes/squeezenet-digits.yaml", "--set", "train.epochs=1",
                                       "--set", "data.limit=300", "--set", "train.threads=1", "--set",
                                       f"train.precision={precision}", "--out", str(out), "--device", "cpu",
                                       "--no-progress"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert ("1 thread (bf16)" in res.output) == (precision == "bf16"), res.output
        runs[name] = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    weights = [k for k, v in runs["bf16"].items() if v.is_floating_point()]
    assert weights and all(runs["bf16"][k].dtype == torch.float32 for k in weights)
    assert any(not torch.equal(runs["bf16"][k], runs["fp32"][k]) for k in weights)
    assert all(torch.equal(runs["bf16"][k], runs["bf16-again"][k]) for k in runs["bf16"])


def test_where_a_run_computes_is_not_what_it_computes():
    """The device is left out of the recipe's hashes (a run started on a GPU resumes on the
    CPU), and fp32 is too (recipes hash as before devices existed); mixed precision is not."""
    base = {"version": 1, "train": {"epochs": 1}, "compress": {"prune": {"sparsity": 0.5}},
            "export": {"formats": ["onnx-int8"]}}
    plain = recipe_from_dict(base)
    on_gpu = recipe_from_dict({**base, "train": {"epochs": 1, "device": "cuda:1", "precision": "fp32"},
                               "compress": {"prune": {"sparsity": 0.5}, "prune_finetune": {"device": "cuda"},
                                            "calibration": {"device": "cuda"}},
                               "export": {"formats": ["onnx-int8"], "calibration": {"device": "cuda:0"}}})
    assert (plain.hash(), plain.train_hash()) == (on_gpu.hash(), on_gpu.train_hash())
    bf16 = recipe_from_dict({**base, "train": {"epochs": 1, "precision": "bf16"}})
    assert bf16.train_hash() != plain.train_hash()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: --device cuda is not an error here")
def test_every_command_refuses_a_missing_gpu_before_it_reads_anything(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "missing.pt"  # never read: the device is checked first
    for args in (["train", "-r", "recipes/squeezenet-digits.yaml", "--out", out],
                 ["compress", missing, "--set", "compress.prune.sparsity=0.5", "--out", out],
                 ["eval", missing], ["sensitivity", missing, "--out", out],
                 ["export", missing, "-f", "onnx-int8", "--out", out]):
        res = CliRunner().invoke(cli, [*map(str, args), "--device", "cuda"])
        assert res.exit_code == 2, res.output
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: --device cuda:"), res.output
    assert not out.exists()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: a cuda calibration device is not an error here")
def test_a_recipe_calibration_device_this_machine_lacks_is_one_line_naming_the_field(tmp_path):
    """compress.calibration.device and export.calibration.device are checked before the
    model is read."""
    out = tmp_path / "out"
    for args, field in (
            (["compress", tmp_path / "missing.pt", "--set", "compress.ptq.target_bytes=10000",
              "--set", "compress.calibration.device=cuda"], "compress.calibration.device"),
            (["export", tmp_path / "missing.pt", "-r", "recipes/squeezenet-digits.yaml", "-f", "onnx,tflite-int8",
              "--set", "export.calibration.device=cuda"], "export.calibration.device")):
        res = CliRunner().invoke(cli, [*map(str, args), "--out", str(out)])
        assert res.exit_code == 2, res.output
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {field} cuda:"), res.output
    assert not out.exists()


def test_a_retraining_precision_this_cpu_lacks_is_one_line_before_the_model_is_read(tmp_path):
    """compress checks each retraining stage's precision with its device up front (it was
    refused only when that stage began, after pruning)."""
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compress", str(tmp_path / "missing.pt"), "--set", "compress.prune.sparsity=0.5",
                                   "--set", "compress.cluster_finetune.precision=fp16", "--device", "cpu",
                                   "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: compress.cluster_finetune.precision fp16:"), res.output
    assert not out.exists()


def _calibration_passes(device):
    """Every torch-side calibration pass that takes a device, on a small seeded net: GPTQ,
    activation equalization, and compress's post-training statistics."""
    from torch import nn

    from edgesqueeze.compress.ptq_stats import calibration_stats
    from edgesqueeze.export.prepare import equalize_activations, gptq_round

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.randn(12, 1, 8, 8)
    stats = calibration_stats(net, x, fisher_samples=2, seed=3, batch_size=4, device=device)
    eq = equalize_activations(net, x, alpha=0.5, batch_size=4, device=device)
    gq = gptq_round(net, x, batch_size=4, device=device)
    return net, stats, eq.state_dict(), gq.state_dict()


def test_calibration_passes_on_the_cpu_are_the_passes_without_a_device():
    """On the CPU the device changes nothing (bit for bit), and everything comes back on it."""
    _, stats, eq, gq = _calibration_passes(None)
    net, stats_cpu, eq_cpu, gq_cpu = _calibration_passes(torch.device("cpu"))
    for kind in ("fisher", "hessian"):
        assert stats[kind].keys() == stats_cpu[kind].keys() and stats[kind]
        assert all(torch.equal(stats[kind][k], stats_cpu[kind][k]) for k in stats[kind])
    for a, b in ((eq, eq_cpu), (gq, gq_cpu)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.device.type == "cpu" for p in net.parameters())


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs where there is one)")
def test_calibration_passes_on_cuda_match_the_cpu_and_leave_the_model_there():
    _, stats, eq, gq = _calibration_passes(None)
    net, stats_gpu, eq_gpu, gq_gpu = _calibration_passes(torch.device("cuda"))
    assert all(p.device.type == "cpu" for p in net.parameters())
    for kind in ("fisher", "hessian"):
        for k in stats[kind]:
            assert stats_gpu[kind][k].device.type == "cpu"
            torch.testing.assert_close(stats_gpu[kind][k], stats[kind][k], rtol=1e-3, atol=1e-6)
    for a, b in ((eq, eq_gpu), (gq, gq_gpu)):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


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


def test_compress_writes_the_same_archive_whatever_device_the_cpu_is_named_by(tmp_path):
    """Where the passes ran is not recorded in what they made: post-training compression with
    --device cpu and with auto (the CPU here) write the same .esq bytes."""
    res = CliRunner().invoke(cli, ["train", "-r", "recipes/squeezenet-digits.yaml", "--set", "train.epochs=1",
                                   "--set", "data.limit=300", "--set", "train.threads=1", "--set",
                                   "model.kwargs={width_mult: 0.5}", "--out", str(tmp_path / "float"),
                                   "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    archives = {}
    for device in ("cpu", "auto"):
        out = tmp_path / device
        res = CliRunner().invoke(cli, ["compress", str(tmp_path / "float" / "model.pt"), "--set",
                                       "compress.ptq.target_bytes=20000", "--set", "compress.ptq.fisher_samples=1",
                                       "--set", "compress.calibration.images=16", "--device", device, "--out",
                                       str(out), "--no-progress"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        archives[device] = (out / "model.esq").read_bytes()
    if not HAS_CUDA:
        assert archives["cpu"] == archives["auto"]
