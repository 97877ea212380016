"""Run exported files through the torch-free runtime on an emulated x86 CPU without AVX-512
or VNNI, to test on this CPU what the files compute on that one.

``qemu-x86_64 -cpu Haswell`` (Debian package qemu-user-static) runs this host's Python on a
CPU whose CPUID has AVX2 and FMA and no AVX-512 or VNNI. onnxruntime (MLAS) and XNNPACK read
CPUID to pick their kernels, so under it they run the AVX2 ones: onnxruntime's uint8 x int8
kernels there add pairs of products in 16 bits with saturation (``vpmaddubsw``), which a VNNI
host never does. Emulated timings mean nothing; only outputs are compared. Torch itself does
not run reliably under qemu here (it crashed in ``grid_sample``), so models are trained and
exported natively and only the runtime runs emulated.
"""

from __future__ import annotations

import json
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

_SCRIPT = r"""
import json, sys
import numpy as np
from edgesqueeze.runtime import load
from edgesqueeze.runtime.cpu import cpu_info
x = np.load(sys.argv[1])["x"]
np.savez(sys.argv[2], *[load(p, threads=1).predict(x) for p in sys.argv[3:]])
print(json.dumps({"cpu": cpu_info(), "torch_imported": "torch" in sys.modules}))
"""


def predict_on_haswell(files: list[Path], x: np.ndarray, workdir: Path) -> tuple[list[np.ndarray], dict]:
    """Each file's scores for the float input ``x`` through ``edgesqueeze.runtime`` on the
    emulated Haswell, and what that process saw (``cpu``: :func:`cpu_info`; ``torch_imported``)."""
    inputs, outputs = workdir / "haswell-inputs.npz", workdir / "haswell-outputs.npz"
    np.savez(inputs, x=np.asarray(x, np.float32))
    r = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", _SCRIPT, str(inputs), str(outputs),
                        *map(str, files)], capture_output=True, text=True, timeout=900, check=False)
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
