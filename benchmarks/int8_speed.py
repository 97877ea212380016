"""int8 against fp32 at batch 1 on this CPU: onnxruntime and LiteRT, interleaved, and where the time goes.

Issue "Same numbers on every machine": each int8 file must be at least as fast as the fastest
fp32 runtime at batch 1, also on x86 without VNNI (AVX2 only). This script times exported
files (``edgesqueeze export``) and says what costs what:

- ``time`` (default): every file in every runtime mode, batch 1, ``--threads`` threads, taking
  turns (one run each per round, the order shuffled every round, ``--rounds`` rounds after
  ``--warmup`` runs each), medians with p10 / p90, ratios against the fastest fp32 row of the
  same run, load average before and after. Runtime modes: ``.onnx`` through onnxruntime's CPU
  provider (``ort``, graph optimizations on, without the NCHWc layout for an ``any-cpu`` int8
  file: what ``edgesqueeze.runtime`` does; before session 27 with it); ``.tflite``
  through LiteRT's ``Interpreter`` with its default XNNPACK delegate (``xnnpack``: what
  ``edgesqueeze.runtime`` does) and without it (``builtin``:
  ``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``, TFLite's own kernels), and optionally
  LiteRT's ``CompiledModel`` API with XNNPACK flags (``cm`` or ``cm:0x...``).
- ``segments``: where the time goes inside a ``.tflite`` file. The graph is cut after each
  boundary op (input QUANTIZE / TRANSPOSE, stem conv, pools, the float region's DEQUANTIZE,
  each Fire's CONCATENATION, classifier conv, MEAN, output DEQUANTIZE): one prefix model per
  cut, all timed interleaved like above; a segment's cost is the difference of the medians of
  consecutive prefixes. Run it on the fp32 and int8 files together to see, layer by layer,
  which int8 kernels lose to fp32 and what the QUANTIZE / DEQUANTIZE ops cost.
- ``stem``: one 7x7/2 conv + ReLU (224x224 -> 109x109x96, SqueezeNet 1.0's stem) with 3, 4, 8
  and 16 input channels, fp32 and int8 LiteRT files built here, timed like above: whether an
  int8 conv over few input channels costs as much as one over 8 (XNNPACK's AVX2 int8 kernels
  take input channels in blocks of 8: ``qs8_qc8w_igemm_..._3x8c8__avx2``).
- ``instructions``: instructions per batch-1 inference, per kernel, on the x86 CPU that
  **valgrind** presents (``apt-get install valgrind``): AVX2 and FMA, no AVX-512, no VNNI,
  whatever the host has. onnxruntime and XNNPACK pick their kernels from CPUID, so on an
  AVX-512 VNNI host this shows which kernels an AVX2-only CPU runs and how much work each
  does (cachegrind, ``1`` and ``1 + --rounds`` inferences per file, the difference divided
  by ``--rounds``; XNNPACK's kernels are named, onnxruntime's library has no symbols).
  Instruction counts are not time: check them against real timings before reading a ratio
  as a speed (benchmarks/notes.md, session 25). XNNPACK's counts repeat to 0.1%;
  onnxruntime's do not: a process's setup varies, and with ``--rounds 3`` the same fp32
  ONNX file read 125 M and 197 M instructions per inference in one run; use ``--rounds 30``
  for ``.onnx`` files (196.6-204.4 M there; session 28).
- Under ``tools/with-avx2-cpuid.sh`` (Linux x86-64 with CPUID faulting), ``time``,
  ``segments`` and ``stem`` time the kernels an AVX2-only x86 runs (its CPUID hides AVX-512
  and VNNI from the runtimes), natively on this CPU: real timings of those kernels, on this
  core (its caches and issue widths, not an AVX2-only CPU's). The record's machine says
  "CPUID masked" and its command starts with the wrapper. Session 29 checked it against the
  AVX2-only VM of session 10: int8 stem 1.50x fp32 (there 1.53x), float stem 0.95x (0.98x).
- ``ops``: the ops of each ``.tflite`` (type, in -> out dtype, shape) and how many nodes
  LiteRT's interpreter hands to XNNPACK (its execution plan after delegation).

    python benchmarks/int8_speed.py --files fp32.onnx int8.onnx fp32.tflite int8.tflite
    python benchmarks/int8_speed.py --files onnx_fp32=a.onnx tflite_int8=b.int8.tflite --rounds 300
    python benchmarks/int8_speed.py --stage segments --files fp32=a.tflite int8=b.int8.tflite
    python benchmarks/int8_speed.py --stage ops --files b.int8.tflite
    python benchmarks/int8_speed.py --stage stem
    python benchmarks/int8_speed.py --stage instructions --rounds 3 --tflite-modes xnnpack --files a.tflite b.int8.tflite
    python benchmarks/int8_speed.py --stage instructions --rounds 30 --files a.onnx b.int8.onnx
    tools/with-avx2-cpuid.sh python benchmarks/int8_speed.py --threads 1 --files a.onnx b.int8.onnx

Writes (merges into) ``benchmarks/results/int8_speed.json`` under ``--key`` (default: the
stage name), with ``cpu_info()``, load average, command and date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgesqueeze.runtime.cpu import cpu_info

RESULTS = ROOT / "benchmarks" / "results" / "int8_speed.json"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def versions() -> dict:
    out = {"numpy": np.__version__}
    for mod, name in (("onnxruntime", "onnxruntime"), ("ai_edge_litert", "ai-edge-litert")):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            out[name] = version(name)
    return out


def parse_files(items: list[str]) -> dict[str, Path]:
    """``name=path`` or ``path`` (named after its file name)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not Path(path).is_file():
            sys.exit(f"{path}: no such file")
        out[name] = Path(path)
    return out


