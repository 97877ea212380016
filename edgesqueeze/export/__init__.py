"""Export a checkpoint or ``.esq`` archive to deployable files: ONNX and TFLite, fp32 and INT8.

``export_artifacts`` is the stage the CLI and recipes call: it loads the model (decoding an
``.esq`` on the fly), draws calibration images from the training split of the dataset the
model was trained on, and writes one file per format, each carrying the artifact metadata
(:mod:`edgesqueeze.export._common`) that the torch-free runtime reads back.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from edgesqueeze.config.export import ALL_FORMATS, FORMATS, INT8_FORMATS, SUFFIX, CalibrationConfig, ExportConfig
from edgesqueeze.export._common import META_FORMAT, META_KEY, artifact_meta, calibration_images, check_float_layers, to_input

__all__ = ["ALL_FORMATS", "FORMATS", "META_FORMAT", "META_KEY", "SUFFIX", "CalibrationConfig", "ExportConfig",
           "artifact_meta", "calibration_images", "check_float_layers", "export_artifacts", "to_input"]

Log = Callable[[str], None]


def _image_size(name: str, meta: dict[str, Any]) -> int | None:
    """The size to read dataset ``name`` at for this model: the one it records training at, or
    for an image folder (``imagefolder:``, ``imagenet:``) its square input's side, as ``verify``
    and ``eval`` read a folder (export read it at its own size and refused a folder of 320x160
    images for a 160x160 model, telling the user to pass another --data)."""
    if meta.get("image_size") and name == meta.get("dataset"):
        return int(meta["image_size"])
    shape = meta.get("input_shape")
    if (str(name).strip().lower().startswith(("imagefolder:", "imagenet:")) and shape and len(shape) == 3
            and shape[1] == shape[2]):
        return int(shape[-1])
    return None


def _calibration_set(meta: dict[str, Any], source: Path, config: ExportConfig, *, dataset: str | None,
                     data_dir, seed: int, log: Log):
    """Calibration images: the training split (never the validation or test images) when the
    model's dataset has one; a dataset with only a test split (the ImageNet sample) is used
    whole, with a warning, because there is nothing else."""
    from edgesqueeze.data import load_dataset
    from edgesqueeze.errors import DataError
    from edgesqueeze.evaluation import training_data

    name = dataset or meta.get("dataset")
    if not name:
        raise DataError(f"{source}: INT8 export needs calibration images, and the model does not record "
                        "its dataset; pass --data NAME (e.g. imagenet-sample)")
    size = _image_size(name, meta)
    ds = load_dataset(name, data_dir=data_dir, image_size=size, seed=seed)
    if len(ds.train_x):
        _, (x_train, _), _ = training_data(meta, source=source, dataset=name, data_dir=data_dir, image_size=size)
        pool, where = x_train, "training split"
    else:
        from edgesqueeze.data import fit_channels

        ds = fit_channels(ds, meta.get("input_shape"), source=source)  # a gray dataset, a 3-channel model
        pool, where = ds.test_x, "test split (the dataset has no training split)"
        log(f"warning: calibrating on {name}'s {where}; accuracy measured on it afterwards is in-sample")
    shape = meta.get("input_shape")
    if shape and list(pool.shape[1:]) != list(shape):
        raise DataError(f"{source}: expects images of shape {list(shape)} but '{name}' gives "
                        f"{list(pool.shape[1:])}")
    images = calibration_images(pool, config.calibration.images, seed=seed)
    if len(images) < config.calibration.images:  # capped without a word (only the metadata said it)
        log(f"note: calibrating on all {len(images):,} images of {name}'s {where}: fewer than the "
            f"{config.calibration.images:,} export.calibration.images asks for")
    trained_on = meta.get("dataset")
    if dataset and trained_on and dataset.lower() != str(trained_on).lower():
        log(f"note: calibrating on {dataset}, but {source} was trained on {trained_on}: int8 ranges are set by "
            "the images calibrated on; --data of the training set gives the ranges the model sees")
    info = {"images": int(len(images)), "split": where.split()[0],
            "dataset": name, "seed": seed}
    return images, info


def _describe_with(meta: dict[str, Any], model, source: Path, dataset: str, data_dir, log: Log = print) -> int:
    """A plain state_dict records no dataset, normalization or classes: take them from the
    dataset given (``--data``), as ``compress`` does, so that the files are fed (and
    calibrated) the way the model was trained, not with raw pixels / 255. Returns the
    model's class count (it has run on the dataset's images by then)."""
    from edgesqueeze.data import load_dataset
    from edgesqueeze.errors import DataError

    from edgesqueeze.data import fit_channels

    ds = fit_channels(load_dataset(dataset, data_dir=data_dir, image_size=_image_size(dataset, meta)),
                      meta.get("input_shape"), source=source)
    shape = meta.get("input_shape") or list(ds.input_shape)
    if list(shape) != list(ds.input_shape):
        raise DataError(f"dataset '{ds.name}' gives images of shape {list(ds.input_shape)} but {source} expects "
                        f"{list(shape)}; pass the dataset it was trained on (--data)")
    from edgesqueeze.models.probe import check_fits

    logits = check_fits(model, ds.input_shape, source=source, data=ds.name, num_classes=ds.num_classes)
    meta["dataset"] = ds.name
    meta["input_shape"] = list(ds.input_shape)
    if meta.get("mean") is None or meta.get("std") is None:
        from edgesqueeze.evaluation import input_normalization, normalization_source

        meta["mean"], meta["std"], how = input_normalization(meta, ds)
        meta["normalization_source"] = normalization_source(how, ds)
        log(f"note: input normalization {how}")
    if not meta.get("classes") and ds.classes is not None:
        meta["classes"] = [str(c) for c in ds.classes]
    return logits


_CONTAINER_TAGS = {"pt", "pth", "pt2", "ckpt", "bin", "esq", "torchscript", "ts", "jit", "script", "scripted",
                   "traced", "trace", "export", "exported", "program", "ep", "pickle", "pkl", "state_dict",
                   "statedict", "sd"}


def model_stem(path: str | Path) -> str:
    """The model's name without the container's tags: ``resnet.torchscript.pt`` -> ``resnet``,
    ``mobilenet.pt2`` -> ``mobilenet``, ``model.esq`` -> ``model``."""
    parts = Path(path).name.split(".")
    while len(parts) > 1 and parts[-1].lower() in _CONTAINER_TAGS:
        parts.pop()
    return ".".join(parts)


def export_artifacts(model_path: str | Path, config: ExportConfig, out_dir: str | Path, *,
                     dataset: str | None = None, data_dir=None, arch: str | None = None,
                     arch_kwargs: dict | None = None, trust_pickle: bool = False, input_meta: dict | None = None,
                     default_dataset: str | None = None, seed: int = 0, stem: str | None = None,
                     inputs=(), log: Log | None = print, status: Log | None = None) -> list[Path]:
    """Write every format in ``config.formats`` to ``out_dir``; return the paths written.
    ``log``: told each line (None: nothing). The caller's random states (Python's, numpy's,
    torch's) are given back: the converters' imports reseed them.

    ``status``: told, before each format, which one is being written (``[2/4] onnx-int8:
    model.int8.onnx``): a conversion takes seconds to minutes and prints nothing until its
    file is written.

    An earlier export's files of the same names are removed once the inputs are checked,
    before the first file is written. An output that is one of the inputs (the model,
    ``inputs``: more ``(what, path)`` pairs such as the recipe, or the calibration data), or
    a link to one, is refused (OutputError).

    ``arch``, ``arch_kwargs``, ``trust_pickle``, ``input_meta``, ``default_dataset``: how to
    read a file that does not describe itself (:func:`edgesqueeze.checkpoint.load_model`)."""
    if not isinstance(config, ExportConfig):  # a recipe's section left out is None: one line, not 'no .formats'
        from edgesqueeze.errors import RecipeError

        raise RecipeError(f"export_artifacts takes an ExportConfig (a recipe's 'export' section: Recipe.export, or "
                          f"ExportConfig() for the defaults), got {type(config).__name__}")
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return _export_artifacts(model_path, config, out_dir, dataset=dataset, data_dir=data_dir, arch=arch,
                                     arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_meta=input_meta,
                                     default_dataset=default_dataset, seed=seed, stem=stem, inputs=inputs,
                                     log=log if log is not None else (lambda _m: None), status=status)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def _export_artifacts(model_path, config: ExportConfig, out_dir, *, dataset, data_dir, arch, arch_kwargs,
                      trust_pickle, input_meta, default_dataset, seed, stem, inputs, log: Log, status) -> list[Path]:
    from edgesqueeze._io import sha256_file
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.models.imports import is_import_spec

    source = Path(model_path)
    device = None
    if any(f in INT8_FORMATS for f in config.formats):  # one line for a device this machine lacks, first
        from edgesqueeze.device import resolve_device

        device = resolve_device(config.calibration.device, what="export.calibration.device")
    loaded = load_model(source, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_meta=input_meta)
    meta = dict(loaded.meta)
    if not dataset and not meta.get("dataset"):  # the recipe's data section, as --data
        dataset = default_dataset
    if arch and "arch" not in meta and loaded.kind not in ("torchscript", "exported_program"):
        meta["arch"] = arch  # (a program is not built from it: it may still give the input shape, below)
    if "input_shape" not in meta and arch and not is_import_spec(arch):
        from edgesqueeze.models import get_spec

        meta.setdefault("input_shape", list(get_spec(arch).input_shape))
    model = loaded.model.eval()
    logits = None  # the class count, once the model has run on its inputs
    if "dataset" not in meta and dataset:
        logits = _describe_with(meta, model, source, dataset, data_dir, log)
    elif meta.get("dataset") and (meta.get("mean") is None or meta.get("std") is None):
        # names its dataset but not its normalization (an .esq from before compress recorded
        # it for state_dicts): the dataset's, as compress and eval use, never pixels / 255
        logits = _describe_with(meta, model, source, meta["dataset"], data_dir, log)
    elif "input_shape" not in meta:
        from edgesqueeze.errors import DataError

        raise DataError(f"{source}: does not record its input shape or dataset; pass --data NAME (its images "
                        "give the shape, calibration and normalization) or --input-shape C,H,W")
    if meta.get("mean") is None or meta.get("std") is None:
        from edgesqueeze.errors import DataError

        # the files would take pixels / 255 as they are (mean 0, std 1): a digits model scored 9.75%
        raise DataError(f"{source}: records no input normalization (mean and std) nor the dataset it was "
                        "trained on, so the exported files would feed it raw pixels / 255; pass --data NAME "
                        "(measured on its training images) or --mean/--std (--mean 0 --std 1 if it does take "
                        "raw pixels / 255)")
    from edgesqueeze.models.probe import check_fits
    from edgesqueeze.models.program import lifted_module

    if logits is None:
        logits = check_fits(model, meta["input_shape"], source=source, data=meta.get("dataset"))
    if meta.get("classes") and len(meta["classes"]) != logits:
        from edgesqueeze.errors import DataError

        given = "--classes" if "classes" in meta.get("input_meta_given", []) else "the file's class list"
        raise DataError(f"{source} outputs {logits} logits but {given} names {len(meta['classes'])} classes; "
                        "give one name per logit")
    # TorchScript and torch.export models: one torch.export program with real conv / linear
    # modules, so every format (and the INT8 refinements, which find layers by module) works
    model = lifted_module(model, meta["input_shape"], what=str(source))
    check_float_layers(model, config.float_layers, what="export.float_layers")  # before any file is written
    check_float_layers(model, config.gptq_layers, what="export.gptq_layers")
    for fmt, names in config.float_layers_by_format.items():
        check_float_layers(model, names, what=f"export.float_layers_by_format.{fmt}")
    if config.float_layers and not any(f in INT8_FORMATS for f in config.formats):
        log(f"note: float_layers {list(config.float_layers)} only apply to the int8 formats")
    _some_layer_int8(model, config)
    s2d_stem = _space_to_depth_stem(model, meta, config, log)  # before any file is written
    if "tflite-micro" in config.formats:  # the optional package, before any file is written
        from edgesqueeze.export.tflm import import_micro, table_could_pay

        import_micro()
        import torch

        layers = [m.weight.detach() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        if not any(table_could_pay(w.numel(), int(torch.unique(w).numel())) for w in layers):
            # found only after a whole tflite-int8 conversion (16 s on digits), files written before it
            from edgesqueeze.errors import ExportError

            raise ExportError(f"tflite-micro: {source}: no int8 filter is worth a TFLite Micro value table (no "
                              "layer has few enough distinct weights for its size: the model is not weight-shared); "
                              "export a weight-shared model (an .esq from `edgesqueeze compress`) or ship the "
                              "tflite-int8 file")
    why_not = why_not_weight_shared(model)
    shared = why_not is None
    if not shared and any(f in INT8_FORMATS for f in config.formats) and has_codebooks(model):
        how = {f: config.int8_per_channel(f, shared) for f in config.formats if f in INT8_FORMATS}
        if any(how.values()):  # an .esq judged not weight-shared: its int8 files are another kind, say so
            log(f"note: the model's layers are weight-shared, but {why_not}: so {', '.join(f for f, pc in how.items() if pc)} "
                "get per-channel int8 weights (rounded by GPTQ where that is the format's default), which a packed "
                "file codes at about 8 bits per weight; --int8-weights per-tensor (export.int8_weights) keeps one "
                "scale per tensor and the sharing")
    if shared and any(f in INT8_FORMATS for f in config.formats):
        how = {f: config.int8_per_channel(f, shared) for f in config.formats if f in INT8_FORMATS}
        if not any(how.values()):
            log("weight-shared model: int8 weights get one scale per tensor and round to nearest, so each "
                "shared value stays one int8 value (export.int8_weights: per-channel to change it)")
            for layer, bn in _unfolded_heads(model, meta):
                log(f"note: {layer}'s BatchNorm1d ({bn}) is folded into it now, which rescales each of its rows: "
                    f"its shared values spread over many int8 levels and cost more bits in a packed file; "
                    f"compress with compress.fold_batchnorm: all to fold it before clustering")
        else:
            lost = ", ".join(f for f, pc in how.items() if pc)
            codes = ("a packed file codes them" if "tflite-micro" not in how
                     else "a packed file codes them, and TensorFlow Lite Micro's value tables hold them,")
            log(f"note: {lost}: per-channel int8 weights (GPTQ or activation equalization asked for, or "
                "int8_weights: per-channel) spread the model's shared values over many int8 levels; "
                f"{codes} at several times the .esq's bits per weight (int8_weights: per-tensor keeps the sharing)")
    from edgesqueeze._io import output_folder, output_locks

    # a failure before any file is written leaves no empty folder; the lock (_clear_earlier_outputs)
    # goes before that folder does
    with output_folder(out_dir) as out, output_locks():
        stem = stem or model_stem(source)
        from edgesqueeze._io import check_writable, outputs_clear_of_inputs
        from edgesqueeze.data import dataset_file

        names = output_names(config, stem)
        calib_data = dataset_file(dataset or meta.get("dataset")) if set(config.formats) & set(INT8_FORMATS) else None
        outputs_clear_of_inputs([("the output", out / n) for n in names],  # a link into an input, too
                                [("the model", source), *inputs, ("the calibration data", calib_data)])
        for name in names:  # every output, before the first is replaced
            check_writable(out / name)
        digest = sha256_file(source)
        calib = None
        if any(f in INT8_FORMATS for f in config.formats):  # the data too: a bad --data failed after the fp32 files
            calib = _calibration_set(meta, source, config, dataset=dataset, data_dir=data_dir, seed=seed, log=log)
        _clear_earlier_outputs(out, config, stem, log)
        written = []
        fp32_onnx = _fp32_onnx(model, meta, config)
        try:
            for i, fmt in enumerate(config.formats, 1):
                path = out / f"{stem}{SUFFIX[fmt]}"
                if status is not None:
                    status(f"[{i}/{len(config.formats)}] {fmt}: {path.name}{' and its packed copy' if config.pack and fmt != 'tflite-micro' else ''}")
                rounded: dict[str, Any] = {}  # the float weights an int8 file's integers come from (GPTQ's)
                if fmt in INT8_FORMATS and calib is None:
                    calib = _calibration_set(meta, source, config, dataset=dataset, data_dir=data_dir, seed=seed, log=log)
                if fmt == "onnx":
                    from edgesqueeze.export.onnx import export_onnx

                    export_onnx(model, meta, path, opset=config.opset, fold_normalization=config.fold_normalization,
                                source_sha256=digest, graph=fp32_onnx())
                elif fmt == "onnx-int8":
                    from edgesqueeze.export.onnx_int8 import export_onnx_int8

                    export_onnx_int8(model, meta, path, calib[0], calibration=config.calibration,
                                     calibration_info=calib[1], opset=config.opset,
                                     fold_normalization=config.fold_normalization, float_layers=config.float_layers_for(fmt),
                                     weight_rounding=config.weight_rounding_for(fmt, shared),
                                     gptq_layers=config.gptq_layers, shared=has_codebooks(model), rounded=rounded,
                                     share_concats=config.share_concat_ranges,
                                     bias_correction=config.bias_correction_for(fmt),
                                     equalize_activations=config.equalize_activations,
                                     per_channel=config.int8_per_channel(fmt, shared),
                                     target=config.onnx_int8_target, source_sha256=digest, device=device,
                                     fp32_graph=fp32_onnx())
                elif fmt == "tflite":
                    from edgesqueeze.export.tflite import export_tflite

                    export_tflite(model, meta, path, fold_normalization=config.fold_normalization, source_sha256=digest)
                elif fmt == "tflite-micro":
                    _export_micro(model, meta, path, calib, config, shared, written, seed=seed, digest=digest, log=log,
                                  device=device, s2d_stem=s2d_stem)
                else:
                    _export_tflite_int8(model, meta, path, calib, config, shared, seed=seed, digest=digest, device=device,
                                        rounded=rounded, s2d_stem=s2d_stem)
                log(f"{path}: {path.stat().st_size:,} bytes ({fmt})")
                if fmt == "tflite-int8" and config.tflite_int8_io != "int8":  # an int8 input: no float stem
                    from edgesqueeze.export.tflite import int8_stem_note

                    note = int8_stem_note(model, config.float_layers_for(fmt), int(meta["input_shape"][0]),
                                          space_to_depth=s2d_stem is not None)
                    if note:
                        log(note)
                written.append(path)
                if config.pack and fmt == "tflite-micro":
                    log(f"note: {path.name} is not packed: a microcontroller runs it from flash as it is")
                if config.pack and fmt != "tflite-micro":
                    from edgesqueeze.export.packed import pack_file

                    sources = {k: v.detach().cpu().numpy() for k, v in (rounded or model.state_dict()).items()
                               if k.endswith(".weight") and v.dim() >= 2} if fmt in INT8_FORMATS else None
                    packed, rep = pack_file(path, fmt=fmt, sources=sources)
                    bits = rep["bits_per_nonzero"]
                    how = f", {bits:.2f} bits per non-zero weight of those" if bits else ""
                    n = rep["coded_tensors"]
                    log(f"{packed}: {rep['packed_bytes']:,} bytes (packed {fmt}: {n} weight "
                        f"tensor{'' if n == 1 else 's'} coded{how})")
                    written.append(packed)
            int8 = [p.name for p in written if p.suffix != ".esq" and any(
                p.name == f"{stem}{SUFFIX[f]}" for f in INT8_FORMATS)]
            if int8:
                from edgesqueeze.export._common import float_weights_note

                note = float_weights_note(model, int8)
                if note:
                    log(note)
        except BaseException:  # an error or an interrupt: the files of this run already written stay, each whole
            if written:
                log(f"note: written before the export stopped, each file whole: "
                    f"{', '.join(p.name for p in written)}; the other formats were not")
            raise
        return written


def _fp32_onnx(model, meta, config: ExportConfig):
    """A function giving the fp32 ONNX graph of the model, converted on its first call only,
    for both onnx and onnx-int8 (each conversion is a torch.export trace and an ONNX
    translation: about 3 s of a 4-format digits export); None where only one of them is
    asked for, which then converts its own."""
    if not {"onnx", "onnx-int8"} <= set(config.formats):
        return lambda: None

    @functools.cache
    def graph():
        from edgesqueeze.export.onnx import onnx_graph

        return onnx_graph(model, meta, opset=config.opset, fold_normalization=config.fold_normalization)

    return graph


def _some_layer_int8(model, config: ExportConfig) -> None:
    """Refuse an int8 format whose float layers cover every conv and linear layer: the file
    held no int8 weight (only quantize/dequantize pairs on its activations) and was written
    as int8 without a word."""
    from edgesqueeze.errors import ExportError
    from edgesqueeze.export._common import weighted_layers

    every = {id(m) for m in weighted_layers(model)}
    for fmt in (f for f in config.formats if f in INT8_FORMATS):
        names = config.float_layers_for(fmt)
        kept = {id(m) for n in names for m in weighted_layers(model.get_submodule(n))}
        if every and kept >= every:
            raise ExportError(f"{fmt}: the float layers ({', '.join(names)}) hold every conv and linear layer of "
                              "the model, so the file would have no int8 weight; export onnx / tflite for float, "
                              "or keep fewer layers float")


def output_names(config: ExportConfig, stem: str) -> list[str]:
    """The names of the files an export with ``config`` writes for the model ``stem``: one per
    format, and with --pack each one's packed ``.esq`` (a tflite-micro file is not packed)."""
    names = []
    for fmt in config.formats:
        names.append(f"{stem}{SUFFIX[fmt]}")
        if config.pack and fmt != "tflite-micro":
            names.append(f"{stem}{SUFFIX[fmt]}.esq")
    return names


