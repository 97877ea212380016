"""Compile, once, the bytecode of the modules edgesqueeze and its tests import.

`make install` runs pip with --no-compile: pip compiled every module of every package (torch,
jax and transformers whole), where edgesqueeze imports a small part of them. Importing the
modules below with bytecode writing on compiles just those, so each later process reads them
compiled even where PYTHONDONTWRITEBYTECODE is set; anything else compiles on first import.
A module that does not import is left to the install check and the tests to report.
"""

from __future__ import annotations

import importlib
import sys
import warnings

MODULES = (
    "torch torch._dynamo torch.export torch.onnx torch.fx torch.distributed torch.nn.parallel "
    "numpy onnx onnxscript onnxruntime onnxruntime.quantization sklearn.cluster matplotlib.pyplot PIL "
    "torchao.quantization.pt2e.quantize_pt2e litert_torch litert_torch.quantize.pt2e_quantizer "
    "ai_edge_litert.interpreter tflite_micro zstandard yaml tqdm click pytest hypothesis xdist "
    "edgesqueeze.cli edgesqueeze.runtime edgesqueeze.export edgesqueeze.compress"
).split()


def main() -> int:
    sys.dont_write_bytecode = False
    warnings.simplefilter("ignore")
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported by the install check and the tests, not here
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
