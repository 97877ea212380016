"""CIFAR-10 full-integer TFLite: which calibration setting, chosen on the validation split.

    python benchmarks/cifar_int8.py runs/bench/squeezenet-cifar10-tiny/model.pt \
        runs/bench/resnet8-cifar10/model.pt [--configs entropy,minmax,...]

For each float model and each setting, writes a real ``tflite-int8`` file (256 calibration
images from the training split, as the recipes' ``export`` sections do) and runs it in the
LiteRT interpreter on the 5,000 *validation* images (carved from the training set with the
model's own seed; the model never trained on them): accuracy and top-1 agreement with the
float model on the same images. The test split is not touched, so a setting chosen here can
be measured once on it afterwards (``edgesqueeze verify``).

Writes ``benchmarks/results/cifar_int8.json`` (``--record NAME``: ``NAME.json``, e.g.
cifar_int8_<cpu> for another kind of CPU beside the first record).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import log, save

from edgesqueeze.checkpoint import load_model
from edgesqueeze.evaluation import training_data
from edgesqueeze.config.export import CalibrationConfig
from edgesqueeze.export._common import calibration_images, to_input
from edgesqueeze.export.tflite import export_tflite_int8
from edgesqueeze.runtime import load

# name: (observer, weight rounding, pool requantized)
CONFIGS = {
    "entropy": ("entropy", "gptq", True),          # the export default for tflite-int8 ("auto")
    "minmax": ("minmax", "gptq", True),
    "percentile": ("percentile", "gptq", True),
    "entropy-nearest": ("entropy", "nearest", True),
    "minmax-nearest": ("minmax", "nearest", True),
    "minmax-pool-shared": ("minmax", "gptq", False),
}


def float_scores(model, meta, x: np.ndarray, batch: int = 500) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(to_input(x[i:i + batch], meta["mean"], meta["std"]))).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated of {', '.join(CONFIGS)}")
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--record", default="cifar_int8", help="the results file's name in benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = []
    for path in args.models:
        loaded = load_model(path)
        model, meta = loaded.model.eval(), dict(loaded.meta)
        _, (x_train, _), (x_val, y_val) = training_data(meta, source=path)
        calib = calibration_images(x_train, args.calibration_images, seed=0)
        ref = float_scores(model, meta, x_val).argmax(1)
        row = {"model": str(path), "arch": meta.get("arch"), "val_images": int(len(x_val)),
               "float_val_accuracy": round(float((ref == y_val).mean()), 4), "configs": {}}
        log(f"{path}: float val accuracy {row['float_val_accuracy']:.2%}")
        for name in args.configs.split(","):
            method, rounding, pool = CONFIGS[name]
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                out = export_tflite_int8(model, meta, Path(tmp) / "m.int8.tflite", calib,
                                         calibration=CalibrationConfig(images=len(calib), method=method),
                                         weight_rounding=rounding, requantize_pool=pool, calibration_seed=0)
                size = out.stat().st_size
                pred = load(out, threads=2).predict_images(x_val, batch_size=250).argmax(1)
            r = {"bytes": size, "val_accuracy": round(float((pred == y_val).mean()), 4),
                 "val_agreement": round(float((pred == ref).mean()), 4), "seconds": round(time.perf_counter() - t0, 1)}
            row["configs"][name] = r
            log(f"  {name:<20} {size:>9,} B  val acc {r['val_accuracy']:.2%}  agreement {r['val_agreement']:.2%}")
        results.append(row)
    save(args.record, {"protocol": "tflite-int8 files run in LiteRT on the validation split (5,000 training "
                                    "images held out with the model's seed); 256 calibration images from the "
                                    "rest of the training split", "models": results})


if __name__ == "__main__":
    main()
