"""What every exported artifact shares: its metadata, its input, its calibration images.

Every ``.onnx`` and ``.tflite`` file edgesqueeze writes carries one JSON object, the
*artifact metadata*, so that whoever runs the file knows what to feed it without the
checkpoint (the torch-free runtime reads it back):

- ONNX: ``model.metadata_props`` entry with key :data:`META_KEY`, value the JSON text.
- TFLite: a ``Model.metadata`` entry named :data:`META_KEY` whose buffer holds the JSON text
  (UTF-8), the standard TFLite place for named metadata.

Keys (all present; JSON types)::

    format            "edgesqueeze.artifact"
    artifact_format   "onnx" | "onnx-int8" | "tflite" | "tflite-int8" (| "tflite-micro", set by export.tflm)
    arch, arch_kwargs the model's registry name and builder kwargs (null when unknown)
    classes           class names, index = output position (null when unknown)
    input_shape       [C, H, W] of one image
    layout            "NCHW" (the model's own layout; converters keep it at the interface)
    mean, std         per-channel normalization of [0, 1] pixels
    normalization_source  where mean/std came from: "recorded" (the model's checkpoint),
                      "given" (--mean/--std), "measured: <dataset> training images" (the
                      model recorded none: the dataset's statistics stand in), "standard:
                      ImageNet's usual mean and std (torchvision's)" (the same, for an
                      ImageNet dataset, whose standard values are used), or "none"
                      (nothing known: 0 and 1, i.e. pixels / 255)
    normalization     "caller": feed (pixels/255 - mean) / std;
                      "in-graph": feed pixels/255, the graph normalizes (fold_normalization)
    input_dtype       "float32" or "int8" (tflite-int8 with int8 I/O: quantize with the
                      input tensor's own scale and zero point)
    calibration       null, or {"images": N, "method": ..., "split": "train", "seed": S}
    resize            null (stretch the image to H x W), or the shorter-side size to resize
                      an image to before the center crop to H x W: what the model's dataset
                      does (the ImageNet datasets crop; every other stretches)
    dataset           the dataset the model was trained on (null when unknown), so that a
                      gate can evaluate the file on its test split
    reference_accuracy  the float model's test accuracy from its checkpoint (or null):
                      what ``max_drop`` budgets are measured against
    source_sha256     SHA-256 of the checkpoint or .esq it was exported from
    recipe_hash       the recipe's hash when known, else null
    edgesqueeze_version
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgesqueeze.config.export import FORMATS
from edgesqueeze.errors import ExportError

META_KEY = "edgesqueeze"
META_FORMAT = "edgesqueeze.artifact"


def check_calibration_shape(images, input_shape) -> None:
    """ExportError unless the calibration images (N, C, H, W) are what the model takes."""
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise ExportError(f"calibration images are {tuple(images.shape[1:])}, the model takes "
                          f"{tuple(input_shape)}")


def under(name: str, modules) -> bool:
    """Is the module ``name`` one of ``modules`` or inside one of them (``features.3.squeeze``
    is under ``features.3``; ``features.30`` is not)?"""
    return any(name == m or name.startswith(m + ".") for m in modules)


def check_float_layers(model, float_layers, *, what: str = "float_layers") -> None:
    """Every name in ``float_layers`` is a module of ``model``, else ExportError naming it,
    with the closest module name as a suggestion (``features.O`` -> ``features.0``)."""
    import difflib

    if isinstance(float_layers, str):
        raise ExportError(f"{what}: expected a list of module names, got the string {float_layers!r}")
    modules = {n: m for n, m in model.named_modules() if n}
    names = list(modules)
    for layer in float_layers:
        if layer not in names:
            # the closest name; among equally close ones a layer with weights (features.O is
            # as close to the Fire features.9 as to the conv features.0, and means the conv)
            score = {n: difflib.SequenceMatcher(None, layer, n).ratio() for n in names}
            close = sorted((n for n in names if score[n] >= 0.6),
                           key=lambda n: (-round(score[n], 6), not hasattr(modules[n], "weight")))
            tip = f"; did you mean '{close[0]}'?" if close else ""
            top = sorted({n.split(".")[0] for n in names})
            raise ExportError(f"{what}: the model ({type(model).__name__}) has no module named '{layer}'{tip} "
                              f"(module names are torch paths under {', '.join(top)})")
        if not weighted_layers(modules[layer]) and not _pools(modules[layer]):
            # a BatchNorm (folded into the conv), a ReLU (fused), a Dropout: no int8 op of its own,
            # so the name was recorded as float while the file computed it as before
            before = [n for n in names[:names.index(layer)] if weighted_layers(modules[n]) and
                      not any(k.startswith(n + ".") for k in names if k != n and weighted_layers(modules[k]))]
            tip = f"; the conv or linear layer before it is '{before[-1]}'" if before else ""
            raise ExportError(f"{what}: '{layer}' ({type(modules[layer]).__name__}) holds no conv, linear or "
                              f"pooling layer, the ones an int8 file computes in int8 and can keep float{tip}")


def _pools(module) -> list:
    from torch import nn

    kinds = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)
    return [m for m in module.modules() if isinstance(m, kinds)]


def weighted_layers(module) -> list:
    """The conv (1-3d) and linear layers in ``module`` (itself included): what int8 files
    quantize, and so what a float layer name can keep float."""
    from torch import nn

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [m for m in module.modules() if isinstance(m, kinds)]


def float_weights_note(module, files: Sequence[str]) -> str | None:
    """A note for int8 files of a model with recurrent layers (LSTM, GRU, RNN): neither int8
    exporter quantizes them (onnxruntime's static QDQ quantization and PT2E's XNNPACK
    quantizer leave them float32), so an int8 file of a model that is mostly such weights is
    about as large as its fp32 file, and was written without a word. None when they hold
    under 1% of the weights."""
    from torch import nn

    total = sum(p.numel() for p in module.parameters())
    rows = [(sum(p.numel() for p in m.parameters()), name or "the model", type(m).__name__)
            for name, m in module.named_modules() if isinstance(m, nn.RNNBase)]
    float_n = sum(n for n, _, _ in rows)
    if not rows or float_n < 0.01 * max(total, 1):
        return None
    shown = ", ".join(f"{name} ({cls}, {n:,} values)" for n, name, cls in rows[:6]) + (", ..." if len(rows) > 6 else "")
    return (f"note: {' and '.join(files)}: {100 * float_n / total:.0f}% of the model's weights stay float32, in "
            f"recurrent layers, which int8 export does not quantize (conv and linear layers only): {shown}")


def artifact_meta(meta: dict[str, Any], artifact_format: str, *, normalization: str = "caller",
                  input_dtype: str = "float32", calibration: dict | None = None,
                  source_sha256: str | None = None) -> dict[str, Any]:
    """The artifact metadata (see the module docstring) from a checkpoint's metadata."""
    from edgesqueeze import __version__

    if artifact_format not in FORMATS:
        raise ExportError(f"unknown artifact format {artifact_format!r}")
    shape = meta.get("input_shape")
    if not shape:
        raise ExportError("the model's metadata has no input_shape; export needs to know "
                          "what one image looks like (re-save the checkpoint with edgesqueeze)")
    channels = int(shape[0])
    mean = [float(v) for v in meta.get("mean") or [0.0] * channels]
    std = [float(v) for v in meta.get("std") or [1.0] * channels]
    return {
        "format": META_FORMAT,
        "artifact_format": artifact_format,
        "arch": meta.get("arch"),
        "arch_kwargs": meta.get("arch_kwargs"),
        "classes": list(meta["classes"]) if meta.get("classes") else None,
        "input_shape": [int(v) for v in shape],
        "layout": "NCHW",
        "mean": mean,
        "std": std,
        "normalization": normalization,
        "normalization_source": _normalization_source(meta),
        "input_dtype": input_dtype,
        "calibration": calibration,
        "resize": _resize(meta, shape),
        "dataset": meta.get("dataset"),
        "reference_accuracy": _test_accuracy(meta),
        "source_sha256": source_sha256,
        "recipe_hash": meta.get("recipe_hash"),
        "edgesqueeze_version": __version__,
    }


