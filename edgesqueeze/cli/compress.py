"""``edgesqueeze compress``, ``unpack``, ``sensitivity``: Deep Compression and the `.esq` archive."""

from __future__ import annotations

from pathlib import Path

import click

from edgesqueeze.cli._group import (RESUMABLE, FiniteRange, PathType, _progress_default, check_dataset_option, cli,
                                    device_option, model_options, names_a_folder, progress_bars)


@cli.command("compress")
@click.argument("model_path", type=PathType(dir_okay=False, path_type=Path))
@model_options(recipe_help="Recipe YAML with a 'compress' section (see recipes/); its 'model' section stands "
                           "for --arch, its 'data' for the dataset of a file that records none [default: none: "
                           "lossless re-encoding].", set_example="compress.ptq.target_bytes=480000")
@click.option("--data", "dataset", callback=check_dataset_option,
              help="Dataset [default: the checkpoint's, else the recipe's data section].")
@click.option("--out", "out_dir", type=PathType(file_okay=False, path_type=Path),
              help="Output directory [default: next to the model, <recipe name or model name>-compressed/].")
@click.option("--data-dir", type=PathType(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--teacher", type=PathType(dir_okay=False, path_type=Path),
              help="Model to distil from when a recipe's prune_finetune or cluster_finetune sets 'distill' "
                   "[default: MODEL_PATH itself]; the float original when MODEL_PATH is a pruned.pt.")
@click.option("--resume", is_flag=True,
              help="Go on where an earlier run into the same OUT stopped: from OUT/pruned.pt when pruning "
                   "had finished, else from the last finished epoch of the retraining it was in (each saves "
                   "OUT/<stage>.state.pt after every epoch), when it ran on the same model with the same "
                   "settings, seed and data. Writes the bytes an uninterrupted run writes.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: on a terminal].")
@device_option(what="the retraining stages and ptq's statistics pass (k-means and coding stay on the CPU)")
def compress_cmd(model_path, model_opts, dataset, out_dir, data_dir, teacher, resume, progress, device):
    """Compress a model into a .esq archive, with a report.

    \b
    What runs depends on the recipe's 'compress' section:
      prune / cluster  Deep Compression with retraining on the training split: prune by
                       magnitude, fold BatchNorm, k-means weight sharing with retrained
                       centroids, Huffman coding
      ptq              post-training, no training data: re-cluster an already pruned model
                       to compress.ptq.target_bytes from calibration images only, zeros kept
                       (a target it cannot reach exits 1, the archive written)
      (none, or no -r) lossless re-encoding: existing zeros and codebooks kept, weights
                       bit-identical to the source
    Every run checks that the archive decodes to exactly the weights it measured, and writes
    model.esq, report.json, report.md and plots; a run that prunes also writes pruned.pt, the
    model before weight sharing, to try other cluster settings without pruning again.

    \b
    Example:
      edgesqueeze compress artifacts/squeezenet-mnist/model.pt --recipe recipes/squeezenet-mnist.yaml
      edgesqueeze compress model.pt -r recipes/squeezenet-digits.yaml --set compress.cluster.bits=3
      # your own model: its class and a state_dict (or a pickle with --trust-pickle)
      edgesqueeze compress weights.pt --arch mypkg.nets:MobileNetV2 --arch-kwargs '{width: 0.5}' \\
          --data cifar10 -r recipes/squeezenet-cifar10.yaml
      # other weight sharing on the same pruned model, distilling from the original
      edgesqueeze compress out/pruned.pt -r recipes/squeezenet-cifar10.yaml --set compress.prune=null \\
          --set compress.cluster.bits=5 --set 'compress.cluster_finetune.distill={}' --teacher model.pt \\
          --out out-5bit
      # ImageNet SqueezeNet (plain state_dict, already pruned and shared): lossless, then 466 KB
      edgesqueeze compress ../shared/models/squeezenet1_0-imagenet.pt --arch squeezenet1_0 \\
          --data imagenet-sample --out runs/imagenet-lossless
      edgesqueeze compress ../shared/models/squeezenet1_0-imagenet.pt --arch squeezenet1_0 \\
          --data imagenet-sample -r recipes/squeezenet-imagenet.yaml --out runs/imagenet-ptq-466
    """
    from edgesqueeze.compress.pipeline import CompressConfig, compress
    from edgesqueeze.errors import RecipeError
    from edgesqueeze.recipe import Recipe

    model_opts.note_unused_sets(("model", "data.dataset", "data.data_dir", "compress", "seed", "name"), "compress")
    recipe = model_opts.recipe or Recipe(version=1)
    if model_opts.recipe_path and recipe.compress is None:
        raise RecipeError(f"{model_opts.recipe_path}: has no 'compress' section; see recipes/squeezenet-mnist.yaml "
                          "(or leave out --recipe for a lossless re-encoding)")
    name = recipe.name if model_opts.recipe_path else Path(model_path).stem
    config = recipe.compress or CompressConfig()
    if device:  # where retraining and ptq's statistics pass run: checked before anything is read
        import dataclasses

        from edgesqueeze.device import resolve_device

        resolve_device(device)
        config = dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k), device=device)
                                                for k in ("prune_finetune", "cluster_finetune", "calibration")})
    click.get_current_context().meta[RESUMABLE] = config.mode == "retrain"  # what an interrupt advises
    if resume and config.mode != "retrain":
        what = "compress.ptq" if config.mode == "ptq" else "a lossless re-encoding (no prune/cluster/ptq section)"
        click.echo(f"note: --resume: {what} has no epochs to go on from; it runs from the start", err=True)
    out = out_dir or Path(model_path).parent / f"{name}-compressed"
    result = compress(model_path, config, out_dir=out, seed=recipe.seed, dataset=dataset,
                      data_dir=data_dir or model_opts.data_dir,
                      recipe_hash=recipe.hash() if model_opts.recipe_path else None, recipe_path=model_opts.recipe_path,
                      recipe_name=recipe.name if model_opts.recipe_path else None,
                      teacher=teacher, resume=resume, inputs=[("--classes", model_opts.classes_file)],
                      progress=_progress_default() if progress is None else progress, log=lambda m: click.echo(m),
                      **model_opts.load_kwargs())
    if not result.main:  # another rank of a torchrun launch: rank 0 reports
        return
    from edgesqueeze.compress.report import size_table

    click.echo(size_table(result.report))
    totals, base = result.report.get("totals") or {}, result.report.get("baselines") or {}
    if config.mode == "retrain" and config.cluster is None and totals.get("esq_bytes", 0) > base.get("xz_9e", 1 << 62):
        # each non-zero value is its own codebook entry, coded as one, plus an index that says nothing
        click.echo(f"note: without weight sharing the .esq ({totals['esq_bytes']:,} B) is larger than xz -9e of the "
                   f"same weights ({base['xz_9e']:,} B): a pruned layer keeps as many distinct values as weights; add "
                   "compress.cluster (k-means weight sharing), which the .esq codes in a few bits a weight", err=True)
    written = [n for n in ("model.esq", "report.md", "report.json", "accuracy_vs_size.png", "weights_histogram.png")
               if (result.out_dir / n).exists()]
    click.echo(f"outputs: {result.out_dir}/ ({', '.join(written)})")
    ptq = result.report.get("ptq") or {}
    if ptq.get("within_target") is False:  # a size the recipe asked for and did not get: exit 1
        from edgesqueeze.errors import BudgetError

        cfg = ptq.get("config") or {}
        uniform = cfg.get("allocation") == "uniform"
        lower = "lower compress.ptq.min_bits" if cfg.get("min_bits", 2) > 1 else "min_bits is 1 already"
        why = ("with compress.ptq.allocation: uniform, which gives every layer compress.ptq.bits; lower the bits"
               if uniform else f"even with every layer at its smallest codebook; {lower}")
        raw = int(result.report["totals"].get("raw_bytes") or 0)
        beyond = (f" ({raw:,} B of the archive are raw tensors ptq does not code: biases, and weights that are "
                  "not Conv2d/Linear ones)" if raw > 0.1 * ptq["target_bytes"] else "")
        raise BudgetError(f"{result.out_dir / 'model.esq'}: {result.report['totals']['esq_bytes']:,} B is over "
                          f"compress.ptq.target_bytes ({ptq['target_bytes']:,} B) {why}, prune more before ptq, "
                          f"or raise the target{beyond}. The archive and its report are written")


