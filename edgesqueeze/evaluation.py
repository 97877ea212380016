"""Evaluate and describe model files (checkpoints, state_dicts, TorchScript, torch.export).

This is PyTorch-side evaluation, used by ``edgesqueeze eval`` and ``info``, and the model
runner every other stage scores with (:func:`predict`, :func:`evaluate`): training each
epoch, compression after each stage, verification for its reference. Deployment artifacts
(ONNX, TFLite) are verified through their own runtimes (:mod:`edgesqueeze.verify`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgesqueeze._io import sha256_file
from edgesqueeze._progress import Progress, bar
from edgesqueeze.checkpoint import load_model
from edgesqueeze.errors import DataError


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, *, mean, std, batch_size: int = 512,
            channels_last: bool = False, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits for uint8 images ``x`` (N, C, H, W), in order, on the CPU; the model runs on
    the device its weights are on. ``on_batch(n)`` after each batch of ``n`` images (a
    progress bar's update)."""
    from edgesqueeze.data import batches
    from edgesqueeze.device import model_device

    model.eval()
    device = model_device(model)
    outs = []
    dummy_y = np.zeros(len(x), dtype=np.int64)
    for xb, _ in batches(x, dummy_y, batch_size=batch_size, shuffle=False, generator=None,
                         mean=mean, std=std, channels_last=channels_last):
        if device.type != "cpu":
            xb = xb.to(device, non_blocking=True)
        outs.append(model(xb).float().cpu())
        if on_batch is not None:
            on_batch(len(outs[-1]))
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)


