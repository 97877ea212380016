# Sourced by tools/device-check.sh and benchmarks/arm_instructions.sh: make the arm64 chroot
# look like one Raspberry Pi's CPU to the runtimes' CPU detection, so that XNNPACK and
# onnxruntime pick the int8 kernels that Pi runs.
#
#   emulated_cpu_enter ROOT CPU    # CPU: pi4 (Cortex-A72, no dot product) or pi5 (Cortex-A76,
#                                  # dot product)
#
# qemu-user shows the chroot the host's x86 /proc/cpuinfo and no /sys, so XNNPACK's cpuinfo
# fails (or, with sysfs mounted, crashes under qemu) and LiteRT silently falls back to its ruy
# kernels; the instruction set the runtimes see is the CPU qemu emulates (its HWCAP), by
# default "max", which has the dot product. This mounts /proc in ROOT, binds over its
# cpuinfo one written for CPU (four cores), writes plain /sys/devices/system/cpu/{possible,
# present} files (not sysfs), and sets QEMU_CPU (cortex-a72 / cortex-a76), which the
# caller passes into the chroot's environment. Each change is appended to the caller's
# `undo` array (shell commands, run in reverse order on exit).

emulated_cpu_enter() {
  local root=$1 cpu=$2 part variant rev features i
  case "$cpu" in
    pi4) QEMU_CPU=cortex-a72; part=0xd08; variant=0x0; rev=3; features="fp asimd evtstrm crc32 cpuid" ;;
    pi5) QEMU_CPU=cortex-a76; part=0xd0b; variant=0x4; rev=1
         features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    *) echo "emulated CPU: unknown '$cpu' (pi4 or pi5)" >&2; return 2 ;;
  esac
  export QEMU_CPU
  if ! mountpoint -q "$root/proc"; then
    mount -t proc proc "$root/proc" || return 1
    undo+=("umount '$root/proc'")
  fi
  local cpuinfo
  cpuinfo=$(mktemp)
  undo+=("rm -f '$cpuinfo'")
  for i in 0 1 2 3; do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$i" "$features" "$variant" "$part" "$rev"
  done > "$cpuinfo"
  mount --bind "$cpuinfo" "$root/proc/cpuinfo" || return 1
  undo+=("umount '$root/proc/cpuinfo'")
  local cpu_dir=$root/sys/devices/system/cpu
  if [ ! -e "$cpu_dir/possible" ]; then
    if mountpoint -q "$root/sys"; then
      echo "emulated CPU: $root/sys is mounted; unmount it (sysfs there crashes XNNPACK's cpuinfo under qemu)" >&2
      return 1
    fi
    mkdir -p "$cpu_dir" && echo 0-3 > "$cpu_dir/possible" && echo 0-3 > "$cpu_dir/present" || return 1
    undo+=("rm -rf '$root/sys/devices'")
  fi
}
