#!/usr/bin/env bash
# Run exported artifacts through edgesqueeze's torch-free runtime on an emulated Raspberry Pi
# (Debian bookworm arm64 under qemu-user), or on an emulated x86 CPU without AVX-512 and VNNI,
# and compare top-1 and logits with this host, per file.
#
#   tools/device-check.sh [--data NAME] [--data-dir DIR] [--limit N] [--cpu pi4|pi5|x86-avx2] [--setup-only] [FILE...]
#
# FILE defaults to the demo's exports (artifacts/squeezenet-digits/export/*.onnx, *.tflite, and
# the packed *.esq, decoded on the device). --cpu (or DEVICE_CPU): the CPU qemu emulates and
# the runtimes detect, so they run its int8 kernels: pi4 (Cortex-A72, no dot product; the
# default) or pi5 (Cortex-A76, dot product), tools/emulated_cpu.sh; or x86-avx2, an Intel
# Haswell (AVX2 and FMA, no AVX-512, no VNNI: the x86 CPU whose onnxruntime uint8 x int8
# kernels saturate), which runs this host's Python and packages under qemu-x86_64 (an x86-64
# host only; no root, no chroot; about a minute for the demo's files).
# The Pi checks need root (chroot, binfmt_misc) and the Debian packages qemu-user-static,
# binfmt-support and mmdebstrap; x86-avx2 needs qemu-user-static alone. The arm64 root file
# system is built once (about 6-8 minutes) into DEVICE_ROOT and reused; so is the virtual
# environment inside it with the runtime packages (numpy, onnxruntime, ai-edge-litert: no
# torch). The checkout is copied in and installed (--no-deps) on every run.
#
# Environment: PYTHON (host python with edgesqueeze installed; default .venv/bin/python),
# OUT (results; default artifacts/device-check), DEVICE_ROOT (default
# ~/.cache/edgesqueeze/bookworm-arm64), MIRROR (Debian mirror; default http://deb.debian.org/debian),
# QEMU / MMDEBSTRAP / QEMU_X86 (the tools; default qemu-aarch64-static / mmdebstrap /
# qemu-x86_64-static), THREADS (default 1).
#
# Exit: compare's code (0: every artifact agrees 100% on top-1 between host and device; 1: one
# does not, or the device run failed or imported torch), 2: bad usage or missing tools/files.
# Emulated timings mean nothing, so none are reported: this compares outputs only.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QEMU=${QEMU:-qemu-aarch64-static}
QEMU_X86=${QEMU_X86:-qemu-x86_64-static}
MMDEBSTRAP=${MMDEBSTRAP:-mmdebstrap}
PYTHON=${PYTHON:-$ROOT_DIR/.venv/bin/python}
OUT=${OUT:-$ROOT_DIR/artifacts/device-check}
DEVICE_ROOT=${DEVICE_ROOT:-$HOME/.cache/edgesqueeze/bookworm-arm64}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
THREADS=${THREADS:-1}
DEVICE_CPU=${DEVICE_CPU:-pi4}
# The device install: the `runtime` extra of pyproject.toml, plus what building the checkout
# without build isolation needs (setuptools, wheel), so each run installs it offline.
RUNTIME_REQS="numpy>=1.26,<3 onnxruntime>=1.18 ai-edge-litert>=2.0 setuptools>=68 wheel"

VENV_IN=/opt/edgesqueeze-venv     # paths inside the chroot
SRC_IN=/opt/edgesqueeze-src
CHECK_IN=/opt/edgesqueeze-check
ROOTFS_STAMP=.edgesqueeze-rootfs-complete
VENV_STAMP=$VENV_IN/.edgesqueeze-runtime-installed

say() { echo "device-check: $*"; }
die() { echo "device-check: error: $1" >&2; exit "${2:-2}"; }

# ------------------------------------------------------------------ arguments
prepare_args=()
files=()
setup_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data|--data-dir|--limit)
      [ $# -ge 2 ] || die "$1 needs a value"
      prepare_args+=("$1" "$2"); shift 2 ;;
    --data=*|--data-dir=*|--limit=*) prepare_args+=("$1"); shift ;;
    --cpu)
      [ $# -ge 2 ] || die "$1 needs a value (pi4, pi5 or x86-avx2)"
      DEVICE_CPU=$2; shift 2 ;;
    --cpu=*) DEVICE_CPU=${1#--cpu=}; shift ;;
    --setup-only) setup_only=1; shift ;;
    -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; files+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) files+=("$1"); shift ;;
  esac
done

