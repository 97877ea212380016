"""Cold loads of packed files against their plain files on the emulated arm64 device.

    sudo python benchmarks/cold_arm64.py runs/s20/deploy2/export/*.esq [--loads 5]

The same measurement as ``benchmarks/packed.py --stages cold`` (file to ready session through
``edgesqueeze.runtime.load``, plain and packed interleaved, medians after an untimed round,
1 thread), run inside the Debian bookworm arm64 chroot that ``tools/device-check.sh`` builds
(``--setup-only`` makes it; the edgesqueeze it last installed there is what runs). Each plain
file is decoded from its packed file here and copied in beside it.

Under qemu-user, numpy's vector code is emulated far more slowly than the runtimes' session
setup, so these ratios are worse than a real ARM CPU's and mean little; the issue asks for
them to be recorded, not to meet anything. Stored as ``arm64_emulated`` in
benchmarks/results/packed.json (the rows of ``benchmarks/packed.py`` are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgesqueeze.format import container, packed  # noqa: E402

DEVICE_ROOT = Path(os.environ.get("DEVICE_ROOT", Path.home() / ".cache/edgesqueeze/bookworm-arm64"))
VENV_IN, WORK_IN = "/opt/edgesqueeze-venv", "/opt/edgesqueeze-cold"

SCRIPT = """
import json, sys
from edgesqueeze.runtime.bench import cold_loads
paths = sys.argv[2:]
rows = cold_loads(paths, threads=1, loads=int(sys.argv[1]))
print(json.dumps([{"file": p, **t} for p, (_, t) in zip(paths, rows)]))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="packed files (.onnx.esq, .tflite.esq)")
    ap.add_argument("--loads", type=int, default=5, help="timed rounds (each load is slow under qemu)")
    args = ap.parse_args()
    if not (DEVICE_ROOT / VENV_IN.lstrip("/") / "bin/python").exists():
        print(f"no device venv in {DEVICE_ROOT}: run tools/device-check.sh --setup-only first", file=sys.stderr)
        return 2
    work = DEVICE_ROOT / WORK_IN.lstrip("/")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inside = []
    for i, f in enumerate(args.files):
        data = f.read_bytes()
        name = packed.packed_info(container.loads(data))["name"]
        d = work / str(i)
        d.mkdir()
        (d / name).write_bytes(packed.unpack(data))
        shutil.copyfile(f, d / f.name)
        inside += [f"{WORK_IN}/{i}/{name}", f"{WORK_IN}/{i}/{f.name}"]
    cmd = ["chroot", str(DEVICE_ROOT), "/usr/bin/env", "-i", "HOME=/root", "LANG=C.UTF-8",
           "PATH=/usr/bin:/bin", "OMP_NUM_THREADS=1", f"{VENV_IN}/bin/python", "-c", SCRIPT,
           str(args.loads), *inside]
    print(f"[arm64] {len(inside)} files, {args.loads} timed rounds under qemu (minutes) ...", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        print(res.stderr[-3000:], file=sys.stderr)
        return 1
    timed = json.loads(res.stdout.strip().splitlines()[-1])
    rows = []
    for f, plain_t, packed_t in zip(args.files, timed[0::2], timed[1::2]):
        rows.append({"plain": f"{Path(plain_t['file']).name} ({f})", "packed": str(f),
                     "cold_plain_ms": round(plain_t["cold_load_ms"], 1),
                     "cold_packed_ms": round(packed_t["cold_load_ms"], 1),
                     "decode_ms": round(packed_t["decode_ms"], 1),
                     "ratio": round(packed_t["cold_load_ms"] / plain_t["cold_load_ms"], 2)})
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "benchmarks" / "results" / "packed.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["arm64_emulated"] = {
        "command": f"sudo python benchmarks/cold_arm64.py {' '.join(map(str, args.files))} --loads {args.loads} "
                   f"(chroot {DEVICE_ROOT.name}: Debian bookworm arm64 under qemu-user, the device venv of "
                   "tools/device-check.sh; 1 thread)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows}
    from edgesqueeze._io import write_text_atomic

    write_text_atomic(out, json.dumps(doc, indent=2) + "\n")
    print(f"[arm64] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