def is_fp32(path: Path) -> bool:
    """edgesqueeze names int8 files ``*.int8.onnx`` / ``*.int8.tflite``."""
    return ".int8." not in path.name and not path.stem.endswith("int8")


# ---------------------------------------------------------------------------------------
# Runners: a callable that runs one batch-1 inference on a fixed input


def ort_runner(path: Path | bytes, threads: int, x: np.ndarray):
    from edgesqueeze.runtime._onnx import open_session

    # the session edgesqueeze.runtime opens: an any-cpu int8 file without the x86-only NCHWc
    # layout (since session 18; runs before session 27 opened every file with it)
    s = (open_session(path, threads=threads) if isinstance(path, Path)
         else open_session(Path("model.onnx"), threads=threads, data=path))
    name = s.get_inputs()[0].name
    feed = {name: x}
    return lambda: s.run(None, feed)


def tflite_runner(model: Path | bytes, threads: int, x: np.ndarray, mode: str = "xnnpack"):
    """``xnnpack``: LiteRT's Interpreter as ``edgesqueeze.runtime`` makes it (default XNNPACK
    delegate); ``builtin``: without default delegates; ``cm`` / ``cm:FLAGS``: CompiledModel,
    CPU, XNNPACK with those delegate flags (an int, e.g. 0x100)."""
    if mode.startswith("cm"):
        return _compiled_runner(model, threads, x, mode)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw = {"model_path": str(model)} if isinstance(model, Path) else {"model_content": bytes(model)}
    if mode == "builtin":
        kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    elif mode != "xnnpack":
        raise SystemExit(f"unknown tflite mode {mode!r}")
    it = Interpreter(num_threads=threads, **kw)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]["index"]
    xi = _feed(x, inp)

    def run():
        it.set_tensor(inp["index"], xi)
        it.invoke()
        return it.get_tensor(out)

    run.interpreter = it
    return run


def _feed(x: np.ndarray, details: dict) -> np.ndarray:
    """``x`` as the input tensor wants it (an int8 input: quantized with its own scale)."""
    dtype = np.dtype(details["dtype"])
    if dtype == np.float32:
        return x
    scale, zp = details["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zp, info.min, info.max).astype(dtype)


def _compiled_runner(model: Path | bytes, threads: int, x: np.ndarray, mode: str):
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options

    flags = int(mode.split(":", 1)[1], 0) if ":" in mode else None
    opts = Options(hardware_accelerators=HardwareAccelerator.CPU,
                   cpu_options=CpuOptions(num_threads=threads, xnnpack_flags=flags))
    cm = (CompiledModel.from_file(str(model), options=opts) if isinstance(model, Path)
          else CompiledModel.from_buffer(bytes(model), options=opts))
    ib, ob = cm.create_input_buffers(0), cm.create_output_buffers(0)

    def run():
        ib[0].write(x)
        cm.run_by_index(0, ib, ob)

    run.keep = (cm, ib, ob)
    return run


def interleaved(runners: dict, rounds: int, warmup: int, seed: int = 0) -> dict:
    """Median / p10 / p90 ms per runner; one run each per round, order shuffled per round."""
    for r in runners.values():
        for _ in range(warmup):
            r()
    times = {k: [] for k in runners}
    order = list(runners)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            runners[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": round(float(np.median(v)), 3), "p10_ms": round(float(np.percentile(v, 10)), 3),
                "p90_ms": round(float(np.percentile(v, 90)), 3), "min_ms": round(float(np.min(v)), 3)}
            for k, v in times.items()}