def _clear_earlier_outputs(out: Path, config: ExportConfig, stem: str, log: Log) -> None:
    """Remove every file of an earlier export that this one writes, once its inputs are checked
    and before its first file: an export interrupted (or stopped by a full disk) after its
    first file left the earlier model's other files beside it, and verify and check judged
    them as this export's. The packed copies of the formats written without --pack go too."""
    from edgesqueeze._io import lock_output_folder, remove_earlier_outputs, remove_stale_temps

    lock_output_folder(out, "edgesqueeze export")  # another run's files and temporary files are not stale
    # a killed export (SIGKILL) can die inside an atomic write; only the temporary files of the names
    # an export of this model writes, in any format: the folder may hold another tool's `.x.NNNNNNNN.tmp`
    remove_stale_temps(out, log, names=[n for f in ALL_FORMATS for n in (f"{stem}{SUFFIX[f]}", f"{stem}{SUFFIX[f]}.esq")])
    old = remove_earlier_outputs(out, output_names(config, stem))
    if old:
        log(f"note: {out}/ held an earlier export's {', '.join(p.name for p in old)}: removed (this export "
            "writes its own)")
    for fmt in config.formats:
        if not config.pack or fmt == "tflite-micro":
            _remove_stale_packed(out / f"{stem}{SUFFIX[fmt]}", log)
    mine = set(output_names(config, stem))  # and files of any other model (another stem) the folder holds
    others = sorted(p.name for p in out.iterdir() if p.is_file() and p.name not in mine
                    and p.name.lower().endswith((".onnx", ".tflite", ".onnx.esq", ".tflite.esq")))
    if others:  # another model's files of the same name: verify OUT/* judged them beside this export's
        log(f"note: {out}/ also holds {', '.join(others)}, which this export does not write: an earlier "
            "export's, perhaps of another model; verify the files this export writes (listed below), or "
            "remove those")


