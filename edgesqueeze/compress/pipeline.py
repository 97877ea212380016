"""The compress pipeline: three modes, chosen by which stages the recipe names.

The order of the stages lives here and only here; each stage's maths lives in its module
(``fold``, ``prune``, ``cluster``, ``ptq``; the archive: ``edgesqueeze.format``). Data flows one way::

    retrain:  checkpoint -> prune (masks fixed while retraining, BatchNorm still there to help)
                         -> fold BatchNorm (zeros stay zeros) -> k-means weight sharing
                         -> retrain centroids -> .esq -> decode check
    ptq:      checkpoint -> fold BatchNorm -> post-training re-clustering to a byte budget from
                            calibration images only (zeros kept) -> .esq -> decode check
    lossless: checkpoint -> .esq (existing zeros and codebooks kept) -> decode check, bit-identical

Accuracy is measured on the validation split after every stage (the split carved from the
training set with the checkpoint's own seed, so it was never trained on) and on the test
split once, at the end, for the report. Post-training runs also score the original against
the compressed model (top-1 of each, agreement, KL) on the test images not used for
calibration, and, when calibration images came from the test split, on all of them, labelled
in-sample.

The stages themselves are in :mod:`.stages`; what every mode shares (the stage log, encoding
and the report) in :mod:`.run`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch

from edgesqueeze._io import output_locks, sha256_file
from edgesqueeze.checkpoint import state_digest
from edgesqueeze.compress import stages
from edgesqueeze.compress.inputs import check_fits, load_inputs
from edgesqueeze.compress.prune import existing_masks
from edgesqueeze.compress.ptq import record_written
from edgesqueeze.compress.run import CompressResult, Run, state_of
from edgesqueeze.config.compress import CompressConfig
from edgesqueeze.errors import DataError, EdgesqueezeError, RecipeError
from edgesqueeze.format.codec import CHUNK

Log = Callable[[str], None]


@output_locks()  # the output folder is this run's until it returns
def compress(
    checkpoint: str | Path,
    config: CompressConfig,
    *,
    out_dir: str | Path,
    seed: int = 0,
    data_dir: str | Path | None = None,
    dataset: str | None = None,
    default_dataset: str | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_pickle: bool = False,
    input_meta: dict | None = None,
    recipe_hash: str | None = None,
    recipe_path: str | Path | None = None,
    recipe_name: str | None = None,
    teacher: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    log: Log | None = print,
    inputs: Sequence[tuple[str, str | Path | None]] = (),
) -> CompressResult:
    """Compress the model in ``checkpoint`` into ``out_dir/model.esq`` with a report.

    ``checkpoint`` is an edgesqueeze checkpoint, a ``.esq`` archive, or a plain state_dict
    with ``arch`` (and ``arch_kwargs``). ``dataset`` overrides the one the checkpoint records;
    ``default_dataset`` is used only when it records none (a plain state_dict). What runs is
    :attr:`CompressConfig.mode`: retraining stages, post-training (``ptq``), or a lossless
    re-encoding, which alone can run without a dataset (then nothing is evaluated).

    ``teacher`` is the model retraining distils from when a ``*_finetune.distill`` is set
    [default: ``checkpoint`` itself]; give the float original when ``checkpoint`` is an
    already pruned model (a previous run's ``pruned.pt``).

    ``recipe_path``: the recipe the settings came from, which no output may replace (a
    ``report.md`` that is a link to it); ``inputs``: more ``(what, path)`` files read, which
    no output may replace either (a ``--classes @FILE``).

    ``resume``: when ``out_dir/pruned.pt`` was written by an earlier run from the same file
    with the same prune settings, seed and data, start from it instead of pruning again; a
    retraining that was interrupted goes on after its last finished epoch
    (``out_dir/prune-retrain.state.pt``, ``centroid-retrain.state.pt``: :class:`~.finetune.EpochState`).

    ``progress``: bars on standard error (None: when it is a terminal); ``log``: told each line
    (None: nothing). The caller's torch random state is given back, as :func:`~edgesqueeze.train.fit`
    gives it back.
    """
    if not isinstance(config, CompressConfig):  # a recipe's section left out is None: one line, not 'no .mode'
        raise RecipeError(f"compress takes a CompressConfig (a recipe's 'compress' section: Recipe.compress, or "
                          f"CompressConfig() for a lossless re-encoding), got {type(config).__name__}")
    if log is None:
        log = _silent
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    with torch.random.fork_rng(devices=[]):  # retraining seeds torch's generator: the caller's comes back
        return _compress(checkpoint, config, out_dir=out_dir, seed=seed, data_dir=data_dir, dataset=dataset,
                         default_dataset=default_dataset, arch=arch, arch_kwargs=arch_kwargs,
                         trust_pickle=trust_pickle, input_meta=input_meta, recipe_hash=recipe_hash,
                         recipe_path=recipe_path, recipe_name=recipe_name, teacher=teacher, resume=resume,
                         progress=progress, log=log, inputs=inputs)


def _silent(_msg: str) -> None:
    pass


def _compress(checkpoint, config, *, out_dir, seed, data_dir, dataset, default_dataset, arch, arch_kwargs,
              trust_pickle, input_meta, recipe_hash, recipe_path, recipe_name, teacher, resume, progress, log,
              inputs) -> CompressResult:
    t_start = time.perf_counter()
    from edgesqueeze import distributed

    if distributed.launched() and config.mode != "retrain":
        from edgesqueeze.distributed import DistributedError

        what = "compress.ptq" if config.mode == "ptq" else "a lossless re-encoding (no prune/cluster/ptq section)"
        raise DistributedError(f"{what} trains nothing, so torchrun has nothing to spread over processes: run "
                               "'edgesqueeze compress' without torchrun (torchrun helps prune_finetune and "
                               "cluster_finetune)")
    _outputs_clear_of_inputs(Path(checkpoint), Path(out_dir), teacher, recipe_path, inputs)
    from edgesqueeze._io import check_writable
    from edgesqueeze.compress.stages import CLUSTER_STATE, PRUNE_STATE, PRUNED_NAME

    for name in (*_FINAL_OUTPUTS, PRUNED_NAME, PRUNE_STATE, CLUSTER_STATE):
        check_writable(Path(out_dir) / name)  # before the retraining, not after it
    if config.mode != "lossless":  # a device or precision this machine lacks: one line, before anything is read
        from edgesqueeze.device import check_precision, resolve_device

        for key in ("prune_finetune", "cluster_finetune", "calibration"):
            device = resolve_device(getattr(config, key).device, what=f"compress.{key}.device")
            if key != "calibration" and config.mode == "retrain":
                check_precision(getattr(config, key).precision, device, what=f"compress.{key}.precision")
    distills = config.mode == "retrain" and any(
        f.distill is not None for f in (config.prune_finetune, config.cluster_finetune))
    if teacher is not None and not distills:
        raise RecipeError("--teacher: only retraining with distillation uses a teacher; set "
                          "compress.prune_finetune.distill or compress.cluster_finetune.distill (e.g. to {})")
    inp = load_inputs(checkpoint, dataset=dataset, default_dataset=default_dataset, data_dir=data_dir,
                       arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_meta=input_meta,
                       need_data=config.mode != "lossless", log=log)
    from edgesqueeze.models.layers import keep_layers, prunable_layers

    if inp.meta.get("program") and config.mode == "retrain":
        from edgesqueeze.errors import ModelError

        kind = "TorchScript archive" if inp.meta["program"]["kind"] == "torchscript" else "torch.export program"
        raise ModelError(f"{checkpoint}: is a {kind}; pruning and weight sharing with retraining need the model's "
                         "Python class (to train it): save model.state_dict() and pass --arch package.module:Class "
                         "(or path/to/file.py:Class). On this file, compress.ptq (post-training, to a byte budget) "
                         "and the lossless re-encoding (no prune/cluster/ptq section) work")

    if distills and teacher is None and inp.meta.get("compress_stage") == "prune":
        log(f"note: {checkpoint} is a pruned.pt and no --teacher was given: retraining distils from it, the "
            "pruned model; pass --teacher with the float model it was pruned from to learn that model's outputs")
    if config.mode == "retrain" and inp.loaded.kind == "esq":
        log(f"note: {checkpoint} is already a compressed archive (its weights pruned, shared and possibly "
            "BatchNorm-folded): pruning and clustering it again starts from those, and retraining a folded model "
            "at the recipe's learning rates can diverge; to try other settings, compress the float model, or "
            "its pruned.pt with compress.prune: null")
    kept = keep_layers(inp.loaded.model, config.keep_layers)
    if config.mode == "retrain":  # layer names, before an earlier run's results are removed below
        if config.prune is not None:
            config.prune.explicit(inp.loaded.model, path="compress.prune")
        if config.cluster is not None:
            config.cluster.bits_for(inp.loaded.model, path="compress.cluster")
    if config.fold_batchnorm:  # a model fx cannot trace is refused now, not after the pruning's retraining
        from edgesqueeze.models.fold import conv_bn_pairs

        conv_bn_pairs(inp.loaded.model)
    if kept:
        log(f"compress.keep_layers: {len(kept)} layers left as they are ({', '.join(kept[:6])}"
            f"{', ...' if len(kept) > 6 else ''})")
    if not prunable_layers(inp.loaded.model):
        from edgesqueeze.errors import ModelError

        if kept:  # the model has layers; the recipe kept every one
            raise RecipeError(f"compress.keep_layers: keeps every Conv2d and Linear layer of {checkpoint} "
                              f"({len(kept)}), so there is nothing left to prune, share or code; keep fewer")
        raise ModelError(f"{checkpoint}: has no Conv2d or Linear layer, so there is nothing to prune, share or "
                         "code; compress works on the weights of convolutions and fully connected layers")
    stale = Path(out_dir) / "pruned.pt"
    if config.mode != "retrain" and stale.exists():
        log(f"note: {stale} is from an earlier run in this folder; this one does not prune, so it stays as it was")
    teacher_model = None
    if teacher is not None:
        from edgesqueeze.checkpoint import load_model

        from edgesqueeze.errors import EdgesqueezeError

        # the same permission as the model compressed: the code --arch names, --trust-pickle
        try:
            loaded_teacher = load_model(teacher, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
        except EdgesqueezeError as exc:  # "nope.pt: no such file" did not say which option named it
            raise type(exc)(f"--teacher {exc}") from None
        teacher_model = loaded_teacher.model.eval()
        check_fits(teacher_model, inp.ds, teacher, {})
        for key, mine in (("mean", inp.mean), ("std", inp.std)):
            theirs = loaded_teacher.meta.get(key)
            if theirs is not None and not np.allclose(theirs, mine):
                raise DataError(f"--teacher {teacher}: normalizes inputs with {key} {list(theirs)}, but {checkpoint} "
                                f"with {list(mine)}; distil from a model trained on the same inputs")
    run = Run(checkpoint=Path(checkpoint), config=config, inp=inp, out=Path(out_dir), seed=seed,
               recipe_hash=recipe_hash, recipe_name=recipe_name, progress=progress, log=log, t_start=t_start,
               teacher=teacher_model if teacher_model is not None else inp.loaded.model,
               teacher_path=Path(teacher) if teacher is not None else None, resume=resume)
    stages.refuse_foreign_pruned(run)  # before the earlier run's archive is removed: a refused --resume kept nothing
    if not distributed.launched() or distributed._env_int("RANK", 0) == 0:  # one process removes them
        _clear_earlier_outputs(Path(out_dir), log)
    if config.mode == "lossless":
        return _compress_lossless(run)
    if config.mode == "ptq":
        return _compress_ptq(run)
    return _compress_retrain_distributed(run)


# what a finished run leaves in its folder (pruned.pt and the retraining state files stay:
# --resume reads them, and checks that they are this run's)
_FINAL_OUTPUTS = ("model.esq", "report.json", "report.md", "accuracy_vs_size.png", "weights_histogram.png")


def _outputs_clear_of_inputs(checkpoint: Path, out: Path, teacher, recipe_path=None, more=()) -> None:
    """Refuse an --out folder where an output would replace an input (compressing
    ``out/model.esq`` into ``out``, or ``out/pruned.pt`` with pruning; a ``report.md`` that
    is a link to the recipe): it was replaced. ``more``: other ``(what, path)`` inputs (a
    ``--classes @FILE``), refused as every command refuses an output over an input."""
    from edgesqueeze._io import outputs_clear_of_inputs
    from edgesqueeze.compress.stages import CLUSTER_STATE, PRUNE_STATE, PRUNED_NAME

    outputs_clear_of_inputs([("the output", out / n) for n in (*_FINAL_OUTPUTS, PRUNED_NAME, PRUNE_STATE,
                                                              CLUSTER_STATE)], more)
    inputs = {"the model": checkpoint, "--teacher": Path(teacher) if teacher is not None else None,
              "the recipe": Path(recipe_path) if recipe_path is not None else None}
    for name in (*_FINAL_OUTPUTS, PRUNED_NAME, PRUNE_STATE, CLUSTER_STATE):
        target = out / name
        for what, path in inputs.items():
            if path is not None and target.exists() and path.exists() and target.resolve() == path.resolve():
                raise RecipeError(f"--out {out}: {name} there is {what} compress reads ({path}), and compress "
                                  f"writes {name} in its --out folder or removes an earlier run's; give another "
                                  "--out folder")


def _clear_earlier_outputs(out: Path, log: Log) -> None:
    """Remove an earlier run's final files from ``out`` before this run starts, so that an
    interrupted run never leaves the old model.esq and report beside its own pruned.pt."""
    from edgesqueeze._io import lock_output_folder, remove_earlier_outputs, remove_stale_temps

    lock_output_folder(out, "edgesqueeze compress")  # another run's files and temporary files are not stale
    from edgesqueeze.compress.stages import CLUSTER_STATE, PRUNE_STATE, PRUNED_NAME

    # a killed run (SIGKILL) can die inside an atomic write: its own files' temporary files only
    remove_stale_temps(out, log, names=(*_FINAL_OUTPUTS, PRUNED_NAME, PRUNE_STATE, CLUSTER_STATE))
    old = remove_earlier_outputs(out, _FINAL_OUTPUTS)
    if old:
        log(f"note: {out}/ held an earlier run's {', '.join(p.name for p in old)}: removed (this run writes its own)")


def _compress_retrain_distributed(run: Run) -> CompressResult:
    """Retraining, in one process or, launched by torchrun, data-parallel over every process
    (:mod:`edgesqueeze.distributed`): each rank retrains on its slice of each global batch,
    rank 0 alone logs, evaluates and writes."""
    from edgesqueeze import distributed

    if not distributed.launched():
        return _compress_retrain(run)
    from edgesqueeze.device import resolve_device

    device = resolve_device(run.config.prune_finetune.device, what="compress.prune_finetune.device")
    group = distributed.setup(device)
    then = ("run the same launch again plus --resume (it goes on from the last finished epoch, or from "
            f"{run.out}/pruned.pt when pruning had finished)")
    states = (stages.PRUNED_NAME, stages.PRUNE_STATE, stages.CLUSTER_STATE)  # --resume is advised with one of them
    distributed.explain_termination(group, run.out, then, states)
    log = run.log
    run.group, run.log = group, (log if group.main else (lambda _m: None))
    run.progress = run.progress and group.main
    if group.main:
        log(f"compress: {group.world} processes (torch.distributed), rank 0 writes")
    try:
        result = _compress_retrain(run)
        distributed.barrier(group)  # every rank returns once the files are there
        return result
    except RuntimeError as exc:
        raise distributed.lost_contact(group, exc, run.out, then, states) from None
    finally:
        distributed.teardown(group)



def _compress_retrain(run: Run) -> CompressResult:
    """Deep Compression with retraining: prune, fold BatchNorm, cluster, retrain centroids."""
    inp, config = run.inp, run.config
    data = stages.retrain_data(run)
    model = copy.deepcopy(inp.loaded.model)  # the stages work in place; keep the original to compare
    dense_bytes = stages.start(run, model)
    masks, auto_scan = stages.prune(run, model, data)
    # Fold BatchNorm after pruning (retraining needs BN; a per-channel rescale keeps zeros) and
    # before weight sharing, so that what is clustered is exactly what runs.
    model, folded = stages.fold(run, model)
    model, assignments = stages.cluster(run, model, masks, data)
    if not run.main:  # rank 0 evaluates and writes the same model
        return CompressResult(model, run.out / "model.esq", 0, {}, run.out, main=False)
    test_before = run.test(inp.loaded.model)
    state, blob, stats, decoded, esq_path = stages.write_archive(
        run, model, folded=folded, reference_accuracy=test_before["accuracy"],
        shared=stages.shared_weight_names(model) if assignments else "auto",
        codebook_dtype=config.cluster.codebook_dtype if config.cluster else "float32")
    run.record("esq", decoded, len(blob), "decoded from the archive")
    test_after = run.test(decoded)
    extra: dict[str, Any] = {"evaluation": stages.evaluate_all(run, inp.loaded.model, decoded)}
    if auto_scan:
        extra["auto_sparsity"] = auto_scan
    if run.teacher_path is not None:
        extra["teacher"] = {"path": str(run.teacher_path), "sha256": sha256_file(run.teacher_path)}
    if config.prune is not None:
        extra["pruned_checkpoint"] = str(run.out / stages.PRUNED_NAME)
    if run.warnings:
        extra["warnings"] = run.warnings
    if run.distributed:
        extra["distributed"] = {"processes": run.group.world, **run.distributed}
    return run.finish(before=inp.loaded.model, decoded=decoded, blob=blob, stats=stats, state=state,
                      dense_bytes=dense_bytes, test_before=test_before, test_after=test_after,
                      bits={n: a.bits for n, a in assignments.items()}, esq_path=esq_path, extra=extra)


def _compress_ptq(run: Run) -> CompressResult:
    """Post-training: re-cluster the (pruned) model to ``ptq.target_bytes`` from calibration
    images only, keeping its zeros; then encode, decode-check, and score original against
    compressed on held-out images."""
    inp, cfg, log = run.inp, run.config, run.log
    original = inp.loaded.model
    calib, split, idx, held_x, held_y = stages.calibration_split(run)
    log(f"post-training compression: {len(calib)} calibration images from the {split} split of {inp.ds.name} "
        f"(seed {run.seed}); labels unused, no fine-tuning")
    model = copy.deepcopy(original)
    dense_bytes = stages.start(run, model)
    model, folded = stages.fold(run, model)  # cluster what runs
    masks_before = existing_masks(model)
    held_before = run.test(original, held_x, held_y)
    ref_acc = held_before.get("accuracy") if held_before else None
    model, assignments, ptq_report = stages.ptq(run, model, calib, folded=folded, reference_accuracy=ref_acc)
    # ptq sizes layers and checks its budget with the default chunk (a budget's bytes buy
    # fidelity, not the large-model chunk index): write the archive with the same one.
    state, blob, stats, decoded, esq_path = stages.write_archive(
        run, model, folded=folded, reference_accuracy=ref_acc, shared="auto",
        codebook_dtype=cfg.ptq.codebook_dtype, chunk=CHUNK)
    run.record("esq", decoded, len(blob), "decoded from the archive")
    record_written(ptq_report, stats, len(blob))
    target = cfg.ptq.target_bytes  # over it: ptq warned, the report says so, the CLI exits 1
    mask_kept = all(torch.equal(decoded.get_submodule(n).weight != 0, m) for n, m in masks_before.items())
    evaluation = stages.evaluate_held_out(run, original, decoded, n_calib=len(calib), split=split,
                                          held_x=held_x, held_y=held_y)
    test_after = run.test(decoded, held_x, held_y)
    extra = {
        "calibration": {"dataset": inp.ds.name, "split": split, "images": len(calib), "seed": run.seed,
                        "indices": [int(i) for i in idx]},
        "evaluation": evaluation,
        "ptq": {**ptq_report, "target_bytes": target,
                "within_target": target is None or len(blob) <= target, "mask_kept": mask_kept},
    }
    return run.finish(before=original, decoded=decoded, blob=blob, stats=stats, state=state,
                      dense_bytes=dense_bytes, test_before=held_before, test_after=test_after,
                      bits={n: a.bits for n, a in assignments.items()}, esq_path=esq_path, extra=extra)


def _compress_lossless(run: Run) -> CompressResult:
    """Re-encode without changing a weight: the codec keeps what it finds (zeros as gaps,
    codebooks of at most 256 values per tensor or per slice), and the decoded weights are
    compared bit for bit with the source's."""
    inp = run.inp
    model = inp.loaded.model
    dense_bytes = stages.start(run, model)
    test_before = run.test(model)
    # float16 codebooks only for tensors whose every value survives float16: still lossless.
    state, blob, stats, decoded, esq_path = stages.write_archive(
        run, model, folded=bool(inp.meta.get("folded_batchnorm")), shared="auto", codebook_dtype="float16",
        reference_accuracy=test_before["accuracy"] if test_before else None)
    digest = state_digest(state)
    found = stages.weights_found(stats, model)
    same_values = all(torch.equal(v, state[k]) for k, v in decoded.state_dict().items())  # -0.0 == 0.0 here
    # torch.nn.utils.prune's mask multiplication leaves -0.0 where it pruned a negative weight: the
    # archive stores a zero by its position alone, so it decodes +0.0, the same value (it was
    # refused as "changed a weight (a bug)", after a log line that said bit-identical)
    negative_zeros = sum(int(((v == 0) & torch.signbit(v)).sum()) for v in state.values()
                         if isinstance(v, torch.Tensor) and v.is_floating_point())
    canonical = {k: v + 0.0 if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}
    identical = same_values and state_digest(state_of(decoded)) == state_digest(canonical)
    bits = ("yes" if identical and not negative_zeros else
            f"yes but for the sign of {negative_zeros:,} zeros (-0.0 stored as 0.0, the same value)" if identical
            else "NO")
    run.log(f"lossless re-encoding (no prune, cluster or ptq section): {found['density']:.1%} of weights non-zero, "
            f"{found['shared_tensors']} of {found['weight_tensors']} weight tensors already shared (codebooks of at "
            f"most 256 values, per tensor or per slice), kept; weights bit-identical: {bits}")
    run.record("esq", decoded, len(blob), "decoded from the archive; lossless, " + (
        "bit-identical" if not negative_zeros else "the same values (negative zeros as zeros)"))
    test_after = run.test(decoded)
    extra = {"lossless": {"weights_identical": identical, "negative_zeros_stored_as_zeros": negative_zeros,
                          "source_weights_sha256": digest,
                          "decoded_weights_sha256": state_digest(state_of(decoded)), **found},
             "evaluation": stages.evaluate_all(run, model, decoded)}
    if not identical:  # cannot happen unless the codec is broken; never report it as lossless
        raise EdgesqueezeError("lossless re-encoding changed a weight (a bug)")
    return run.finish(before=model, decoded=decoded, blob=blob, stats=stats, state=state, dense_bytes=dense_bytes,
                      test_before=test_before, test_after=test_after, bits={}, esq_path=esq_path, extra=extra)