def sample_input(seed: int = 0) -> np.ndarray:
    """One normalized ImageNet-sample image if the shared data is there, else noise (timing
    does not depend on the values; a real image keeps any data-dependent path honest)."""
    with contextlib.suppress(Exception):
        from edgesqueeze.data import load_dataset
        from edgesqueeze.export._common import to_input

        ds = load_dataset("imagenet-sample", data_dir=ROOT.parent / "shared" / "datasets")
        return to_input(ds.test_x[seed:seed + 1], ds.mean, ds.std).astype(np.float32)
    return np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Stages


def stage_time(files: dict[str, Path], args, x: np.ndarray) -> dict:
    runners, kinds = {}, {}
    for name, path in files.items():
        fp = is_fp32(path)
        if path.suffix == ".onnx":
            runners[f"{name} [ort]"] = ort_runner(path, args.threads, x)
            kinds[f"{name} [ort]"] = {"file": str(path), "runtime": "onnxruntime", "fp32": fp}
        else:
            for mode in args.tflite_modes.split(","):
                key = f"{name} [litert {mode}]"
                runners[key] = tflite_runner(path, args.threads, x, mode)
                kinds[key] = {"file": str(path), "runtime": f"litert {mode}", "fp32": fp}
    before = load_avg()
    log(f"timing {len(runners)} cases x {args.rounds} rounds, load {before} ...")
    t0 = time.time()
    timed = interleaved(runners, args.rounds, args.warmup)
    for k, v in timed.items():
        v.update(kinds[k])
        v["bytes"] = Path(kinds[k]["file"]).stat().st_size
    fastest = add_ratios(timed)
    return {"batch": 1, "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
            "fastest_fp32": fastest, "load_avg_before": before, "load_avg_after": load_avg(),
            "seconds": round(time.time() - t0), "timings": timed}


def add_ratios(timed: dict) -> str | None:
    """Ratios against the fastest fp32 row (``vs_fastest_fp32``: by median; ``_p10``, ``_min``:
    the same from the 10th percentile and the fastest run, less sensitive to a busy machine)
    and, for int8 rows, against the fastest fp32 row of the same runtime and mode. Returns the
    fastest fp32 row by median."""
    fastest = None
    for stat, suffix in (("median_ms", ""), ("p10_ms", "_p10"), ("min_ms", "_min")):
        fp32 = {k: v[stat] for k, v in timed.items() if v["fp32"]}
        if not fp32:
            return None
        best = min(fp32.values())
        fastest = fastest or min(fp32, key=fp32.get)
        for v in timed.values():
            v["vs_fastest_fp32" + suffix] = round(v[stat] / best, 3)
            same = [w[stat] for w in timed.values() if w["runtime"] == v["runtime"] and w["fp32"]]
            if same and not v["fp32"]:
                v["vs_fp32_same_runtime" + suffix] = round(v[stat] / min(same), 3)
    return fastest


def tflite_ops(path: Path) -> list[dict]:
    from ai_edge_litert import schema_py_generated as s

    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    tnames = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    m = s.Model.GetRootAsModel(bytearray(path.read_bytes()), 0)
    g = m.Subgraphs(0)
    out = []
    for i in range(g.OperatorsLength()):
        op = g.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex())
        kind = names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        ins = [g.Tensors(op.Inputs(j)) for j in range(op.InputsLength()) if op.Inputs(j) >= 0]
        o = g.Tensors(op.Outputs(0))
        out.append({"i": i, "op": kind, "in": tnames[ins[0].Type()], "out": tnames[o.Type()],
                    "shape": [int(d) for d in o.ShapeAsNumpy()]})
    return out


