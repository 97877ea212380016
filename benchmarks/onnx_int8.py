"""ONNX INT8 on the ImageNet SqueezeNet 1.0: latency against fp32, and agreement with fp32.

Two questions, each answered in one run with fp32 measured alongside (ratios next to times):

1. **Latency** (batch 1, 224x224, ``--threads`` intra-op threads, CPU execution provider):
   fp32 against ORT's default static QDQ (int8 activations and weights, per channel) and
   against each change on the way to what ``export_onnx_int8`` writes. Every session is
   warmed up, then the sessions take turns (one run each per round, ``--rounds`` rounds) so
   that a noisy neighbour slows all of them alike; medians are reported. An ORT profile of
   fp32, the default and ours gives the time per op type: which nodes stay float.
2. **Agreement** (top-1 of int8 == top-1 of fp32) and top-1 accuracy on the 100 shared
   images, two-fold: calibrate on one half, score the other half, swap, add up. Nothing is
   scored on the images it was calibrated on.

    python benchmarks/onnx_int8.py                 # both; writes benchmarks/results/onnx_int8.json
    python benchmarks/onnx_int8.py --only latency --rounds 300

Needs ``../shared`` (the pretrained SqueezeNet and the ImageNet sample).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgesqueeze.checkpoint import load_model  # noqa: E402
from edgesqueeze.data import load_dataset  # noqa: E402
from edgesqueeze.export import onnx as eo  # noqa: E402
from edgesqueeze.export._common import CalibrationConfig, to_input  # noqa: E402
from run import kl_div  # noqa: E402 - benchmarks/run.py, next to this script

SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results" / "onnx_int8.json"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def setup():
    loaded = load_model(SHARED / "models" / "squeezenet1_0-imagenet.pt", arch="squeezenet1_0")
    ds = load_dataset("imagenet-sample", data_dir=SHARED / "datasets")
    meta = {**loaded.meta, "input_shape": [3, 224, 224], "mean": list(ds.mean), "std": list(ds.std),
            "classes": list(ds.classes)}
    return loaded.model.eval(), meta, ds


def folds(n: int, seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[: n // 2]), np.sort(order[n // 2:])]


# ---------------------------------------------------------------------------------------
# Latency


def ort_default(fproto, x):
    """What ``quantize_static`` does when asked for per-channel QDQ and nothing else."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    with tempfile.TemporaryDirectory() as tmp, eo._quiet():
        src, dst = Path(tmp, "a.onnx"), Path(tmp, "b.onnx")
        src.write_bytes(fproto.SerializeToString())
        quantize_static(str(src), str(dst), eo._Reader(x, 25), quant_format=QuantFormat.QDQ, per_channel=True)
        import onnx

        return onnx.load(str(dst))


def qoperator(fproto, x):
    """uint8 x int8, per channel, in QOperator form (QLinearConv in the file itself)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp, eo._quiet():
        src, dst = Path(tmp, "a.onnx"), Path(tmp, "b.onnx")
        src.write_bytes(fproto.SerializeToString())
        quantize_static(str(src), str(dst), eo._Reader(x, 25), quant_format=QuantFormat.QOperator,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        import onnx

        return onnx.load(str(dst))


def preprocessed(fproto):
    """``quant_pre_process`` (symbolic shape inference + ORT graph optimization) first."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, eo._quiet():
        src, dst = Path(tmp, "a.onnx"), Path(tmp, "b.onnx")
        src.write_bytes(fproto.SerializeToString())
        quant_pre_process(str(src), str(dst))
        return onnx.load(str(dst))


def make_session(model_bytes: bytes, threads: int, *, config: dict | None = None, level=None, profile=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = level
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, x: np.ndarray, rounds: int, warmup: int = 20) -> dict:
    feed = {"input": x}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    order = list(sessions)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no session always runs right after the same neighbour
        for k in order:
            s = sessions[k]
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": round(float(np.median(v)), 3), "p10_ms": round(float(np.percentile(v, 10)), 3),
                "p90_ms": round(float(np.percentile(v, 90)), 3)} for k, v in times.items()}


def op_profile(model_bytes: bytes, x: np.ndarray, threads: int, runs: int = 30) -> dict:
    """Mean microseconds per run spent in each op type, and how many nodes of each type ran."""
    with tempfile.TemporaryDirectory() as tmp:
        s = make_session(model_bytes, threads, profile=str(Path(tmp, "p")))
        for _ in range(runs):
            s.run(None, {"input": x})
        events = json.loads(Path(s.end_profiling()).read_text())
    us = collections.defaultdict(float)
    nodes = collections.defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            us[op] += e["dur"]
            nodes[op].add(e["name"])
    return {op: {"us_per_run": round(t / runs), "nodes": len(nodes[op])}
            for op, t in sorted(us.items(), key=lambda kv: -kv[1])}


