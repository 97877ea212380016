#!/usr/bin/env bash
# Run a command natively on this x86-64 CPU while it sees the CPUID of an AVX2-only x86 (AVX2
# and FMA; no AVX-512, no VNNI, no AVX-VNNI, no AMX: a Haswell's vector features), so that
# onnxruntime and XNNPACK pick, and run at native speed, the kernels such a CPU runs.
#
#   tools/with-avx2-cpuid.sh COMMAND [ARG...]
#   tools/with-avx2-cpuid.sh .venv/bin/python benchmarks/int8_speed.py --threads 1 --files a.onnx b.int8.tflite
#   tools/with-avx2-cpuid.sh --check      # can this machine do it? (exit 0 yes, 2 no, with why)
#
# What it is for: timing int8 files against fp32 on the kernels of an x86 CPU without VNNI,
# where qemu-x86_64 -cpu Haswell (tools/device-check.sh --cpu x86-avx2) runs the same kernels
# but emulated, and emulated timings mean nothing. What it is not: an AVX2-only CPU. The
# kernels are that CPU's; the core that runs them (its caches, how many vector instructions of
# each kind it issues per cycle) is this one, so say "AVX2 kernels on <this CPU>" with every
# number, never "an AVX2 CPU". Outputs are those of the AVX2 kernels, bit for bit (tested
# against the emulated Haswell in tests/test_cpuid_avx2.py).
#
# How: tools/cpuid-avx2.c, compiled once with the C compiler (CC, default cc) into
# ${XDG_CACHE_HOME:-~/.cache}/edgesqueeze/, preloaded (LD_PRELOAD) into COMMAND. It needs Linux
# on x86-64 with CPUID faulting (/proc/cpuinfo flag cpuid_fault: Intel since Ivy Bridge, AMD
# Zen 5, many virtual machines) and no root. COMMAND and the programs it starts see
# EDGESQUEEZE_CPUID=avx2 (benchmarks record it). glibc's own string functions chose their code
# before the library loads; GLIBC_TUNABLES turns their AVX-512 variants off too.
#
# Exit: COMMAND's exit code; 2 when this machine cannot mask CPUID or the library cannot be built.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=$ROOT_DIR/tools/cpuid-avx2.c
CC=${CC:-cc}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/edgesqueeze

die() { echo "with-avx2-cpuid: error: $1" >&2; exit 2; }

[ $# -gt 0 ] || die "no command given; usage: tools/with-avx2-cpuid.sh COMMAND [ARG...] (or --check)"
[ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] \
  || die "needs Linux on x86-64 (this is $(uname -s) $(uname -m)); on other machines use tools/device-check.sh --cpu x86-avx2"
grep -qw cpuid_fault /proc/cpuinfo \
  || die "this CPU or kernel cannot make CPUID fault (no cpuid_fault flag in /proc/cpuinfo); for outputs (not timings) use tools/device-check.sh --cpu x86-avx2 (qemu)"

# One library per source version: the file name carries the source's hash.
hash=$(sha256sum "$SRC" | cut -c1-16)
lib=$CACHE/cpuid-avx2-$hash.so
if [ ! -f "$lib" ]; then
  command -v "$CC" >/dev/null 2>&1 || die "no C compiler ($CC) to build $SRC; install one (apt-get install gcc) or set CC"
  mkdir -p "$CACHE"
  tmp=$(mktemp "$CACHE/.cpuid-avx2.XXXXXX")
  "$CC" -O2 -Wall -shared -fPIC -o "$tmp" "$SRC" -ldl || { rm -f "$tmp"; die "building $SRC with $CC failed"; }
  chmod 755 "$tmp" && mv -f "$tmp" "$lib"
fi

# Already masked (a command this wrapper started runs it again: `tools/with-avx2-cpuid.sh make
# test` reaches the tests that call it): the library is loaded and the settings are set.
case ":${LD_PRELOAD:-}:" in
  *":$lib:"*) if [ "${EDGESQUEEZE_CPUID:-}" = avx2 ]; then
                [ "$1" != --check ] || { echo "with-avx2-cpuid: ok: already masked (AVX2-only CPUID)"; exit 0; }
                exec "$@"
              fi ;;
esac
export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
export EDGESQUEEZE_CPUID=avx2
export GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX512F,-AVX512DQ,-AVX512BW,-AVX512VL,-AVX512CD,-AVX_VNNI,-AVX512_VNNI${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}"
if [ "$1" = --check ]; then
  # The library's constructor exits 2 with the kernel's reason when CPUID cannot fault.
  /bin/true && echo "with-avx2-cpuid: ok: CPUID faulting works here; commands run with AVX2-only CPUID" && exit 0
fi
exec "$@"
