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

   Every variant names its weights: ``uint8 weights, any-cpu`` (8-bit, -127..127 stored as
   uint8 + 128: ``export_onnx_int8``'s default since session 11, exact on every CPU),
   ``8-bit weights, vnni-or-arm`` (int8, -127..127) or ``7-bit int8 weights, session-10
   any-cpu`` (onnxruntime's ``reduce_range``, -64..64). Each file is scored twice: by the optimized session (integer
   ``QLinearConv`` kernels of *this* CPU) and by a session with ``ORT_DISABLE_ALL``, which runs
   the QDQ graph as float ops on the dequantized values: the exact integer result (to one
   requantization step), what x86 with VNNI and ARM compute. A row's main numbers are the
   file's result on its target CPUs: the optimized session for uint8 and 7-bit weights (exact
   everywhere; the row checks it against the exact run) and the exact run for int8 8-bit;
   ``optimized_here`` holds the int8 8-bit file's numbers on this CPU, which saturate on x86 without VNNI
   (``edgesqueeze.runtime.cpu``). For 8-bit variants the bias correction's per-channel means
   are measured with exact arithmetic too (as an export on a VNNI or ARM host would; variant
   option ``_bias_means: "here"`` measures them with this CPU's kernels instead). Each row
   records ``cpu_info()``.

    python benchmarks/onnx_int8.py                 # both; writes benchmarks/results/onnx_int8.json
    python benchmarks/onnx_int8.py --only latency --rounds 300
    python benchmarks/onnx_int8.py --only agreement --variants "*stem and first two Fires*" --split-seed 2
    python benchmarks/onnx_int8.py --summary       # means over split seeds 0..3, no runs

Needs ``../shared`` (the pretrained SqueezeNet and the ImageNet sample).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import fnmatch
import json
import os
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
from edgesqueeze.export import onnx_int8 as eo  # noqa: E402
from edgesqueeze.config.export import CalibrationConfig  # noqa: E402
from edgesqueeze.export._common import to_input  # noqa: E402
from edgesqueeze.runtime.cpu import cpu_info  # noqa: E402
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
    # weights explicit everywhere: uint8 (export_onnx_int8's default target any-cpu), int8
    # (vnni-or-arm) or 7-bit int8 (session 10's any-cpu); the s8s8 and QOperator rows are ORT's
    ours = eo.quantize_qdq(fproto, x_cal, calibration=cfg, weights="uint8")
    eo.correct_biases(ours, fproto, x_cal, batch_size=25)
    models = {
        "fp32": fproto,
        "ort_default_qdq_s8s8": ort_default(fproto, x_cal),
        "u8s8_per_tensor (8-bit)": eo.quantize_qdq(fproto, x_cal, calibration=cfg, per_channel=False,
                                                   weights="int8"),
        "u8s8_per_channel (8-bit)": eo.quantize_qdq(fproto, x_cal, calibration=cfg, weights="int8"),
        "u8s8_per_channel_reduce_range (7-bit)": eo.quantize_qdq(fproto, x_cal, calibration=cfg,
                                                                 weights="int8-7bit"),
        "u8u8_per_channel (uint8 weights)": eo.quantize_qdq(fproto, x_cal, calibration=cfg, weights="uint8"),
        "u8s8_qoperator (8-bit)": qoperator(fproto, x_cal),
        "u8u8_after_quant_pre_process (uint8 weights)": eo.quantize_qdq(preprocessed(fproto), x_cal,
                                                                        calibration=cfg, weights="uint8"),
        "ours_default (u8u8 per-channel + bias correction)": ours,
        # mixed precision: the stem conv in float; its max pool then runs as ORT's uint8
        # NCHW MaxPool, or (what float_layers does) stays float with the conv
        "stem_float_pool_uint8 (uint8 weights)": eo.quantize_qdq(fproto, x_cal, calibration=cfg,
                                                                 float_nodes=["features.0"], weights="uint8"),
        "stem_float_pool_float (float_layers=[features.0], uint8 weights)": eo.quantize_qdq(
            fproto, x_cal, calibration=cfg, float_nodes=eo._matching_nodes(fproto, ["features.0"]),
            weights="uint8"),
        "float_layers=[features.0, features.3] (uint8 weights)": eo.quantize_qdq(
            fproto, x_cal, calibration=cfg, float_nodes=eo._matching_nodes(fproto, ["features.0", "features.3"]),
            weights="uint8"),
        "float_layers=[features.0, features.3, features.4] (uint8 weights)": eo.quantize_qdq(
            fproto, x_cal, calibration=cfg, weights="uint8",
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
            blobs["ours_default (u8u8 per-channel + bias correction)"], threads, level=level)
    load_before = load_avg()
    log(f"timing {len(sessions)} sessions x {rounds} rounds, load {load_before} ...")
    t0 = time.time()
    timed = interleaved(sessions, x1, rounds)
    fp = timed["fp32"]["median_ms"]
    for v in timed.values():
        v["vs_fp32"] = round(v["median_ms"] / fp, 3)
    log("profiling op types ...")
    profiles = {k: op_profile(blobs[k], x1, threads) for k in
                ("fp32", "ort_default_qdq_s8s8", "ours_default (u8u8 per-channel + bias correction)",
                 "stem_float_pool_uint8 (uint8 weights)",
                 "stem_float_pool_float (float_layers=[features.0], uint8 weights)",
                 "float_layers=[features.0, features.3, features.4] (uint8 weights)")}
    return {"threads": threads, "rounds": rounds, "batch": 1, "input": [1, 3, 224, 224], "cpu": cpu_info(),
            "load_avg_before": load_before, "load_avg_after": load_avg(), "seconds": round(time.time() - t0),
            "sizes_bytes": {k: len(b) for k, b in blobs.items()},
            "timings": timed, "op_profile": profiles}


# ---------------------------------------------------------------------------------------
# Agreement


# Settings without their weights; VARIANTS below has each with each kind of weights, named
# "<setting> (uint8 weights, any-cpu)", "<setting> (8-bit weights, vnni-or-arm)" and
# "<setting> (7-bit int8 weights, session-10 any-cpu)".
# Rows in onnx_int8.json without such a suffix are older: 8-bit weights (onnxruntime's and
# then edgesqueeze's default), scored by the optimized session of the machine of the time.
_AE = {"weight_rounding": "gptq", "equalize_activations": 0.5}
SETTINGS = {
    # name: export_onnx_int8 / quantize_int8_graph keyword arguments
    "u8s8 minmax": {"bias_correction": False},
    "u8s8 entropy": {"bias_correction": False, "method": "entropy"},
    "u8s8 percentile 99.999": {"bias_correction": False, "method": "percentile"},
    "u8s8 per-tensor weights": {"bias_correction": False, "per_channel": False},
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
    "+ GPTQ weights, activation equalization 0.5": dict(_AE),
    # the recipe's onnx-int8 (recipes/squeezenet-imagenet.yaml)
    "+ GPTQ weights, activation equalization 0.5, stem and first two Fires float": {
        **_AE, "float_layers": ["features.0", "features.3", "features.4"]},
    # session 8: the tflite-int8 recipe's float layers (stem int8), and one Fire more
    "+ GPTQ weights, activation equalization 0.5, first two Fires float": {
        **_AE, "float_layers": ["features.3", "features.4"]},
    "+ GPTQ weights, activation equalization 0.5, stem and first three Fires float": {
        **_AE, "float_layers": ["features.0", "features.3", "features.4", "features.5"]},
    # session 28: the recipe's (since session 27) with each Fire's concat a copy (share_concat_ranges)
    "+ GPTQ weights, activation equalization 0.5, first two Fires float, shared concat ranges": {
        **_AE, "float_layers": ["features.3", "features.4"], "share_concats": True},
    # 7-bit weights (session 10's any-cpu) missed the target with the recipe's float layers: one end more float
    "+ GPTQ weights, activation equalization 0.5, stem, first two Fires and classifier float": {
        **_AE, "float_layers": ["features.0", "features.3", "features.4", "classifier.1"]},
    # other equalization strengths with the recipe's float layers
    "+ GPTQ weights, activation equalization 0.3, stem and first two Fires float": {
        "weight_rounding": "gptq", "equalize_activations": 0.3,
        "float_layers": ["features.0", "features.3", "features.4"]},
    "+ GPTQ weights, activation equalization 0.3, stem and first three Fires float": {
        "weight_rounding": "gptq", "equalize_activations": 0.3,
        "float_layers": ["features.0", "features.3", "features.4", "features.5"]},
    # session 18: all int8 (exact on every CPU, and faster on AVX2) with clipped activation ranges
    "+ GPTQ weights, activation equalization 0.5, percentile 99.999 ranges": {**_AE, "method": "percentile"},
    "+ GPTQ weights, activation equalization 0.5, entropy ranges": {**_AE, "method": "entropy"},
    "+ GPTQ weights, activation equalization 0.75, stem and first two Fires float": {
        "weight_rounding": "gptq", "equalize_activations": 0.75,
        "float_layers": ["features.0", "features.3", "features.4"]},
}
RANGES = {  # suffix: quantize_qdq's weights (export_onnx_int8's target: INT8_TARGETS)
    "uint8 weights, any-cpu": "uint8",
    "7-bit int8 weights, session-10 any-cpu": "int8-7bit",
    "8-bit weights, vnni-or-arm": "int8",
}
VARIANTS = {"ort_default_qdq_s8s8": None}  # quantize_static with per_channel=True only (8-bit, s8s8)
VARIANTS.update({f"{name} ({suffix})": {**kw, "weights": w}
                 for name, kw in SETTINGS.items() for suffix, w in RANGES.items()})
# the recipe's 8-bit file as an export on an AVX2-only host writes it: the bias correction's
# means measured with this CPU's (saturating) kernels
VARIANTS["+ GPTQ weights, activation equalization 0.5, stem and first two Fires float, bias means from "
         "this CPU's kernels (8-bit weights, vnni-or-arm)"] = {
    **SETTINGS["+ GPTQ weights, activation equalization 0.5, stem and first two Fires float"],
    "weights": "int8", "_bias_means": "here"}
assert all(kw is None or kw.get("weights") in eo.WEIGHT_TYPES for kw in VARIANTS.values())


def pick(names: list[str] | None) -> list[str]:
    """Variant names matching ``names`` (exact names or fnmatch patterns); all without."""
    if not names:
        return list(VARIANTS)
    out = [v for v in VARIANTS if any(v == n or fnmatch.fnmatchcase(v, n) for n in names)]
    missing = [n for n in names if not any(v == n or fnmatch.fnmatchcase(v, n) for v in VARIANTS)]
    if missing:
        sys.exit(f"no variant matches {missing}; variants:\n  " + "\n  ".join(VARIANTS))
    return out


def scores(logits: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict:
    """Counts over these images (added up over the two folds by the caller)."""
    return {"agree": int((logits.argmax(1) == ref.argmax(1)).sum()),
            "top1": int((logits.argmax(1) == y).sum()),
            "sq": float(10 * np.log10((ref ** 2).sum() / ((logits - ref) ** 2).sum())),
            "kl_sum": kl_div(logits, ref) * len(ref)}


def _row(parts: list[dict], n: int) -> dict:
    return {"agree": sum(p["agree"] for p in parts), "top1": sum(p["top1"] for p in parts),
            "logit_sqnr_db": round(float(np.mean([p["sq"] for p in parts])), 2),
            "kl_vs_fp32": round(float(np.sum([p["kl_sum"] for p in parts])) / n, 5)}


def agreement(model, meta, ds, names=None, split_seed: int = 0) -> dict:
    fold = folds(len(ds.test_x), split_seed)
    x_all = to_input(ds.test_x, ds.mean, ds.std)
    fp32 = eo.onnx_graph(model, meta)
    ref = run(fp32, x_all)
    cpu = cpu_info()
    out = {"fp32_top1": int((ref.argmax(1) == ds.test_y).sum()), "images": len(ds.test_x),
           "split_seed": split_seed, "cpu": cpu, "variants": {}}
    for name in pick(names):
        kw = VARIANTS[name]
        t0 = time.time()
        opt, exact, diff, same = [], [], [], 0
        for k in range(2):
            cal, ev = fold[k], fold[1 - k]
            if kw is None:
                q = ort_default(fp32, to_input(ds.test_x[cal], ds.mean, ds.std))
            else:
                q = quantized(model, meta, ds.test_x[cal], fp32, seed=k, **kw)
            lo, le = run(q, x_all[ev]), run(q, x_all[ev], exact=True)
            opt.append(scores(lo, ref[ev], ds.test_y[ev]))
            exact.append(scores(le, ref[ev], ds.test_y[ev]))
            diff.append(float(np.abs(lo - le).max()))
            same += int((lo.argmax(1) == le.argmax(1)).sum())
        n = len(ds.test_x)
        seven = bool(kw and kw.get("weights") in ("uint8", "int8-7bit"))  # exact on every CPU
        if kw is None:
            weights = "8-bit -127..127, int8 activations (s8s8: not fused on x86, float convs)"
        else:
            weights = {"uint8": "8-bit -127..127 stored as uint8 + 128 (any-cpu)",
                       "int8-7bit": "7-bit -64..64 (session 10's any-cpu)",
                       "int8": "8-bit -127..127 (vnni-or-arm)"}[kw["weights"]]
        main_rows, other = (opt, exact) if seven or kw is None else (exact, opt)
        row = {"weights": weights,
               "scored_by": ("optimized session (this CPU's integer kernels)" if seven or kw is None else
                             "exact arithmetic (ORT_DISABLE_ALL: QDQ as float ops = VNNI x86 / ARM)"),
               **_row(main_rows, n),
               ("exact_arithmetic" if seven or kw is None else "optimized_here"): _row(other, n),
               "optimized_vs_exact": {"same_top1": same, "max_abs_logit_diff": round(max(diff), 4)},
               "seconds": round(time.time() - t0), "load_avg": load_avg(),
               "cpu": {k: cpu[k] for k in ("cpu", "features", "int8_kernels")}}
        if kw and "_bias_means" in kw:
            row["bias_means"] = kw["_bias_means"]
        out["variants"][name] = row
        log(f"{name:36s} {json.dumps({k: v for k, v in row.items() if k != 'cpu'})}")
    return out


@contextlib.contextmanager
def exact_bias_means(on: bool):
    """Bias correction measures per-channel means with ``eo._session``, an optimized session:
    on x86 without VNNI an 8-bit file's integer kernels saturate there, so its correction would
    pull toward saturated means. ``on``: measure them with exact arithmetic instead (what an
    export on a VNNI x86 or ARM host measures)."""
    if not on:
        yield
        return
    import onnxruntime as ort

    orig = eo._session

    def exact_session(model_bytes: bytes, *, threads: int = 1):
        return make_session(model_bytes, threads, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)

    eo._session = exact_session
    try:
        yield
    finally:
        eo._session = orig


def quantized(model, meta, images, fp32, *, seed, method="minmax", augment=0, _bias_means=None, **kw):
    """export_onnx_int8's graph without writing a file (``fp32``, the model's fp32 graph, is
    reused when no transform changes the weights). 8-bit weights: the bias correction's means
    exact unless ``_bias_means="here"``."""
    exact = kw.get("weights") == "int8" and _bias_means != "here"
    with exact_bias_means(exact):
        return eo.quantize_int8_graph(model, meta, images, mean=meta["mean"], std=meta["std"],
                                      calibration=CalibrationConfig(method=method, batch_size=25),
                                      augment=augment, augment_seed=seed, fp32_graph=fp32, **kw)


def run(proto, x: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """Logits of ``x``. ``exact``: ORT_DISABLE_ALL, the QDQ graph as float ops on dequantized
    values (no integer kernels, so no saturation: the result of VNNI x86 and ARM)."""
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if exact else None
    s = make_session(proto.SerializeToString(), 2, level=level)
    return np.concatenate([s.run(None, {"input": x[i:i + 25]})[0] for i in range(0, len(x), 25)])


def summary(result: dict, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> dict:
    """Per variant measured on every split seed in ``seeds``: means and worst split (variants
    missing on any of them are left out; {} when a split was never run)."""
    by_seed = {0: result.get("agreement", {})}
    by_seed.update({int(k): v for k, v in result.get("agreement_splits", {}).items()})
    if not all(s in by_seed for s in seeds):
        return {}
    out = {}
    for name in by_seed[seeds[0]].get("variants", {}):
        rows = [by_seed[s]["variants"].get(name) for s in seeds]
        if any(r is None or "weights" not in r for r in rows):  # only rows of this script's format
            continue
        fp = [by_seed[s]["fp32_top1"] for s in seeds]
        out[name] = {"split_seeds": list(seeds), "agree": [r["agree"] for r in rows],
                     "top1": [r["top1"] for r in rows], "fp32_top1": fp,
                     "kl_vs_fp32": [r["kl_vs_fp32"] for r in rows],
                     "mean_agree": round(float(np.mean([r["agree"] for r in rows])), 2),
                     "min_agree": min(r["agree"] for r in rows),
                     "mean_top1": round(float(np.mean([r["top1"] for r in rows])), 2),
                     "mean_drop_points": round(float(np.mean(fp) - np.mean([r["top1"] for r in rows])), 2),
                     "mean_kl_vs_fp32": round(float(np.mean([r["kl_vs_fp32"] for r in rows])), 5),
                     "meets_95_and_1_point": bool(np.mean([r["agree"] for r in rows]) >= 95
                                                  and np.mean(fp) - np.mean([r["top1"] for r in rows]) <= 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("latency", "agreement"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--variants", nargs="*", help="agreement variants to run: names or fnmatch patterns "
                                                  "(default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--split-seed", type=int, default=0,
                    help="agreement only, on another random 2-fold split (seed > 0); written under "
                         "'agreement_splits' (the main table is split 0)")
    ap.add_argument("--summary", action="store_true",
                    help="only recompute 'agreement_summary' (means over split seeds 0..3; and over 0..7 "
                         "where all were run) from the JSON")
    ap.add_argument("--list", action="store_true", help="list the agreement variants and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(VARIANTS))
        return
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.summary:
        result["agreement_summary"] = summary(result)
        if summary(result, tuple(range(8))):
            result["agreement_summary_seeds_0_7"] = summary(result, tuple(range(8)))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["agreement_summary"], indent=2))
        return
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this benchmark needs the shared SqueezeNet and ImageNet sample")
    torch.set_num_threads(1)
    model, meta, ds = setup()
    result.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "machine": {**cpu_info(), "cores": os.cpu_count()},
                   "versions": versions(), "command": " ".join(["python"] + sys.argv)})
    result["note"] = ("Rows whose name ends in '(uint8 weights, any-cpu)', '(7-bit int8 weights, session-10 "
                      "any-cpu)' or '(8-bit weights, vnni-or-arm)' carry 'weights', 'scored_by' and 'cpu'. Rows without such a suffix are older: 8-bit "
                      "weights, scored by the optimized session of the machine of the time (not recorded).")
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
        if "agreement" in result:  # keep the other variants' rows (older ones included)
            new["variants"] = {**result["agreement"].get("variants", {}), **new["variants"]}
        result["agreement"] = new
    result["agreement_summary"] = summary(result)
    if summary(result, tuple(range(8))):  # more splits, where measured (the issue asks for 0..3)
        result["agreement_summary_seeds_0_7"] = summary(result, tuple(range(8)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("agreement_summary", {}), indent=2))


def versions() -> dict:
    import onnx
    import onnxruntime

    with contextlib.suppress(Exception):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu": locals().get("cpu")}


if __name__ == "__main__":
    main()
