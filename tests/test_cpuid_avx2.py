"""tools/with-avx2-cpuid.sh: a command run natively while its CPUID is an AVX2-only x86's.

What its outputs are worth is tested against the emulated Haswell in test_export_onnx.py
(bit for bit); here: that the mask hides what it must and nothing else breaks. A real
segmentation fault still crashes (with and without Python's faulthandler, which installs its
own SIGSEGV handler after the mask's), the features numpy and the runtimes see are a
Haswell's, and every CPUID the process runs is answered, none at inference time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from emulated_x86 import AVX2_CPUID, X86_64_HOST, requires_avx2_cpuid


def masked(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(AVX2_CPUID), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.mark.skipif(not X86_64_HOST, reason="the wrapper is for x86-64 hosts")
def test_usage_errors_exit_2_with_the_reason():
    r = masked()
    assert r.returncode == 2 and "no command given" in r.stderr
    r = masked("--check", env={"CC": "no-such-compiler-here", "XDG_CACHE_HOME": os.devnull + "/x"})
    assert r.returncode == 2 and "with-avx2-cpuid: error:" in r.stderr


@requires_avx2_cpuid
def test_the_process_sees_a_haswell_and_says_it_is_masked():
    code = ("import json, numpy; from numpy._core._multiarray_umath import __cpu_features__ as f;"
            "from edgesqueeze.runtime.cpu import cpu_info;"
            "print(json.dumps({'numpy': {k: f[k] for k in ('AVX2', 'FMA3', 'AVX512F', 'AVX512VNNI')},"
            " 'cpu': cpu_info(), 'env': __import__('os').environ.get('EDGESQUEEZE_CPUID')}))")
    r = masked(sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["numpy"] == {"AVX2": True, "FMA3": True, "AVX512F": False, "AVX512VNNI": False}
    assert seen["cpu"]["features"] == ["avx2", "fma"]
    assert seen["cpu"]["int8_kernels"].startswith("x86 AVX2 (no VNNI)")
    assert seen["env"] == "avx2"
    here = json.loads(subprocess.run([sys.executable, "-c", "import json; from edgesqueeze.runtime.cpu import "
                                      "cpu_info; print(json.dumps(cpu_info()))"],
                                     capture_output=True, text=True, check=True).stdout)
    if {"avx512f", "avx512_vnni", "avx_vnni"} & set(here["features"]):  # something to hide here
        assert "CPUID masked" in seen["cpu"]["cpu"] and "not an AVX2-only CPU" in seen["cpu"]["note"]


@requires_avx2_cpuid
@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_real_segfault_still_crashes(faulthandler):
    """Only CPUID instructions are answered; any other SIGSEGV takes the program's handler (here
    faulthandler's, which prints the Python traceback) or the default action."""
    args = [sys.executable, *(["-X", "faulthandler"] if faulthandler else []), "-c",
            "import ctypes, numpy; ctypes.string_at(0)"]
    r = masked(*args)
    assert r.returncode in (-signal.SIGSEGV, 128 + signal.SIGSEGV), (r.returncode, r.stderr)
    assert ("Segmentation fault" in r.stderr) == faulthandler


@requires_avx2_cpuid
def test_no_cpuid_at_inference_time(tmp_path):
    """The runtimes read CPUID when they start, not per inference: a trapped CPUID costs two
    system calls, so one per inference would make the timings the mask's."""
    code = ("import sys, numpy as np, onnxruntime as ort, onnx; from onnx import helper, TensorProto as T;"
            "g = helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g',"
            " [helper.make_tensor_value_info('x', T.FLOAT, [1, 8])], [helper.make_tensor_value_info('y', T.FLOAT, [1, 8])]);"
            "s = ort.InferenceSession(helper.make_model(g).SerializeToString(), providers=['CPUExecutionProvider']);"
            "[s.run(None, {'x': np.ones((1, 8), np.float32)}) for _ in range(int(sys.argv[1]))]")
    counts = []
    for runs in (1, 201):
        r = masked(sys.executable, "-c", code, str(runs), env={"CPUID_AVX2_COUNT": "1"})
        assert r.returncode == 0, r.stderr
        # the Python process exits last (run masked, the wrapper's own helpers print theirs first)
        counts.append(int(r.stderr.split("cpuid-avx2: ")[-1].split()[0]))
    assert counts[0] > 0 and counts[1] == counts[0], counts


