"""TFLite INT8 of the ImageNet SqueezeNet 1.0: what each calibration / quantization step buys.

    python benchmarks/tflite_int8.py                          # everything (~1-2 h on 2 busy cores)
    python benchmarks/tflite_int8.py --stages tflite,latency  # only the LiteRT files and latency
    python benchmarks/tflite_int8.py --stages latency         # re-time the files kept in runs/bench

Target: int8 top-1 within 1 point of fp32 and top-1 agreement with fp32 >= 95%.

Only 100 labelled images exist (``imagenet-sample``, one per 10th class), so nothing is
tuned on the images it is measured on: 2-fold cross-validation. Fold A is the even
positions, fold B the odd ones; each configuration is calibrated (and, for the sensitivity
scan, *selected*) on one half and measured on the other, then swapped, so every image is
measured once, by a file that never saw it. Numbers are over all 100.

Steps (each measured 2-fold):
1. ``screen``: the quantized model simulated in torch (PT2E quantize/dequantize graph, the
   same ranges and weights the LiteRT file gets): observers (minmax, histogram/"entropy",
   percentile), augmented calibration data, cross-layer equalization, bias correction, the
   pooled logits' own int8 range, and a per-layer sensitivity scan (which single conv kept
   float lowers the calibration half's KL the most).
2. ``tflite``: real LiteRT files (``export_tflite_int8``) for litert-torch's default and the
   chosen setting, run by the LiteRT interpreter on the held-out half; then the mixed-precision
   ladder (stem float, + first Fire, + second Fire), stopping at the first step that meets the
   target (``--stages tflite --configs ladder`` runs only that and keeps the other rows).
3. ``repeats`` (on request, ``--configs``): chosen settings over ``--splits`` more random 2-fold
   splits, since one split of 100 images moves the numbers by a few points.
4. ``latency``: LiteRT fp32 vs int8, batch 1, 2 threads, medians after warm-up, measured
   interleaved in the same run (load average recorded).

Writes ``benchmarks/results/tflite_int8.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import RESULTS, SHARED, kl_div, log, save

from edgesqueeze.checkpoint import load_model
from edgesqueeze.data import load_dataset
from edgesqueeze.config.export import CalibrationConfig
from edgesqueeze.export._common import to_input
from edgesqueeze.export.tflite import (
    augment_calibration,
    equalize_cross_layer,
    export_tflite,
    export_tflite_int8,
    gptq_round,
)
from edgesqueeze.export.tflite_quant import correct_bias, quantize_pt2e
from edgesqueeze.runtime.cpu import cpu_info

MODEL = SHARED / "models" / "squeezenet1_0-imagenet.pt"
FILES = ROOT / "runs" / "bench" / "tflite_int8"  # the LiteRT files of the last tflite stage
Q = torch.ops.quantized_decomposed


def load():
    ds = load_dataset("imagenet-sample")
    lm = load_model(MODEL, arch="squeezenet1_0")
    meta = {**lm.meta, "input_shape": [3, 224, 224], "mean": list(ds.mean), "std": list(ds.std),
            "classes": list(ds.classes)}
    return lm.model.eval(), meta, ds


def folds(n: int):
    a = np.arange(n) % 2 == 0
    return [(a, ~a), (~a, a)]  # (calibrate on, measure on)


def metrics(logits: torch.Tensor, ref: torch.Tensor, y: np.ndarray) -> dict:
    p, r = logits.argmax(1).numpy(), ref.argmax(1).numpy()
    top5 = logits.topk(5, 1).indices.numpy()
    kl = torch.nn.functional.kl_div(logits.double().log_softmax(1), ref.double().log_softmax(1),
                                    log_target=True, reduction="batchmean").item()
    return {"top1": float((p == y).mean()), "top5": float((top5 == y[:, None]).any(1).mean()),
            "agree_top1": float((p == r).mean()), "kl_vs_fp32": round(kl, 5)}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ---------------------------------------------------------------------------------------
# Screen: torch simulation of the int8 graph


def simulate(model, x, cal_images, eval_x, cfg: dict, mean, std) -> torch.Tensor:
    """Logits of ``eval_x`` through the PT2E-quantized model calibrated on ``cal_images``."""
    base = equalize_cross_layer(model) if cfg.get("equalize") else model
    imgs = augment_calibration(cal_images[:cfg.get("images")], cfg.get("augment", 0), seed=0)
    calib = torch.from_numpy(to_input(imgs, mean, std))
    if cfg.get("gptq"):
        base = gptq_round(base, calib)
    gm, _ = quantize_pt2e(base, calib, method=cfg.get("method", "entropy"),
                          percentile=cfg.get("percentile", 99.999),
                          float_layers=cfg.get("float_layers", ()),
                          requantize_pool=cfg.get("requantize_pool", False))
    if cfg.get("bias_correction"):
        correct_bias(gm, base, calib)
    if cfg.get("only"):  # diagnostics: keep only the weights' or only the activations' int8
        gm = bypass(gm, Q.quantize_per_tensor.default if cfg["only"] == "weights" else Q.quantize_per_channel.default)
    with torch.no_grad():
        return gm(eval_x)


def bypass(gm, quantize_op):
    """``gm`` with every ``quantize_op`` -> dequantize pair removed (that part stays float)."""
    g = copy.deepcopy(gm)
    for node in list(g.graph.nodes):
        if node.target == quantize_op:
            for dq in list(node.users):
                dq.replace_all_uses_with(node.args[0])
    g.graph.eliminate_dead_code()
    g.recompile()
    return g


def float_variant(gm, layers: set[str]):
    """``gm`` with the convs in ``layers`` float: weights and output range bypassed. Ranges
    are observed on the float model, so they do not depend on which layers stay float:
    one calibration serves every variant of the scan."""
    g = copy.deepcopy(gm)
    for node in list(g.graph.nodes):
        stack = node.meta.get("nn_module_stack") or {}
        if node.target != torch.ops.aten.conv2d.default or not stack or list(stack.values())[-1][0] not in layers:
            continue
        w = node.args[1]
        if getattr(w, "target", None) == Q.dequantize_per_channel.default:
            node.replace_input_with(w, w.args[0].args[0])
        cur = node
        if len(cur.users) == 1 and "relu" in str(next(iter(cur.users)).target):
            cur = next(iter(cur.users))
        for user in list(cur.users):
            if user.target == Q.quantize_per_tensor.default:
                for dq in list(user.users):
                    dq.replace_all_uses_with(cur)
    g.graph.eliminate_dead_code()
    g.recompile()
    return g


def sensitivity(gm, layers: list[str], x_cal, ref_cal) -> list[tuple[str, float]]:
    """(layer, KL vs fp32 on calibration images with that one conv float), best first.
    Uses only the calibration half: the scan never sees the images it is measured on."""
    scores = []
    for layer in layers:
        with torch.no_grad():
            scores.append((layer, round(kl_div(float_variant(gm, {layer})(x_cal), ref_cal), 5)))
    return sorted(scores, key=lambda t: t[1])


SCREEN = [
    ("litert-torch default: histogram observer", {"method": "entropy"}),
    ("histogram, 16 calibration images", {"method": "entropy", "images": 16}),
    ("minmax observer", {"method": "minmax"}),
    ("percentile 99.99", {"method": "percentile", "percentile": 99.99}),
    ("percentile 99.999", {"method": "percentile", "percentile": 99.999}),
    ("histogram + 3 augmented copies (200 images)", {"method": "entropy", "augment": 3}),
    ("histogram + cross-layer equalization", {"method": "entropy", "equalize": True}),
    ("histogram + pooled logits own range", {"method": "entropy", "requantize_pool": True}),
    ("histogram + pooled logits float", {"method": "entropy", "float_layers": ["classifier.3"]}),
    ("histogram + own pool range + bias correction", {"method": "entropy", "requantize_pool": True,
                                                      "bias_correction": True}),
    ("histogram + classifier (conv + pool) float", {"method": "entropy", "float_layers": ["classifier"]}),
    ("histogram + own pool range + GPTQ weight rounding", {"method": "entropy", "requantize_pool": True,
                                                           "gptq": True}),
    ("diagnostic: int8 weights only (activations float)", {"method": "entropy", "only": "weights"}),
    ("diagnostic: int8 weights only, GPTQ rounding", {"method": "entropy", "only": "weights", "gptq": True}),
    ("diagnostic: int8 activations only (own pool range, weights float)",
     {"method": "entropy", "requantize_pool": True, "only": "activations"}),
]


def screen(model, x, ref, ds, results: dict, only: list[str] | None) -> None:
    rows = results.setdefault("screen", [])
    done = {r["name"] for r in rows}
    for name, cfg in SCREEN:
        if name in done or (only and name not in only):
            continue
        t0 = time.time()
        logits = torch.zeros_like(ref)
        for cal, ev in folds(len(x)):
            logits[torch.from_numpy(ev)] = simulate(model, x, ds.test_x[cal], x[ev], cfg, ds.mean, ds.std)
        row = {"name": name, "config": cfg, **metrics(logits, ref, ds.test_y),
               "wall_s": round(time.time() - t0, 1), "loadavg": loadavg()}
        rows.append(row)
        log(f"screen: {row}")
        save("tflite_int8", results)


def scan(model, x, ref, ds, results: dict, ks=(0, 1, 2, 3, 4, 6, 8), n_scan: int = 25) -> None:
    """Per fold: calibrate once, rank the convs by the calibration half's KL with that one conv
    float (first ``n_scan`` calibration images), then measure on the held-out half with the
    k best kept float (graph surgery on the same calibrated model)."""
    base = {"method": "entropy", "requantize_pool": True}
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    per_fold, logits_k = [], {k: torch.zeros_like(ref) for k in ks}
    t0 = time.time()
    for cal, ev in folds(len(x)):
        gm, _ = quantize_pt2e(model, x[cal], method=base["method"], requantize_pool=True)
        with torch.no_grad():
            base_kl = kl_div(gm(x[cal][:n_scan]), ref[cal][:n_scan])
        ranking = sensitivity(gm, layers, x[cal][:n_scan], ref[cal][:n_scan])
        per_fold.append({"calibration_kl_all_int8": round(base_kl, 5), "ranking": ranking})
        log(f"scan: all-int8 calibration KL {base_kl:.5f}; best single-float layers {ranking[:8]}")
        for k in ks:
            with torch.no_grad():
                logits_k[k][torch.from_numpy(ev)] = float_variant(gm, {n for n, _ in ranking[:k]})(x[ev])
    rows = [{"k": k, **metrics(logits_k[k], ref, ds.test_y)} for k in ks]
    results["sensitivity"] = {"base": base, "scan_images": n_scan, "folds": per_fold, "keep_k_float": rows,
                              "wall_s": round(time.time() - t0, 1), "loadavg": loadavg()}
    log(f"scan: {rows}")
    save("tflite_int8", results)


# ---------------------------------------------------------------------------------------
# Real LiteRT files


def litert_logits(path: Path, x: np.ndarray, threads: int = 2) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.allocate_tensors()
    ys = []
    for i in range(len(x)):
        it.set_tensor(inp["index"], x[i:i + 1])
        it.invoke()
        ys.append(it.get_tensor(out["index"])[0].copy())
    return np.stack(ys)


FINAL = [
    ("litert-torch default (histogram observer, pool shares its input's range, nearest rounding)",
     {"requantize_pool": False, "weight_rounding": "nearest"}),
    ("histogram observer, pool's own range, nearest rounding", {"weight_rounding": "nearest"}),
    ("edgesqueeze default (histogram, pool's own range, GPTQ weight rounding)", {}),
    ("edgesqueeze default + classifier (conv + pool) float", {"float_layers": ["classifier"]}),
]
# Mixed precision from the input side (onnx-int8 needed the stem and the first two Fires float,
# benchmarks/results/onnx_int8.json): one more module float per step, stopping at the first
# step that reaches the target on all 100 held-out predictions (both folds combined).
LADDER = [
    ("edgesqueeze default + stem (features.0) float", {"float_layers": ["features.0"]}),
    ("edgesqueeze default + stem and first Fire (features.0, features.3) float",
     {"float_layers": ["features.0", "features.3"]}),
    ("edgesqueeze default + stem and first two Fires (features.0, features.3, features.4) float",
     {"float_layers": ["features.0", "features.3", "features.4"]}),
    ("edgesqueeze default + stem and first three Fires (features.0, .3, .4, .5) float",
     {"float_layers": ["features.0", "features.3", "features.4", "features.5"]}),
    ("edgesqueeze default + stem and first four Fires (features.0, .3, .4, .5, .7) float",
     {"float_layers": ["features.0", "features.3", "features.4", "features.5", "features.7"]}),
]
# Both ends float: the classifier (conv + pool: the pooled logits' range) with the early layers.
BOTH_ENDS = [
    ("edgesqueeze default + stem, first Fire and classifier float",
     {"float_layers": ["features.0", "features.3", "classifier"]}),
    ("edgesqueeze default + stem, first two Fires and classifier float",
     {"float_layers": ["features.0", "features.3", "features.4", "classifier"]}),
]
# The observer again, now with the early layers float (it was chosen with everything int8).
OBSERVERS = [
    ("edgesqueeze default + stem and first two Fires float, minmax observer",
     {"float_layers": ["features.0", "features.3", "features.4"], "method": "minmax"}),
    ("edgesqueeze default + stem and first two Fires float, percentile 99.99 observer",
     {"float_layers": ["features.0", "features.3", "features.4"], "method": "percentile", "percentile": 99.99}),
]
# Clipping (histogram, percentile) hurt once the early layers are float: the ladder again with minmax.
MINMAX_LADDER = [
    ("edgesqueeze default, minmax observer", {"method": "minmax"}),
    ("edgesqueeze default + stem float, minmax observer", {"float_layers": ["features.0"], "method": "minmax"}),
    ("edgesqueeze default + stem and first Fire float, minmax observer",
     {"float_layers": ["features.0", "features.3"], "method": "minmax"}),
    ("edgesqueeze default + stem and first three Fires float, minmax observer",
     {"float_layers": ["features.0", "features.3", "features.4", "features.5"], "method": "minmax"}),
]
# After the concatenation fix (2026-11-30, tflite_quant._share_concat_ranges: litert-torch had left
# every Fire's cat unannotated and the file clipped expand3x3 to expand1x1's range). The rows
# above were measured before it.
AFTER_CONCAT_FIX = [
    ("all int8, minmax, concatenations in one range", {"method": "minmax"}),
    ("all int8, histogram, concatenations in one range", {"method": "entropy"}),
    ("stem and first two Fires float, minmax, concatenations in one range",
     {"float_layers": ["features.0", "features.3", "features.4"], "method": "minmax"}),
]
# Session 7 (edgesqueeze.export.prepare): activation equalization before GPTQ, bias correction
# of the calibrated model, and fewer float layers (latency: LiteRT int8 must stay 2x faster
# than the fastest fp32 runtime).
_AE = {"method": "minmax", "equalize_activations": 0.5}
ACT_EQ = [
    ("all int8, minmax, activation equalization 0.5", dict(_AE)),
    ("all int8, minmax, activation equalization 0.5, bias correction", {**_AE, "bias_correction": True}),
    ("stem and first Fire float, minmax, activation equalization 0.5",
     {**_AE, "float_layers": ["features.0", "features.3"]}),
    ("stem and first Fire float, minmax, activation equalization 0.5, bias correction",
     {**_AE, "float_layers": ["features.0", "features.3"], "bias_correction": True}),
    ("stem and first two Fires float, minmax, activation equalization 0.5",
     {**_AE, "float_layers": ["features.0", "features.3", "features.4"]}),
]
# Session 8: the first Fire float and the stem int8. A float region between int8 layers
# survives conversion when it holds two convs in a row (a whole Fire); a lone float conv there
# is re-quantized by the converter (export refuses it). LiteRT's float stem was what cost the
# speed; Fire 1 is 4% of the MACs.
FIRE1 = [
    ("first Fire float, minmax, activation equalization 0.5", {**_AE, "float_layers": ["features.3"]}),
    ("first Fire float, minmax, activation equalization 0.5, bias correction",
     {**_AE, "float_layers": ["features.3"], "bias_correction": True}),
    ("first two Fires float, minmax, activation equalization 0.5", {**_AE, "float_layers": ["features.3", "features.4"]}),
    ("first two Fires float, minmax, activation equalization 0.5, bias correction",
     {**_AE, "float_layers": ["features.3", "features.4"], "bias_correction": True}),
    ("first Fire and the second's squeeze and expand1x1 float, minmax, activation equalization 0.5, "
     "bias correction", {**_AE, "float_layers": ["features.3", "features.4.squeeze", "features.4.expand1x1"],
                         "bias_correction": True}),
]
# Issue "Same numbers on every machine": on x86 without VNNI (AVX2 only) LiteRT's XNNPACK int8
# convs are no faster than its fp32 ones (qs8 3x8c8 AVX2 kernels: sign-extend + vpmaddwd,
# against fp32 6x16 FMA3), and the int8 7x7 stem over 3 input channels pads each tap's 3
# channels to 8 (2.8x the fp32 stem's time): the recipe's file was 1.39x slower than fp32
# there (benchmarks/int8_speed.py). The stem float again, with the recipe's other settings.
AVX2 = [
    ("stem and first two Fires float, minmax, activation equalization 0.5, bias correction",
     {**_AE, "float_layers": ["features.0", "features.3", "features.4"], "bias_correction": True}),
    ("stem float, minmax, activation equalization 0.5, bias correction",
     {**_AE, "float_layers": ["features.0"], "bias_correction": True}),
]
CONFIGS = FINAL + LADDER + BOTH_ENDS + OBSERVERS + MINMAX_LADDER + AFTER_CONCAT_FIX + ACT_EQ + FIRE1 + AVX2


def meets_target(row: dict, fp32_top1: float) -> bool:
    """Top-1 agreement >= 95% and top-1 at most 1 point below fp32 (over all 100 images)."""
    return row["agree_top1"] >= 0.95 - 1e-9 and fp32_top1 - row["top1"] <= 0.01 + 1e-9


def tflite_stage(model, meta, x, ref, ds, results: dict, tmp: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Real LiteRT files, 2-fold. ``only``: configuration names (or ``ladder`` for the
    float-layer ladder) to (re)measure; rows of other configurations already in the results
    are kept. The ladder stops at its first step that meets the target."""
    fp32 = export_tflite(model, meta, tmp / "fp32.tflite")
    y = torch.from_numpy(litert_logits(fp32, x.numpy()))
    results["fp32"] = {"torch": metrics(ref, ref, ds.test_y), "litert": metrics(y, ref, ds.test_y),
                       "litert_max_abs_diff": float((y - ref).abs().max()), "bytes": fp32.stat().st_size}
    files = {"fp32": fp32}
    rows = {r["name"]: r for r in results.get("tflite", [])}
    wanted = set(only or [n for n, _ in CONFIGS])
    if "ladder" in wanted:
        wanted |= {n for n, _ in LADDER}
    ladder_done = False
    for i, (name, opts) in enumerate(CONFIGS):
        if name not in wanted:
            continue
        in_ladder = any(name == n for n, _ in LADDER)
        if in_ladder and ladder_done:
            log(f"tflite: skipped (an earlier ladder step met the target): {name}")
            continue
        logits = torch.zeros_like(ref)
        per_fold = []
        t0 = time.time()
        for f, (cal, ev) in enumerate(folds(len(x))):
            kw = dict(opts)  # "method": the observer (default: histogram, litert-torch's)
            cal_cfg = CalibrationConfig(method=kw.pop("method", "entropy"),
                                        percentile=kw.pop("percentile", 99.999))
            path = export_tflite_int8(model, meta, tmp / f"int8_{i}_{f}.tflite", ds.test_x[cal],
                                      calibration=cal_cfg, calibration_split="test-fold", **kw)
            out = torch.from_numpy(litert_logits(path, x[ev].numpy()))
            logits[torch.from_numpy(ev)] = out
            per_fold.append({"measured_on": "odd" if f == 0 else "even",
                             **metrics(out, ref[torch.from_numpy(ev)], ds.test_y[ev])})
            files.setdefault(name, path)
        row = {"name": name, "options": opts, **metrics(logits, ref, ds.test_y),
               "bytes": files[name].stat().st_size, "folds": per_fold, "wall_s": round(time.time() - t0, 1),
               "loadavg": loadavg()}
        if in_ladder:
            row["meets_target"] = meets_target(row, results["fp32"]["torch"]["top1"])
            ladder_done = row["meets_target"]
        rows[name] = row
        log(f"tflite: {row}")
        results["tflite"] = [rows[n] for n, _ in CONFIGS if n in rows]  # saved after each row
        save("tflite_int8", results)
    return files


