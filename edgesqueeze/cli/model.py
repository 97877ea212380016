"""``edgesqueeze train``, ``eval``, ``models``, ``info``: training and PyTorch-side model files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgesqueeze.cli._group import (FiniteRange, PathType, _progress_default, check_dataset_option, cli,
                                    device_option, model_options, progress_bars, progress_option, recipe_option,
                                    strict_json)


@cli.command()
@click.option("--recipe", "-r", "recipe_path", required=True, type=PathType(dir_okay=False, path_type=Path),
              callback=recipe_option, help="Recipe YAML, or the name of one edgesqueeze ships (recipes/): "
              "squeezenet-digits, squeezenet-mnist, squeezenet-cifar10, ...")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set train.epochs=3 (repeatable).")
@click.option("--out", "out_dir", type=PathType(file_okay=False, path_type=Path),
              help="Output directory [default: recipe's output_dir or artifacts/<recipe name>].")
@click.option("--data-dir", type=PathType(file_okay=False, path_type=Path),
              help="Look for dataset files here first.")
@click.option("--resume", is_flag=True, help="Continue the run in the output directory after its last epoch.")
@click.option("--overwrite", is_flag=True, help="Start over even if the output directory holds a run.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: on a terminal].")
@device_option
def train(recipe_path, overrides, out_dir, data_dir, resume, overwrite, progress, device):
    """Train the model a recipe describes.

    Writes model.pt (checkpoint with metadata), last.pt (resumable state, every epoch),
    metrics.csv/json, curves.png, summary.json (test accuracy, wall times) and recipe.json
    (the recipe as run) to the output directory.

    \b
    Example:
      edgesqueeze train --recipe recipes/squeezenet-mnist.yaml
      edgesqueeze train -r recipes/squeezenet-digits.yaml --set train.epochs=3 --out runs/quick
      edgesqueeze train -r recipes/squeezenet-mnist.yaml --resume      # after an interruption
    """
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in the output folder and --overwrite starts over; "
                               "give one of them")
    from edgesqueeze.recipe import load_recipe
    from edgesqueeze.train import fit

    if device:
        from edgesqueeze.device import resolve_device

        resolve_device(device)  # the option named in the error, before anything is read
    recipe = load_recipe(recipe_path, overrides)
    from edgesqueeze.recipe import replaced_by_overrides

    for note in replaced_by_overrides(recipe_path, overrides):
        click.echo(note, err=True)
    # set on the recipe, not as `--set` text: a folder named "d #1", "~" or "2024" was read as YAML
    # (a comment, null, a number), and an empty `data:` section could not take it
    import dataclasses

    if data_dir:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, data_dir=str(data_dir)))
    if device:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, device=device))
    from edgesqueeze._io import outputs_clear_of_inputs
    from edgesqueeze.train import OUTPUTS

    out = Path(out_dir) if out_dir else recipe.out_dir()
    outputs_clear_of_inputs([("the run's output", out / name) for name in OUTPUTS],
                            [("--recipe", recipe_path)])
    from edgesqueeze.cli._group import TRAIN_STATE

    click.get_current_context().meta[TRAIN_STATE] = out / "last.pt"  # what an interrupt can say
    result = fit(recipe, out_dir=out_dir, resume=resume, overwrite=overwrite,
                 progress=_progress_default() if progress is None else progress,
                 log=lambda s: click.echo(s))
    if result.main:  # under torchrun, rank 0 speaks for the run
        click.echo(f"outputs: {result.out_dir}/ (model.pt, metrics.csv, metrics.json, curves.png, summary.json)")


@cli.command("eval")
@click.argument("model_path", type=PathType(dir_okay=False, path_type=Path))
@click.option("--data", "--dataset", "dataset", callback=check_dataset_option,
              help="Dataset name [default: the one the checkpoint was trained on].")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Which images: the held-out test split, or the validation / training part of the training "
                   "split as the checkpoint's recipe carved it (--val-fraction, --seed).")
@click.option("--data-dir", type=PathType(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--val-fraction", type=FiniteRange(0, 1, max_open=True), default=None,
              help="Validation fraction for --split val/train [default: from the checkpoint's recipe, else 0.1].")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Split seed [default: the checkpoint's].")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate a seeded subset of at most N images of the "
              "split (each class in proportion; of the test split, the images verify --limit measures).")
@click.option("--image-size", type=click.IntRange(min=4), help="Resize images (datasets that support it).")
@model_options(set_example="data.val_fraction=0.2")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass (memory holds one batch of activations).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@progress_option
@device_option
def eval_cmd(model_path, dataset, split, data_dir, val_fraction, seed, limit, image_size, model_opts, batch_size,
             as_json, progress, device):
    """Accuracy of a PyTorch model file on a dataset split: a checkpoint, state_dict (--arch),
    TorchScript, torch.export .pt2, pickle (--trust-pickle) or .esq archive. Exported .onnx and
    .tflite files are measured by `edgesqueeze verify` (through their runtimes).

    \b
    Example:
      edgesqueeze eval artifacts/squeezenet-mnist/model.pt
      edgesqueeze eval squeezenet1_0.pt --arch squeezenet1_0 --data imagenet-sample
    """
    _no_torch_model_said_early(model_path)
    from edgesqueeze.evaluation import evaluate_file

    model_opts.note_unused_sets(("model", "data.dataset", "data.val_fraction", "data.data_dir", "seed"), "eval")
    data = model_opts.section("data")
    if val_fraction is None and data is not None:
        val_fraction = data.val_fraction
    if seed is None and "seed" in model_opts.given:
        seed = model_opts.recipe.seed
    metrics = evaluate_file(model_path, dataset=dataset, split=split, data_dir=data_dir or model_opts.data_dir,
                            val_fraction=val_fraction, seed=seed, limit=limit, image_size=image_size,
                            batch_size=batch_size, device=device, progress=progress_bars(progress),
                            **model_opts.load_kwargs())
    if dataset is None:
        model_opts.note_dataset_recorded(metrics.get("dataset"), "eval")
    if as_json:  # strict JSON: a diverged model's NaN loss is null, not the NaN no parser but Python's reads
        click.echo(strict_json(metrics, indent=2))
        return
    if metrics["normalization"].startswith("measured"):
        click.echo(f"note: input normalization {metrics['normalization']}", err=True)
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


def _no_torch_model_said_early(path: Path) -> None:
    """An exported (.onnx, .tflite) or packed file given to eval or info, refused as the model
    loader refuses it but before torch is imported: on a device install (no torch) the
    error said to install the training stack instead of naming inspect."""
    from edgesqueeze._io import not_a_file
    from edgesqueeze.runtime._base import not_torch_file, sniff

    if not_a_file(path):  # a pipe (opening one with no writer waits forever), a folder: the loader says so
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return  # the loader says why
    not_torch_file(path, head)
    if sniff(head) == "esq":
        from edgesqueeze.errors import FormatError
        from edgesqueeze.format import container
        from edgesqueeze.format.packed import PACKED_KEY, is_packed, not_a_model_archive

        try:
            archive = container.read_esq(path)
        except FormatError:
            return  # the loader says what is wrong with it
        if is_packed(archive):
            raise FormatError(f"{path}: {not_a_model_archive(archive.meta[PACKED_KEY])}")


@cli.command()
@click.argument("model_path", type=PathType(dir_okay=False, path_type=Path))
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(model_path, model_opts, as_json):
    """What a PyTorch model file holds: kind, architecture, parameters, classes, metrics, provenance.
    For .onnx, .tflite and packed .esq files use `edgesqueeze inspect`.

    \b
    Example:
      edgesqueeze info artifacts/squeezenet-digits/model.pt
      edgesqueeze info squeezenet1_0.pt --arch squeezenet1_0
    """
    _no_torch_model_said_early(model_path)
    model_opts.note_unused_sets(("model", "data.dataset"), "info")
    from edgesqueeze.evaluation import describe_file

    desc = describe_file(model_path, **model_opts.load_kwargs())
    if as_json:
        click.echo(strict_json(desc, indent=2))
        return
    for key, value in desc.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
            if len(value) > 200:
                value = value[:197] + "..."
        click.echo(f"{key:>16}: {value}")