def _normalization_source(meta: dict[str, Any]) -> str:
    if meta.get("normalization_source"):
        return str(meta["normalization_source"])
    if meta.get("mean") is None or meta.get("std") is None:
        return "none"
    return "given" if {"mean", "std"} & set(meta.get("input_meta_given", ())) else "recorded"


def _resize(meta: dict[str, Any], shape) -> int | None:
    """How ``edgesqueeze run`` makes an image file the model's input: as the dataset the model
    is measured on made its images. The ImageNet datasets resize the shorter side to
    ``round(side * 256 / 224)`` and crop the centre (torchvision's evaluation transform;
    ``data._images.imagenet_crop``): that shorter side. Every other dataset (digits, MNIST,
    CIFAR-10, an image folder) stretches the whole image to the input: None. A model that
    records no dataset: the crop from 160 px up (a pretrained ImageNet-style model).

    The crop once followed the size alone, so a 160 px model trained on an image folder (which
    stretches) was fed crops by ``run`` while ``verify`` measured stretched images, and the
    rounding differed from the dataset's (182 against 183 at 160 px)."""
    if meta.get("resize"):
        return int(meta["resize"])
    side = int(shape[-1])
    dataset = str(meta.get("dataset") or "").strip().lower()
    crops = dataset == "imagenet-sample" or dataset.startswith("imagenet:") if dataset else side >= 160
    return int(round(side * 256 / 224)) if crops else None


def _test_accuracy(meta: dict[str, Any]) -> float | None:
    """The float model's test accuracy: a checkpoint's own, or what an ``.esq`` records of the
    model it was compressed from (its files recorded null, so a gate on them had no drop)."""
    test = (meta.get("metrics") or {}).get("test") or {}
    acc = test.get("accuracy", meta.get("reference_accuracy"))
    # a fraction of at most a million images: 6 decimals are exact, float32 noise is not
    return round(float(acc), 6) if isinstance(acc, (int, float)) else None


def meta_json(meta: dict[str, Any]) -> str:
    """The metadata JSON a file embeds, with room for the file's own CRC-32
    (:mod:`edgesqueeze.format.seal`: 8 zeros, which the final write fills in)."""
    from edgesqueeze.format.seal import KEY, PLACEHOLDER

    return json.dumps({**meta, KEY: PLACEHOLDER}, sort_keys=True, separators=(",", ":"))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 300 characters), or its
    type name: what an ExportError quotes from a converter's multi-page traceback."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0][:300] if lines else "") or type(exc).__name__


def to_input(images: np.ndarray, mean, std, *, normalize: bool = True) -> np.ndarray:
    """uint8 NCHW pixels -> float32 model input: /255, then (x - mean) / std per channel."""
    x = images.astype(np.float32) / 255.0
    if normalize:
        m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        x = (x - m) / s
    return np.ascontiguousarray(x, dtype=np.float32)


def calibration_images(train_x: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` training images (uint8 NCHW) drawn without replacement, seeded, in index order:
    :func:`~edgesqueeze.data.calibration_indices`, as compress draws its own."""
    from edgesqueeze.data import calibration_indices

    if len(train_x) == 0:
        raise ExportError("no training images to calibrate INT8 ranges on")
    idx = calibration_indices(len(train_x), n, seed)
    return np.asarray(train_x[idx])  # decoded here when the images stream from disk
