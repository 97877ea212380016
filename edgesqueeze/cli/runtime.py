"""``edgesqueeze inspect``, ``run``, ``bench``: any model file through the torch-free runtime."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgesqueeze.cli._group import PathType, cli, model_options, progress_bars, strict_json, threads_option
from edgesqueeze.errors import DataError


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=PathType(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON (a list, for several files).")
@model_options
def inspect(paths, as_json, model_opts):
    """What a .pt, .esq, .onnx or .tflite file (or a packed .onnx.esq / .tflite.esq) holds:
    inputs, outputs, ops, tensors, metadata. Several files are described one after another.

    \b
    A file that is damaged (a plain .onnx/.tflite whose bytes no longer match the CRC-32
    recorded at export) is still described, then refused: exit 2, as `run` and `verify`
    refuse it (after the other files are described).

    \b
    Examples:
      edgesqueeze inspect artifacts/squeezenet-digits/export/model.int8.tflite
      edgesqueeze inspect artifacts/squeezenet-digits/export/*
    """
    from edgesqueeze._io import once_each

    from edgesqueeze.errors import EdgesqueezeError, FormatError

    unique, _ = once_each(paths)
    descs, failed = [], []
    for i, path in enumerate(map(Path, unique)):
        show = ("json" if len(unique) == 1 else None) if as_json else "summary"  # several: one JSON list
        try:
            desc = _inspect_one(path, model_opts, show, first=i == 0,
                                note_options=not any(d.get("kind") in ("onnx", "tflite") for d in descs))
        except EdgesqueezeError as exc:
            if len(unique) == 1:
                raise
            failed.append(exc)  # the others are still described (--json printed nothing at all)
            continue
        descs.append(desc)
        if str(desc.get("checksum", "")).startswith("DOES NOT MATCH"):  # described, yet damaged: refused after
            failed.append(FormatError(f"{path}: its bytes are not the ones exported (the CRC-32 recorded in it "
                                      "does not match); export it again, or `edgesqueeze reseal` it if it was "
                                      "changed on purpose"))
    if as_json and len(unique) > 1:
        click.echo(strict_json(descs, indent=2, default=str))
    _raise_first(failed, "not described or damaged")  # as run and verify refuse such a file: exit 2


def _raise_first(failed: list, what: str) -> None:
    """Raise the first of the errors of a several-file command (after every file had its turn),
    counting the others (``what``: what happened to them)."""
    if failed:
        more = f" (and {len(failed) - 1} other file(s) {what})" if len(failed) > 1 else ""
        raise type(failed[0])(f"{failed[0]}{more}")


def _inspect_one(path: Path, model_opts, show: str | None, *, first: bool, note_options: bool = True) -> dict:
    """Describe one file: printed (``show``: "summary", "json" or None), and returned."""
    from edgesqueeze.inspect import inspect_file, summary_lines

    desc = inspect_file(path, model_opts.load_kwargs())
    if desc.get("kind") in ("onnx", "tflite") and note_options:  # --arch nosuch was taken without a word
        unused = model_opts.torch_only_options() + [f"--{k.replace('_', '-')}" for k in model_opts.input_meta]
        if unused:
            click.echo(f"note: {', '.join(unused)} {'describe' if len(unused) > 1 else 'describes'} a PyTorch "
                       f"model file; {path} is an exported "
                       "file, which records its own: not used", err=True)
    if show == "json":
        click.echo(strict_json(desc, indent=2, default=str))
    elif show == "summary":
        click.echo(("" if first else "\n") + "\n".join(summary_lines(desc)))
    return desc


@cli.command("run")
@click.argument("model_path", type=PathType(dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=PathType(path_type=Path))
@click.option("--top-k", "-k", default=5, show_default=True, type=click.IntRange(min=1), help="Classes to print.")
@threads_option()
@click.option("--batch-size", "-b", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images decoded and run at a time (memory holds one batch of pixels, not all).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--mean", metavar="LIST", help="For a file without edgesqueeze metadata (another tool exported "
              "it): the per-channel mean its inputs were normalized with, on pixels scaled to 0..1, e.g. "
              "0.485,0.456,0.406 (with --std).")
@click.option("--std", metavar="LIST", help="For a file without edgesqueeze metadata: the per-channel std (with "
              "--mean).")
@click.option("--input-shape", metavar="C,H,W", help="For a file without edgesqueeze metadata whose input leaves "
              "the image size free (another tool exported it so): the size to resize images to, e.g. 3,224,224.")
@click.option("--progress/--no-progress", default=None,
              help="A bar over the images on standard error, for more than one batch [default: on a terminal].")
def run_cmd(model_path, images, top_k, threads, batch_size, as_json, mean, std, input_shape, progress):
    """Classify image files with an .onnx or .tflite artifact, or a packed .onnx.esq /
    .tflite.esq (no PyTorch needed).

    IMAGES are files or folders; a folder stands for the image files under it (jpg, png,
    bmp, gif, webp, tiff, pgm/pbm/ppm; sorted, recursive), each read upright as its EXIF
    orientation says (as a viewer shows a phone photo), then made the model's input as the
    dataset it was measured on made its images (the file's "resize": ImageNet's centre crop,
    else stretched to the input). Transparency is dropped (the colour stored under
    transparent pixels is what the model sees, as in training on such files) and an animated
    GIF or a multi-page TIFF gives its first frame. Each file is classified once, even
    when named twice. Results are printed when every image has been read, so a bad image
    stops the run with one error line naming it and no partial output.

    \b
    Examples:
      edgesqueeze run model.int8.tflite cat.jpg dog.png
      edgesqueeze run model.int8.tflite.esq photos/ --json > labels.json
    """
    import numpy as np

    from edgesqueeze.runtime import load, load_images, topk
    from edgesqueeze.runtime.images import image_files

    from edgesqueeze.cli._group import _floats

    if (mean is None) != (std is None):
        raise click.UsageError("give --mean and --std together")
    paths = image_files(images)
    art = load(model_path, threads=threads)
    if mean is not None:
        art.describe({"mean": _floats(mean, "--mean"), "std": _floats(std, "--std", positive=True)})
    shape = art.meta.get("input_shape") or art.input_spec.image_shape
    if input_shape is not None:
        from edgesqueeze.cli._group import _shape
        from edgesqueeze.runtime._base import given_image_shape

        shape = given_image_shape(model_path, shape, _shape(input_shape))
    if any(d is None for d in shape):
        raise DataError(f"{model_path}: the input shape {list(shape)} has dynamic dimensions and the file has no "
                        f"metadata saying what one image is; give the size to resize images to (--input-shape C,H,W)")
    if mean is None and not art.has_metadata:
        click.echo(f"note: {model_path} has no edgesqueeze metadata: its pixels are fed scaled to 0..1 with no "
                   "mean/std normalization; give --mean and --std if it was trained with them", err=True)
    results = {}
    from edgesqueeze._progress import bar

    # a bar for more than one batch, drawn by the factory verify, check and eval use
    with bar(progress_bars(progress) if len(paths) > batch_size else None, "classifying", len(paths)) as update:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            scores = art.predict_images(load_images(chunk, shape, resize=art.meta.get("resize")),
                                        batch_size=batch_size)
            for img, row in zip(chunk, scores):
                if not np.isfinite(row).all():
                    raise DataError(f"{img}: {model_path} computed NaN or infinite scores for it; no class can be "
                                    "ranked (a float model whose weights hold NaN, or --mean/--std far from its own)")
                results[img] = [{"index": i, "class": name, "probability": round(p, 5)}
                                for i, name, p in topk(row, top_k, art.classes)]
            if update is not None:
                update(len(chunk))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for img, rows in results.items():
        click.echo(f"{img}:")
        for r in rows:
            click.echo(f"  {100 * r['probability']:6.2f}%  {r['class']} ({r['index']})")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=PathType(dir_okay=False, path_type=Path))
@click.option("--batch-size", "-b", "batch_sizes", multiple=True, type=click.IntRange(min=1),
              help="Batch size(s) to time [default: 1 and 32].")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=1, max=1_000_000),
              help="Timed runs per case.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0, max=100_000),
              help="Untimed runs first.")
@threads_option("Threads of every runtime, PyTorch's too [default: each runtime's own: onnxruntime one per "
                "physical core, LiteRT 1, PyTorch its intra-op count; give it to time files alike].")
@click.option("--json", "json_path", type=PathType(dir_okay=False, allow_dash=True, path_type=Path),
              help="Write rows as JSON ('-': standard output, and the table goes to standard error): one per "
                   "file and batch size, with file, format, backend, batch_size, threads, portable, p50_ms, "
                   "p90_ms, mean_ms, ratio (p50 over the first file's), bytes, cold_load_ms (the load time "
                   "above), decode_ms (a packed file's decoding, else null), runs, warmup, date, "
                   "edgesqueeze_version and cpu (model, ISA features, int8 kernels, cores).")
@click.option("--portable/--x86-nchwc", "portable", default=None,
              help="ONNX only. --x86-nchwc: onnxruntime's default optimizations, NCHWc float kernels "
                   "included, even for onnx-int8 files made for any CPU, which are otherwise opened "
                   "without them so that their float layers round as on ARM (on an AVX2 x86 the "
                   "ImageNet recipe's onnx-int8 ran 18.3 ms with them, 20.4 ms without, one thread); "
                   "--portable: without them for every ONNX file [default: as each file asks].")
@model_options
def bench(paths, batch_sizes, runs, warmup, threads, json_path, portable, model_opts):
    """Latency of artifacts (p50, p90) at batch 1 and 32, with ratios against the first file,
    and each file's load time (file to ready session through edgesqueeze.runtime.load: the
    file's CRC-32 and metadata checks, then the runtime's session; packed files decode first,
    and their decoding alone is shown beside it). Loads are timed after one untimed load of every
    file, so the runtimes' imports and the file's pages are in memory: a warm load, the
    median of 3, not the first load after a reboot.

    .onnx and .tflite (and packed .onnx.esq / .tflite.esq) run through their runtimes; .pt
    and .esq checkpoints through PyTorch eager (a .pt of your own model: --arch, or
    TorchScript / .pt2 with --input-shape).

    \b
    Example:
      edgesqueeze bench model.onnx model.int8.onnx model.tflite model.int8.tflite --threads 2
    """
    from edgesqueeze._io import check_writable, is_stdout, write_text_output
    from edgesqueeze.benchmark import bench_files

    from edgesqueeze._io import outputs_clear_of_inputs

    outputs_clear_of_inputs([("--json", json_path)],
                            [*(("a file timed", p) for p in paths), *model_opts.input_files])
    quiet = is_stdout(json_path)  # stdout is the JSON then; the table goes to stderr
    unused = [f"--{k}" for k in ("mean", "std", "classes") if k in model_opts.input_meta]
    if unused:  # they describe what a model's outputs mean, not how long it takes
        click.echo(f"note: {', '.join(unused)} change no timing; bench does not use "
                   f"{'them' if len(unused) > 1 else 'it'}", err=True)
    if json_path and not quiet:
        check_writable(json_path)  # before the timing, not after it
    rows = bench_files(list(paths), batch_sizes=list(batch_sizes) or [1, 32], runs=runs, warmup=warmup,
                       threads=threads, model_args=model_opts.load_kwargs(), portable=portable,
                       log=lambda m: click.echo(m, err=True))
    unused = model_opts.torch_only_options()
    if unused and rows and not any(r.get("backend") == "pytorch-eager" for r in rows):
        click.echo(f"note: {', '.join(unused)} {'describe' if len(unused) > 1 else 'describes'} a PyTorch model "
                   "file; none of the files timed is one: "
                   "not used", err=True)
    packed = any(r.get("decode_ms") for r in rows)  # a column for the decoding only when some file has it
    head = f"{'file':<44}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'vs first':>10}{'load ms':>10}"
    click.echo(head + (f"{'decode ms':>11}" if packed else ""), err=quiet)
    for r in rows:
        load = "-" if r.get("cold_load_ms") is None else f"{r['cold_load_ms']:.1f}"
        decode = (f"{r['decode_ms']:.1f}" if r.get("decode_ms") else "-") if packed else ""
        name = r["file"] if len(r["file"]) <= 43 else "..." + r["file"][-40:]
        ratio = f"{r['ratio']:.2f}" if r["ratio"] >= 0.1 else f"{r['ratio']:.2g}"  # 0.0038x, not 0.00x
        click.echo(f"{name:<44}{r['batch_size']:>6}{r['p50_ms']:>10.2f}{r['p90_ms']:>10.2f}"
                   f"{ratio:>9}x{load:>10}" + (f"{decode:>11}" if packed else ""), err=quiet)
    if rows:
        cpu = rows[0]["cpu"]
        click.echo(f"cpu: {cpu['cpu']} ({cpu['int8_kernels']})" + (f"; {cpu['note']}" if cpu.get("note") else ""),
                   err=quiet)
        if threads is None and len({r["backend"] for r in rows}) > 1:  # unlike setups, said: not a column of None
            click.echo("threads: each runtime's default (onnxruntime one per physical core, LiteRT 1, PyTorch "
                       "its intra-op count); --threads N times them alike", err=quiet)
    if json_path:
        write_text_output(json_path, json.dumps(rows, indent=2) + "\n")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=PathType(dir_okay=False, path_type=Path))
def reseal(paths):
    """Record a plain .onnx / .tflite file's checksum again, after you changed the file on
    purpose (its metadata edited by another tool, say): the runtime refuses a file whose
    bytes no longer match the CRC-32 recorded at export, as it would a damaged copy.

    Only the 8 digits of the record change; the file is rewritten atomically. A file that
    matches is left as it is. A packed .esq is not resealed: unpack it, or pack it again.

    \b
    Examples:
      edgesqueeze reseal model.int8.tflite
      edgesqueeze reseal export/*.onnx export/*.tflite
    """
    from edgesqueeze._io import once_each

    from edgesqueeze.errors import EdgesqueezeError

    unique = once_each(paths)[0]
    failed = []
    for path in map(Path, unique):
        try:
            _reseal_one(path)
        except EdgesqueezeError as exc:
            if len(unique) == 1:
                raise
            failed.append(exc)  # the others are still resealed (it stopped at the first packed file)
    _raise_first(failed, "not resealed")


def _reseal_one(path: Path) -> None:
    from edgesqueeze._io import write_bytes_atomic
    from edgesqueeze.errors import FormatError
    from edgesqueeze.format.container import MAGIC
    from edgesqueeze.format.seal import KEY, check_seal, seal

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if data[:len(MAGIC)] == MAGIC:
        raise DataError(f"{path}: a packed or checkpoint archive checks itself (SHA-256 in its header); "
                        f"reseal takes a plain .onnx or .tflite file")
    from edgesqueeze.runtime import load

    try:  # a file the runtime cannot open (truncated, not a model, a .tflite named .onnx) must not get a
        # valid checksum, nor be told that its checksum matches
        load(path, check=False)
    except FormatError as exc:
        raise DataError(f"{path}: not a model the runtime opens, so it is not resealed ({str(exc).removeprefix(f'{path}: ')})") from None
    try:
        if check_seal(data, str(path)) is not None:
            click.echo(f"{path}: its checksum ({KEY}) already matches; nothing to do")
            return
    except FormatError:
        pass  # the bytes changed, or the record itself: what reseal is for
    try:
        sealed = seal(data)
    except FormatError as exc:
        raise DataError(f"{path}: {exc}") from None
    if sealed == data:
        raise DataError(f"{path}: records no {KEY} (exported before the record existed, or not by edgesqueeze); "
                        f"nothing to reseal")
    write_bytes_atomic(path, sealed)
    click.echo(f"{path}: {KEY} recorded again ({check_seal(sealed, str(path))}); no other byte changed")