def stage_ops(files: dict[str, Path], args, x: np.ndarray) -> dict:
    res = {}
    for name, path in files.items():
        if path.suffix != ".tflite":
            continue
        ops = tflite_ops(path)
        it = tflite_runner(path, args.threads, x, "xnnpack").interpreter
        plan = [d["op_name"] for d in it._get_ops_details()]  # the only way to see the plan
        # the plan lists the file's nodes, then the delegate nodes that replaced them
        res[name] = {"ops": [f"{o['i']} {o['op']} {o['in']}->{o['out']} {o['shape']}" for o in ops],
                     "counts": {k: sum(o["op"] == k for o in ops) for k in sorted({o["op"] for o in ops})},
                     "xnnpack_delegate_nodes": plan.count("DELEGATE"),
                     "nodes_after_delegation": len(plan) - len(ops)}
        log(f"{name}: {len(ops)} ops, {plan.count('DELEGATE')} XNNPACK partition(s)")
    return res


_BOUNDARY = {"QUANTIZE", "DEQUANTIZE", "TRANSPOSE", "MAX_POOL_2D", "CONCATENATION", "MEAN"}


def cuts(ops: list[dict]) -> list[tuple[int, str]]:
    """(last op index, label of the segment ending there) at each boundary op.

    A QUANTIZE that feeds a CONCATENATION (the end of a float region inside a Fire) is no
    boundary: the Fire's concat is."""
    out, fire, pool, convs_seen = [], 1, 0, 0
    for i, o in enumerate(ops):
        nxt = ops[i + 1]["op"] if i + 1 < len(ops) else None
        if o["op"] == "CONV_2D":
            convs_seen += 1
            if convs_seen == 1:
                out.append((i, "stem conv 7x7/2 (features.0)"))
            elif nxt == "MEAN":
                out.append((i, "classifier conv 1x1 (classifier.1)"))
            continue
        if o["op"] not in _BOUNDARY or (o["op"] == "QUANTIZE" and i > 0):
            continue
        if o["op"] == "CONCATENATION":
            fire += 1
            label = f"Fire {fire} (features.{_FIRE_INDEX.get(fire, '?')})"
        elif o["op"] == "MAX_POOL_2D":
            pool += 1
            label = f"max pool {pool}"
        elif o["op"] == "QUANTIZE":
            label = "input QUANTIZE (float32 -> int8)"
        elif o["op"] == "TRANSPOSE":
            label = "input TRANSPOSE (NCHW -> NHWC)"
        elif o["op"] == "DEQUANTIZE":
            label = "output DEQUANTIZE (int8 -> float32)" if i == len(ops) - 1 else "DEQUANTIZE into float region"
        else:
            label = "MEAN (global average pool)"
        out.append((i, label))
    if not out or out[-1][0] != len(ops) - 1:
        out.append((len(ops) - 1, "end"))
    return out


_FIRE_INDEX = {2: 3, 3: 4, 4: 5, 5: 7, 6: 8, 7: 9, 8: 10, 9: 12}  # SqueezeNet 1.0 Fire n -> features.k


def prefix_model(path: Path, last: int) -> bytes:
    """The ``.tflite`` at ``path`` cut after op ``last``: ops 0..last, output = that op's output."""
    from ai_edge_litert.tools import flatbuffer_utils as fu

    m = fu.read_model(str(path))
    g = m.subgraphs[0]
    g.operators = g.operators[: last + 1]
    g.outputs = np.array([g.operators[-1].outputs[0]], dtype=np.int32)
    m.signatureDefs = []  # the signature names the old output
    return bytes(fu.convert_object_to_bytearray(m))


def stage_segments(files: dict[str, Path], args, x: np.ndarray) -> dict:
    runners, plan = {}, {}
    for name, path in files.items():
        if path.suffix != ".tflite":
            continue
        ops = tflite_ops(path)
        plan[name] = cuts(ops)
        for mode in args.tflite_modes.split(","):
            for last, label in plan[name]:
                runners[(name, mode, last)] = tflite_runner(prefix_model(path, last), args.threads, x, mode)
    before = load_avg()
    log(f"timing {len(runners)} prefix models x {args.rounds} rounds, load {before} ...")
    t0 = time.time()
    timed = interleaved({f"{k[0]}|{k[1]}|{k[2]}": r for k, r in runners.items()}, args.rounds, args.warmup)
    res = {}
    for name, name_cuts in plan.items():
        ops = tflite_ops(files[name])
        for mode in args.tflite_modes.split(","):
            rows, prev_ms, prev_last = [], 0.0, -1
            for last, label in name_cuts:
                med = timed[f"{name}|{mode}|{last}"]["median_ms"]
                rows.append({"segment": label, "ops": f"{prev_last + 1}..{last}",
                             "op_types": [f"{o['op']} {o['in']}" + ("" if o["in"] == o["out"] else f"->{o['out']}")
                                          for o in ops[prev_last + 1: last + 1]],
                             "prefix_median_ms": med, "segment_ms": round(med - prev_ms, 3)})
                prev_ms, prev_last = med, last
            res[f"{name} [litert {mode}]"] = rows
    return {"batch": 1, "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
            "method": "prefix models cut after each boundary op, timed interleaved; segment = difference "
                      "of consecutive prefix medians (includes the per-invoke overhead once, in the first)",
            "load_avg_before": before, "load_avg_after": load_avg(), "seconds": round(time.time() - t0),
            "segments": res}


