"""Run edgesqueeze artifacts (.onnx, .tflite) with numpy and onnxruntime / LiteRT; no torch.

This package installs alone on a device (``pip install edgesqueeze[runtime]``) and must
never import torch, directly or through another edgesqueeze module. The backends are
imported only when a file of their kind is loaded.

    >>> from edgesqueeze.runtime import load, load_image, topk
    >>> art = load("model.int8.tflite", threads=4)
    >>> img = load_image("cat.jpg", art.input_spec.image_shape, resize=art.meta.get("resize"))
    >>> topk(art.predict_images(img[None])[0], 3, art.classes)
    [(3, 'cat', 0.91), (5, 'dog', 0.06), (2, 'bird', 0.01)]
"""

from __future__ import annotations

from edgesqueeze.runtime._base import Artifact, InputSpec, softmax, topk
from edgesqueeze.runtime._load import load
from edgesqueeze.runtime.bench import benchmark, compare
from edgesqueeze.runtime.images import load_image, load_images
from edgesqueeze.runtime.inspect import inspect_artifact

__all__ = ["Artifact", "InputSpec", "benchmark", "compare", "inspect_artifact", "load", "load_image",
           "load_images", "softmax", "topk"]