def _write_stdout_whole(data: bytes, source: Path, out=None) -> None:
    """``data`` to standard output, or an OutputError (exit 2) when its reader stops first:
    the file is the output, so a reader gone after 100 bytes (`| head -c 100`, a dropped ssh)
    is a model not delivered, not the `| head -1` of a command's text (that exits 0)."""
    out = click.get_binary_stream("stdout") if out is None else out
    view, done = memoryview(data), 0
    try:
        while done < len(data):  # an unbuffered stream writes what the pipe takes (64 KiB) and says how much
            n = out.write(view[done:])
            done += len(data) - done if n is None else n
        out.flush()
    except BrokenPipeError:
        from edgesqueeze.cli._group import _to_devnull
        from edgesqueeze.errors import OutputError

        _to_devnull(out)
        raise OutputError(f"-o -: the reader of standard output stopped before the {len(data):,} bytes unpacked "
                          f"from {source} were all written; it does not have the whole file") from None


@cli.command()
@click.argument("esq_paths", nargs=-1, required=True, type=PathType(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "--out", "out_path", type=PathType(allow_dash=True),
              help="File to write: a checkpoint (.pt) for a checkpoint archive; for a packed file, the "
                   ".onnx/.tflite [default: its recorded name, beside it]; '-': standard output. A folder "
                   "(existing, or given with a trailing /) gets the file in it, under the packed file's "
                   "recorded name or the archive's name as .pt. --out is the same option, as the other "
                   "commands spell it.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists [default: refuse].")
def unpack(esq_paths, out_path, force):
    """Decode a .esq archive: a checkpoint archive into a normal edgesqueeze checkpoint, a
    packed .onnx.esq / .tflite.esq into its plain .onnx / .tflite. Several archives are
    unpacked one after another, each beside itself or into the folder -o names.

    Both are exact: the weights bit for bit, a packed file's bytes checked against the
    SHA-256 it recorded. A packed file unpacks without PyTorch (a device install); a
    checkpoint archive needs it. The code a checkpoint archive names as its architecture is
    not imported: its weights and metadata are written as stored.

    \b
    Examples:
      edgesqueeze unpack artifacts/squeezenet-digits/compressed/model.esq -o model.pt
      edgesqueeze unpack model.int8.tflite.esq -o plain.tflite  # the plain file, on a device given only the .esq
      edgesqueeze unpack export/*.esq -o plain/                  # each packed file's plain file, in plain/
    """
    from edgesqueeze._io import once_each

    unique, _ = once_each(esq_paths)
    if len(unique) > 1 and out_path == "-":
        raise click.UsageError(f"-o -: {len(unique)} archives cannot share standard output; unpack one at a time, "
                               "or give -o a folder")
    if len(unique) > 1 and out_path is not None and not names_a_folder(Path(out_path), out_path):
        raise click.UsageError(f"-o {out_path}: {len(unique)} archives to unpack, one output file; give -o a folder "
                               "(with a trailing /), or leave -o out to write each beside its archive")
    if len(unique) > 1:
        _no_two_to_one_name(list(map(Path, unique)), out_path)
    for esq_path in map(Path, unique):
        _unpack_one(esq_path, out_path, force, several=len(unique) > 1)


def _no_two_to_one_name(paths: list[Path], out_path) -> None:
    """Refuse, before the first is written, two archives that would unpack to one file (two
    exports' model.int8.tflite.esq into one folder): the second replaced the first (--force),
    or the run stopped halfway with "exists"."""
    import os

    from edgesqueeze.format import container
    from edgesqueeze.format.packed import PACKED_KEY

    folder = Path(out_path) if out_path is not None else None
    targets: dict[str, Path] = {}
    for p in paths:
        try:
            meta = container.read_esq(p).meta
        except Exception:  # noqa: BLE001 - unpacking it says what is wrong, in turn
            continue
        name = Path(meta[PACKED_KEY]["name"]).name if isinstance(meta.get(PACKED_KEY), dict) else f"{p.stem}.pt"
        target = os.path.realpath((folder or p.parent) / name)
        if target in targets:
            raise click.UsageError(f"{targets[target]} and {p} would both unpack to {target}; unpack them into "
                                   "separate folders (-o DIR/)")
        targets[target] = p


def _unpack_one(esq_path: Path, out_path, force: bool, *, several: bool = False) -> None:
    import os

    from edgesqueeze._io import check_writable, remove_stale_temps, write_bytes_atomic
    from edgesqueeze.verify import sniff

    what = sniff(esq_path)
    if what not in ("packed", "esq"):
        from edgesqueeze.errors import FormatError

        size = esq_path.stat().st_size
        found = (f"only {size} bytes: truncated?" if size < 8 else "a TFLite model" if what == "tflite"
                 else "a PyTorch checkpoint" if what == "pt" else "no .esq header: an ONNX model or another file")
        raise FormatError(f"{esq_path}: not an .esq archive ({found}); unpack takes a model.esq or a packed "
                          ".onnx.esq / .tflite.esq")

    to_stdout = out_path == "-"
    if to_stdout and click.get_binary_stream("stdout").isatty():  # as gzip -c and xz -c refuse
        raise click.UsageError("-o -: standard output is a terminal, and the file is binary; redirect it "
                               "(-o - > model.onnx) or pipe it, or give -o a file name")
    folder = None  # -o results/ (or an existing folder): the file goes in it, as cp does
    if out_path is not None and not to_stdout and names_a_folder(Path(out_path), out_path):
        folder, out_path = Path(out_path), None
        if folder.exists() and not folder.is_dir():  # mkdir said only "afile: File exists"
            raise click.UsageError(f"-o {folder}/: names a folder, but {folder} is a file; give a folder, or a file "
                                   "name without the trailing /")
    out_path = Path(out_path) if out_path is not None else None

    def check_target(target: Path, suffixes: tuple[str, ...], holds: str) -> None:
        if to_stdout:
            return
        check_writable(target)  # a folder, or a link loop, in the way
        if os.path.realpath(target) == os.path.realpath(esq_path):
            raise click.UsageError(f"{target}: would overwrite the archive itself; give another -o")
        if target.is_file() and not force:  # a device or pipe (/dev/stdout) is written into, not replaced
            raise click.UsageError(f"{target}: exists; pass --force to replace it, or -o another file")
        known = (".onnx", ".tflite", ".pt", ".pth", ".esq", ".pt2")
        if target.suffix.lower() in known and target.suffix.lower() not in suffixes:
            raise click.UsageError(f"{target}: {esq_path} holds {holds}; name the output {suffixes[0]} "
                                   f"(e.g. -o {target.with_suffix(suffixes[0]).name})")
        # a killed unpack's half-written file, of this name only: other files may lie beside it
        remove_stale_temps(target.parent, lambda m: click.echo(m, err=True), names={target.name})

    if what == "packed":
        from edgesqueeze.runtime._base import check_name, unpack_file
        from edgesqueeze.runtime._base import sniff as sniff_head

        data, packed = unpack_file(esq_path)

        check_name(esq_path, "tflite" if sniff_head(data[:64]) == "tflite" else "onnx", packed=True)  # as run does
        out_path = out_path or (folder or esq_path.parent) / Path(packed["name"]).name
        inner = Path(packed["name"]).suffix.lower() or ".onnx"
        check_target(out_path, (inner,), f"a{'n ONNX' if inner == '.onnx' else ' TFLite'} model")
        if to_stdout:
            _write_stdout_whole(data, esq_path)
            click.echo(f"-: {len(data):,} bytes ({packed['format']}, SHA-256 checked) from {esq_path}", err=True)
            return
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out_path, data)
        # -o /dev/stdout or a pipe: the model's bytes went to stdout, so the line goes to stderr
        click.echo(f"{out_path}: {len(data):,} bytes ({packed['format']}, SHA-256 checked) from {esq_path}",
                   err=not out_path.is_file())
        return
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # first: on a device, -o model.pt would not help
        from edgesqueeze.errors import RuntimeBackendError

        # not a usage error (the command line is right): one `error:` line naming what to install
        raise RuntimeBackendError(f"{esq_path}: unpacking a checkpoint archive writes a PyTorch checkpoint, which "
                                  "needs torch, not installed here (pip install 'edgesqueeze[train]', or '.[train]' in "
                                  "a checkout, after torch itself as README 'Install' says); or use the .esq as it "
                                  "is: eval, export and verify read it, and a device runs its exported files")
    if out_path is None and folder is None:
        raise click.UsageError(f"{esq_path} is a checkpoint archive: " + (
            "give -o a folder (DIR/), which gets each file, this one as its name with .pt" if several
            else "pass -o model.pt"))
    out_path = out_path or folder / f"{esq_path.stem}.pt"
    check_target(out_path, (".pt", ".pth"), "a PyTorch checkpoint")
    from edgesqueeze.checkpoint import save_state, stored_weights

    state, meta, _ = stored_weights(esq_path)  # a TorchScript / program archive is refused there
    if to_stdout:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            save_state(Path(tmp) / "model.pt", state, meta)
            _write_stdout_whole((Path(tmp) / "model.pt").read_bytes(), esq_path)
        click.echo(f"-: {sum(t.numel() for t in state.values()):,} values from {esq_path}", err=True)
        return
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    save_state(out_path, state, meta)
    # -o /dev/stdout or a pipe: the checkpoint's bytes went to stdout, so the line goes to stderr
    click.echo(f"{out_path}: {sum(t.numel() for t in state.values()):,} values from {esq_path}",
               err=not out_path.is_file())