def _remove_stale_packed(path: Path, log: Log) -> None:
    """Remove the packed copy (``path`` + ``.esq``) of the file this export replaces: written
    without --pack, the new plain file sat beside the old model's packed one, which verify
    and check would then judge as this export's. Only a file that reads as a packed file
    is removed; anything else by that name is left, with a note."""
    stale = path.with_name(path.name + ".esq")
    if not stale.is_file() or stale.is_symlink():
        return
    from edgesqueeze.format import container
    from edgesqueeze.format.packed import is_packed

    try:
        ours = is_packed(container.read_esq(stale))
    except Exception:  # damaged, or not an archive: not removed unread
        ours = False
    if ours:
        stale.unlink()
        log(f"note: removed {stale.name}: the packed copy of the {path.name} this export replaces "
            "(pass --pack to write a new one)")
    else:
        log(f"note: {stale} is not from this export (it is not a packed copy of {path.name}); "
            "remove it if it is stale")


def _space_to_depth_stem(model, meta: dict[str, Any], config: ExportConfig, log: Log) -> str | None:
    """The stem conv that ``export.space_to_depth_stem`` rewrites in the tflite files, checked
    (ExportError naming it and what to do), or None when the option is off or no format takes it."""
    if not config.space_to_depth_stem:
        return None
    if not {"tflite-int8", "tflite-micro"} & set(config.formats):
        log("note: space_to_depth_stem only applies to tflite-int8 and tflite-micro")
        return None
    from edgesqueeze.errors import ExportError
    from edgesqueeze.export.prepare import find_stem
    from edgesqueeze.export.tflite import check_space_to_depth_stem

    channels = int(meta["input_shape"][0])
    name = find_stem(model, channels)
    if name is None:
        raise ExportError(f"space_to_depth_stem: the model ({type(model).__name__}) has no plain conv over its "
                          f"{channels} input channel{'s' * (channels > 1)}; set space_to_depth_stem: false")
    check_space_to_depth_stem(model, name, meta["input_shape"], config.float_layers_for("tflite-int8"))
    return name