def latency(model, meta, ds, *, threads: int, rounds: int) -> dict:
    import onnxruntime as ort

    fproto = eo.onnx_graph(model, meta)
    cal = folds(len(ds.test_x))[0]
    x_cal = to_input(ds.test_x[cal], ds.mean, ds.std)
    cfg = CalibrationConfig(batch_size=25)
    log("quantizing the variants ...")
    ours = eo.quantize_qdq(fproto, x_cal, calibration=cfg)
    eo.correct_biases(ours, fproto, x_cal, batch_size=25)
    models = {
        "fp32": fproto,
        "ort_default_qdq_s8s8": ort_default(fproto, x_cal),
        "u8s8_per_tensor": eo.quantize_qdq(fproto, x_cal, calibration=cfg, per_channel=False),
        "u8s8_per_channel": eo.quantize_qdq(fproto, x_cal, calibration=cfg),
        "u8s8_per_channel_reduce_range": eo.quantize_qdq(fproto, x_cal, calibration=cfg, reduce_range=True),
        "u8s8_qoperator": qoperator(fproto, x_cal),
        "u8s8_after_quant_pre_process": eo.quantize_qdq(preprocessed(fproto), x_cal, calibration=cfg),
        "ours_default (u8s8 per-channel + bias correction)": ours,
        # mixed precision: the stem conv in float; its max pool then runs as ORT's uint8
        # NCHW MaxPool, or (what float_layers does) stays float with the conv
        "stem_float_pool_uint8": eo.quantize_qdq(fproto, x_cal, calibration=cfg, float_nodes=["features.0"]),
        "stem_float_pool_float (float_layers=[features.0])": eo.quantize_qdq(
            fproto, x_cal, calibration=cfg, float_nodes=eo._matching_nodes(fproto, ["features.0"])),
        "float_layers=[features.0, features.3]": eo.quantize_qdq(
            fproto, x_cal, calibration=cfg, float_nodes=eo._matching_nodes(fproto, ["features.0", "features.3"])),
        "float_layers=[features.0, features.3, features.4]": eo.quantize_qdq(
            fproto, x_cal, calibration=cfg,
            float_nodes=eo._matching_nodes(fproto, ["features.0", "features.3", "features.4"])),
    }
    blobs = {k: m.SerializeToString() for k, m in models.items()}
    x1 = to_input(ds.test_x[:1], ds.mean, ds.std)
    sessions = {k: make_session(b, threads) for k, b in blobs.items()}
    # the default file again, with ORT's switch that lets x86 fuse int8 x int8 QDQ convs
    sessions["ort_default_qdq_s8s8 + session.qdqisint8allowed=1"] = make_session(
        blobs["ort_default_qdq_s8s8"], threads, config={"session.qdqisint8allowed": "1"})
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    for name, level in levels.items():
        sessions[f"fp32 @ {name} optimization"] = make_session(blobs["fp32"], threads, level=level)
        sessions[f"ours @ {name} optimization"] = make_session(
            blobs["ours_default (u8s8 per-channel + bias correction)"], threads, level=level)
    load_before = load_avg()
    log(f"timing {len(sessions)} sessions x {rounds} rounds, load {load_before} ...")
    t0 = time.time()
    timed = interleaved(sessions, x1, rounds)
    fp = timed["fp32"]["median_ms"]
    for v in timed.values():
        v["vs_fp32"] = round(v["median_ms"] / fp, 3)
    log("profiling op types ...")
    profiles = {k: op_profile(blobs[k], x1, threads) for k in
                ("fp32", "ort_default_qdq_s8s8", "ours_default (u8s8 per-channel + bias correction)",
                 "stem_float_pool_uint8", "stem_float_pool_float (float_layers=[features.0])",
                 "float_layers=[features.0, features.3, features.4]")}
    return {"threads": threads, "rounds": rounds, "batch": 1, "input": [1, 3, 224, 224],
            "load_avg_before": load_before, "load_avg_after": load_avg(), "seconds": round(time.time() - t0),
            "sizes_bytes": {k: len(b) for k, b in blobs.items()},
            "timings": timed, "op_profile": profiles}


# ---------------------------------------------------------------------------------------
# Agreement


