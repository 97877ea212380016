"""Users' own models on CIFAR-10, end to end through the command line, as a user runs it.

    python benchmarks/zoo_cifar.py [ResNet10 MobileNetV2 ShuffleNetV2] [--stages train,ptq,int8,dc]

For each class of examples/zoo.py (given to edgesqueeze as ``--arch``/``model.import``
``examples/zoo.py:Class``, never registered):

1. ``edgesqueeze train -r recipes/zoo-cifar10.yaml --set model.import=examples/zoo.py:Class``
   (CIFAR-10 JPEG copy, 45,000 training images, 5,000 validation, 10,000 test);
2. the same trained model as TorchScript (``torch.jit.trace``), compressed post-training
   (``compress.ptq``, calibration images only) to a quarter of its fp32 size: size, and top-1
   agreement with the float model on the test images not used for calibration;
3. ``edgesqueeze export`` of the float model to onnx-int8 and tflite-int8 and
   ``edgesqueeze verify`` against the float model: accuracy and top-1 agreement;
4. retraining Deep Compression with the recipe's ``compress`` section (prune, fold BN,
   4-bit weight sharing with retrained centroids, Huffman) -> ``.esq``; size against dense
   fp32 and test accuracy against the float model.

Writes ``benchmarks/results/zoo_cifar.json`` after every stage (a long run: ~30 min per model
on 2 cores), merging its row into what the file holds then, so that runs for different
classes may overlap. ``--stages`` re-runs some stages only (``dc`` after a recipe change: the
trained model is reused; the row keeps the other stages' numbers). Outputs stay in
runs/bench/zoo-<Class>/; training resumes if interrupted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import RESULTS, log, save

EDGESQUEEZE = [sys.executable, "-m", "edgesqueeze"]
RECIPE = "recipes/zoo-cifar10.yaml"


def sh(*args: str) -> float:
    """Run one edgesqueeze command from the repo root, its output into the log; wall seconds."""
    cmd = [*EDGESQUEEZE, *args]
    log("$ edgesqueeze " + " ".join(args))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return round(time.perf_counter() - t0, 1)


STAGES = ("train", "ptq", "int8", "dc")


def one(cls: str, done, row: dict, stages: set[str]) -> dict:
    out = ROOT / "runs" / "bench" / f"zoo-{cls}"
    spec = [f"--set=model.import=examples/zoo.py:{cls}", f"--set=name=zoo-{cls}-cifar10"]
    row.update({"class": cls, "arch": f"examples/zoo.py:{cls}"})
    if "train" in stages:
        row["train_wall_s"] = sh("train", "-r", RECIPE, *spec, "--out", str(out), "--resume", "--no-progress")
        summary = json.loads((out / "summary.json").read_text())
        row["float"] = {"test_accuracy": summary["test"]["accuracy"],
                        "val_accuracy": summary["history"][-1]["val_accuracy"],
                        "epoch_s": [round(h["epoch_s"], 1) for h in summary["history"]]}
    if "ptq" in stages:
        ptq_stage(out, row)
        done(row)
    if "int8" in stages:
        int8_stage(out, spec, row)
        done(row)
    if "dc" in stages:  # last: the longest
        row["compress_wall_s"] = sh("compress", str(out / "model.pt"), "-r", RECIPE, *spec, "--out",
                                    str(out / "dc"), "--no-progress")
        rep = json.loads((out / "dc" / "report.json").read_text())
        row["deep_compression"] = {"totals": rep["totals"], "test": rep["test"], "stages": rep["stages"],
                                   "date": time.strftime("%Y-%m-%d")}
        row.pop("note", None)
    return row


def ptq_stage(out: Path, row: dict) -> None:
    """The trained model as TorchScript, post-training compressed to a quarter of fp32."""
    import torch

    from edgesqueeze.checkpoint import load_model

    loaded = load_model(out / "model.pt")
    ts_path = out / "model.torchscript.pt"
    shape = loaded.meta["input_shape"]
    # traced first, as most users save TorchScript; a trace that recorded x.size() (ShuffleNet's
    # channel shuffle) cannot be converted for compress (one error line), and is then scripted
    torch.jit.save(torch.jit.trace(loaded.model.eval(), torch.zeros(1, *shape)), str(ts_path))
    row["torchscript"] = "trace"
    dense = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    target = dense // 4 - 2048  # a margin under 4x for the archive's own header
    ptq = out / "ptq.yaml"
    ptq.write_text(f"version: 1\ncompress:\n  ptq: {{target_bytes: {target}}}\n  calibration: {{images: 512}}\n")
    args = ("compress", str(ts_path), "--data", "cifar10", "-r", str(ptq), "--mean",
            ",".join(map(str, loaded.meta["mean"])), "--std", ",".join(map(str, loaded.meta["std"])),
            "--out", str(out / "ts-ptq"), "--no-progress")
    try:
        row["ts_ptq_wall_s"] = sh(*args)
    except subprocess.CalledProcessError:
        log("the traced TorchScript was refused; scripting the model instead (torch.jit.script)")
        torch.jit.save(torch.jit.script(loaded.model.eval()), str(ts_path))
        row["torchscript"] = "script (the trace was refused: it recorded x.size())"
        row["ts_ptq_wall_s"] = sh(*args)
    rep = json.loads((out / "ts-ptq" / "report.json").read_text())
    row["torchscript_ptq"] = {"target_bytes": target, "totals": rep["totals"], "evaluation": rep.get("evaluation")}


def int8_stage(out: Path, spec: list[str], row: dict) -> None:
    """INT8 files of the float model, verified against it."""
    row["export_wall_s"] = sh("export", str(out / "model.pt"), "-r", RECIPE, *spec, "-f", "onnx-int8,tflite-int8",
                              "--out", str(out / "export"))
    sh("verify", str(out / "model.pt"), str(out / "export" / "model.int8.onnx"),
       str(out / "export" / "model.int8.tflite"), "--out", str(out / "export" / "verify.json"))
    ver = json.loads((out / "export" / "verify.json").read_text())
    row["int8"] = {Path(r["path"]).name: {k: r.get(k) for k in ("format", "bytes", "accuracy", "agreement")}
                   for r in ver["artifacts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("classes", nargs="*", default=["ResNet10", "MobileNetV2", "ShuffleNetV2"])
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    if stages - set(STAGES):
        ap.error(f"--stages: unknown {', '.join(sorted(stages - set(STAGES)))}; known: {', '.join(STAGES)}")
    path = RESULTS / "zoo_cifar.json"

    def rows() -> dict:
        return {r["class"]: r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}

    def done(row: dict) -> None:  # saved after every stage: a long run may be cut short
        current = rows()  # another class's run may have written since
        current[row["class"]] = row
        save("zoo_cifar", {"recipe": RECIPE, "runs": list(current.values())})

    for cls in args.classes:
        done(one(cls, done, dict(rows().get(cls, {})), stages))


if __name__ == "__main__":
    main()
