#!/usr/bin/env bash
# Instructions per batch-1 inference, kernel by kernel, on the ARM code path of a Raspberry
# Pi 4 (Cortex-A72: ARMv8.0 NEON, no dot product), counted on this x86 host:
# `benchmarks/int8_speed.py --stage instructions` run inside the arm64 chroot of
# tools/device-check.sh, where valgrind (arm64, 3.19: it hides the dot-product extension)
# runs under qemu-user. XNNPACK and onnxruntime pick their kernels from the CPU they see, so
# this counts the kernels a Pi 4 runs. Not time: instruction counts say which kernels run and
# how much work each does (benchmarks/notes.md, session 25). Emulated timings mean nothing.
#
#   sudo benchmarks/arm_instructions.sh [--key KEY] [--note TEXT] [--rounds N] NAME=FILE...
#
# Results merge into benchmarks/results/int8_speed.json under KEY (default
# instructions_arm64_a72_valgrind). Needs root, and the chroot that `make device-check`
# builds (DEVICE_ROOT, default ~/.cache/edgesqueeze/bookworm-arm64); valgrind is installed
# into it on first use (apt). While it runs, the chroot is a Cortex-A72 to qemu and to the
# runtimes' CPU detection (tools/emulated_cpu.sh: /proc, a Cortex-A72 /proc/cpuinfo,
# /sys/devices/system/cpu/{possible,present}, QEMU_CPU=cortex-a72); and the first 4 bytes of numpy's
# OpenBLAS .eh_frame are zeroed (valgrind 3.19's CFI reader asserts on it). All of it is
# undone on exit. About 15 minutes for 8 files on 2 cores.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE_ROOT=${DEVICE_ROOT:-$HOME/.cache/edgesqueeze/bookworm-arm64}
VENV_IN=/opt/edgesqueeze-venv
WORK_IN=/tmp/es-instructions
KEY=instructions_arm64_a72_valgrind
NOTE="the kernels a Raspberry Pi 4 runs (Cortex-A72, no dot product), counted under valgrind in the emulated arm64 chroot"
ROUNDS=3

say() { echo "arm-instructions: $*"; }
die() { echo "arm-instructions: error: $1" >&2; exit "${2:-2}"; }

files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --key|--note|--rounds)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in --key) KEY=$2 ;; --note) NOTE=$2 ;; --rounds) ROUNDS=$2 ;; esac; shift 2 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) files+=("$1"); shift ;;
  esac
done
[ ${#files[@]} -gt 0 ] || die "no files given (NAME=FILE ...; see --help)"
[ "$(id -u)" = 0 ] || die "needs root (it enters the arm64 chroot); run it with sudo"
[ -x "$DEVICE_ROOT$VENV_IN/bin/python" ] \
  || die "no runtime venv in $DEVICE_ROOT; build the chroot first: sudo tools/device-check.sh --setup-only"

in_chroot() {  # QEMU_CPU: set by emulated_cpu_enter below (unset before: qemu's default)
  chroot "$DEVICE_ROOT" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    ${QEMU_CPU:+QEMU_CPU=$QEMU_CPU} "$@"
}

if ! in_chroot sh -c 'command -v valgrind' >/dev/null 2>&1; then
  say "installing valgrind in the chroot (apt, a few minutes under emulation) ..."
  cp /etc/resolv.conf "$DEVICE_ROOT/etc/resolv.conf"
  in_chroot sh -c 'apt-get update -qq && apt-get install -y -qq valgrind >/dev/null' || die "apt-get install valgrind failed"
fi

# ------------------------------------------------------------------ what we change, undone on exit
undo=()
cleanup() {
  for ((i = ${#undo[@]} - 1; i >= 0; i--)); do eval "${undo[$i]}" || true; done
}
trap cleanup EXIT

# a Raspberry Pi 4's CPU, as XNNPACK's and onnxruntime's CPU detection see it
# shellcheck source=../tools/emulated_cpu.sh
. "$ROOT_DIR/tools/emulated_cpu.sh"
emulated_cpu_enter "$DEVICE_ROOT" pi4 || die "could not set up the emulated Cortex-A72 in $DEVICE_ROOT"
blas=$(ls "$DEVICE_ROOT$VENV_IN"/lib/python3*/site-packages/numpy.libs/libscipy_openblas*.so 2>/dev/null | head -1 || true)
if [ -n "$blas" ]; then
  cp -p "$blas" "$blas.es-orig"
  undo+=("mv -f '$blas.es-orig' '$blas'")
  python3 - "$blas" <<'EOF'
import struct, sys
path = sys.argv[1]
data = bytearray(open(path, "rb").read())
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
def section(i):
    return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
names = section(shstrndx)[4]
for i in range(shnum):
    name_off, _, _, _, offset, size = section(i)
    name = data[names + name_off:data.index(b"\0", names + name_off)]
    if name == b".eh_frame" and size >= 4:
        data[offset:offset + 4] = b"\0\0\0\0"  # a zero-length first entry: the end of the table
        open(path, "wb").write(data)
        break
EOF
fi

# ------------------------------------------------------------------ run
rm -rf "$DEVICE_ROOT$WORK_IN" && mkdir -p "$DEVICE_ROOT$WORK_IN"
undo+=("rm -rf '$DEVICE_ROOT$WORK_IN'")
cp "$ROOT_DIR/benchmarks/int8_speed.py" "$DEVICE_ROOT$WORK_IN/"
args=()
for f in "${files[@]}"; do
  name=${f%%=*}; path=${f#*=}
  [ "$name" != "$f" ] || { name=$(basename "$f"); path=$f; }
  [ -f "$path" ] || die "$path: no such file"
  base=$(basename "$path")
  cp "$path" "$DEVICE_ROOT$WORK_IN/$name.$base"
  args+=("$name=$WORK_IN/$name.$base")
done
say "counting ${#files[@]} files under valgrind in the arm64 chroot (minutes per file) ..."
in_chroot "$VENV_IN/bin/python" "$WORK_IN/int8_speed.py" --stage instructions --rounds "$ROUNDS" \
  --tflite-modes xnnpack --out "$WORK_IN/out.json" --key "$KEY" --note "$NOTE" --files "${args[@]}"
python3 - "$DEVICE_ROOT$WORK_IN/out.json" "$ROOT_DIR/benchmarks/results/int8_speed.json" "$KEY" <<'EOF'
import json, sys
src, dst, key = sys.argv[1:4]
run = json.load(open(src))[key]
run["command"] = "sudo benchmarks/arm_instructions.sh (int8_speed.py --stage instructions in the arm64 chroot under qemu-user)"
run["machine"]["emulated_on"] = "x86_64 host, qemu-aarch64-static; /proc/cpuinfo: Cortex-A72"
results = json.load(open(dst))
results[key] = run
open(dst, "w").write(json.dumps(results, indent=2) + "\n")
print(f"arm-instructions: wrote {key} into {dst}")
EOF
