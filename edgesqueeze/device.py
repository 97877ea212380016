"""Where PyTorch computes, and in what precision: ``--device auto|cpu|cuda|cuda:N|mps`` and
``precision: fp32|bf16|fp16`` (mixed precision through autocast: bf16 and fp16 on CUDA, bf16
on a CPU that computes bfloat16 natively).

``auto`` takes CUDA when torch sees a CUDA device, else the CPU (never MPS: Apple's backend
lacks ops that some user models need, so it is asked for by name). On the CPU nothing
changes: the same seed gives the same weights and the same checkpoint bytes as before
devices existed, because data are drawn on the CPU (one seeded generator) and only the
batches move.
"""

from __future__ import annotations

import contextlib
import platform
from typing import Iterator

import torch

from edgesqueeze.errors import EdgesqueezeError

PRECISIONS = ("fp32", "bf16", "fp16")


class DeviceError(EdgesqueezeError):
    """A device that is not here, or a precision it cannot run."""


def resolve_device(spec: str | None, *, what: str = "--device") -> torch.device:
    """The ``torch.device`` for ``spec``; a DeviceError (one line, what to do) for a device
    this machine does not have."""
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise DeviceError(f"{what} {spec!r}: expected cuda or cuda:N with N a device number, e.g. cuda:0")
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA device (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise DeviceError(f"{what} {spec}: {why}; use --device cpu, or auto to take a GPU only when "
                              "there is one")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise DeviceError(f"{what} {spec}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
        return torch.device(text)
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            why = ("this torch is built without MPS" if mps is None or not mps.is_built()
                   else "MPS needs Apple silicon and macOS 12.3 or later")
            raise DeviceError(f"{what} mps: Apple's Metal backend is not available here ({why}); use --device "
                              "cpu or auto")
        return torch.device("mps")
    raise DeviceError(f"{what} {spec!r}: unknown device; use auto, cpu, cuda, cuda:N or mps")


def native_bf16() -> str | None:
    """What makes this CPU compute bfloat16 natively (``"AMX-BF16"``, ``"AVX512_BF16"``,
    ``"ARM BF16"``), or None where oneDNN would emulate it, slower than float32. x86 from torch's
    own CPUID reading (so a CPUID mask counts), ARM from /proc/cpuinfo's ``bf16`` feature."""
    if platform.machine().lower() in ("x86_64", "amd64", "i686"):
        get = getattr(torch.cpu, "get_capabilities", None)  # what oneDNN dispatches on (torch >= 2.5)
        caps = get() if get is not None else {}
        return next((name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512_BF16"))
                     if caps.get(key)), None)
    from edgesqueeze.runtime.cpu import cpu_flags

    return "ARM BF16" if "bf16" in (cpu_flags() or ()) else None


def check_precision(precision: str, device: torch.device, *, what: str = "precision") -> None:
    """Mixed precision: bf16 and fp16 on CUDA, bf16 on a CPU with native bfloat16 (AMX-BF16,
    AVX512_BF16, ARM BF16), where it halved the CIFAR-10 SqueezeNet's training step (AMX,
    benchmarks/notes.md, session 51). Elsewhere it is refused: emulated bf16 is slower than
    fp32, CPU fp16 has no fast kernels, and MPS autocast covers too few ops to be worth a
    silent difference. fp32 on the CPU is the run it always was (same seed, same weights)."""
    if precision not in PRECISIONS:
        raise DeviceError(f"{what} {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    if device.type == "cpu":
        if precision == "fp16":
            raise DeviceError(f"{what} fp16: mixed fp16 runs on CUDA only; on the CPU use bf16 (on a CPU "
                              "that computes it natively) or fp32")
        if native_bf16() is None:
            raise DeviceError(f"{what} bf16: this CPU does not compute bfloat16 natively (no AMX-BF16, "
                              "AVX512_BF16 or ARM BF16), and emulated bf16 is slower than fp32; use fp32 "
                              "(or --device cuda)")
        return
    if device.type != "cuda":
        raise DeviceError(f"{what} {precision}: mixed precision runs on CUDA and on CPUs with native "
                          f"bfloat16, and this run is on {device}; use fp32")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{what} bf16: this GPU has no bfloat16 support; use fp16 or fp32")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward passes of a training step in ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, precision: str):
    """A ``torch.amp.GradScaler`` for fp16 (whose small gradients underflow without one);
    ``None`` otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device ``model``'s weights are on (the CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def placed(model: torch.nn.Module, device: torch.device | None) -> Iterator[torch.device]:
    """Run a calibration pass of ``model`` on ``device`` and put it back on the CPU after.

    The statistics passes of ``compress`` (post-training Fisher and input Hessians) and of
    ``export`` (GPTQ's Hessians, activation equalization's ranges) use it: the model's
    forward (and backward) passes run on ``device``, their sums stay there and come back to
    the CPU once, and everything after (k-means, GPTQ's column loop, the files) is on the
    CPU as before. ``None`` or the CPU changes nothing: the same calls, the same results.
    Yields the device to move the calibration images to."""
    device = torch.device("cpu") if device is None else device
    if device.type == "cpu":
        yield device
        return
    model.to(device)
    try:
        yield device
    finally:
        model.to("cpu")
