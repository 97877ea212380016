"""The ``edgesqueeze`` command. It parses, calls the library and prints; no logic lives here.

Every :class:`~edgesqueeze.errors.EdgesqueezeError` becomes one ``error: ...`` line on
stderr and its exit code (1 for a broken budget, 2 for bad usage or input).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgesqueeze import __version__
from edgesqueeze.errors import EdgesqueezeError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgesqueezeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgesqueeze")
def cli() -> None:
    """Make trained PyTorch CNNs small enough for the edge, and prove it.

    \b
    Start here:
      edgesqueeze models                                    list architectures
      edgesqueeze train --recipe recipes/squeezenet-digits.yaml
      edgesqueeze eval artifacts/squeezenet-digits/model.pt
      edgesqueeze info artifacts/squeezenet-digits/model.pt
    """


def _arch_kwargs(num_classes: int | None) -> dict:
    return {"num_classes": num_classes} if num_classes else {}


def _progress_default() -> bool:
    return sys.stderr.isatty()


# ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--recipe", "-r", "recipe_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Recipe YAML (see recipes/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set train.epochs=3 (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory [default: recipe's output_dir or artifacts/<recipe name>].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Look for dataset files here first.")
@click.option("--resume", is_flag=True, help="Continue the run in the output directory after its last epoch.")
@click.option("--overwrite", is_flag=True, help="Start over even if the output directory holds a run.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: on a terminal].")
def train(recipe_path, overrides, out_dir, data_dir, resume, overwrite, progress):
    """Train the model a recipe describes.

    Writes model.pt (checkpoint with metadata), last.pt (resumable state, every epoch),
    metrics.csv/json and curves.png to the output directory.

    \b
    Example:
      edgesqueeze train --recipe recipes/squeezenet-mnist.yaml
      edgesqueeze train -r recipes/squeezenet-digits.yaml --set train.epochs=3 --out runs/quick
      edgesqueeze train -r recipes/squeezenet-mnist.yaml --resume      # after an interruption
    """
    from edgesqueeze.recipe import load_recipe
    from edgesqueeze.train import fit

    if data_dir:
        overrides = (*overrides, f"data.data_dir={data_dir}")
    recipe = load_recipe(recipe_path, overrides)
    result = fit(recipe, out_dir=out_dir, resume=resume, overwrite=overwrite,
                 progress=_progress_default() if progress is None else progress,
                 log=lambda s: click.echo(s))
    click.echo(f"outputs: {result.out_dir}/ (model.pt, metrics.csv, metrics.json, curves.png)")


@cli.command("eval")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", help="Dataset name [default: the one the checkpoint was trained on].")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Validation fraction for --split val/train [default: from the checkpoint's recipe, else 0.1].")
@click.option("--seed", type=int, default=None, help="Split seed [default: the checkpoint's].")
@click.option("--limit", type=click.IntRange(min=10), help="Evaluate a seeded subset of at most N images.")
@click.option("--image-size", type=click.IntRange(min=4), help="Resize images (datasets that support it).")
@click.option("--arch", help="Architecture of a plain state_dict (see 'edgesqueeze models').")
@click.option("--num-classes", type=click.IntRange(min=1), help="Class count for --arch.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled nn.Module (runs code from the file).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(model_path, dataset, split, data_dir, val_fraction, seed, limit, image_size, arch, num_classes,
             trust_pickle, batch_size, as_json):
    """Accuracy of a model file on a dataset split.

    \b
    Example:
      edgesqueeze eval artifacts/squeezenet-mnist/model.pt
      edgesqueeze eval squeezenet1_0.pt --arch squeezenet1_0 --dataset imagenet-sample
    """
    from edgesqueeze.evaluate import evaluate_file

    metrics = evaluate_file(model_path, dataset=dataset, split=split, data_dir=data_dir, val_fraction=val_fraction,
                            seed=seed, limit=limit, image_size=image_size, arch=arch,
                            arch_kwargs=_arch_kwargs(num_classes), trust_pickle=trust_pickle,
                            batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    top5 = f"  top-5 {100 * metrics['top5']:.2f}%" if "top5" in metrics else ""
    click.echo(f"{metrics['dataset']} {metrics['split']}: top-1 {100 * metrics['accuracy']:.2f}%{top5}  "
               f"loss {metrics['loss']:.4f}  ({metrics['n']} images)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def models(as_json):
    """List the architectures, with parameters and MACs at their default input size.

    \b
    Example:
      edgesqueeze models
    """
    from edgesqueeze.models import build_model, count_macs, count_params, list_specs

    rows = []
    for spec in list_specs():
        model = build_model(spec.name)
        rows.append({"name": spec.name, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
                     "params": count_params(model), "macs": count_macs(model, spec.input_shape),
                     "description": spec.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<22}{'input':>12}{'classes':>9}{'params':>12}{'MACs':>10}  description")
    for r in rows:
        shape = "x".join(map(str, r["input_shape"]))
        click.echo(f"{r['name']:<22}{shape:>12}{r['num_classes']:>9}{r['params']:>12,}"
                   f"{_human_count(r['macs']):>10}  {r['description']}")


def _human_count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@cli.command()
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", help="Architecture of a plain state_dict.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Class count for --arch.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled nn.Module (runs code from the file).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(model_path, arch, num_classes, trust_pickle, as_json):
    """What a model file holds: kind, architecture, parameters, classes, metrics, provenance.

    \b
    Example:
      edgesqueeze info artifacts/squeezenet-digits/model.pt
      edgesqueeze info squeezenet1_0.pt --arch squeezenet1_0
    """
    from edgesqueeze.evaluate import describe_file

    desc = describe_file(model_path, arch=arch, arch_kwargs=_arch_kwargs(num_classes), trust_pickle=trust_pickle)
    if as_json:
        click.echo(json.dumps(desc, indent=2))
        return
    for key, value in desc.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
            if len(value) > 200:
                value = value[:197] + "..."
        click.echo(f"{key:>16}: {value}")


@cli.command("compress")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Recipe YAML with a 'compress' section (see recipes/) [default: none: lossless re-encoding].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set compress.ptq.target_bytes=480000 (repeatable; "
                   "works without --recipe too).")
@click.option("--arch", help="Architecture of a plain state_dict, e.g. squeezenet1_0 [default: the recipe's model; "
              "builder kwargs: --set model.kwargs={width_mult: 0.5}].")
@click.option("--num-classes", type=click.IntRange(min=1), help="Class count for --arch.")
@click.option("--data", "dataset", help="Dataset [default: the checkpoint's, else the recipe's data section].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory [default: next to the model, <recipe name or model name>-compressed/].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=Path),
              help="Model to distil from when a recipe's prune_finetune or cluster_finetune sets 'distill' "
                   "[default: MODEL_PATH itself]; the float original when MODEL_PATH is a pruned.pt.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: on a terminal].")
def compress_cmd(model_path, recipe_path, overrides, arch, num_classes, dataset, out_dir, data_dir, teacher, progress):
    """Compress a model into a .esq archive, with a report.

    \b
    What runs depends on the recipe's 'compress' section:
      prune / cluster  Deep Compression with retraining on the training split: prune by
                       magnitude, fold BatchNorm, k-means weight sharing with retrained
                       centroids, Huffman coding
      ptq              post-training, no training data: re-cluster an already pruned model
                       to compress.ptq.target_bytes from calibration images only, zeros kept
      (none, or no -r) lossless re-encoding: existing zeros and codebooks kept, weights
                       bit-identical to the source
    Every run checks that the archive decodes to exactly the weights it measured, and writes
    model.esq, report.json, report.md and plots; a run that prunes also writes pruned.pt, the
    model before weight sharing, to try other cluster settings without pruning again.

    \b
    Example:
      edgesqueeze compress artifacts/squeezenet-mnist/model.pt --recipe recipes/squeezenet-mnist.yaml
      edgesqueeze compress model.pt -r recipes/squeezenet-digits.yaml --set compress.cluster.bits=3
      # other weight sharing on the same pruned model, distilling from the original
      edgesqueeze compress out/pruned.pt -r recipes/squeezenet-cifar10.yaml --set compress.prune=null \
          --set compress.cluster.bits=5 --teacher model.pt --out out-5bit
      # ImageNet SqueezeNet (plain state_dict, already pruned and shared): lossless, then 466 KB
      edgesqueeze compress ../shared/models/squeezenet1_0-imagenet.pt --arch squeezenet1_0 \\
          --data imagenet-sample --out runs/imagenet-lossless
      edgesqueeze compress ../shared/models/squeezenet1_0-imagenet.pt --arch squeezenet1_0 \\
          --data imagenet-sample -r recipes/squeezenet-imagenet.yaml --out runs/imagenet-ptq-466
    """
    from edgesqueeze.compress.pipeline import CompressConfig, compress
    from edgesqueeze.errors import RecipeError
    from edgesqueeze.recipe import apply_overrides, given_sections, load_recipe, recipe_from_dict

    default_dataset = None
    kwargs = _arch_kwargs(num_classes)
    if recipe_path:
        recipe = load_recipe(recipe_path, overrides)
        if recipe.compress is None:
            raise RecipeError(f"{recipe_path}: has no 'compress' section; see recipes/squeezenet-mnist.yaml "
                              "(or leave out --recipe for a lossless re-encoding)")
        given = given_sections(recipe_path, overrides)
        name = recipe.name
    else:  # --set alone builds a recipe: e.g. --set compress.ptq.target_bytes=480000
        raw = apply_overrides({"version": 1}, overrides)
        recipe, given, name = recipe_from_dict(raw, source="--set"), set(raw), Path(model_path).stem
    # A plain state_dict says nothing about itself: the recipe's model and data stand in,
    # but only where it names them (the dataclass defaults are meant for training).
    if "model" in given and arch in (None, recipe.model.arch):
        arch, kwargs = recipe.model.arch, {**recipe.model.kwargs, **kwargs}
    if "data" in given:
        default_dataset = recipe.data.dataset
    config = recipe.compress or CompressConfig()
    out = out_dir or Path(model_path).parent / f"{name}-compressed"
    result = compress(model_path, config, out_dir=out, seed=recipe.seed, dataset=dataset,
                      default_dataset=default_dataset, arch=arch, arch_kwargs=kwargs,
                      data_dir=data_dir or recipe.data.data_dir, recipe_hash=recipe.hash() if recipe_path else None,
                      teacher=teacher,
                      progress=_progress_default() if progress is None else progress, log=lambda m: click.echo(m))
    from edgesqueeze.compress.report import size_table

    click.echo(size_table(result.report))
    click.echo(f"outputs: {result.out_dir}/ (model.esq, report.md, report.json, accuracy_vs_size.png)")


@cli.command()
@click.argument("esq_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write (.pt).")
def unpack(esq_path, out_path):
    """Decode a .esq archive into a normal edgesqueeze checkpoint.

    The weights are bit-for-bit the ones the archive was made from.

    \b
    Example:
      edgesqueeze unpack artifacts/squeezenet-mnist/squeezenet-mnist-compressed/model.esq -o model.pt
    """
    from edgesqueeze.checkpoint import model_from_esq, save_checkpoint

    model, meta = model_from_esq(esq_path)
    save_checkpoint(out_path, model, meta)
    click.echo(f"{out_path}: {sum(t.numel() for t in model.state_dict().values()):,} values from {esq_path}")


@cli.command()
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sparsities", default="0.5,0.7,0.8,0.9,0.95", show_default=True,
              help="Comma-separated sparsities to try on each layer.")
@click.option("--layers", help="Comma-separated layer names [default: every Conv2d and Linear].")
@click.option("--max-drop", type=click.FloatRange(min=0), help="Accuracy points a layer may lose; prints the "
              "largest sparsity per layer within it, ready for a recipe's compress.prune.layers.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory [default: next to the model, sensitivity/].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Look for dataset files here first.")
def sensitivity(model_path, sparsities, layers, max_drop, out_dir, data_dir):
    """Prune each layer alone at several sparsities and measure validation accuracy.

    Writes sensitivity.md (the table), sensitivity.json and sensitivity.png.

    \b
    Example:
      edgesqueeze sensitivity artifacts/squeezenet-mnist/model.pt --max-drop 0.2
    """
    from edgesqueeze.compress.pipeline import sensitivity as run_sensitivity

    try:
        sps = [float(x) for x in sparsities.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{sparsities!r} is not a list of numbers", param_hint="--sparsities") from None
    if not sps or not all(0 <= x < 1 for x in sps):
        raise click.BadParameter("each sparsity must be >= 0 and < 1", param_hint="--sparsities")
    out = out_dir or Path(model_path).parent / "sensitivity"
    result = run_sensitivity(model_path, sparsities=sps, out_dir=out, max_drop=max_drop, data_dir=data_dir,
                             layers=[x.strip() for x in layers.split(",")] if layers else None,
                             log=lambda m: click.echo(m))
    click.echo((out / "sensitivity.md").read_text())
    if "chosen" in result:
        click.echo("compress.prune.layers for a recipe:")
        for name, sp in result["chosen"].items():
            click.echo(f"  {name}: {sp}")


# --------------------------------------------------------------------------------------- deploy


def _csv(value: str, what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise click.BadParameter(f"{value!r} names nothing", param_hint=what)
    return items


@cli.command("export")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "-f", "formats", default=None, metavar="LIST",
              help="Comma-separated: onnx, onnx-int8, tflite, tflite-int8 [default: the recipe's, else all four].")
@click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Recipe with an 'export' section (calibration, options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory [default: next to the model, export/].")
@click.option("--data", "dataset", help="Dataset for calibration images [default: the model's own].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--calibration-images", type=click.IntRange(min=1), help="Calibration image count for INT8.")
@click.option("--calibration-method", type=click.Choice(["auto", "minmax", "entropy", "percentile"]),
              help="How INT8 activation ranges are chosen [default: auto: what measured best per "
                   "format, today minmax for both].")
@click.option("--fold-normalization", is_flag=True, default=None,
              help="Normalize inside the graph: the file then takes pixels / 255.")
@click.option("--float-layers", metavar="LIST",
              help="Comma-separated module names kept float in both INT8 files (mixed precision), e.g. "
                   "features.0,features.3; replaces the recipe's float_layers and float_layers_by_format "
                   "[default: the recipe's, else none].")
@click.option("--weight-rounding", type=click.Choice(["auto", "nearest", "gptq"]),
              help="How INT8 weights are rounded: gptq (on the calibration images) or nearest [default: "
                   "auto: gptq for tflite-int8, nearest for onnx-int8].")
@click.option("--equalize-activations", type=click.FloatRange(0, 1), metavar="ALPHA",
              help="Even out per-channel activation ranges before INT8 quantization, moving the "
                   "imbalance into the next conv's weights; 0 off, 1 full [default: the recipe's, else 0].")
@click.option("--onnx-int8-target", type=click.Choice(["any-cpu", "vnni-or-arm"]),
              help="CPUs the onnx-int8 file must compute exactly. any-cpu: 8-bit weights stored as uint8 "
                   "(zero point 128), the same results on x86 with or without VNNI and on ARM. vnni-or-arm: "
                   "int8 weights, faster on VNNI x86 (its uint8 x int8 kernels); x86 CPUs without VNNI "
                   "(AVX2 only) saturate their products and compute other logits (digits: 94% top-1 "
                   "agreement with the exact result) [default: the recipe's, else any-cpu].")
@click.option("--arch", help="Architecture of a plain state_dict (e.g. squeezenet1_0).")
def export_cmd(model_path, formats, recipe_path, overrides, out_dir, dataset, data_dir, calibration_images,
               calibration_method, fold_normalization, float_layers, weight_rounding, equalize_activations,
               onnx_int8_target, arch):
    """Export a checkpoint or .esq archive to ONNX and TFLite, fp32 and INT8.

    Each file carries its metadata (classes, input shape, normalization, calibration,
    source hash), so that `edgesqueeze run` and `verify` know what to feed it. INT8 files
    are calibrated on images from the model's training split.

    \b
    Example:
      edgesqueeze export artifacts/squeezenet-digits/model.pt
      edgesqueeze export model.esq -f tflite-int8 --calibration-images 512
      edgesqueeze export squeezenet1_0.pt --arch squeezenet1_0 --data imagenet-sample -f onnx-int8
      edgesqueeze export squeezenet1_0.pt --arch squeezenet1_0 --data imagenet-sample \
          --float-layers features.0,features.3,features.4
    """
    import dataclasses

    from edgesqueeze.export import ExportConfig, export_artifacts

    seed, recipe_data_dir = 0, None
    config = ExportConfig()
    if recipe_path:
        from edgesqueeze.recipe import load_recipe

        recipe = load_recipe(recipe_path, overrides)
        config, seed, recipe_data_dir = recipe.export or config, recipe.seed, recipe.data.data_dir
    elif overrides:
        raise click.UsageError("--set needs --recipe")
    if formats:
        try:
            config = dataclasses.replace(config, formats=tuple(_csv(formats, "--format")))
        except EdgesqueezeError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--format") from None
    calib = config.calibration
    if calibration_images:
        calib = dataclasses.replace(calib, images=calibration_images)
    if calibration_method:
        calib = dataclasses.replace(calib, method=calibration_method)
    config = dataclasses.replace(config, calibration=calib)
    if fold_normalization is not None:
        config = dataclasses.replace(config, fold_normalization=fold_normalization)
    if weight_rounding:
        config = dataclasses.replace(config, weight_rounding=weight_rounding)
    if equalize_activations is not None:
        config = dataclasses.replace(config, equalize_activations=equalize_activations)
    if onnx_int8_target:
        config = dataclasses.replace(config, onnx_int8_target=onnx_int8_target)
    if float_layers is not None:
        try:
            config = dataclasses.replace(config, float_layers=tuple(_csv(float_layers, "--float-layers")),
                                         float_layers_by_format={})
        except EdgesqueezeError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--float-layers") from None
    out = out_dir or Path(model_path).parent / "export"
    written = export_artifacts(model_path, config, out, dataset=dataset, data_dir=data_dir or recipe_data_dir,
                               arch=arch, seed=seed, log=lambda m: click.echo(m))
    click.echo(f"wrote {len(written)} file(s) to {out}/; check them with: edgesqueeze verify {out}/*")


def _budget_from_options(recipe_path, max_size, max_size_for, min_accuracy, max_drop, min_agreement):
    import dataclasses

    from edgesqueeze.config.budget import Budget, BudgetSpecError, parse_fraction, parse_size

    budget = Budget()
    if recipe_path:
        from edgesqueeze.recipe import load_recipe

        budget = load_recipe(recipe_path).budget_spec()
    try:
        per = dict(budget.max_size_per_format)
        for item in max_size_for:
            fmt, sep, size = item.partition("=")
            if not sep:
                raise BudgetSpecError(f"--max-size-for: expected FORMAT=SIZE, got {item!r}")
            from edgesqueeze.config.budget import ARTIFACT_FORMATS

            if fmt not in ARTIFACT_FORMATS:
                raise BudgetSpecError(f"--max-size-for: unknown format {fmt!r}; use {', '.join(ARTIFACT_FORMATS)}")
            per[fmt] = parse_size(size, what=f"--max-size-for {fmt}")
        changes = {"max_size_per_format": per}
        if max_size is not None:
            changes["max_size"] = parse_size(max_size, what="--max-size")
        if min_accuracy is not None:
            changes["min_accuracy"] = parse_fraction(_number_or_pct(min_accuracy), "--min-accuracy")
        if min_agreement is not None:
            changes["min_agreement"] = parse_fraction(_number_or_pct(min_agreement), "--min-agreement")
        if max_drop is not None:
            changes["max_drop"] = max_drop
    except BudgetSpecError as exc:
        raise click.BadParameter(str(exc)) from None
    return dataclasses.replace(budget, **changes)


def _number_or_pct(text: str):
    text = text.strip()
    if text.endswith("%"):
        return text
    try:
        return float(text)
    except ValueError:
        return text


_BUDGET_OPTIONS = [
    click.option("--max-size", metavar="SIZE", help="Largest file allowed, e.g. 500KB, 0.5MB, 64KiB."),
    click.option("--max-size-for", multiple=True, metavar="FORMAT=SIZE",
                 help="Per-format size limit, e.g. tflite-int8=100KB (repeatable)."),
    click.option("--min-accuracy", metavar="ACC", help="Lowest test accuracy, 0.99 or 99%."),
    click.option("--max-drop", type=click.FloatRange(min=0), metavar="POINTS",
                 help="Most accuracy points lost against the float model."),
    click.option("--min-agreement", metavar="FRAC", help="Lowest top-1 agreement with the float model, 0.95 or 95%."),
]


def _with_budget_options(fn):
    for option in reversed(_BUDGET_OPTIONS):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "dataset", help="Dataset whose test split to use [default: the one each file records].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path),
              help="Float model (.pt) for top-1 agreement and accuracy drop [default: the first .pt given].")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N test images.")
@click.option("--threads", type=click.IntRange(min=1), help="Runtime threads.")
@click.option("--latency", is_flag=True, help="Also measure batch-1 latency (p50).")
@click.option("--arch", help="Architecture of .pt files that are plain state_dicts (see 'edgesqueeze models'); "
                             "give --data too, a state_dict records no dataset.")
@click.option("--num-classes", type=click.IntRange(min=1), help="Class count for --arch.")
@click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Recipe whose 'budget' section to check against.")
@_with_budget_options
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the verification report here (JSON; the markdown and plots go beside it) "
                   "[default: verify.json beside the first file].")
@click.pass_context
def verify(ctx, paths, dataset, data_dir, reference, limit, threads, latency, arch, num_classes, recipe_path,
           max_size, max_size_for, min_accuracy, max_drop, min_agreement, out_path):
    """Evaluate artifacts on the test split through their own runtimes.

    .onnx runs in onnxruntime, .tflite in LiteRT, .esq through its decoder (its weights
    checked against the hash recorded at compress time), .pt in PyTorch as the float
    reference. Reports file size, gzip size, accuracy and top-1 agreement; with a budget
    (options or the recipe's), exits 1 when one is broken. Writes verify.json, verify.md
    (the table, the verdicts, the machine) and two plots: size_by_format.png and
    accuracy_vs_size.png.

    \b
    The report names this CPU and the ISA features that select int8 kernels (AVX2, AVX-512,
    VNNI; ARM dot product), and warns when a file's numbers here are known not to be what
    another CPU computes (an onnx-int8 file exported with --onnx-int8-target vnni-or-arm).

    \b
    Example:
      edgesqueeze verify artifacts/squeezenet-digits/model.pt artifacts/squeezenet-digits/export/*
      edgesqueeze verify squeezenet1_0.pt export/* --arch squeezenet1_0 --data imagenet-sample
    """
    from edgesqueeze._io import write_text_atomic
    from edgesqueeze.budget import artifacts_markdown, check, exit_code, verdicts_table
    from edgesqueeze.verify import evaluate_artifacts
    from edgesqueeze.verify_report import machine_info, write_report

    out = out_path or Path(paths[0]).parent / "verify.json"
    if out.suffix.lower() == ".md":
        raise click.BadParameter(f"{out}: names the JSON report, and the markdown is written beside it; "
                                 f"give {out.with_suffix('.json')} to get {out}", param_hint="--out")
    budget = _budget_from_options(recipe_path, max_size, max_size_for, min_accuracy, max_drop, min_agreement)
    if num_classes and not arch:
        raise click.UsageError("--num-classes needs --arch")
    report = evaluate_artifacts(list(paths), dataset=dataset, data_dir=data_dir, reference=reference, limit=limit,
                                threads=threads, latency=latency, arch=arch, arch_kwargs=_arch_kwargs(num_classes),
                                log=lambda m: click.echo(m))
    report["machine"] = machine_info(threads)
    verdicts = None if budget.is_empty() else check(report["artifacts"], budget)
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    written = write_report(out, report, verdicts=verdicts, machine=report["machine"])
    click.echo(artifacts_markdown(report["artifacts"]))
    plots = ", ".join(p.name for p in written["plots"]) or "no plots"
    click.echo(f"report: {out}, {written['markdown']}, plots ({plots})"
               + (f"; {written['note']}" if written["note"] else ""))
    if verdicts is not None:
        click.echo(verdicts_table(verdicts))
        ctx.exit(exit_code(verdicts))
    if any(r["error"] for r in report["artifacts"]):
        ctx.exit(2)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_with_budget_options
@click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Take the budget from this recipe's 'budget' section (options override it).")
@click.option("--data", "dataset", help="Dataset to evaluate artifact files on [default: the one each file records].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path),
              help="Float model (.pt) for agreement and drop [default: the first .pt given].")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N test images.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write verdicts as JSON.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write JUnit XML (one test case per artifact and budget).")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write Markdown (e.g. $GITHUB_STEP_SUMMARY).")
@click.pass_context
def check(ctx, paths, max_size, max_size_for, min_accuracy, max_drop, min_agreement, recipe_path, dataset, data_dir,
          reference, limit, json_path, junit_path, md_path):
    """The CI gate: exit 0 when every budget holds, 1 when one is broken, 2 on bad input.

    PATHS are report.json files (from `verify` or `compress`: nothing is re-run) or
    artifact files (.pt, .esq, .onnx, .tflite: evaluated now on the test split through
    their own runtimes). An artifact that cannot be evaluated is never a pass.

    \b
    Example:
      edgesqueeze check artifacts/squeezenet-digits/export/verify.json --max-size 100KB --min-accuracy 0.95
      edgesqueeze check model.int8.tflite --data mnist --max-size 100KB --min-accuracy 99.4% \\
          --junit gate.xml --markdown "$GITHUB_STEP_SUMMARY"
    """
    from edgesqueeze._io import write_text_atomic
    from edgesqueeze.budget import (check as run_check, exit_code, verdicts_json, verdicts_junit,
                                    verdicts_markdown, verdicts_table)
    from edgesqueeze.verify import evaluate_artifacts, rows_from_report

    budget = _budget_from_options(recipe_path, max_size, max_size_for, min_accuracy, max_drop, min_agreement)
    if budget.is_empty():
        raise click.UsageError("no budget: give --max-size, --min-accuracy, --max-drop, --min-agreement "
                               "or a --recipe with a 'budget' section")
    rows, files = [], []
    for p in paths:
        if p.suffix.lower() == ".json":
            rows.extend(rows_from_report(p))
        else:
            files.append(p)
    if files:
        report = evaluate_artifacts(files, dataset=dataset, data_dir=data_dir, reference=reference, limit=limit,
                                    log=lambda m: click.echo(m, err=True))
        rows.extend(report["artifacts"])
    verdicts = run_check(rows, budget)
    click.echo(verdicts_table(verdicts))
    if json_path:
        write_text_atomic(json_path, verdicts_json(verdicts, rows, budget))
    if junit_path:
        write_text_atomic(junit_path, verdicts_junit(verdicts))
    if md_path:
        md = verdicts_markdown(verdicts, rows)
        if str(md_path).endswith("GITHUB_STEP_SUMMARY") or md_path.exists() and not md_path.is_file():
            with open(md_path, "a") as fh:
                fh.write(md)
        else:
            write_text_atomic(md_path, md)
    ctx.exit(exit_code(verdicts))


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
def inspect(path, as_json):
    """What a .pt, .esq, .onnx or .tflite file holds: inputs, outputs, ops, tensors, metadata.

    \b
    Example:
      edgesqueeze inspect artifacts/squeezenet-digits/export/model.int8.tflite
    """
    from edgesqueeze.inspect import inspect_file, summary_lines

    desc = inspect_file(path)
    if as_json:
        click.echo(json.dumps(desc, indent=2, default=str))
    else:
        click.echo("\n".join(summary_lines(desc)))


@cli.command("run")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(min=1), help="Classes to print.")
@click.option("--threads", type=click.IntRange(min=1), help="Runtime threads.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def run_cmd(model_path, images, top_k, threads, as_json):
    """Classify image files with an .onnx or .tflite artifact (no PyTorch needed).

    \b
    Example:
      edgesqueeze run model.int8.tflite cat.jpg dog.png
    """
    from edgesqueeze.runtime import load, load_images, topk

    art = load(model_path, threads=threads)
    shape = art.meta.get("input_shape") or art.input_spec.image_shape
    batch = load_images(list(images), shape, resize=art.meta.get("resize"))
    scores = art.predict_images(batch)
    results = {str(img): [{"index": i, "class": name, "probability": round(p, 5)}
                          for i, name, p in topk(scores[j], top_k, art.classes)] for j, img in enumerate(images)}
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for img, rows in results.items():
        click.echo(f"{img}:")
        for r in rows:
            click.echo(f"  {100 * r['probability']:6.2f}%  {r['class']} ({r['index']})")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", "-b", "batch_sizes", multiple=True, type=click.IntRange(min=1),
              help="Batch size(s) to time [default: 1 and 32].")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=1), help="Timed runs per case.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1), help="Runtime threads [default: the runtime's].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write rows as JSON.")
def bench(paths, batch_sizes, runs, warmup, threads, json_path):
    """Latency of artifacts (p50, p90) at batch 1 and 32, with ratios against the first file.

    .onnx and .tflite run through their runtimes; .pt and .esq through PyTorch eager.

    \b
    Example:
      edgesqueeze bench model.onnx model.int8.onnx model.tflite model.int8.tflite --threads 2
    """
    from edgesqueeze._io import write_text_atomic
    from edgesqueeze.benchmark import bench_files

    rows = bench_files(list(paths), batch_sizes=list(batch_sizes) or [1, 32], runs=runs, warmup=warmup,
                       threads=threads, log=lambda m: click.echo(m, err=True))
    head = f"{'file':<44}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'vs first':>10}"
    click.echo(head)
    for r in rows:
        click.echo(f"{r['file'][-43:]:<44}{r['batch_size']:>6}{r['p50_ms']:>10.2f}{r['p90_ms']:>10.2f}"
                   f"{r['ratio']:>9.2f}x")
    if json_path:
        write_text_atomic(json_path, json.dumps(rows, indent=2) + "\n")


def main() -> None:
    cli(prog_name="edgesqueeze")


if __name__ == "__main__":
    main()