def _export_tflite_int8(model, meta, path: Path, calib, config: ExportConfig, shared: bool, *, seed: int,
                        digest: str, device=None, rounded: dict[str, Any] | None = None,
                        s2d_stem: str | None = None, float_for: str = "tflite-int8") -> None:
    """The tflite-int8 file, with the export settings resolved for it (a tflite-micro file
    takes the same ones, :func:`~edgesqueeze.config.export.int8_base`, except the float
    layers where the recipe gives tflite-micro its own: ``float_for``)."""
    from edgesqueeze.export.tflite import export_tflite_int8

    fmt = "tflite-int8"
    export_tflite_int8(model, meta, path, calib[0], calibration=config.calibration,
                       calibration_split=calib[1]["split"], calibration_seed=seed,
                       calibration_dataset=calib[1].get("dataset"),
                       io=config.tflite_int8_io, fold_normalization=config.fold_normalization,
                       float_layers=config.float_layers_for(float_for),
                       weight_rounding=config.weight_rounding_for(fmt, shared),
                       gptq_layers=config.gptq_layers, shared=has_codebooks(model), rounded=rounded,
                       bias_correction=config.bias_correction_for(fmt),
                       equalize_activations=config.equalize_activations,
                       per_channel=config.int8_per_channel(fmt, shared), source_sha256=digest,
                       space_to_depth_stem=s2d_stem, device=device)


