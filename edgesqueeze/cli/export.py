"""``edgesqueeze export``: deployable ONNX and TFLite files."""

from __future__ import annotations

import math
from pathlib import Path

import click

from edgesqueeze.cli._group import PathType, check_dataset_option, cli, device_option, model_options
from edgesqueeze.errors import EdgesqueezeError


def _csv(value: str, what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise click.BadParameter(f"{value!r} names nothing", param_hint=what)
    return items


@cli.command("export")
@click.argument("model_path", type=PathType(dir_okay=False, path_type=Path))
@click.option("--format", "-f", "formats", multiple=True, metavar="LIST",
              help="Comma-separated, or the option repeated: onnx, onnx-int8, tflite, tflite-int8, tflite-micro "
                   "(the tflite-int8 file LiteRT runs, compressed the TensorFlow Lite Micro way for a "
                   "microcontroller: value tables and DECODE operators; needs edgesqueeze[micro]) "
                   "[default: the recipe's, else the first four].")
@click.option("--out", "out_dir", type=PathType(file_okay=False, path_type=Path),
              help="Output directory [default: next to the model, export/].")
@click.option("--data", "dataset", callback=check_dataset_option,
              help="Dataset for calibration images [default: the model's own].")
@click.option("--data-dir", type=PathType(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--calibration-images", type=click.IntRange(1, 100_000),
              help="Calibration image count for INT8 [default: the recipe's, else 256].")
@click.option("--calibration-method", type=click.Choice(["auto", "minmax", "entropy", "percentile", "mse"]),
              help="How INT8 activation ranges are chosen [default: auto: what measured best per "
                   "format, today minmax for both]. entropy, percentile and mse clip the tails; mse "
                   "picks each tensor's range for the least squared quantization error. On ImageNet "
                   "SqueezeNet 1.0 (no BatchNorm, long-tailed activations) onnx-int8 with entropy "
                   "ranges scored 1% top-1, with mse the best agreement of the four: verify before "
                   "shipping.")
@click.option("--fold-normalization", is_flag=True, default=None,
              help="Normalize inside the graph: the file then takes pixels / 255.")
@click.option("--float-layers", metavar="LIST",
              help="Comma-separated module names kept float in both INT8 files (mixed precision), e.g. "
                   "features.0,features.3; replaces the recipe's float_layers and float_layers_by_format "
                   "('none': every layer int8) [default: the recipe's, else none].")
@click.option("--weight-rounding", type=click.Choice(["auto", "nearest", "gptq"]),
              help="How INT8 weights are rounded: gptq (on the calibration images; on a weight-shared "
                   "model it picks among each layer's own values, so a packed file stays as small; "
                   "export.gptq_layers limits it to named modules) or nearest [default: auto: nearest for a "
                   "weight-shared model (an .esq), else gptq for tflite-int8 and nearest for onnx-int8].")
@click.option("--equalize-activations", type=click.FloatRange(0, 1), metavar="ALPHA",
              help="Even out per-channel activation ranges before INT8 quantization, moving the "
                   "imbalance into the next conv's weights; 0 off, 1 full [default: the recipe's, else 0].")
@click.option("--onnx-int8-target", type=click.Choice(["any-cpu", "any-cpu-7bit", "vnni-or-arm"]),
              help="CPUs the onnx-int8 file must compute exactly. any-cpu: 8-bit weights stored as uint8 "
                   "(zero point 128), the same results on x86 with or without VNNI and on ARM. any-cpu-7bit: "
                   "7-bit int8 weights, the same results everywhere too, with onnxruntime's faster uint8 x "
                   "int8 kernels on every x86 (digits demo: fp32's speed, where any-cpu takes 1.28x its time "
                   "on AVX2 kernels), for a model that keeps its accuracy on a 7-bit grid (ImageNet "
                   "SqueezeNet lost 2.75 points of agreement). vnni-or-arm: "
                   "int8 weights, faster on VNNI x86 (its uint8 x int8 kernels; ImageNet SqueezeNet on "
                   "AVX-512 VNNI, deploy recipe: 4.2 ms an image against any-cpu's 7.5 as the runtime opens "
                   "it, without NCHWc float kernels so that its float layers round as on ARM; fp32 7.2); x86 "
                   "CPUs without VNNI "
                   "(AVX2 only) saturate their products and compute other logits (on an emulated Haswell, "
                   "`make device-check DEVICE_CPU=x86-avx2`: digits 94% top-1 agreement with the exact "
                   "result; ImageNet SqueezeNet, squeezenet-imagenet.yaml: 68%, top-1 50% against 57%) "
                   "[default: the recipe's, else any-cpu].")
@click.option("--int8-weights", type=click.Choice(["auto", "per-channel", "per-tensor"]),
              help="One int8 weight scale per output channel or per tensor. auto: per tensor for a "
                   "weight-shared model (an .esq), so each shared value stays one int8 value and --pack codes "
                   "it as compactly as the .esq [default: the recipe's, else auto].")
@click.option("--pack/--no-pack", default=None,
              help="Also write each file packed (model.int8.tflite.esq): its weights Deep-Compression-coded, "
                   "restored byte for byte on the device by `edgesqueeze.runtime.load` [default: the "
                   "recipe's, else no].")
@click.option("--space-to-depth-stem/--no-space-to-depth-stem", default=None,
              help="tflite-int8: compute a stride-2 first conv over few channels (RGB) as a 2x2 space-to-depth "
                   "and a conv over 4x the channels, the same int8 weights rearranged (the same outputs, bit for "
                   "bit, as the file with the plain stem). XNNPACK's int8 kernels on AVX2-only x86 and a "
                   "Raspberry Pi 4 pad input channels to 8, so a 3-channel int8 stem costs more than a float one "
                   "there. ImageNet SqueezeNet's file with it took 1.09x onnxruntime fp32's time on AVX2-only "
                   "kernels (1.50x with the plain int8 stem; a float stem, export.float_layers, 0.95x) and "
                   "0.82x fp32's instructions on a Pi 4 under valgrind (1.09x plain); see docs/BENCHMARKS.md "
                   "[default: the recipe's, else off].")
@click.option("--progress/--no-progress", default=None,
              help="Before each format, a line on standard error naming it ([2/4] onnx-int8: model.int8.onnx): "
                   "a conversion prints nothing until its file is written [default: on a terminal].")
@device_option(what="the INT8 calibration passes of GPTQ and activation equalization (onnxruntime's and "
                    "PT2E's calibration, and the files, stay on the CPU)")
@model_options(recipe_help="Recipe with an 'export' section (calibration, options); its 'model' section stands "
                           "for --arch, its 'data' for the dataset of a file that records none.",
               set_example="export.calibration.images=512")
def export_cmd(model_path, formats, out_dir, dataset, data_dir, calibration_images,
               calibration_method, fold_normalization, float_layers, weight_rounding, equalize_activations,
               onnx_int8_target, int8_weights, pack, space_to_depth_stem, progress, device, model_opts):
    """Export a model to ONNX and TFLite, fp32 and INT8: an edgesqueeze checkpoint or .esq
    archive, or your own model as a state_dict with --arch, a TorchScript archive, a
    torch.export program (.pt2) or a pickle (--trust-pickle).

    Each file carries its metadata (classes, input shape, normalization, calibration,
    source hash), so that `edgesqueeze run` and `verify` know what to feed it. INT8 files
    are calibrated on images from the model's training split. Files are named after the
    model (resnet.torchscript.pt gives resnet.onnx, resnet.int8.onnx, ...).

    \b
    Example:
      edgesqueeze export artifacts/squeezenet-digits/model.pt
      edgesqueeze export model.esq -f tflite-int8 --calibration-images 512
      edgesqueeze export model.esq -f tflite-int8 --pack   # + model.int8.tflite.esq, the file to ship
      edgesqueeze export squeezenet1_0.pt --arch squeezenet1_0 --data imagenet-sample -f onnx-int8
      edgesqueeze export squeezenet1_0.pt --arch squeezenet1_0 --data imagenet-sample \\
          --float-layers features.0,features.3,features.4
    """
    import dataclasses

    from edgesqueeze.export import ExportConfig, export_artifacts

    seed, config = 0, ExportConfig()
    model_opts.note_unused_sets(("model", "data.dataset", "data.data_dir", "export", "seed"), "export")
    if model_opts.recipe is not None:
        config, seed = model_opts.recipe.export or config, model_opts.recipe.seed
    if formats:  # `-f onnx -f tflite` is both, as `-f onnx,tflite` (it was the last one alone)
        try:
            joined = ",".join(formats) if any(f.strip(" ,") for f in formats) else formats[-1]  # '' as given
            config = dataclasses.replace(config, formats=tuple(_csv(joined, "--format")))
        except EdgesqueezeError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--format") from None
    calib = config.calibration
    if calibration_images:
        calib = dataclasses.replace(calib, images=calibration_images)
    if calibration_method:
        calib = dataclasses.replace(calib, method=calibration_method)
    if device:
        from edgesqueeze.device import resolve_device

        resolve_device(device)  # a device this machine lacks: one line naming --device, before anything is read
        calib = dataclasses.replace(calib, device=device)
    config = dataclasses.replace(config, calibration=calib)
    if fold_normalization is not None:
        config = dataclasses.replace(config, fold_normalization=fold_normalization)
    if weight_rounding:
        config = dataclasses.replace(config, weight_rounding=weight_rounding)
    if equalize_activations is not None:
        if math.isnan(equalize_activations):  # FloatRange lets nan through
            raise click.BadParameter("nan is not in the range 0<=x<=1", param_hint="--equalize-activations")
        config = dataclasses.replace(config, equalize_activations=equalize_activations)
    if onnx_int8_target:
        config = dataclasses.replace(config, onnx_int8_target=onnx_int8_target)
    if int8_weights:
        config = dataclasses.replace(config, int8_weights=int8_weights)
    if pack is not None:
        config = dataclasses.replace(config, pack=pack)
    if space_to_depth_stem is not None:
        config = dataclasses.replace(config, space_to_depth_stem=space_to_depth_stem)
    if float_layers is not None:
        try:  # none (or ''): every layer int8, whatever the recipe keeps float (it could not be cleared)
            names = () if float_layers.strip().lower() in ("", "none") else tuple(_csv(float_layers, "--float-layers"))
            config = dataclasses.replace(config, float_layers=names, float_layers_by_format={})
        except EdgesqueezeError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--float-layers") from None
    from edgesqueeze.config.export import INT8_FORMATS

    int8_only = [opt for opt, value in (("--weight-rounding", weight_rounding),
                                        ("--equalize-activations", equalize_activations),
                                        ("--onnx-int8-target", onnx_int8_target), ("--int8-weights", int8_weights),
                                        ("--calibration-images", calibration_images),
                                        ("--calibration-method", calibration_method),
                                        ("--space-to-depth-stem", space_to_depth_stem)) if value is not None]
    int8_keys = ("export.calibration", "export.onnx_int8_target", "export.equalize_activations", "export.tflite_int8_io",
                 "export.weight_rounding", "export.int8_weights", "export.gptq_layers", "export.float_layers",
                 "export.bias_correction", "export.space_to_depth_stem")
    int8_only += [f"--set {item.split('=', 1)[0].strip()}" for item in model_opts.overrides
                  if item.split("=", 1)[0].strip().startswith(int8_keys)]
    if int8_only and not any(f in INT8_FORMATS for f in config.formats):  # taken without a word
        click.echo(f"note: {', '.join(int8_only)} only apply to the int8 formats, and this export writes none "
                   f"({', '.join(config.formats)})", err=True)
    out = out_dir or Path(model_path).parent / "export"
    from edgesqueeze.cli._group import _progress_default

    show = _progress_default() if progress is None else progress
    written = export_artifacts(model_path, config, out, dataset=dataset, data_dir=data_dir or model_opts.data_dir,
                               seed=seed, inputs=model_opts.input_files, log=lambda m: click.echo(m),
                               status=(lambda m: click.echo(m, err=True)) if show else None,
                               **model_opts.load_kwargs())
    import shlex

    click.echo(f"wrote {len(written)} file(s) to {out}/; check them with: edgesqueeze verify "
               + " ".join(shlex.quote(str(p)) for p in written))