@cli.command()
@click.argument("model_path", type=PathType(dir_okay=False, path_type=Path))
@click.option("--sparsities", default="0.5,0.7,0.8,0.9,0.95", show_default=True,
              help="Comma-separated sparsities to try on each layer.")
@click.option("--layers", help="Comma-separated layer names [default: every Conv2d and Linear].")
@click.option("--max-drop", type=FiniteRange(min=0, max=100), help="Accuracy points a layer may lose; prints the "
              "largest sparsity per layer within it, ready for a recipe's compress.prune.layers [default: none: "
              "the table alone, no choice].")
@click.option("--out", "out_dir", type=PathType(file_okay=False, path_type=Path),
              help="Output directory [default: next to the model, sensitivity/].")
@click.option("--data", "dataset", callback=check_dataset_option,
              help="Dataset [default: the one the model records].")
@click.option("--data-dir", type=PathType(file_okay=False, path_type=Path), help="Look for dataset files here first.")
@click.option("--progress/--no-progress", default=None,
              help="A bar over the measurements, on standard error [default: on a terminal].")
@model_options
@device_option
def sensitivity(model_path, sparsities, layers, max_drop, out_dir, dataset, data_dir, progress, model_opts, device):
    """Prune each layer alone at several sparsities and measure validation accuracy.

    Writes sensitivity.md (the table), sensitivity.json and sensitivity.png.

    \b
    Example:
      edgesqueeze sensitivity artifacts/squeezenet-digits/model.pt --max-drop 0.2   # after make demo
    """
    from edgesqueeze.compress.sensitivity import sensitivity as run_sensitivity

    try:
        sps = sorted({float(x) for x in sparsities.split(",") if x.strip()})  # one measurement each
    except ValueError:
        raise click.BadParameter(f"{sparsities!r} is not a list of numbers", param_hint="--sparsities") from None
    if not sps:
        raise click.BadParameter("no sparsities given; give some, e.g. 0.5,0.8,0.9", param_hint="--sparsities")
    if not all(0 <= x < 1 for x in sps):
        raise click.BadParameter("each sparsity must be >= 0 and < 1", param_hint="--sparsities")
    names = [x.strip() for x in layers.split(",") if x.strip()] if layers is not None else None
    if names is not None and not names:  # "," scanned nothing and printed an empty table
        raise click.BadParameter(f"{layers!r} names no layer; give layer names, e.g. features.0,classifier.1",
                                 param_hint="--layers")
    model_opts.note_unused_sets(("model", "data.dataset", "data.data_dir"), "sensitivity")
    out = out_dir or Path(model_path).parent / "sensitivity"
    result = run_sensitivity(model_path, sparsities=sps, out_dir=out, max_drop=max_drop,
                             data_dir=data_dir or model_opts.data_dir,
                             dataset=dataset, model_args=model_opts.load_kwargs(), device=device,
                             layers=names,
                             inputs=model_opts.input_files,
                             log=lambda m: click.echo(m, err=True),  # stdout: the table alone
                             progress=progress_bars(progress))
    if dataset is None:
        model_opts.note_dataset_recorded(result.get("dataset"), "sensitivity")
    click.echo((out / "sensitivity.md").read_text())
    if "chosen" in result:
        # ready to paste into a recipe as it stands (it printed the layers alone, two spaces in, which
        # had to be re-indented under compress: prune: layers:)
        click.echo("for a recipe (compress.prune.layers; a denser model than the recipe's may need a lower "
                   "compress.cluster_finetune.lr or grad_clip for its centroid retraining):")
        click.echo("compress:\n  prune:\n    layers:")
        for name, sp in result["chosen"].items():
            click.echo(f"      {name}: {sp}")