def _export_micro(model, meta, path: Path, calib, config: ExportConfig, shared: bool, written: list[Path], *,
                  seed: int, digest: str, log: Log, device=None, s2d_stem: str | None = None) -> None:
    """The tflite-int8 file (the one written beside it in this export, else made in memory),
    compressed for TensorFlow Lite Micro (:mod:`edgesqueeze.export.tflm`)."""
    import tempfile

    from edgesqueeze._io import write_bytes_atomic
    from edgesqueeze.export.tflm import micro_compress

    plain = next((p for p in written if p.name.endswith(SUFFIX["tflite-int8"])), None)
    against = f"the tflite-int8 file ({plain.name})" if plain is not None else "its tflite-int8 conversion"
    if config.float_layers_for("tflite-micro") != config.float_layers_for("tflite-int8"):
        plain = None  # other float layers than the tflite-int8 file's: converted for it
        floats = list(config.float_layers_for("tflite-micro"))
        against = (f"its own tflite-int8 conversion (float layers {floats or 'none'}, not the tflite-int8 "
                   f"file's {list(config.float_layers_for('tflite-int8'))})")
    if plain is not None:
        data = plain.read_bytes()
    else:
        with tempfile.TemporaryDirectory(prefix="edgesqueeze-micro-") as tmp:
            tmp_path = Path(tmp) / "model.int8.tflite"
            _export_tflite_int8(model, meta, tmp_path, calib, config, shared, seed=seed, digest=digest,
                                device=device, s2d_stem=s2d_stem, float_for="tflite-micro")
            data = tmp_path.read_bytes()
    out, rep = micro_compress(data, what=str(path))
    if len(out) >= len(data):  # the tables and DECODE operators cost more than the indices save
        from edgesqueeze.errors import ExportError

        raise ExportError(f"{path}: TFLite Micro value tables do not pay off for this model: {len(out):,} B against "
                          f"the tflite-int8 file's {len(data):,} B (each coded filter adds a DECODE operator, about "
                          "256 B); ship the tflite-int8 file")
    arenas = _micro_arenas(path, data, out)  # first: a file TensorFlow Lite Micro cannot open is not written
    write_bytes_atomic(path, out)  # sealed by micro_compress: its own CRC-32
    kept = [r for r in rep["rows"] if not r["index_bits"]]
    widths = ", ".join(f"{b}-bit" for b in sorted({r["index_bits"] for r in rep["rows"] if r["index_bits"]}))
    log(f"{path}: TFLite Micro value tables on {rep['compressed']} of {rep['filters']} int8 filters "
        f"({widths} indices): flash {len(data):,} -> {len(out):,} B against {against}"
        + (f", arena (RAM) {arenas[0]:,} -> {arenas[1]:,} B" if arenas else "")
        + (f"; {len(kept)} kept as int8 ({_why_kept(kept)})" if kept else ""))
    if arenas and arenas[1] - arenas[0] > len(data) - len(out):
        log(f"note: {path.name} saves {len(data) - len(out):,} B of flash but needs {arenas[1] - arenas[0]:,} B more "
            "RAM: TFLite Micro's DECODE operators expand the coded filters into the arena; where RAM is shorter "
            "than flash, ship the tflite-int8 file")