case "$DEVICE_CPU" in
  pi4|pi5|x86-avx2) ;;
  *) die "--cpu: unknown CPU '$DEVICE_CPU'; choose pi4 (Cortex-A72, no dot product), pi5 (Cortex-A76, dot product) or x86-avx2 (Haswell: AVX2, no AVX-512, no VNNI)" ;;
esac

# ------------------------------------------------------------------ tools
if [ "$DEVICE_CPU" = x86-avx2 ]; then
  [ $setup_only = 0 ] || die "--setup-only: x86-avx2 has nothing to set up (it runs this host's Python under qemu)"
  command -v "$QEMU_X86" >/dev/null 2>&1 || die "not found: $QEMU_X86 (Debian package qemu-user-static);
  install it with: apt-get install qemu-user-static"
  [ "$(uname -m)" = x86_64 ] || die "--cpu x86-avx2 runs this host's x86-64 Python under $QEMU_X86: it needs an x86-64 host (this is $(uname -m))"
fi
missing=()
command -v "$QEMU" >/dev/null 2>&1 || missing+=("$QEMU (Debian package qemu-user-static)")
command -v "$MMDEBSTRAP" >/dev/null 2>&1 || missing+=("$MMDEBSTRAP (Debian package mmdebstrap)")
[ "$DEVICE_CPU" = x86-avx2 ] && missing=()
if [ ${#missing[@]} -gt 0 ]; then
  for m in "${missing[@]}"; do echo "device-check: error: not found: $m" >&2; done
  echo "device-check: install them with: apt-get install qemu-user-static binfmt-support mmdebstrap" >&2
  exit 2
fi
[ "$DEVICE_CPU" = x86-avx2 ] || [ "$(id -u)" = 0 ] || die "needs root (it builds and enters an arm64 chroot); run it with sudo
  (--cpu x86-avx2, an emulated x86 CPU without VNNI, needs no root)"
if [ $setup_only = 0 ]; then
  [ -x "$PYTHON" ] || die "host python $PYTHON not found; run \`make install\` first or set PYTHON"
  "$PYTHON" -c "import edgesqueeze.runtime" 2>/dev/null \
    || die "$PYTHON cannot import edgesqueeze.runtime; run \`make install\` first or set PYTHON"
fi

# ------------------------------------------------------------------ files
# FILE and OUT are taken relative to where this was started; the defaults to the checkout.
if [ $setup_only = 0 ]; then
  if [ ${#files[@]} -eq 0 ]; then
    shopt -s nullglob
    demo="$ROOT_DIR/artifacts/squeezenet-digits/export"
    files=("$demo"/*.onnx "$demo"/*.tflite "$demo"/*.esq)
    shopt -u nullglob
    [ ${#files[@]} -gt 0 ] || die "no artifacts in artifacts/squeezenet-digits/export/; run \`make demo\` first,
  or name the files: tools/device-check.sh FILE..."
  fi
  for i in "${!files[@]}"; do
    [ -f "${files[$i]}" ] || die "${files[$i]}: no such file"
    files[i]=$(realpath "${files[$i]}")
  done
fi
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

# ------------------------------------------------------------------ prepare and compare (host)
prepare_on_host() {  # inputs, the host's logits and the manifest, into OUT
  say "prepare on the host: ${files[*]}"
  "$PYTHON" "$ROOT_DIR/tools/device_check.py" prepare --out "$OUT" --threads "$THREADS" \
    "${prepare_args[@]}" "${files[@]}" || exit $?
}
compare_and_exit() {  # $1: the device run's exit code; exits with compare's (1 if the run failed)
  local run_rc=$1 cmp_rc=0
  [ "$run_rc" = 0 ] || say "the device run exited $run_rc"
  "$PYTHON" "$ROOT_DIR/tools/device_check.py" compare --dir "$OUT" --json "$OUT/compare.json" \
    --markdown "$OUT/compare.md" || cmp_rc=$?
  if [ -f "$OUT/compare.json" ]; then say "results: $OUT/compare.md, $OUT/compare.json"; fi
  [ "$run_rc" = 0 ] || exit 1  # a failed device run is a failed check, whatever compare found
  exit $cmp_rc
}

# ------------------------------------------------------------------ x86 without VNNI (no chroot)
# qemu-x86_64 emulates a Haswell: its CPUID has AVX2 and FMA and no AVX-512 or VNNI, which is
# what onnxruntime (MLAS) and XNNPACK read to pick their kernels, so they run the AVX2 ones
# (edgesqueeze's CPU report reads the same CPUID; /proc/cpuinfo stays the host's). The
# Python, numpy and runtimes are this host's own; only the CPU differs.
if [ "$DEVICE_CPU" = x86-avx2 ]; then
  # Run under tools/with-avx2-cpuid.sh (the test suite masked, as an AVX2-only x86 runs it),
  # the mask's preload must not follow into the emulated process: qemu answers CPUID as its own
  # Haswell, and CPUID cannot be made to fault inside it.
  unmasked_preload=$(printf '%s' "${LD_PRELOAD:-}" | tr ' :' '\n\n' | grep -v '/cpuid-avx2-[^/]*\.so$' | paste -sd: - || true)
  qemu_quiet() {  # TCG lacks a few Haswell features no kernel here uses; drop those warnings
    env -u EDGESQUEEZE_CPUID LD_PRELOAD="$unmasked_preload" \
      "$QEMU_X86" -cpu Haswell "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2)
  }
  prepare_on_host
  rm -rf "${OUT:?}/device"  # no logits of an earlier run compared if this one cannot start
  say "run on the emulated x86 CPU without VNNI ($QEMU_X86 -cpu Haswell: AVX2, FMA; no AVX-512, no VNNI) ..."
  run_rc=0
  qemu_quiet "$PYTHON" "$ROOT_DIR/tools/device_check.py" run --dir "$OUT" --out device \
    --threads "$THREADS" --require-no-torch || run_rc=$?
  compare_and_exit $run_rc
fi

# ------------------------------------------------------------------ binfmt_misc
# qemu-user-static registers qemu-aarch64 with binfmt_misc (flag F: the interpreter is opened
# on the host, so the chroot needs no copy of it). Containers often lack the mount.
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
  say "binfmt_misc is not mounted; mounting it: mount -t binfmt_misc binfmt_misc $BINFMT"
  mount -t binfmt_misc binfmt_misc "$BINFMT" \
    || die "could not mount binfmt_misc at $BINFMT (a container without the privilege?)"
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
  command -v update-binfmts >/dev/null 2>&1 \
    || die "arm64 binaries are not registered with binfmt_misc and update-binfmts is missing;
  apt-get install binfmt-support"
  say "registering arm64 emulation: update-binfmts --enable qemu-aarch64"
  update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
fi
[ -e "$BINFMT/qemu-aarch64" ] || die "qemu-aarch64 is still not registered in $BINFMT"
if ! grep -q '^enabled' "$BINFMT/qemu-aarch64"; then
  say "enabling arm64 emulation: echo 1 > $BINFMT/qemu-aarch64"
  echo 1 > "$BINFMT/qemu-aarch64"
fi

# ------------------------------------------------------------------ lock
mkdir -p "$(dirname "$DEVICE_ROOT")"
exec 9>"$DEVICE_ROOT.lock"
flock -n 9 || { say "another device check holds $DEVICE_ROOT.lock; waiting"; flock 9; }

mounted_under() {  # prints the mount points at or below $1
  awk -v p="$1" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts
}

# ------------------------------------------------------------------ root file system (once)
if [ ! -f "$DEVICE_ROOT/$ROOTFS_STAMP" ]; then
  tmp="$DEVICE_ROOT.partial"
  for d in "$DEVICE_ROOT" "$tmp"; do
    if [ -e "$d" ]; then
      [ -z "$(mounted_under "$d")" ] \
        || die "$d has file systems mounted in it ($(mounted_under "$d" | tr '\n' ' ')); unmount them first"
      say "removing the incomplete $d"
      rm -rf --one-file-system "$d"
    fi
  done
  say "building the Debian $SUITE arm64 root file system in $DEVICE_ROOT"
  say "(once; about 6-9 minutes under emulation) ..."
  start=$(date +%s)
  "$MMDEBSTRAP" --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$tmp" "$MIRROR" </dev/null || die "mmdebstrap failed (see above); is $MIRROR reachable?"
  date -u +%Y-%m-%dT%H:%M:%SZ > "$tmp/$ROOTFS_STAMP"
  mv "$tmp" "$DEVICE_ROOT"
  say "root file system built in $(( $(date +%s) - start )) s"
else
  say "reusing the arm64 root file system in $DEVICE_ROOT"
fi
[ "$(chroot "$DEVICE_ROOT" /usr/bin/uname -m)" = aarch64 ] || die "the chroot does not run as aarch64"

# Network for pip inside the chroot: DNS, and the host's CA bundle (a proxy may re-sign TLS).
cp -L /etc/resolv.conf "$DEVICE_ROOT/etc/resolv.conf" 2>/dev/null || true
HOST_CA=""
for c in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [ -n "$c" ] && [ -f "$c" ]; then HOST_CA=$c; break; fi
done
CA_IN=/etc/ssl/certs/edgesqueeze-host-ca.crt
if [ -n "$HOST_CA" ]; then
  cp -L "$HOST_CA" "$DEVICE_ROOT$CA_IN"
else
  CA_IN=/etc/ssl/certs/ca-certificates.crt
fi

in_chroot() {  # a clean environment: nothing of the host's leaks in
  local proxy=()
  for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -n "${!v:-}" ] && proxy+=("$v=${!v}")
  done
  chroot "$DEVICE_ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 ${QEMU_CPU:+QEMU_CPU=$QEMU_CPU} \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT="$CA_IN" SSL_CERT_FILE="$CA_IN" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1 "${proxy[@]}" "$@"
}

# The device's CPU: what qemu emulates and what the runtimes' CPU detection reads, so that
# they pick that Pi's int8 kernels (tools/emulated_cpu.sh); undone on exit.
# (Before the venv: pip and the import check below run on that CPU too.)
undo=()
cleanup() {
  for ((i = ${#undo[@]} - 1; i >= 0; i--)); do eval "${undo[$i]}" || true; done
}
trap cleanup EXIT
# shellcheck source=emulated_cpu.sh
. "$ROOT_DIR/tools/emulated_cpu.sh"
emulated_cpu_enter "$DEVICE_ROOT" "$DEVICE_CPU" || die "could not emulate the CPU '$DEVICE_CPU' in $DEVICE_ROOT"

# ------------------------------------------------------------------ device venv (once)
if [ ! -f "$DEVICE_ROOT$VENV_STAMP" ] || [ "$(cat "$DEVICE_ROOT$VENV_STAMP")" != "$RUNTIME_REQS" ]; then
  say "creating $VENV_IN in the chroot and installing: $RUNTIME_REQS (a few minutes under emulation) ..."
  start=$(date +%s)
  rm -rf --one-file-system "$DEVICE_ROOT$VENV_IN"
  in_chroot /usr/bin/python3 -m venv "$VENV_IN" || die "python3 -m venv failed in the chroot"
  # shellcheck disable=SC2086
  in_chroot "$VENV_IN/bin/python" -m pip install -q $RUNTIME_REQS \
    || die "pip install in the chroot failed (see above); is PyPI reachable?"
  echo "$RUNTIME_REQS" > "$DEVICE_ROOT$VENV_STAMP"
  say "device venv ready in $(( $(date +%s) - start )) s"
else
  say "reusing the device venv $VENV_IN ($RUNTIME_REQS)"
fi

# ------------------------------------------------------------------ the checkout
say "copying the checkout into the chroot ($SRC_IN) and installing it there (--no-deps) ..."
rm -rf --one-file-system "$DEVICE_ROOT$SRC_IN"
mkdir -p "$DEVICE_ROOT$SRC_IN"
tar -C "$ROOT_DIR" -cf - --exclude=./.venv --exclude=./artifacts --exclude=./.git \
    --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=.hypothesis . | tar -C "$DEVICE_ROOT$SRC_IN" -xf -
in_chroot "$VENV_IN/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall "$SRC_IN" \
  || die "installing the checkout in the chroot failed (see above)"
in_chroot "$VENV_IN/bin/python" -c "
import platform, sys
import numpy, onnxruntime, ai_edge_litert, edgesqueeze.runtime
try:
    import torch
except ImportError:
    pass
else:
    sys.exit('torch is importable on the device: ' + torch.__file__)
print('device:', platform.machine(), 'python', platform.python_version(), 'numpy', numpy.__version__,
      'onnxruntime', onnxruntime.__version__, '(import torch fails, as it should)')
" || die "the device venv is not as it should be (see above)" 1
[ $setup_only = 1 ] && { say "setup done"; exit 0; }

# ------------------------------------------------------------------ prepare (host), run (device), compare (host)
prepare_on_host

rm -rf --one-file-system "$DEVICE_ROOT$CHECK_IN"
mkdir -p "$DEVICE_ROOT$CHECK_IN"
cp -a "$OUT/manifest.json" "$OUT"/inputs-*.npz "$OUT/models" "$DEVICE_ROOT$CHECK_IN/"
say "run on the emulated device (arm64, $DEVICE_CPU: qemu's $QEMU_CPU) ..."
run_rc=0
in_chroot "$VENV_IN/bin/python" "$SRC_IN/tools/device_check.py" run --dir "$CHECK_IN" --out device \
  --threads "$THREADS" --require-no-torch || run_rc=$?
rm -rf "${OUT:?}/device"
if [ -d "$DEVICE_ROOT$CHECK_IN/device" ]; then
  cp -a "$DEVICE_ROOT$CHECK_IN/device" "$OUT/device"
fi
compare_and_exit $run_rc
