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


def test_unknown_features_are_not_guessed():
    info = cpu_info("", "x86_64")
    assert info["features"] is None and "unknown" in info["int8_kernels"]
    assert int8_saturates(info) is None


def test_this_machine_is_described():
    info = cpu_info()
    assert info["arch"] and info["cpu"] and info["int8_kernels"]


def test_int8_target_from_metadata_old_and_new():
    assert int8_target({"artifact_format": "onnx-int8", "calibration": {"target": "any-cpu"}}) == "any-cpu"
    assert int8_target({"artifact_format": "onnx-int8", "calibration": {"target": "vnni-or-arm"}}) == "vnni-or-arm"
    # files written before the field: reduce_range said it
    assert int8_target({"artifact_format": "onnx-int8", "calibration": {"reduce_range": True}}) == "any-cpu"
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