def _micro_arenas(path: Path, plain: bytes, micro: bytes) -> tuple[int, int] | None:
    """The arena TensorFlow Lite Micro allocates for the plain int8 file and for the compressed
    one (one inference each on zeros), or None where its interpreter cannot say. A file its
    interpreter cannot open (an operator it lacks, such as GELU) is an ExportError: the file
    was written with exit 0, and verify then refused it."""
    from edgesqueeze.errors import EdgesqueezeError, ExportError
    from edgesqueeze.runtime._tflm import MicroArtifact

    try:
        arts = [MicroArtifact(path, data=d) for d in (plain, micro)]
    except EdgesqueezeError as exc:
        raise ExportError(f"{exc}; not written: a microcontroller runs only the operators TensorFlow Lite Micro "
                          "has (use layers it has, e.g. ReLU or ReLU6 for GELU or SiLU, or ship the tflite-int8 "
                          "file to a device with LiteRT)") from None
    try:
        a, b = (art.arena_bytes for art in arts)
    except EdgesqueezeError:
        return None
    return (a, b) if a is not None and b is not None else None


def _why_kept(rows: list[dict]) -> str:
    """Why filters got no TFLite Micro value table, naming the first of each kind."""
    many = [r["name"] for r in rows if r["distinct"] > 128]
    small = [r["name"] for r in rows if r["distinct"] <= 128]
    return "; ".join(f"{what}: {names[0]}{', ...' if len(names) > 1 else ''}" for what, names in (
        ("more than 128 distinct values", many), ("too small for a table to pay off", small)) if names)


