"""Run exported files through the torch-free runtime on an emulated x86 CPU without AVX-512
or VNNI, to test on this CPU what the files compute on that one.

``qemu-x86_64 -cpu Haswell`` (Debian package qemu-user-static) runs this host's Python on a
CPU whose CPUID has AVX2 and FMA and no AVX-512 or VNNI. onnxruntime (MLAS) and XNNPACK read
CPUID to pick their kernels, so under it they run the AVX2 ones: onnxruntime's uint8 x int8
kernels there add pairs of products in 16 bits with saturation (``vpmaddubsw``), which a VNNI
host never does. Emulated timings mean nothing; only outputs are compared. Torch itself does
not run reliably under qemu here (it crashed in ``grid_sample``), so models are trained and
exported natively and only the runtime runs emulated.

``tools/with-avx2-cpuid.sh`` runs the same kernels natively: on a Linux x86-64 host with CPUID
faulting it answers the process's CPUID instructions with a Haswell's vector features. The
tests check that it computes what the emulated Haswell computes, bit for bit, so that its
timings (benchmarks) are timings of those kernels.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

QEMU = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
X86_64_HOST = platform.machine().lower() in ("x86_64", "amd64")  # qemu-x86_64 runs this host's Python
requires_haswell = pytest.mark.skipif(
    QEMU is None or not X86_64_HOST,
    reason="needs qemu-x86_64 (apt-get install qemu-user-static) on an x86-64 host")

# tools/with-avx2-cpuid.sh: the same AVX2 kernels, run natively under a CPUID mask (Linux x86-64
# with CPUID faulting and a C compiler); --check says whether this machine can.
AVX2_CPUID = Path(__file__).resolve().parents[1] / "tools" / "with-avx2-cpuid.sh"


def without_cpuid_mask(env: dict | None = None) -> dict:
    """``env`` (default this process's) without tools/with-avx2-cpuid.sh's preload and marker,
    for a process qemu emulates: qemu answers CPUID as its own Haswell, and CPUID cannot be
    made to fault inside it (the preload would exit 2). So the suite can run masked, as an
    AVX2-only x86 would run it (``tools/with-avx2-cpuid.sh make test``)."""
    env = dict(os.environ if env is None else env)
    env.pop("EDGESQUEEZE_CPUID", None)
    keep = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":")
            if p and not Path(p).name.startswith("cpuid-avx2-")]
    if keep:
        env["LD_PRELOAD"] = ":".join(keep)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def _avx2_cpuid_works() -> bool:
    if not X86_64_HOST or platform.system() != "Linux":
        return False
    return subprocess.run([str(AVX2_CPUID), "--check"], capture_output=True, timeout=120).returncode == 0


AVX2_CPUID_WORKS = _avx2_cpuid_works()
requires_avx2_cpuid = pytest.mark.skipif(
    not AVX2_CPUID_WORKS,
    reason="needs Linux x86-64 with CPUID faulting (cpuid_fault in /proc/cpuinfo) and a C compiler")

_SCRIPT = r"""
import json, sys
import numpy as np
from edgesqueeze.runtime import load
from edgesqueeze.runtime.cpu import cpu_info
x = np.load(sys.argv[1])["x"]
np.savez(sys.argv[2], *[load(p, threads=1).predict(x) for p in sys.argv[3:]])
print(json.dumps({"cpu": cpu_info(), "torch_imported": "torch" in sys.modules}))
"""


def predict_on_haswell(files: list[Path], x: np.ndarray, workdir: Path,
                       masked: bool = False) -> tuple[list[np.ndarray], dict]:
    """Each file's scores for the float input ``x`` through ``edgesqueeze.runtime`` on the
    emulated Haswell, and what that process saw (``cpu``: :func:`cpu_info`; ``torch_imported``).
    ``masked``: natively under tools/with-avx2-cpuid.sh instead (the same kernels, not emulated)."""
    name = "avx2-cpuid" if masked else "haswell"
    inputs, outputs = workdir / f"{name}-inputs.npz", workdir / f"{name}-outputs.npz"
    np.savez(inputs, x=np.asarray(x, np.float32))
    runner = [str(AVX2_CPUID)] if masked else [QEMU, "-cpu", "Haswell"]
    r = subprocess.run([*runner, sys.executable, "-c", _SCRIPT, str(inputs), str(outputs),
                        *map(str, files)], capture_output=True, text=True, timeout=900, check=False,
                       env=None if masked else without_cpuid_mask())
    assert r.returncode == 0, r.stdout + r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    with np.load(outputs) as got:
        return [got[f"arr_{i}"] for i in range(len(files))], seen


def assert_emulated_cpu_has_no_vnni(seen: dict) -> None:
    """The emulation is what the test needs: AVX2 without AVX-512 or VNNI, and no torch."""
    features = seen["cpu"]["features"]
    assert "avx2" in features and not {"avx512f", "avx512_vnni", "avx_vnni"} & set(features), seen["cpu"]
    assert seen["cpu"]["int8_kernels"].startswith("x86 AVX2 (no VNNI)")
    assert seen["torch_imported"] is False


def assert_same_as_this_host(path: Path, there: np.ndarray, x: np.ndarray) -> None:
    """``path``'s scores on the emulated CPU (``there``) against this host's through the same
    runtime path: the same top-1 on every input, logits within the rounding of a
    requantization (a few steps of an output scale; saturated pairs move them by several)."""
    from edgesqueeze.runtime import load

    here = load(path, threads=1).predict(x)
    diff = float(np.abs(there - here).max())
    print(f"{path.name}, emulated Haswell vs this host: top-1 agreement "
          f"{(there.argmax(1) == here.argmax(1)).mean():.4f}, max |logit difference| {diff:.3g}")
    assert (there.argmax(1) == here.argmax(1)).all()
    assert diff < 0.5