def stage_stem(files: dict[str, Path], args, x: np.ndarray) -> dict:
    with tempfile.TemporaryDirectory(prefix="int8-speed-stem-") as tmp:
        runners = _stem_runners(Path(tmp), args.threads)
        before = load_avg()
        log(f"timing {len(runners)} single-conv models x {args.rounds} rounds, load {before} ...")
        timed = interleaved(runners, args.rounds, args.warmup)
    for cin in _STEM_CIN:
        f, q = timed[f"Cin {cin} fp32"], timed[f"Cin {cin} int8"]
        q["int8_vs_fp32"] = round(q["median_ms"] / f["median_ms"], 3)
        q["int8_vs_fp32_p10"] = round(q["p10_ms"] / f["p10_ms"], 3)
    return {"batch": 1, "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
            "model": "Conv2d(Cin, 96, 7, stride 2) + ReLU on 224x224, LiteRT XNNPACK",
            "load_avg_before": before, "load_avg_after": load_avg(), "timings": timed}


_STEM_CIN = (3, 4, 8, 16)


def _stem_runners(tmp: Path, threads: int) -> dict:
    import torch
    from torch import nn

    from edgesqueeze.export.tflite import export_tflite, export_tflite_int8

    runners = {}
    torch.manual_seed(0)
    for cin in _STEM_CIN:
        model = nn.Sequential(nn.Conv2d(cin, 96, 7, 2), nn.ReLU()).eval()
        meta = {"input_shape": [cin, 224, 224], "mean": [0.5] * cin, "std": [0.25] * cin}
        images = np.random.default_rng(0).integers(0, 256, (16, cin, 224, 224), dtype=np.uint8)
        xc = np.random.default_rng(1).standard_normal((1, cin, 224, 224)).astype(np.float32)
        f32 = export_tflite(model, meta, tmp / f"stem{cin}.tflite")
        i8 = export_tflite_int8(model, meta, tmp / f"stem{cin}.int8.tflite", images, weight_rounding="nearest")
        runners[f"Cin {cin} fp32"] = tflite_runner(f32, threads, xc, "xnnpack")
        runners[f"Cin {cin} int8"] = tflite_runner(i8, threads, xc, "xnnpack")
    return runners


# ---------------------------------------------------------------------------------------
# Instructions on the AVX2 code path (valgrind)


def _child(path: Path, mode: str, k: int) -> None:
    """Under valgrind: ``k`` batch-1 inferences of ``path`` (1 thread, noise input: the
    kernels' work does not depend on the values), and the SIMD features numpy saw."""
    from numpy._core._multiarray_umath import __cpu_features__ as feats

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    r = ort_runner(path, 1, x) if path.suffix == ".onnx" else tflite_runner(path, 1, x, mode)
    for _ in range(k):
        r()
    keys = ("AVX2", "FMA3", "AVX512F", "AVX512_SKX", "AVX512VNNI", "AVXVNNI", "ASIMD", "ASIMDDP", "ASIMDHP", "SVE")
    print("FEATURES " + json.dumps({f: bool(feats.get(f)) for f in keys if f in feats}))


def _cachegrind_ir(out: Path) -> dict[str, int]:
    """Instructions per function (summed over source files) of a cachegrind output file."""
    per: dict[str, int] = {}
    fn = "?"
    with out.open() as fh:
        for line in fh:
            if line.startswith("fn="):
                fn = line[3:].strip()
            elif line[:1].isdigit():
                per[fn] = per.get(fn, 0) + int(line.split()[1])
    return per