def has_codebooks(model, max_values: int = 256) -> bool:
    """Every conv and linear weight of ``model`` holds at most ``max_values`` distinct values,
    as pruning plus k-means weight sharing leave them (before any BatchNorm folding, which
    scales rows and keeps each row on its int8 grid): GPTQ then keeps each layer's values
    (:func:`~edgesqueeze.export.prepare.gptq_round`), whether or not one scale per tensor
    would (:func:`is_weight_shared`)."""
    import torch

    return all(torch.unique(m.weight.detach()).numel() <= max_values for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight is not None)


def _unfolded_heads(model, meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Linear -> BatchNorm1d pairs still in ``model``, which the exporters fold."""
    import torch

    from edgesqueeze.models.fold import conv_bn_pairs

    if not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) or not meta.get("input_shape"):
        return []
    try:
        pairs = conv_bn_pairs(model, torch.zeros(2, *meta["input_shape"]))
    except Exception:  # noqa: BLE001 - a model fx cannot trace: nothing to say
        return []
    return [(c, b) for c, b in pairs if isinstance(model.get_submodule(c), torch.nn.Linear)]


def is_weight_shared(model, max_values: int = 256, keep: float = 0.9) -> bool:
    """Every conv and linear weight of ``model`` holds at most ``max_values`` distinct values
    (what pruning plus k-means weight sharing leave: an ``.esq`` model) *and* one int8 scale
    per tensor keeps at least ``keep`` of them distinct. The digits ``.esq`` (16 values a
    layer) loses one value in two layers, two centroids 0.04 of an int8 step apart; the
    released Deep Compression SqueezeNet's 256-value codebooks would lose many. BatchNorm
    is folded first (on a copy), as export does: it scales each channel differently."""
    return why_not_weight_shared(model, max_values, keep) is None


def why_not_weight_shared(model, max_values: int = 256, keep: float = 0.9) -> str | None:
    """None for a model :func:`is_weight_shared` calls weight-shared; else why not, naming the
    first layer that is not (for export's note: a weight-shared model's int8 files switched to
    per-channel weights without a word when one layer lost 2 of its 17 values)."""
    import torch

    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        from edgesqueeze.models.fold import fold_batchnorm

        try:  # the exported graph folds BatchNorm into the convs: judge what it will hold (a copy)
            model = fold_batchnorm(model)
        except Exception:  # noqa: BLE001 - a model fx cannot trace: judged as it is
            pass
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight is not None:
            values = torch.unique(m.weight.detach().float())
            if values.numel() > max_values:
                return f"{name} holds {values.numel():,} distinct weights (more than {max_values})"
            step = values.abs().max() / 127
            kept = torch.unique(torch.round(values / step)).numel() if step > 0 else values.numel()
            if kept < keep * values.numel():
                return (f"{name}'s {values.numel()} shared values would be {kept} int8 values under one scale per "
                        f"tensor (fewer than {keep:.0%} kept)")
    return None
