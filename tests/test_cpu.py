"""CPU features that select int8 kernels, and the warning verify gives for files whose
numbers depend on them. Real /proc/cpuinfo texts of the kinds of CPU users run on."""

import pytest

from edgesqueeze.runtime.cpu import cpu_info, int8_saturates, int8_target, int8_warning

AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes
"""
INTEL_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni
"""
INTEL_AVX512_NO_VNNI = """model name\t: Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz
flags\t\t: sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl
"""
ALDER_LAKE = """model name\t: 12th Gen Intel(R) Core(TM) i7-1260P
flags\t\t: sse avx avx2 fma avx_vnni
"""
PI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08
"""
PI5 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0b
"""


@pytest.mark.parametrize("text, machine, features, saturates, kernels", [
    (AMD_AVX2, "x86_64", ["avx2", "fma"], True, "x86 AVX2 (no VNNI)"),
    (INTEL_VNNI, "x86_64", ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"], False,
     "x86 AVX-512 VNNI"),
    (INTEL_AVX512_NO_VNNI, "x86_64", ["avx2", "fma", "avx512f", "avx512bw", "avx512vl"], True,
     "x86 AVX-512 (no VNNI)"),
    (ALDER_LAKE, "x86_64", ["avx2", "fma", "avx_vnni"], False, "x86 AVX-VNNI"),
    (PI4, "aarch64", ["asimd"], False, "ARM (no dot product)"),
    (PI5, "aarch64", ["asimd", "asimddp"], False, "ARM (dot product)"),
])
def test_cpu_info_names_the_int8_features(text, machine, features, saturates, kernels):
    info = cpu_info(text, machine)
    assert info["arch"] == machine
    assert info["features"] == features
    assert info["int8_kernels"].startswith(kernels)
    assert int8_saturates(info) is saturates


EMERALD_RAPIDS_VM = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
flags\t\t: sse avx avx2 fma avx512f avx512bw avx512vl avx_vnni avx512_vnni amx_int8
processor\t: 1
cpu family\t: 6
model\t\t: 207
"""


def test_the_cpu_is_named_by_its_numbers_where_the_name_is_generic():
    """A VM's model name says 'Intel(R) Xeon(R) Processor'; family 6 model 207 is Emerald
    Rapids, and ARM /proc/cpuinfo has no name at all, only the part (0xd08: Cortex-A72)."""
    x86 = cpu_info(EMERALD_RAPIDS_VM, "x86_64")
    assert x86["cpu"] == "Intel(R) Xeon(R) Processor (family 6, model 207, stepping 2)"
    assert x86["features"][-1] == "amx_int8"
    assert cpu_info(PI4, "aarch64")["cpu"] == "(implementer 0x41, part 0xd08)"
    assert cpu_info(INTEL_VNNI, "x86_64")["cpu"] == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"


def test_unknown_features_are_not_guessed():
    info = cpu_info("", "x86_64")
    assert info["features"] is None and "unknown" in info["int8_kernels"]
    assert int8_saturates(info) is None


def test_this_machine_is_described():
    info = cpu_info()
    assert info["arch"] and info["cpu"] and info["int8_kernels"]


# numpy's runtime-dispatch names for what a process can execute (CPUID / HWCAP)
HASWELL = {"SSE", "SSE2", "SSE3", "SSSE3", "SSE41", "SSE42", "AVX", "F16C", "FMA3", "AVX2", "POPCNT"}
ZEN5 = HASWELL | {"AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX512VNNI", "AVX512_ICL"}


def test_the_process_view_wins_over_a_cpuinfo_of_another_cpu():
    """Under qemu-x86_64 -cpu Haswell, /proc/cpuinfo is the VNNI host's but the runtimes pick
    their kernels from the emulated CPUID: the features, the kernels and the warning follow
    the process, and a note says /proc/cpuinfo is not this CPU. AVX-VNNI, which numpy does
    not name, is not taken from a /proc/cpuinfo that is wrong elsewhere."""
    host = INTEL_VNNI.replace("avx512_vnni", "avx512_vnni avx_vnni")
    info = cpu_info(host, "x86_64", HASWELL)
    assert info["features"] == ["avx2", "fma"] and info["source"] == "cpuid"
    assert info["int8_kernels"].startswith("x86 AVX2 (no VNNI)") and int8_saturates(info) is True
    assert "avx512f" in info["note"] and "avx512_vnni" in info["note"] and "cannot use" in info["note"]
    assert "saturates" in int8_warning({"artifact_format": "onnx-int8", "calibration": {"target": "vnni-or-arm"}},
                                       info)
    # the other way round: a kernel that hides a feature the CPU runs
    hidden = cpu_info(AMD_AVX2, "x86_64", ZEN5)
    assert "avx512_vnni" in hidden["features"] and "lacks" in hidden["note"]


def test_a_masked_cpuid_is_named_in_the_model():
    """Under tools/with-avx2-cpuid.sh (EDGESQUEEZE_CPUID=avx2) the process sees a Haswell's
    features on a VNNI CPU: the kernels are AVX2's, and the model name itself says what the
    mask hides, so a timing recorded under it cannot pass for an AVX2-only CPU's."""
    host = INTEL_VNNI.replace("avx512_vnni", "avx512_vnni avx_vnni")
    info = cpu_info(host, "x86_64", HASWELL, cpuid_masked=True)
    assert info["features"] == ["avx2", "fma"] and int8_saturates(info) is True
    assert "CPUID masked" in info["cpu"] and "avx512_vnni" in info["cpu"] and "avx_vnni" in info["cpu"]
    assert "with-avx2-cpuid" in info["note"] and "not an AVX2-only CPU" in info["note"]
    # without the mask the same view is an emulated CPU (qemu), and the model name is the host's
    plain = cpu_info(host, "x86_64", HASWELL)
    assert "masked" not in plain["cpu"] and "cannot use" in plain["note"]
    # the mask on a CPU that has nothing to hide changes nothing
    assert cpu_info(AMD_AVX2, "x86_64", HASWELL, cpuid_masked=True) == {**cpu_info(AMD_AVX2, "x86_64"),
                                                                           "source": "cpuid"}