def random_folds(n: int, seed: int):
    """A seeded random half / half split, both ways (like :func:`folds`, other halves)."""
    a = np.zeros(n, bool)
    a[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    return [(a, ~a), (~a, a)]


def repeats_stage(model, meta, x, ref, ds, results: dict, tmp: Path, names: list[str], splits: int) -> None:
    """The chosen configurations again over ``splits`` more random 2-fold splits (seeds 1..):
    with 100 images a single split moves agreement and top-1 by a few points, so a setting is
    judged on the mean (and the worst split), not on the split it was picked on."""
    configs = dict(CONFIGS)
    rows = {r["name"]: r for r in results.get("tflite_repeats", [])}
    fp32_top1 = float((ref.argmax(1).numpy() == ds.test_y).mean())
    for name in names:
        opts = configs[name]
        kw = dict(opts)
        cal_cfg = CalibrationConfig(method=kw.pop("method", "entropy"), percentile=kw.pop("percentile", 99.999))
        per = []
        t0 = time.time()
        for seed in range(1, splits + 1):
            logits = torch.zeros_like(ref)
            for f, (cal, ev) in enumerate(random_folds(len(x), seed)):
                path = export_tflite_int8(model, meta, tmp / f"rep_{seed}_{f}.tflite", ds.test_x[cal],
                                          calibration=cal_cfg, calibration_split="test-fold", **kw)
                logits[torch.from_numpy(ev)] = torch.from_numpy(litert_logits(path, x[ev].numpy()))
            per.append({"seed": seed, **metrics(logits, ref, ds.test_y)})
            log(f"repeats: {name} split {seed}: {per[-1]}")
        agree = [p["agree_top1"] for p in per]
        top1 = [p["top1"] for p in per]
        if name in rows:  # a re-measurement: the earlier row is kept, not overwritten
            results.setdefault("tflite_repeats_earlier", []).append(rows[name])
        rows[name] = {"name": name, "options": opts, "splits": per,
                      "mean_agree_top1": round(float(np.mean(agree)), 4), "min_agree_top1": min(agree),
                      "mean_top1": round(float(np.mean(top1)), 4), "min_top1": min(top1),
                      "mean_drop_points": round(100 * (fp32_top1 - float(np.mean(top1))), 2),
                      "mean_kl_vs_fp32": round(float(np.mean([p["kl_vs_fp32"] for p in per])), 5),
                      "wall_s": round(time.time() - t0, 1), "loadavg": loadavg(),
                      "cpu": {k: v for k, v in cpu_info().items() if k != "arch"}}
        results["tflite_repeats"] = [rows[n] for n, _ in CONFIGS if n in rows]
        results["tflite_repeats_protocol"] = (
            "each configuration over seeded random half/half splits (seeds 1..N, numpy permutation), "
            "2-fold each: calibrate on one half, measure on the other, swap; metrics over all 100 per split")
        save("tflite_int8", results)


def latency(files: dict[str, Path], results: dict, *, warmup: int = 10, rounds: int = 30, per: int = 5) -> None:
    """Median ms per batch-1 invoke, 2 threads; files interleaved round by round so load
    changes hit all alike."""
    from ai_edge_litert.interpreter import Interpreter

    its = {}
    for name, path in files.items():
        it = Interpreter(model_path=str(path), num_threads=2)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        it.set_tensor(inp["index"], np.random.default_rng(0).standard_normal(inp["shape"]).astype(np.float32))
        for _ in range(warmup):
            it.invoke()
        its[name] = it
    times = {name: [] for name in its}
    before = loadavg()
    for _ in range(rounds):
        for name, it in its.items():
            for _ in range(per):
                t = time.perf_counter()
                it.invoke()
                times[name].append((time.perf_counter() - t) * 1e3)
    ms = {name: round(float(np.median(v)), 2) for name, v in times.items()}
    results["latency"] = {"batch": 1, "threads": 2, "median_ms": ms,
                          "speedup_vs_fp32": {n: round(ms["fp32"] / v, 2) for n, v in ms.items()},
                          "samples_per_file": rounds * per, "loadavg_before": before, "loadavg_after": loadavg()}
    log(f"latency: {results['latency']}")
    save("tflite_int8", results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="tflite,latency,screen,scan",
                    help="comma-separated subset of tflite, latency, screen, scan, repeats (results of other "
                         "stages already in the JSON are kept)")
    ap.add_argument("--only", action="append", help="screen only these configuration names")
    ap.add_argument("--configs", action="append",
                    help="tflite stage: only these configuration names ('ladder' for the float-layer "
                         "ladder); other rows already in the JSON are kept")
    ap.add_argument("--splits", type=int, default=3, help="repeats stage: random 2-fold splits per configuration")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    torch.set_num_threads(args.threads)
    old = RESULTS / "tflite_int8.json"
    results = json.loads(old.read_text()) if old.is_file() else {}
    results.pop("machine", None), results.pop("command", None)
    results.update({"target": "int8 top-1 within 1 point of fp32, top-1 agreement with fp32 >= 95%",
                    "protocol": "100 imagenet-sample images, 2-fold: calibrate (and select) on one half, "
                                "measure on the other, swap; metrics over all 100"})
    results.setdefault("runs", []).append({"stages": sorted(stages), "loadavg_start": loadavg(),
                                           "start": time.strftime("%Y-%m-%d %H:%M:%S")})
    if stages - {"latency"}:
        model, meta, ds = load()
        x = torch.from_numpy(to_input(ds.test_x, ds.mean, ds.std))
        with torch.no_grad():
            ref = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        if "tflite" in stages:
            files = tflite_stage(model, meta, x, ref, ds, results, Path(tmp), args.configs)
            FILES.mkdir(parents=True, exist_ok=True)
            index_path = FILES / "index.json"
            index = json.loads(index_path.read_text()) if index_path.is_file() else {}
            for name, path in files.items():  # kept for a later latency-only run
                shutil.copy(path, FILES / path.name)
                index[name] = path.name
            index_path.write_text(json.dumps(index, indent=1))
        if "latency" in stages:
            if not (FILES / "index.json").is_file():
                raise SystemExit(f"latency needs the files of a tflite stage in {FILES}; run --stages tflite first")
            index = json.loads((FILES / "index.json").read_text())
            latency({n: FILES / f for n, f in index.items()}, results)
        if "repeats" in stages:
            repeats_stage(model, meta, x, ref, ds, results, Path(tmp), args.configs or [], args.splits)
        if "screen" in stages:
            screen(model, x, ref, ds, results, args.only)
        if "scan" in stages:
            scan(model, x, ref, ds, results)
    results["runs"][-1]["loadavg_end"] = loadavg()
    save("tflite_int8", results)


if __name__ == "__main__":
    main()