def accuracy_metrics(logits: torch.Tensor, y: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Top-1, top-5 (when there are at least 5 classes), mean cross-entropy, count."""
    y = torch.as_tensor(y, dtype=torch.long)
    if len(y) == 0:
        return {"n": 0}
    out = {
        "n": int(len(y)),
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "loss": float(F.cross_entropy(logits, y)),
    }
    if logits.shape[1] >= 5:
        top5 = logits.topk(5, dim=1).indices
        out["top5"] = float((top5 == y[:, None]).any(1).float().mean())
    return out


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, mean, std, batch_size: int = 512,
             channels_last: bool = False, on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (and the mean loss) of ``model`` on uint8 images ``x`` (N, C,
    H, W) with labels ``y``, each normalized with ``mean`` / ``std`` (one value per channel,
    on pixels scaled to 0..1). The model runs in eval mode and gets its training flag back."""
    if not isinstance(model, nn.Module):  # load_model's result: its .model (an AttributeError: 'training')
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            raise DataError(f"evaluate takes an nn.Module (or load_model's result), got {type(model).__name__}")
        model = inner
    if mean is None or std is None:
        raise DataError("evaluate: give mean and std (per channel, on pixels scaled to 0..1; "
                        "input_normalization(meta, dataset) gives a model's own)")
    if len(x) != len(y):
        raise DataError(f"evaluate: {len(x)} images but {len(y)} labels")
    was_training = model.training
    try:
        logits = predict(model, x, mean=mean, std=std, batch_size=batch_size, channels_last=channels_last,
                         on_batch=on_batch)
    finally:
        model.train(was_training)
    if len(y) and (int(np.min(y)) < 0 or int(np.max(y)) >= logits.shape[-1]):
        raise DataError(f"evaluate: labels must be in 0..{logits.shape[-1] - 1} (the model's {logits.shape[-1]} "
                        f"classes), got {int(np.min(y))}..{int(np.max(y))}")
    return accuracy_metrics(logits, y)


def input_normalization(meta: dict, ds) -> tuple[list[float], list[float], str]:
    """``(mean, std, how)``: the normalization a model is fed. What the file records (or the
    user gave, ``--mean``/``--std``) wins; otherwise the dataset's own statistics (measured
    on its full training set, or ImageNet's usual ones for ImageNet data), and ``how`` says
    so, for a one-line note and the metadata."""
    if meta.get("mean") is not None and meta.get("std") is not None:
        given = set(meta.get("input_meta_given", ()))
        how = "given (--mean/--std)" if {"mean", "std"} & given else "recorded in the file"
        return list(meta["mean"]), list(meta["std"]), how
    from edgesqueeze.data import IMAGENET_MEAN, IMAGENET_STD

    source = ("ImageNet's usual mean and std (torchvision's), the statistics of "
              if (tuple(ds.mean), tuple(ds.std)) == (IMAGENET_MEAN, IMAGENET_STD) else "measured on the training images of ")
    return (list(ds.mean), list(ds.std),
            f"{source}'{ds.name}' (the file records none; pass --mean/--std "
            "if the model was trained with other values)")


def normalization_source(how: str, ds) -> str:
    """The metadata's ``normalization_source`` for statistics :func:`input_normalization`
    took from the dataset ``ds`` (``how`` its third value): measured on its training images, or
    ImageNet's standard values (export wrote "measured" for those too, and for imagenet-sample,
    which has no training images)."""
    if how.startswith("measured"):
        return f"measured: {ds.name} training images"
    return "standard: ImageNet's usual mean and std (torchvision's)"


def training_data(meta: dict, *, source: str | Path, dataset: str | None = None, data_dir: str | Path | None = None,
                  seed: int | None = None, limit: int | None = None, image_size: int | None = None,
                  val_fraction: float | None = None):
    """The dataset a checkpoint was trained on and its train/validation split, as in training.

    ``meta`` is a checkpoint's metadata; every argument left ``None`` takes the value it
    records (its seed, validation fraction, and for the same dataset its limit and image
    size), so the validation split is the one the model never trained on.
    Returns ``(dataset, (x_train, y_train), (x_val, y_val))``.
    """
    from edgesqueeze.data import fit_channels, load_dataset, split_train_val

    name = dataset or meta.get("dataset")
    if not name:
        raise DataError(f"{source}: does not record its dataset; pass --data NAME")
    seed = meta.get("seed", 0) if seed is None else seed
    if name == meta.get("dataset"):  # by default, the same data options the model was trained with
        limit = meta.get("data_limit") if limit is None else limit
        image_size = meta.get("image_size") if image_size is None else image_size
    ds = load_dataset(name, data_dir=data_dir, image_size=image_size, limit=limit, seed=seed,
                      stream=bool(meta.get("data_stream")))
    ds = fit_channels(ds, meta.get("input_shape"), source=source)  # a gray dataset, a 3-channel model
    vf = meta.get("val_fraction", 0.1) if val_fraction is None else val_fraction
    train, val = split_train_val(ds, vf, seed)
    return ds, train, val


def evaluate_file(
    path: str | Path,
    *,
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | Path | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_pickle: bool = False,
    input_meta: dict | None = None,
    default_dataset: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 accuracy and loss of the model in ``path`` on a dataset split, computed on
    ``device`` (``edgesqueeze.device``; default auto); ``progress``: a bar over the images
    (:mod:`edgesqueeze._progress`)."""
    from edgesqueeze.device import resolve_device

    dev = resolve_device(device)
    loaded = load_model(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_meta=input_meta,
                        default_dataset=default_dataset)
    meta = loaded.meta
    expected = meta.get("input_shape")
    if image_size and expected and len(expected) == 3 and list(expected[1:]) != [image_size, image_size]:
        # before the dataset is decoded and cached at that size (--image-size 2000 wrote 3 GB first)
        raise DataError(f"--image-size {image_size} gives images of {image_size}x{image_size}, but {path} was "
                        f"trained on {list(expected)}; leave out --image-size, or pass --image-size {expected[-1]}")
    name = dataset or meta.get("dataset")
    if (image_size is None and name and name != meta.get("dataset") and expected and len(expected) == 3
            and expected[1] == expected[2] and str(name).lower().startswith(("imagefolder:", "imagenet:"))):
        # another image folder than the one it was trained on: resized to its input, as verify does
        # (it said "images differ in size" and asked for --image-size, which the file records)
        image_size = int(expected[-1])
    # --limit of the test split limits the dataset, as verify --limit does (the same images); of
    # val or train it takes at most that many of the model's own split: limiting the dataset
    # first carved another validation split out of the subset, mostly images it trained on
    ds, train, val = training_data(meta, source=path, dataset=dataset, data_dir=data_dir, seed=seed,
                                   limit=limit if split == "test" else None, image_size=image_size,
                                   val_fraction=val_fraction)
    x, y = {"test": (ds.test_x, ds.test_y), "val": val, "train": train}[split]
    if limit is not None and split != "test":
        from edgesqueeze.data.datasets import limited_test

        keep = limited_test(y, limit, meta.get("seed", 0) if seed is None else seed)  # seeded, each class in proportion
        x, y = x[keep], y[keep]
    if len(x) == 0:
        raise DataError(f"dataset '{ds.name}' has no '{split}' images" + (f" among the {limit} --limit keeps"
                                                                          if limit else ""))
    expected = meta.get("input_shape")
    if expected and list(ds.input_shape) != list(expected):
        if list(ds.input_shape)[1:] == list(expected)[1:] or list(ds.input_shape)[:1] != list(expected)[:1]:
            todo = (f"it takes {expected[0]}-channel images and '{ds.name}' has {ds.input_shape[0]}: pass the "
                    "dataset it was trained on (--data)")  # --image-size changes no channel count
        elif image_size:
            todo = f"leave out --image-size {image_size}, or pass --image-size {expected[-1]}"
        else:
            todo = f"pass --image-size {expected[-1]} or the matching --data"
        raise DataError(f"dataset '{ds.name}' gives images of shape {list(ds.input_shape)} but {path} was trained "
                        f"on {list(expected)}; {todo}")
    # The model was trained with its own normalization: feed it exactly that.
    mean, std, how = input_normalization(meta, ds)
    from edgesqueeze.models.probe import check_class_names, check_fits

    check_fits(loaded.model, ds.input_shape, source=path, data=ds.name, num_classes=ds.num_classes)
    check_class_names(meta.get("classes"), ds, path)
    with bar(progress, f"{Path(path).name} ({split})", len(x)) as update:
        metrics = evaluate(loaded.model.to(dev), x, y, mean=mean, std=std, batch_size=batch_size, on_batch=update)
    return {"model": str(path), "dataset": ds.name, "split": split, **metrics, "normalization": how}


def describe_file(path: str | Path, *, arch: str | None = None, arch_kwargs: dict | None = None,
                  trust_pickle: bool = False, input_meta: dict | None = None,
                  default_dataset: str | None = None) -> dict[str, Any]:
    """A JSON-ready summary of a model file: what it is, its weights, its metadata."""
    from edgesqueeze.models.imports import UntrustedCode

    path = Path(path)
    note = None
    try:
        loaded = load_model(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle,
                            input_meta=input_meta, default_dataset=default_dataset)
        kind, meta, arch_name = loaded.kind, loaded.meta, loaded.meta.get("arch", type(loaded.model).__name__)
        params = list(loaded.model.parameters()) or [t for t in loaded.model.state_dict().values()
                                                     if torch.is_floating_point(t)]
    except UntrustedCode:  # describe what the file stores, without importing the code it names
        from edgesqueeze.checkpoint import stored_weights

        state, meta, kind = stored_weights(path)
        arch_name = meta["arch"]
        params = [t for k, t in state.items() if torch.is_floating_point(t) and not k.endswith(("running_mean",
                                                                                              "running_var"))]
        note = (f"the code {arch_name} was not imported (pass --arch {arch_name} to build it); parameters "
                "counted from the stored tensors")
    total = sum(p.numel() for p in params)
    nonzeros = [int(torch.count_nonzero(p)) for p in params]
    nonzero = sum(nonzeros)
    # conv and linear weights: what pruning thins
    w_total = sum(p.numel() for p in params if p.dim() >= 2)
    w_nonzero = sum(n for p, n in zip(params, nonzeros) if p.dim() >= 2)
    out: dict[str, Any] = {
        "file": str(path),
        "kind": kind,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "arch": arch_name,
        "parameters": total,
        "density": round(nonzero / total, 4) if total else None,  # biases and BatchNorm included
        # the pruning's own measure (compress's report and metrics.density): conv and linear weights only
        "weight_density": round(w_nonzero / w_total, 4) if w_total else None,
    }
    folded = meta.get("folded_layers") or meta.get("folded_batchnorm")
    if folded:  # 'models' counts the architecture's BatchNorm weights, which this file has no more
        what = f"{len(folded)} BatchNorm layers" if isinstance(folded, list) else "its BatchNorm layers"
        note = ((note + "; ") if note else "") + (
            f"{what} folded into the layers before them (compress.fold_batchnorm), so it has fewer "
            "parameters than the architecture ('edgesqueeze models'): their scales and shifts are in those "
            "weights and biases")
    if note:
        out["note"] = note
    for key in ("arch_kwargs", "dataset", "input_shape", "mean", "std", "metrics", "recipe_name", "recipe_hash",
                "seed", "edgesqueeze_version", "torch_version"):
        if key in meta:
            out[key] = meta[key]
    if "classes" in meta:
        out["num_classes"] = len(meta["classes"])
        out["classes"] = meta["classes"]
    return out
