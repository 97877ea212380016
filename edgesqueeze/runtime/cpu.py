"""What this CPU is, as far as int8 kernels care, and what that means for a given file.

int8 runtimes pick their kernels by CPU feature, and on x86 that changes the *result*, not
just the speed: onnxruntime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2 only, or
AVX-512 without VNNI) add pairs of products in 16 bits with saturation (``vpmaddubsw``),
while VNNI x86 (``vpdpbusd``) and ARM (``sdot``/``udot``, or widening multiplies) are exact.
A uint8 x int8 file whose weights use the full -127..127 range can therefore compute other
logits on the device than on the machine that verified it. edgesqueeze's default
``onnx-int8`` files (target ``any-cpu``) store their 8-bit weights as uint8 with zero point
128, which selects onnxruntime's uint8 x uint8 kernels, exact everywhere (older files used
7-bit int8 weights for the same end); this module lets ``verify`` and the
benchmarks say which case a number was measured in.

Linux reads ``/proc/cpuinfo``; elsewhere the features are unknown (``None``), never guessed.
No torch, no third-party import: it runs on the device.

    >>> info = cpu_info()
    >>> info["arch"], info["int8_kernels"]          # doctest: +SKIP
    ('x86_64', 'x86 AVX2 (no VNNI): uint8 x int8 products saturate in 16 bits')
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_info", "int8_saturates", "int8_warning", "int8_target"]

# The flags (as /proc/cpuinfo spells them) that select int8 kernels, in the order shown.
X86_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2")  # asimddp: the dot-product instructions


def _family(arch: str) -> str:
    """``x86``, ``arm`` or ``other`` for a ``platform.machine()`` name."""
    if arch in ("x86_64", "amd64", "i686", "i386"):
        return "x86"
    if arch in ("aarch64", "arm64") or arch.startswith("armv"):
        return "arm"
    return "other"


def _cpuinfo(text: str | None = None) -> tuple[str, set[str] | None]:
    """(model name, flags) from /proc/cpuinfo text (read when ``text`` is None)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "", None
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
    return model, flags


def cpu_info(cpuinfo_text: str | None = None, machine: str | None = None) -> dict[str, Any]:
    """``arch``, ``cpu`` (model name), ``features`` (the int8-relevant flags present, or None
    when unknown) and ``int8_kernels`` (one line: which kind of int8 kernels run here).

    ``cpuinfo_text`` / ``machine``: for tests, another machine's ``/proc/cpuinfo`` and
    ``platform.machine()``.
    """
    arch = (machine or platform.machine() or "unknown").lower()
    model, flags = _cpuinfo(cpuinfo_text)
    x86, arm = _family(arch) == "x86", _family(arch) == "arm"
    known = X86_FLAGS if x86 else ARM_FLAGS if arm else ()
    features = None if flags is None else [f for f in known if f in flags]
    info: dict[str, Any] = {"arch": arch, "cpu": model or platform.processor() or arch,
                            "features": features}
    info["int8_kernels"] = _kernels(arch, x86, arm, features)
    return info


def _kernels(arch: str, x86: bool, arm: bool, features: list[str] | None) -> str:
    if features is None:
        return f"{arch}: CPU features unknown"
    f = set(features)
    if x86:
        if "avx512_vnni" in f or "avx_vnni" in f:
            kind = "AVX-512 VNNI" if "avx512_vnni" in f else "AVX-VNNI"
            return f"x86 {kind}: exact uint8 x int8 dot products"
        simd = "AVX-512" if "avx512bw" in f else "AVX2" if "avx2" in f else "SSE"
        return f"x86 {simd} (no VNNI): uint8 x int8 products saturate in 16 bits"
    if arm:
        dot = "dot product" if "asimddp" in f else "no dot product"
        return f"ARM ({dot}{', i8mm' if 'i8mm' in f else ''}): exact int8 products"
    return f"{arch}: int8 kernels unknown"


def int8_saturates(info: dict[str, Any] | None = None) -> bool | None:
    """True when this CPU's onnxruntime uint8 x int8 kernels saturate (x86 without VNNI),
    False when they are exact (VNNI x86, ARM), None when unknown."""
    info = info or cpu_info()
    if info.get("features") is None:
        return None
    family = _family(info["arch"])
    if family == "x86":
        return not ({"avx512_vnni", "avx_vnni"} & set(info["features"]))
    return False if family == "arm" else None


def int8_target(meta: dict[str, Any]) -> str | None:
    """Which CPUs an ``onnx-int8`` file was quantized for: ``any-cpu`` or ``vnni-or-arm``
    (None for other files). Files from before the field existed say it through
    ``reduce_range`` (absent or false: full 8-bit weights, ``vnni-or-arm``)."""
    if (meta or {}).get("artifact_format") != "onnx-int8":
        return None
    cal = meta.get("calibration") or {}
    if cal.get("target") in ("any-cpu", "vnni-or-arm"):
        return cal["target"]
    return "any-cpu" if cal.get("reduce_range") else "vnni-or-arm"


def int8_warning(meta: dict[str, Any], info: dict[str, Any] | None = None) -> str | None:
    """One line when the numbers a file gives on this CPU are known not to be what another
    CPU computes, else None."""
    if int8_target(meta) != "vnni-or-arm":
        return None
    info = info or cpu_info()
    sat = int8_saturates(info)
    if sat:
        return ("quantized with int8 weights for VNNI x86 or ARM (target vnni-or-arm), but this CPU "
                f"({info['int8_kernels']}) saturates its products: numbers measured here are not what "
                "the target devices compute; re-export with --onnx-int8-target any-cpu or verify on the device")
    where = "this CPU" if sat is False else "this CPU (features unknown)"
    return ("quantized with int8 weights (target vnni-or-arm): numbers measured on "
            f"{where} hold for VNNI x86 and ARM, not for x86 CPUs without VNNI (AVX2 only), which "
            "saturate its products; export with --onnx-int8-target any-cpu to compute the same everywhere")