def test_the_process_view_agrees_with_a_true_cpuinfo():
    info = cpu_info(INTEL_VNNI, "x86_64", ZEN5)
    assert info == {**cpu_info(INTEL_VNNI, "x86_64"), "source": "cpuid"}
    assert "note" not in info
    # a flag numpy does not name comes from /proc/cpuinfo when that describes this CPU
    assert cpu_info(ALDER_LAKE, "x86_64", HASWELL)["features"] == ["avx2", "fma", "avx_vnni"]
    # ARM: HWCAP names; without /proc/cpuinfo (macOS, a chroot without /proc) the process alone
    pi5 = cpu_info(None, "aarch64", {"NEON", "ASIMD", "ASIMDHP", "ASIMDDP"})
    assert pi5["features"] == ["asimd", "asimddp"] and pi5["source"] == "hwcap"
    assert pi5["int8_kernels"].startswith("ARM (dot product)") and "note" not in pi5
    assert cpu_info(PI4, "aarch64", {"NEON", "ASIMD"})["features"] == ["asimd"]


def test_a_feature_numpy_does_not_know_is_left_to_cpuinfo():
    """An older numpy whose table has no AVX512VNNI key says nothing about VNNI: /proc/cpuinfo
    decides it, rather than the missing key reading as 'no VNNI'."""
    table = {name: True for name in ZEN5 - {"AVX512VNNI", "AVX512_ICL"}}
    info = cpu_info(INTEL_VNNI, "x86_64", table)
    assert "avx512_vnni" in info["features"] and "note" not in info
    assert int8_saturates(info) is False
    # a key present and false is the process's word
    assert "avx512_vnni" not in cpu_info(INTEL_VNNI, "x86_64", {**table, "AVX512VNNI": False})["features"]


def test_this_process_is_described_as_numpy_dispatches():
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found  # numpy >= 2
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__ as found

    info = cpu_info()
    if info["arch"] in ("x86_64", "amd64"):
        assert ("avx2" in info["features"]) == bool(found.get("AVX2"))
        assert ("avx512_vnni" in info["features"]) == bool(found.get("AVX512VNNI"))
    elif info["arch"] in ("aarch64", "arm64"):
        assert ("asimddp" in info["features"]) == bool(found.get("ASIMDDP"))


def test_int8_target_from_metadata_old_and_new():
    assert int8_target({"artifact_format": "onnx-int8", "calibration": {"target": "any-cpu"}}) == "any-cpu"
    assert int8_target({"artifact_format": "onnx-int8", "calibration": {"target": "vnni-or-arm"}}) == "vnni-or-arm"
    # files written before the field: reduce_range said it
    assert int8_target({"artifact_format": "onnx-int8", "calibration": {"reduce_range": True}}) == "any-cpu-7bit"
    assert int8_target({"artifact_format": "onnx-int8", "calibration": {"target": "any-cpu-7bit"}}) == "any-cpu-7bit"
    assert int8_target({"artifact_format": "onnx-int8", "calibration": {"reduce_range": False}}) == "vnni-or-arm"
    assert int8_target({"artifact_format": "tflite-int8", "calibration": {}}) is None
    assert int8_target({}) is None


def test_int8_warning_only_for_cpu_dependent_files():
    full = {"artifact_format": "onnx-int8", "calibration": {"target": "vnni-or-arm"}}
    portable = {"artifact_format": "onnx-int8", "calibration": {"target": "any-cpu"}}
    avx2, vnni, pi = cpu_info(AMD_AVX2, "x86_64"), cpu_info(INTEL_VNNI, "x86_64"), cpu_info(PI4, "aarch64")
    for host in (avx2, vnni, pi):
        assert int8_warning(portable, host) is None
        assert int8_warning({"artifact_format": "tflite-int8"}, host) is None
    on_avx2 = int8_warning(full, avx2)
    assert "saturates" in on_avx2 and "not what" in on_avx2 and "--onnx-int8-target any-cpu" in on_avx2
    for host in (vnni, pi):
        w = int8_warning(full, host)
        assert "not for x86 CPUs without VNNI" in w and "--onnx-int8-target any-cpu" in w
