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
   chosen setting, run by the LiteRT interpreter on the held-out half.
3. ``latency``: LiteRT fp32 vs int8, batch 1, 2 threads, medians after warm-up, measured
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

from run import RESULTS, SHARED, log, save

from edgesqueeze.checkpoint import load_model
from edgesqueeze.data import load_dataset
from edgesqueeze.export._common import CalibrationConfig, to_input
from edgesqueeze.export.tflite import (
    augment_calibration,
    correct_bias,
    equalize_cross_layer,
    export_tflite,
    export_tflite_int8,
    gptq_round,
    quantize_pt2e,
)

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


def kl_div(out: torch.Tensor, ref: torch.Tensor) -> float:
    return torch.nn.functional.kl_div(out.double().log_softmax(1), ref.double().log_softmax(1),
                                      log_target=True, reduction="batchmean").item()


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


def tflite_stage(model, meta, x, ref, ds, results: dict, tmp: Path) -> dict[str, Path]:
    fp32 = export_tflite(model, meta, tmp / "fp32.tflite")
    y = torch.from_numpy(litert_logits(fp32, x.numpy()))
    results["fp32"] = {"torch": metrics(ref, ref, ds.test_y), "litert": metrics(y, ref, ds.test_y),
                       "litert_max_abs_diff": float((y - ref).abs().max()), "bytes": fp32.stat().st_size}
    files = {"fp32": fp32}
    rows = []
    for name, opts in FINAL:
        logits = torch.zeros_like(ref)
        t0 = time.time()
        for f, (cal, ev) in enumerate(folds(len(x))):
            path = export_tflite_int8(model, meta, tmp / f"int8_{len(rows)}_{f}.tflite", ds.test_x[cal],
                                      calibration=CalibrationConfig(method="entropy"), calibration_split="test-fold",
                                      **opts)
            logits[torch.from_numpy(ev)] = torch.from_numpy(litert_logits(path, x[ev].numpy()))
            files.setdefault(name, path)
        row = {"name": name, "options": opts, **metrics(logits, ref, ds.test_y),
               "bytes": files[name].stat().st_size, "wall_s": round(time.time() - t0, 1)}
        rows.append(row)
        log(f"tflite: {row}")
    results["tflite"] = rows
    save("tflite_int8", results)
    return files


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
                    help="comma-separated subset of tflite, latency, screen, scan (results of other "
                         "stages already in the JSON are kept)")
    ap.add_argument("--only", action="append", help="screen only these configuration names")
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
            files = tflite_stage(model, meta, x, ref, ds, results, Path(tmp))
            FILES.mkdir(parents=True, exist_ok=True)
            for path in files.values():  # kept for a later latency-only run
                shutil.copy(path, FILES / path.name)
            (FILES / "index.json").write_text(json.dumps({n: p.name for n, p in files.items()}, indent=1))
        if "latency" in stages:
            if not (FILES / "index.json").is_file():
                raise SystemExit(f"latency needs the files of a tflite stage in {FILES}; run --stages tflite first")
            index = json.loads((FILES / "index.json").read_text())
            latency({n: FILES / f for n, f in index.items()}, results)
        if "screen" in stages:
            screen(model, x, ref, ds, results, args.only)
        if "scan" in stages:
            scan(model, x, ref, ds, results)
    results["runs"][-1]["loadavg_end"] = loadavg()
    save("tflite_int8", results)


if __name__ == "__main__":
    main()