VARIANTS = {
    # name: export_onnx_int8 keyword arguments
    "ort_default_qdq_s8s8": None,  # quantize_static with per_channel=True only
    "u8s8 minmax": {"bias_correction": False},
    "u8s8 entropy": {"bias_correction": False, "method": "entropy"},
    "u8s8 percentile 99.999": {"bias_correction": False, "method": "percentile"},
    "u8s8 per-tensor weights": {"bias_correction": False, "per_channel": False},
    "u8s8 reduce_range": {"bias_correction": False, "reduce_range": True},
    "+ bias correction (default)": {},
    "+ equalize": {"equalize": True},
    "+ augment 2": {"augment": 2},
    "+ stem float": {"float_layers": ["features.0"]},
    "+ stem and classifier float": {"float_layers": ["features.0", "classifier.1"]},
    "+ stem and first Fire float": {"float_layers": ["features.0", "features.3"]},
    "stem and first Fire float, no bias correction": {"float_layers": ["features.0", "features.3"],
                                                       "bias_correction": False},
    "+ stem and first two Fires float": {"float_layers": ["features.0", "features.3", "features.4"]},
    "+ stem and first three Fires float": {"float_layers": ["features.0", "features.3", "features.4",
                                                            "features.5"]},
    # session 7: weights rounded by GPTQ, activation ranges equalized (edgesqueeze.export.prepare)
    "+ GPTQ weights": {"weight_rounding": "gptq"},
    "+ GPTQ weights, activation equalization 0.5": {"weight_rounding": "gptq", "equalize_activations": 0.5},
    "+ GPTQ weights, activation equalization 0.5, stem and first two Fires float": {
        "weight_rounding": "gptq", "equalize_activations": 0.5,
        "float_layers": ["features.0", "features.3", "features.4"]},
    # session 8: the tflite-int8 recipe's float layers (stem int8), and one Fire more
    "+ GPTQ weights, activation equalization 0.5, first two Fires float": {
        "weight_rounding": "gptq", "equalize_activations": 0.5, "float_layers": ["features.3", "features.4"]},
    "+ GPTQ weights, activation equalization 0.5, stem and first three Fires float": {
        "weight_rounding": "gptq", "equalize_activations": 0.5,
        "float_layers": ["features.0", "features.3", "features.4", "features.5"]},
}


def agreement(model, meta, ds, names=None, split_seed: int = 0) -> dict:
    fold = folds(len(ds.test_x), split_seed)
    x_all = to_input(ds.test_x, ds.mean, ds.std)
    fp32 = eo.onnx_graph(model, meta)
    ref = run(fp32, x_all)
    out = {"fp32_top1": int((ref.argmax(1) == ds.test_y).sum()), "images": int(len(ds.test_x)), "variants": {}}
    for name, kw in VARIANTS.items():
        if names and name not in names:
            continue
        t0 = time.time()
        agree = top1 = 0
        sq, kl = [], []
        for k in range(2):
            cal, ev = fold[k], fold[1 - k]
            if kw is None:
                q = ort_default(fp32, to_input(ds.test_x[cal], ds.mean, ds.std))
            else:
                q = quantized(model, meta, ds.test_x[cal], fp32, seed=k, **kw)
            logits = run(q, x_all[ev])
            agree += int((logits.argmax(1) == ref[ev].argmax(1)).sum())
            top1 += int((logits.argmax(1) == ds.test_y[ev]).sum())
            sq.append(10 * np.log10((ref[ev] ** 2).sum() / ((logits - ref[ev]) ** 2).sum()))
            kl.append(kl_div(logits, ref[ev]) * len(ev))  # one image is 2 points of agreement here
        row = {"agree": agree, "top1": top1, "logit_sqnr_db": round(float(np.mean(sq)), 2),
               "kl_vs_fp32": round(float(np.sum(kl)) / len(ds.test_x), 5),
               "seconds": round(time.time() - t0)}
        out["variants"][name] = row
        log(f"{name:36s} {json.dumps(row)}")
    return out


def quantized(model, meta, images, fp32, *, seed, method="minmax", augment=0, **kw):
    """export_onnx_int8's graph without writing a file (``fp32``, the model's fp32 graph, is
    reused when no transform changes the weights)."""
    return eo.quantize_int8_graph(model, meta, images, mean=meta["mean"], std=meta["std"],
                                  calibration=CalibrationConfig(method=method, batch_size=25),
                                  augment=augment, augment_seed=seed, fp32_graph=fp32, **kw)


def run(proto, x: np.ndarray) -> np.ndarray:
    s = make_session(proto.SerializeToString(), 2)
    return np.concatenate([s.run(None, {"input": x[i:i + 25]})[0] for i in range(0, len(x), 25)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("latency", "agreement"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--variants", nargs="*", help="agreement variants to run (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--split-seed", type=int, default=0,
                    help="agreement only, on another random 2-fold split (seed > 0); written under "
                         "'agreement_splits' (the main table is split 0)")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this benchmark needs the shared SqueezeNet and ImageNet sample")
    torch.set_num_threads(1)
    model, meta, ds = setup()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                   "versions": versions(), "command": " ".join(["python"] + sys.argv)})
    if args.only in (None, "latency"):
        result["latency"] = latency(model, meta, ds, threads=args.threads, rounds=args.rounds)
    if args.split_seed:  # another random 2-fold split: how much one split moves the numbers
        splits = result.setdefault("agreement_splits", {})
        new = agreement(model, meta, ds, args.variants, split_seed=args.split_seed)
        old = splits.get(str(args.split_seed), {}).get("variants", {})
        new["variants"] = {**old, **new["variants"]}
        splits[str(args.split_seed)] = new
    elif args.only in (None, "agreement"):
        new = agreement(model, meta, ds, args.variants)
        if args.variants and "agreement" in result:  # a subset: keep the other variants' rows
            new["variants"] = {**result["agreement"].get("variants", {}), **new["variants"]}
        result["agreement"] = new
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def versions() -> dict:
    import onnx
    import onnxruntime

    with contextlib.suppress(Exception):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu": locals().get("cpu")}


if __name__ == "__main__":
    main()
