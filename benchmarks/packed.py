"""Packed files against what else ships a small model: sizes side by side, and cold loads.

    python benchmarks/packed.py runs/s15/mnist/export/*.esq runs/s15/imagenet/deploy.int8.onnx.esq \
        [--loads 20] [--threads 1] [--tflm-python PYTHON_WITH_TFLITE_MICRO]

For each packed file (``export --pack``: ``model.int8.tflite.esq`` and the like) the plain
file is decoded from it (the exact bytes ``export`` wrote; SHA-256 checked) and compared:

1. **Size, same model, same bytes to restore.** The plain file; ``gzip -9`` of it (what TF
   Model Optimization reports as a compressed size); ``xz -9e``; TFLite Micro's LUT
   compression of the int8 ``.tflite`` (``--tflm-python``: a Python with the ``tflite-micro``
   package, which holds TFLM's interpreter and compression tools; its result is also run
   in TFLM's interpreter on the same inputs as the plain file); and ours.
2. **Cold load**, file to ready session through ``edgesqueeze.runtime.load`` (the packed file
   decoded first), plain and packed interleaved, ``--loads`` timed rounds after an untimed
   one (:func:`edgesqueeze.runtime.bench.cold_loads`); medians. The packed file's decoding
   is timed on its own too.

Writes benchmarks/results/packed.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from run import RESULTS, log, machine, save  # noqa: E402

from edgesqueeze.format import container, packed  # noqa: E402
from edgesqueeze.runtime.bench import cold_loads  # noqa: E402

TFLM_SCRIPT = ROOT / "benchmarks" / "tflm_lut.py"


def _tflm(python: str, plain: Path, work: Path, images: int) -> dict:
    """TFLite Micro's LUT compression of ``plain``, both files run in TFLM's interpreter
    (in ``python``, an environment with tflite-micro) on the first ``images`` test images
    of the file's dataset, scored here against the labels and against LiteRT on the plain
    file."""
    import numpy as np

    from edgesqueeze.data import load_dataset
    from edgesqueeze.runtime import load

    art = load(plain, threads=1)
    ds = load_dataset(art.meta["dataset"])
    x, y = art.prepare(ds.test_x[:images]), np.asarray(ds.test_y[:images])
    np.save(work / "x.npy", x)
    ref = art.predict(x)
    out = work / (plain.stem + ".tflm.json")
    proc = subprocess.run([python, str(TFLM_SCRIPT), str(plain), "--x", str(work / "x.npy"), "--json", str(out)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    res = json.loads(out.read_text())
    res["litert_accuracy"] = float((ref.argmax(1) == y).mean())
    for name in ("plain", "lut"):
        f = out.with_suffix(f".{name}.npy")
        if f.exists():
            logits = np.load(f)
            res[f"{name}_accuracy"] = float((logits.argmax(1) == y).mean())
            res[f"{name}_agreement_with_litert"] = float((logits.argmax(1) == ref.argmax(1)).mean())
            res[f"{name}_max_logit_diff_litert"] = float(np.abs(logits - ref).max())
    if "plain_accuracy" in res and "lut_accuracy" in res:
        res["lut_identical_to_plain"] = bool(np.array_equal(np.load(out.with_suffix(".plain.npy")),
                                                            np.load(out.with_suffix(".lut.npy"))))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="packed files (.onnx.esq, .tflite.esq)")
    ap.add_argument("--loads", type=int, default=20, help="timed cold loads of each file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tflm-python", help="a Python with the tflite-micro package, for the TFLM LUT column "
                    "[default: this one when it has it (make install puts edgesqueeze[micro] in .venv)]")
    ap.add_argument("--tflm-images", type=int, default=2000, help="test images run through TFLM (batch 1, slow)")
    ap.add_argument("--stages", default="sizes,tflm,cold",
                    help="what to measure (sizes, tflm, cold); rows of earlier runs keep the rest")
    ap.add_argument("--note", default="", help="where the files came from (recorded with the results)")
    args = ap.parse_args()
    if args.tflm_python is None:
        import importlib.util

        if importlib.util.find_spec("tflite_micro") is not None:
            args.tflm_python = sys.executable
    stages = set(args.stages.split(","))
    old = json.loads((RESULTS / "packed.json").read_text()) if (RESULTS / "packed.json").exists() else {}
    # each row keeps the machine its cold loads were timed on and its run's note (older rows: the file's)
    by_file = {r["file"]: {"machine": old.get("machine"), "note": old.get("note", ""), **r}
               for r in old.get("rows", [])}
    here = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = []
        for f in args.files:
            raw = f.read_bytes()
            info = packed.packed_info(container.loads(raw))
            plain_bytes = packed.unpack(raw)
            plain = work / f"{len(pairs)}-{info['name']}"
            plain.write_bytes(plain_bytes)
            row = dict(by_file.get(str(f), {}))
            row.update({"file": str(f), "name": info["name"], "format": info["format"],
                        "plain_bytes": len(plain_bytes), "gzip9_bytes": len(gzip.compress(plain_bytes, 9, mtime=0)),
                        "xz9e_bytes": len(lzma.compress(plain_bytes, preset=9 | lzma.PRESET_EXTREME)),
                        "packed_bytes": len(raw), "sha256": hashlib.sha256(plain_bytes).hexdigest()})
            if ("tflm" in stages and args.tflm_python and info["name"].endswith(".tflite")
                    and "int8" in info["format"]):
                log(f"TFLite Micro LUT compression of {f}")
                row["tflm"] = _tflm(args.tflm_python, plain, work, args.tflm_images)
            rows.append(row)
            pairs.append((plain, f))
        if "cold" in stages:
            log(f"cold loads: {args.loads} timed rounds of {2 * len(pairs)} files, interleaved, "
                f"{args.threads} thread(s)")
            timed = cold_loads([p for pair in pairs for p in pair], threads=args.threads, loads=args.loads)
            for i, row in enumerate(rows):
                plain_t, packed_t = timed[2 * i][1], timed[2 * i + 1][1]
                row.update(cold_plain_ms=round(plain_t["cold_load_ms"], 2),
                           cold_packed_ms=round(packed_t["cold_load_ms"], 2), decode_ms=round(packed_t["decode_ms"], 2),
                           cold_ratio=round(packed_t["cold_load_ms"] / plain_t["cold_load_ms"], 2),
                           cold_loadavg=list(os.getloadavg()), machine=here)  # the timings' machine
        for row in rows:
            row["note"] = args.note or row.get("note", "")
            log(f"{row['file']}: " + json.dumps({k: v for k, v in row.items() if k != "tflm"}))
    rows += [r for f, r in by_file.items() if f not in {str(a) for a in args.files}]  # other files' rows stay
    keep = {"arm64_emulated": old["arm64_emulated"]} if "arm64_emulated" in old else {}  # benchmarks/cold_arm64.py
    save("packed", {"rows": rows, "loads": args.loads, "threads": args.threads, "note": args.note or old.get("note", ""),
                    **keep})


if __name__ == "__main__":
    main()