def stage_instructions(files: dict[str, Path], args, x: np.ndarray) -> dict:
    import concurrent.futures
    import shutil
    import subprocess

    vg = shutil.which("valgrind")
    if vg is None:
        sys.exit("--stage instructions needs valgrind (Debian: apt-get install valgrind)")
    mode = args.tflite_modes.split(",")[0]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # no spinning BLAS threads
    tmp = Path(tempfile.mkdtemp(prefix="es-cachegrind-"))
    jobs = [(name, path, k) for name, path in files.items() for k in (1, 1 + args.rounds)]

    def one(job):
        name, path, k = job
        out = tmp / f"{name}.{k}.out"
        p = subprocess.run([vg, "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}",
                            sys.executable, __file__, "--child", str(path), mode, str(k)],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            sys.exit(f"valgrind on {path} failed:\n{p.stderr[-2000:]}")
        feats = json.loads(p.stdout.split("FEATURES ", 1)[1].splitlines()[0])
        return job, _cachegrind_ir(out), feats

    log(f"{len(jobs)} valgrind runs, {os.cpu_count()} at a time (each a minute or more) ...")
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        done = {(j[0], j[2]): (ir, f) for j, ir, f in pool.map(one, jobs)}
    shutil.rmtree(tmp, ignore_errors=True)
    rows, features = {}, None
    for name, path in files.items():
        lo, features = done[(name, 1)]
        hi = done[(name, 1 + args.rounds)][0]
        per = {fn: (hi.get(fn, 0) - lo.get(fn, 0)) / args.rounds for fn in hi}
        total = sum(per.values())
        kernels = {fn: round(v / 1e6, 2) for fn, v in sorted(per.items(), key=lambda kv: -kv[1])
                   if v >= 0.01 * total}
        runtime = "ort" if path.suffix == ".onnx" else f"litert {mode}"
        rows[name] = {"file": str(path), "runtime": runtime, "fp32": is_fp32(path),
                      "minstr_per_inference": round(total / 1e6, 1), "kernels_minstr": kernels}
    for row in rows.values():  # int8 against the fp32 file of the same runtime, if one was given
        ref = [r for r in rows.values() if r["fp32"] and r["runtime"] == row["runtime"]]
        if ref and not row["fp32"]:
            row["vs_fp32_same_runtime"] = round(row["minstr_per_inference"] / ref[0]["minstr_per_inference"], 3)
    for name, row in rows.items():
        log(f"{name:28s} {row['minstr_per_inference']:8.1f} M instructions"
            + (f"  ({row['vs_fp32_same_runtime']}x fp32)" if "vs_fp32_same_runtime" in row else ""))
        for fn, m in list(row["kernels_minstr"].items())[:6]:
            log(f"    {m:8.1f} M  {fn}")
    vg_version = subprocess.run([vg, "--version"], capture_output=True, text=True).stdout.strip()
    return {"valgrind": vg_version, "isa_seen_under_valgrind": features, "threads": 1,
            "inferences": args.rounds, "tflite_mode": mode, "instructions": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", nargs="+", default=[], help="name=path or path (.onnx / .tflite)")
    ap.add_argument("--stage", choices=("time", "segments", "ops", "stem", "instructions"), default="time")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # FILE MODE K: one valgrind run
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--tflite-modes", default="xnnpack,builtin",
                    help="comma-separated: xnnpack, builtin, cm, cm:FLAGS (CompiledModel with XNNPACK flags)")
    ap.add_argument("--key", help="where in the JSON (default: the stage name)")
    ap.add_argument("--note", help="a line saying what this run is for, stored with it")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.child:
        return _child(Path(args.child[0]), args.child[1], int(args.child[2]))
    if not args.files and args.stage != "stem":
        ap.error(f"--stage {args.stage} needs --files")
    files = parse_files(args.files)
    x = sample_input() if args.stage != "instructions" else None
    masked = os.environ.get("EDGESQUEEZE_CPUID") == "avx2"  # under tools/with-avx2-cpuid.sh
    if masked and args.stage == "instructions":
        ap.error("--stage instructions counts under valgrind, whose CPU has no AVX-512 already; "
                 "run it without tools/with-avx2-cpuid.sh")
    run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["tools/with-avx2-cpuid.sh"] * masked + ["python"] + sys.argv), "machine": {**cpu_info(), "cores": os.cpu_count()},
           "versions": versions(), "files": {k: str(v) for k, v in files.items()}}
    if args.note:
        run["note"] = args.note
    stage = {"time": stage_time, "segments": stage_segments, "ops": stage_ops, "stem": stage_stem,
             "instructions": stage_instructions}[args.stage]
    run.update(stage(files, args, x))
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result[args.key or args.stage] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
