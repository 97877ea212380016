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

The features are the ones this process can execute, as numpy's runtime dispatch reads them
(CPUID on x86, the kernel's HWCAP on ARM): what onnxruntime's and XNNPACK's own CPU detection
sees. ``/proc/cpuinfo`` gives the model name and the flags numpy does not name (AVX-VNNI, AMX,
i8mm); where it lists features this process does not have (under ``qemu-x86_64 -cpu Haswell``
it is the host's), the process wins and ``note`` says so. Without either, the features are
unknown (``None``), never guessed. No torch; numpy only: it runs on the device.

    >>> info = cpu_info()
    >>> info["arch"], info["int8_kernels"]          # doctest: +SKIP
    ('x86_64', 'x86 AVX2 (no VNNI): uint8 x int8 products saturate in 16 bits')
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_info", "int8_saturates", "int8_warning", "int8_target"]

# The flags (as /proc/cpuinfo spells them) that select int8 kernels, in the order shown.
X86_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2")  # asimddp: the dot-product instructions
# numpy's names for those flags (the ones its runtime dispatch knows).
NUMPY_NAMES = {"AVX2": "avx2", "FMA3": "fma", "AVX512F": "avx512f", "AVX512BW": "avx512bw",
               "AVX512VL": "avx512vl", "AVX512VNNI": "avx512_vnni",
               "ASIMD": "asimd", "ASIMDDP": "asimddp", "SVE": "sve"}


def _family(arch: str) -> str:
    """``x86``, ``arm`` or ``other`` for a ``platform.machine()`` name."""
    if arch in ("x86_64", "amd64", "i686", "i386"):
        return "x86"
    if arch in ("aarch64", "arm64") or arch.startswith("armv"):
        return "arm"
    return "other"


# The numbers that name a core's microarchitecture where the model name does not (a VM's
# "Intel(R) Xeon(R) Processor"): x86 family / model / stepping, ARM implementer / part.
_ID_KEYS = {"cpu family": "family", "model": "model", "stepping": "stepping",
            "cpu implementer": "implementer", "cpu part": "part"}


def _cpuinfo(text: str | None = None) -> tuple[str, set[str] | None]:
    """(model name, flags) from /proc/cpuinfo text (read when ``text`` is None). The model
    name ends with the core's identifying numbers, e.g. ``Intel(R) Xeon(R) Processor (family
    6, model 207, stepping 2)`` or ``(implementer 0x41, part 0xd08)`` (a Cortex-A72), so that
    a record names the microarchitecture even where a hypervisor hides the name."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "", None
    model, flags, ids = "", None, {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
        elif key in _ID_KEYS and _ID_KEYS[key] not in ids and value.strip():
            ids[_ID_KEYS[key]] = value.strip()
    if ids:
        model = f"{model} ({', '.join(f'{k} {v}' for k, v in ids.items())})".strip()
    return model, flags


def cpu_flags() -> set[str] | None:
    """The flags (x86) or features (ARM) /proc/cpuinfo lists for this CPU; None without it."""
    return _cpuinfo()[1]


def _process_features() -> dict[str, bool] | None:
    """numpy's runtime dispatch table: each CPU feature it knows (its names: ``AVX512VNNI``,
    ``ASIMDDP``, ...) and whether this process can use it; None when numpy does not say."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found  # numpy >= 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as found  # numpy 1.x
        except ImportError:
            return None
    return {str(name): bool(on) for name, on in found.items()}


def cpu_info(cpuinfo_text: str | None = None, machine: str | None = None,
             process_features: set[str] | dict[str, bool] | None = None,
             cpuid_masked: bool = False) -> dict[str, Any]:
    """``arch``, ``cpu`` (model name), ``features`` (the int8-relevant flags present, or None
    when unknown), ``source`` (where they were read) and ``int8_kernels`` (one line: which
    kind of int8 kernels run here); ``note`` when ``/proc/cpuinfo`` describes another CPU
    than the one this process runs on (emulated, CPUID masked, or features the OS does not
    enable). Under ``tools/with-avx2-cpuid.sh`` (which sets ``EDGESQUEEZE_CPUID=avx2``) the
    model name says which features the mask hides, so that every record of a timing made
    under it says so.

    ``cpuinfo_text`` / ``machine`` / ``process_features``: for tests, another machine's
    ``/proc/cpuinfo``, ``platform.machine()`` and numpy's dispatch table (a dict of feature
    name to usable, or the set of usable names), and ``cpuid_masked`` for
    ``EDGESQUEEZE_CPUID=avx2``. Given any of the first three, nothing is read from this
    machine. A flag whose numpy name the table lacks (an older numpy) is judged by
    ``/proc/cpuinfo`` alone.
    """
    here = cpuinfo_text is None and machine is None and process_features is None
    # tools/with-avx2-cpuid.sh sets this for the programs it runs under its CPUID mask
    masked = os.environ.get("EDGESQUEEZE_CPUID") == "avx2" if here else cpuid_masked
    arch = (machine or platform.machine() or "unknown").lower()
    model, flags = _cpuinfo(cpuinfo_text) if here or cpuinfo_text is not None else ("", None)
    if here:
        process_features = _process_features()
    x86, arm = _family(arch) == "x86", _family(arch) == "arm"
    known = X86_FLAGS if x86 else ARM_FLAGS if arm else ()
    features, source, note = None if flags is None else [f for f in known if f in flags], "/proc/cpuinfo", None
    table = (process_features if isinstance(process_features, dict)
             else None if process_features is None else {name: True for name in process_features})
    named = {ours: theirs for theirs, ours in NUMPY_NAMES.items()
             if ours in known and (not isinstance(process_features, dict) or theirs in table)}
    if table is not None and named:
        has = {ours for ours, theirs in named.items() if table.get(theirs)}
        differ = [] if flags is None else [f for f in named if (f in flags) != (f in has)]
        if differ:
            unusable = [f for f in differ if f not in has]
            unlisted = [f for f in differ if f in has]
            why = "; ".join(([f"it lists {', '.join(unusable)}, which this process cannot use"] if unusable else [])
                            + ([f"it lacks {', '.join(unlisted)}, which this process has"] if unlisted else []))
            if masked and unusable:
                # the mask hides the flags numpy does not name too (AVX-VNNI, AMX)
                hidden = ", ".join(f for f in known if f in flags and (f in unusable or f not in named))
                model = f"{model or arch} (CPUID masked: {hidden} hidden)"
                note = (f"CPUID masked by tools/with-avx2-cpuid.sh: this CPU has {hidden}, "
                        "hidden from the runtimes, which run the kernels of an x86 without them on "
                        "this CPU's cores; timings are those kernels on this CPU, not an AVX2-only CPU's")
            else:
                note = (f"/proc/cpuinfo does not describe the CPU this process runs on ({why}): an "
                        "emulated CPU, a masked CPUID, or features the OS does not enable; the "
                        "features shown are the process's, which the runtimes' kernels follow")
        # a flag numpy does not name counts only where /proc/cpuinfo describes this CPU
        trust_proc = flags is not None and not differ
        features = [f for f in known if (f in has if f in named else trust_proc and f in flags)]
        source = "cpuid" if x86 else "hwcap"
    info: dict[str, Any] = {"arch": arch, "cpu": model or platform.processor() or arch,
                            "features": features, "source": source}
    if note:
        info["note"] = note
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


# onnx-int8 targets whose files every CPU computes exactly (uint8 weights, or 7-bit int8 ones)
EXACT_TARGETS = ("any-cpu", "any-cpu-7bit")


def int8_target(meta: dict[str, Any]) -> str | None:
    """Which CPUs an ``onnx-int8`` file was quantized for: ``any-cpu``, ``any-cpu-7bit`` or
    ``vnni-or-arm`` (None for other files). Files from before the field existed say it through
    ``reduce_range`` (true: 7-bit int8 weights, ``any-cpu-7bit``; absent or false: full 8-bit
    int8 weights, ``vnni-or-arm``)."""
    if (meta or {}).get("artifact_format") != "onnx-int8":
        return None
    cal = meta.get("calibration") or {}
    if cal.get("target") in (*EXACT_TARGETS, "vnni-or-arm"):
        return cal["target"]
    return "any-cpu-7bit" if cal.get("reduce_range") else "vnni-or-arm"


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
                "the target devices compute; re-export with --onnx-int8-target any-cpu (or any-cpu-7bit) or verify on the device")
    where = "this CPU" if sat is False else "this CPU (features unknown)"
    return ("quantized with int8 weights (target vnni-or-arm): numbers measured on "
            f"{where} hold for VNNI x86 and ARM, not for x86 CPUs without VNNI (AVX2 only), which "
            "saturate its products; export with --onnx-int8-target any-cpu to compute the same everywhere")
