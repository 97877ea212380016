"""Compile, once, the bytecode of the modules edgesqueeze and its tests import.

`make install` runs pip with --no-compile: pip compiled every module of every package (torch,
jax and transformers whole), where edgesqueeze imports a small part of them. Importing the
modules below with bytecode writing on compiles just those, so each later process reads them
compiled even where PYTHONDONTWRITEBYTECODE is set; anything else compiles on first import.
A module that does not import is left to the install check and the tests to report.

Two processes share the work: this one imports torch and what stands on it, a second one the
packages that do not import torch (on 2 Zen 3 cores: 16 s instead of 24 s in one process).
Where both import a module (numpy), both compile it; Python writes each .pyc atomically.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

WITH_TORCH = (
    "torch torch._dynamo torch.export torch.onnx torch.fx torch.distributed torch.nn.parallel "
    "torchao.quantization.pt2e.quantize_pt2e litert_torch litert_torch.quantize.pt2e_quantizer "
    "edgesqueeze.cli edgesqueeze.runtime edgesqueeze.export edgesqueeze.compress"
).split()
WITHOUT_TORCH = (
    "sympy jax ai_edge_quantizer onnx onnxscript onnxruntime onnxruntime.quantization sklearn.cluster "
    "matplotlib.pyplot PIL ai_edge_litert.interpreter tflite_micro zstandard yaml tqdm click pytest "
    "hypothesis xdist"
).split()


def _import(names: list[str]) -> None:
    sys.dont_write_bytecode = False
    warnings.simplefilter("ignore")
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported by the install check and the tests, not here
            pass


def main(argv: list[str]) -> int:
    if argv == ["--without-torch"]:
        _import(WITHOUT_TORCH)
        return 0
    other = subprocess.Popen([sys.executable, __file__, "--without-torch"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _import(WITH_TORCH)
    finally:
        other.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