@requires_avx2_cpuid
def test_the_wrapper_run_inside_itself_masks_once():
    """`tools/with-avx2-cpuid.sh make test` reaches the tests that call the wrapper again: the
    library is preloaded once and glibc's settings are not repeated."""
    r = masked(str(AVX2_CPUID), "bash", "-c", 'echo "$LD_PRELOAD"; echo "$GLIBC_TUNABLES"; echo "$EDGESQUEEZE_CPUID"')
    assert r.returncode == 0, r.stderr
    preload, tunables, marker = r.stdout.splitlines()
    assert preload.count("cpuid-avx2-") == 1 and tunables.count("-AVX512F") == 1 and marker == "avx2"
    r = masked(str(AVX2_CPUID), "--check")
    assert r.returncode == 0 and "already masked" in r.stdout


@requires_avx2_cpuid
def test_a_program_that_takes_sigsegv_with_signal_still_works(tmp_path):
    """gcc's cc1 sets its crash handler with signal(SIGSEGV, ...), which went around the mask's
    sigaction() interposer: every CPUID it ran afterwards was its "internal compiler error:
    Segmentation fault" (`tools/with-avx2-cpuid.sh make test` failed on the C decoder's build).
    A signal() handler must see real faults still, as a sigaction() one does."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "p.c"
    src.write_text(r"""
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static void on_segv(int sig) { (void)sig; write(1, "handled\n", 8); _exit(3); }
int main(int argc, char **argv) {
    unsigned a, b, c, d;
    signal(SIGSEGV, on_segv);
    __cpuid_count(7, 0, a, b, c, d);  /* trapped and answered by the mask, not on_segv */
    printf("avx512f %u\n", (b >> 16) & 1);
    fflush(stdout);
    if (argc > 1) *(volatile int *)0 = 1;  /* a real fault: the program's handler */
    return 0;
}
""")
    exe = tmp_path / "p"
    r = masked(cc, "-O1", "-o", str(exe), str(src))  # the compiler itself, under the mask
    assert r.returncode == 0, r.stderr[-500:]
    r = masked(str(exe))
    assert r.returncode == 0 and r.stdout == "avx512f 0\n", (r.returncode, r.stdout, r.stderr[-300:])
    r = masked(str(exe), "crash")
    assert r.returncode == 3 and r.stdout == "avx512f 0\nhandled\n", (r.returncode, r.stdout, r.stderr[-300:])


@requires_avx2_cpuid
def test_a_sent_sigsegv_does_what_it_does_without_the_mask(tmp_path):
    """Review: raise(SIGSEGV) with the default action was swallowed under the mask (the process
    went on, then died at its next CPUID); with SIG_IGN it died at the next CPUID. Native: the
    first dies at the raise, the second goes on."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "r.c"
    src.write_text(r"""
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
int main(int argc, char **argv) {
    unsigned a, b, c, d;
    if (argc > 1) signal(SIGSEGV, SIG_IGN);
    raise(SIGSEGV);
    printf("survived\n");
    fflush(stdout);
    __cpuid_count(7, 0, a, b, c, d);
    printf("cpuid %u\n", (b >> 16) & 1);
    return 0;
}
""")
    exe = tmp_path / "r"
    assert subprocess.run([cc, "-O1", "-o", str(exe), str(src)], capture_output=True).returncode == 0
    r = masked(str(exe))
    assert r.returncode in (-signal.SIGSEGV, 128 + signal.SIGSEGV) and r.stdout == "", (r.returncode, r.stdout)
    r = masked(str(exe), "ignore")
    assert r.returncode == 0 and r.stdout == "survived\ncpuid 0\n", (r.returncode, r.stdout, r.stderr[-300:])
