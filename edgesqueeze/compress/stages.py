"""The compress pipeline's stages: each function is one step of a mode in :mod:`.pipeline`
(record the float model, prune and retrain, fold BatchNorm, cluster and retrain centroids,
post-training re-clustering, write the archive, score the result), logging its line and
appending its row to the run's stage log. The maths lives in ``prune``, ``cluster``, ``ptq``."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesqueeze.checkpoint import state_digest
from edgesqueeze.compress import cluster as cluster_mod
from edgesqueeze.compress.finetune import EpochState, finetune
from edgesqueeze.compress.prune import Pruner, existing_masks, layer_stats, resolve_auto
from edgesqueeze.compress.run import Run, compare, density, float_bytes, shared_weight_names, state_of
from edgesqueeze.data import calibration_indices
from edgesqueeze.errors import BudgetError, DataError, EdgesqueezeError, Note
from edgesqueeze.models.fold import conv_bn_pairs, fold_batchnorm
from edgesqueeze.models.layers import prunable_layers

PRUNED_NAME = "pruned.pt"
# the retraining stages' state after each finished epoch (compress --resume goes on from it)
PRUNE_STATE, CLUSTER_STATE = "prune-retrain.state.pt", "centroid-retrain.state.pt"


def start(run: Run, model: nn.Module) -> int:
    """Record the float model; returns its dense fp32 size in bytes."""
    dense_bytes = float_bytes(model)
    run.record("float", model, dense_bytes, "dense fp32")
    return dense_bytes


def retrain_data(run: Run) -> tuple:
    """``(x, y, dataset, augment)`` for retraining, normalized as the checkpoint says."""
    from edgesqueeze.data import default_augment

    inp = run.inp
    ds, (x_tr, y_tr) = inp.ds, inp.train
    if not len(x_tr):
        raise DataError(f"compress.prune / compress.cluster retrain on a training split, and dataset '{ds.name}' "
                        "has none; use compress.ptq (calibration images only) instead")
    ds_norm = dataclasses.replace(ds, mean=tuple(inp.mean), std=tuple(inp.std))
    return (x_tr, y_tr, ds_norm, default_augment(ds.name))


def prune(run: Run, model: nn.Module, data: tuple) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Keep existing zeros (an already pruned model) and, with ``compress.prune``, reach the
    targets while retraining, then save ``pruned.pt``. Returns the masks and, for
    ``sparsity: auto``, the scan."""
    config, log = run.config, run.log
    x_tr, x_val = run.inp.train[0], run.inp.val[0]
    masks = existing_masks(model)
    auto_scan: dict[str, Any] = {}
    if config.prune is None:
        return masks, auto_scan
    pcfg = config.prune
    if run.resume and (resumed := _resume_pruned(run, model)) is not None:
        return resumed, auto_scan
    if not run.resume and run.main:
        _remove_foreign_pruned(run)
    if pcfg.sparsity == "auto":
        if not len(x_val):
            raise EdgesqueezeError("compress.prune.sparsity: 'auto' needs a validation split to "
                                   "scan on; set numeric sparsities instead")
        log(f"sparsity auto: scanning {len(prunable_layers(model))} layers at "
            f"{', '.join(f'{s:.0%}' for s in pcfg.scan)} (max drop {pcfg.max_drop} points)")
        pcfg, auto_scan = resolve_auto(pcfg, model, run.val_acc, path="compress.prune")
        log("sparsity auto chose: " + ", ".join(f"{n} {s:.0%}" for n, s in pcfg.layers.items()))
    ft = config.prune_finetune
    steps = max(1, int(round(ft.epochs * max(1, len(x_tr) // ft.batch_size))))
    if pcfg.schedule == "gradual" and pcfg.end == 0:
        pcfg = dataclasses.replace(pcfg, end=max(pcfg.begin + 1, int(0.7 * steps)))
    elif pcfg.schedule == "gradual" and ft.epochs > 0 and pcfg.end > steps:
        # begin/end are optimizer steps: written as epochs (or past the retraining), the model
        # trained dense and was pruned to the target after its last step, with no retraining
        log(f"warning: compress.prune.end {pcfg.end} (begin {pcfg.begin}) is past the retraining's {steps} "
            "optimizer steps: the schedule counts steps, not epochs; the sparsity not reached by then is "
            "applied after the last step, with no retraining; set end (and begin) below "
            f"{steps}, or 0 for the default (0.7 of the steps)")
    pruner = Pruner(model, pcfg, keep=masks, path="compress.prune")
    before = run.stages[-1]["val_accuracy"]
    if pcfg.schedule == "oneshot" or ft.epochs <= 0:
        pruner.update(None)
        run.record("prune (before retraining)", model, None, f"{density(model):.1%} of conv and linear weights kept")
    def restore(masks: dict[str, torch.Tensor]) -> None:
        for name in pruner.masks:
            pruner.masks[name] = masks[name].to(dtype=torch.bool)
        pruner.apply_masks()

    state = EpochState(run.out / PRUNE_STATE, key=f"{run.source_sha256}:{prune_settings_sha256(run)}",
                       resume=run.resume, write=run.main, extra=lambda: dict(pruner.masks), restore=restore)
    finetune(model, data, ft, seed=run.seed, desc="prune-retrain", progress=run.progress,
             on_step=pruner.update if pcfg.schedule == "gradual" else None, attach=pruner.attach,
             teacher=run.teacher, log=log, group=run.group, state=state)
    pruner.update(None)
    pruner.detach()
    masks = pruner.masks
    same_on_every_rank(run, "masks", {n: m.to(torch.uint8) for n, m in masks.items()})
    run.record("prune", model, None, f"{density(model):.1%} of conv and linear weights kept")
    run.check_retraining("prune_finetune", model, before, what="pruning and retraining",
                         hint="lower the sparsity, or if retraining diverged:")
    if run.main:
        save_pruned(run, model)
    return masks, auto_scan


def same_on_every_rank(run: Run, what: str, tensors: dict[str, torch.Tensor]) -> None:
    """Under torchrun: check that every rank holds bit-identical ``tensors`` (the pruning
    masks, the codebooks and assignments) and note their digests for the report."""
    if run.group is None or not run.group.active:
        return
    from edgesqueeze import distributed

    every = distributed.same_on_every_rank(run.group, tensors, f"compress: the {what}")
    run.distributed[what] = {"sha256_by_rank": every, "identical": True}
    run.log(f"{what}: bit-identical on all {len(every)} ranks (sha256 {every[0][:16]}...)")


def _settings_sha256(run: Run, sections: tuple[str, ...]) -> str:
    """SHA-256 of the config ``sections`` (a fine-tune's device and precision left out, as in
    recipe hashes), keep_layers, the seed, the data and the teacher."""
    import hashlib
    import json

    from edgesqueeze.compress.run import jsonable

    c = run.config
    blob = {name: jsonable(v) if dataclasses.is_dataclass(v := getattr(c, name)) else v for name in sections}
    for name in sections:
        if name.endswith("_finetune"):
            blob[name] = {k: v for k, v in blob[name].items() if k not in ("device", "precision")}
    blob.update(keep_layers=list(c.keep_layers), seed=run.seed,
                dataset=run.inp.ds.name if run.inp.ds is not None else None,
                # the teacher's bytes, not its path: another model copied over teach.pt was resumed
                # from, one epoch distilled from each
                teacher=_teacher_sha256(run.teacher_path) if run.teacher_path else None)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _teacher_sha256(path) -> str:
    from edgesqueeze._io import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return str(path)  # loading it says what is wrong with it


def prune_settings_sha256(run: Run) -> str:
    """What determines the pruned model besides the input file: the prune and prune_finetune
    sections, the seed, the data and keep_layers (device and precision left out, as in recipe
    hashes). ``pruned.pt`` records it, and ``--resume`` reuses only a match."""
    return _settings_sha256(run, ("prune", "prune_finetune"))


def cluster_settings_sha256(run: Run) -> str:
    """What determines the weight-shared model besides the input file: everything pruning
    depends on, BatchNorm folding, and the cluster and cluster_finetune sections."""
    return _settings_sha256(run, ("prune", "prune_finetune", "fold_batchnorm", "cluster", "cluster_finetune"))


def _pruned_by_this_run(run: Run, meta: dict[str, Any]) -> bool:
    """Whether a ``pruned.pt`` with metadata ``meta`` is what this run's pruning writes: the
    same input file and prune settings, seed and data."""
    return (meta.get("pruned_from_sha256") == run.source_sha256
            and meta.get("prune_settings_sha256") == prune_settings_sha256(run))


def _pruned_file(run: Run, path: Path) -> tuple[Any, dict]:
    """``pruned.pt``'s payload and metadata, or an error when it is not this run's to resume."""
    import json

    from edgesqueeze.checkpoint import load_resume_file

    payload = load_resume_file(path, "an edgesqueeze checkpoint", "a pruned model to resume from",
                               "delete it, or leave out --resume, to prune again")
    meta = json.loads(payload.get("meta_json", "{}")) if isinstance(payload, dict) else {}
    if not _pruned_by_this_run(run, meta):
        raise EdgesqueezeError(f"{path}: was pruned from another model or with other prune settings, seed or data; "
                               f"leave out --resume (it is then pruned again and replaced) or use another --out")
    return payload, meta


def refuse_foreign_pruned(run: Run) -> None:
    """With --resume, a ``pruned.pt`` this run cannot resume from is refused before anything
    in the folder changes: the refusal came after the earlier run's finished archive and
    reports were removed, and they were lost."""
    from edgesqueeze import distributed

    path = run.out / PRUNED_NAME
    # under torchrun the ranks decide together (_resume_pruned): one rank refusing alone here
    # left the others waiting on it, and the refusal became a connection error
    if run.resume and run.config.prune is not None and path.is_file() and not distributed.launched():
        _pruned_file(run, path)


def _resume_pruned(run: Run, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """With ``--resume``: the weights of ``pruned.pt`` in ``model`` and its masks, when it was
    pruned from the same file with the same settings; None (prune again) when there is none."""
    from edgesqueeze import distributed
    from edgesqueeze.checkpoint import load_resume_file, load_state_dict_checked

    path = run.out / PRUNED_NAME
    # every rank resumes, or none: each looks on its own disk (refused when they disagree)
    if not distributed.same_file_on_every_rank(run.group, path):
        run.log(f"--resume: no {path}: " + ("pruning goes on from its last finished epoch"
                                            if (run.out / PRUNE_STATE).is_file() else "pruning from the start"))
        return None
    payload, meta = _pruned_file(run, path)
    from edgesqueeze.train import resume_threads

    resume_threads(meta.get("compress_threads"), run.log, "weight sharing")  # None in older files: as it is
    load_state_dict_checked(model, payload["state_dict"], source=str(path))
    masks = existing_masks(model)
    run.record("prune", model, None,
               f"{density(model):.1%} of conv and linear weights kept; resumed from {PRUNED_NAME}")
    run.log(f"--resume: pruning done by an earlier run ({path}); going on with weight sharing")
    # an interrupted pruning's epochs, from a run that pruned into this folder again: pruned.pt
    # stands for them now (the 0.7 MB file was left beside the finished archive)
    (run.out / PRUNE_STATE).unlink(missing_ok=True)
    return masks


def _remove_foreign_pruned(run: Run) -> None:
    """A run that prunes (without --resume) replaces ``pruned.pt`` once its pruning is done;
    an earlier run's one from another model or other prune settings is removed now, before
    the retraining: left there, it made ``--resume`` of this run, interrupted while pruning,
    refuse it and never reach this run's own epoch state. One from the same model and
    settings stays (it is what this run would write, and --resume may start from it); runs
    that do not prune leave it alone (compressing it with other cluster settings is its use)."""
    import json

    from edgesqueeze.checkpoint import load_resume_file

    path = run.out / PRUNED_NAME
    if not path.is_file() or path.is_symlink():
        return
    try:
        payload = load_resume_file(path, "an edgesqueeze checkpoint", "a pruned model", "")
        meta = json.loads(payload.get("meta_json", "{}")) if isinstance(payload, dict) else {}
    except Exception:  # noqa: BLE001 - damaged, or another kind of file: not this run's either
        meta = {}
    if _pruned_by_this_run(run, meta):
        return
    path.unlink()
    run.log(f"note: removed {path}: an earlier run pruned it from another model or with other prune settings, "
            "seed or data (this run writes its own once its pruning is done)")


def save_pruned(run: Run, model: nn.Module) -> Path:
    """Write the pruned model (BatchNorm not yet folded) as an ordinary checkpoint, so that
    other weight-sharing settings can be tried without pruning again: compress it with the
    same recipe and ``--set compress.prune=null`` (its zeros are kept as they are), and
    ``--teacher`` the original when distilling."""
    from edgesqueeze.checkpoint import save_checkpoint

    meta = {k: v for k, v in run.inp.meta.items() if k != "metrics"}
    meta.update(compress_stage="prune", pruned_from_sha256=run.source_sha256,
                prune_settings_sha256=prune_settings_sha256(run),
                # float sums depend on it: compress --resume from this file goes on with the same count
                compress_threads=torch.get_num_threads(),
                metrics={"val_accuracy": run.stages[-1]["val_accuracy"], "density": round(density(model), 4)})
    path = save_checkpoint(run.out / PRUNED_NAME, model, meta)
    run.log(f"pruned model (before weight sharing): {path}")
    return path


def _head_hint(run: Run) -> str:
    """Why retraining may diverge after a Linear head's BatchNorm1d was folded: a large fold
    scale passes every change upstream on to the head amplified, which the live BatchNorm
    used to normalize away."""
    big = {k: v for k, v in run.folded_head_scales.items() if v > 4}
    if not big:
        return ""
    layer, scale = max(big.items(), key=lambda kv: kv[1])
    return (f"the BatchNorm1d folded into {layer} scales its outputs up to {scale:.0f}x, so changes before it "
            f"reach the head amplified; set compress.fold_batchnorm: true to keep that BatchNorm (export folds "
            f"it, spreading the layer's shared values), or")


def fold(run: Run, model: nn.Module) -> tuple[nn.Module, bool]:
    """Fold BatchNorm into the layer before it when the config says so and there is any, so
    that what is clustered is exactly what runs (a per-channel rescale keeps zeros zero).
    Returns the model and whether the archive's model is folded; the pairs folded go to the
    archive's ``folded_layers`` (``run.folded_layers``), which loading folds again, unless
    they are every Conv2d -> BatchNorm2d pair and nothing else: what an archive without
    ``folded_layers`` means.

    A Linear -> BatchNorm1d head folds too with ``fold_batchnorm: all``, when the dataset's
    input shape shows it 2-D; its largest scale is kept for the retraining warning
    (``run.folded_head_scales``). An input archive folded before pairs were recorded (no
    ``folded_layers``) is not folded again: its archive could not say which pairs it holds."""
    meta = run.inp.meta
    folded = bool(meta.get("folded_batchnorm"))
    before = meta.get("folded_layers")
    if (folded and before is None) or not run.config.fold_batchnorm:
        return model, folded
    heads = run.config.fold_batchnorm == "all" and run.inp.ds is not None
    example = torch.zeros(2, *run.inp.ds.input_shape) if heads else None
    tied: dict[str, list[str]] = {}
    pairs = conv_bn_pairs(model, example, tied=tied)
    for layer, bns in tied.items():
        warnings.warn(f"fold_batchnorm: {layer} -> {', '.join(bns)} not folded: {layer} or its BatchNorm is "
                      "applied more than once, and a fold into one weight would change every call", Note)
    if pairs:
        for layer, bn_name in pairs:
            if isinstance(model.get_submodule(layer), nn.Linear):
                bn = model.get_submodule(bn_name)
                scale = (bn.weight.detach().abs() if bn.weight is not None else 1) / torch.sqrt(bn.running_var + bn.eps)
                run.folded_head_scales[layer] = float(scale.max())
        # conv pairs do not depend on the example, so the pairs are legacy_pairs(model) exactly when all are Conv2d
        legacy = before is None and all(isinstance(model.get_submodule(c), nn.Conv2d) for c, _ in pairs)
        model = fold_batchnorm(model, pairs)
        folded = True
        # recorded only when loading could not tell: every Conv2d pair and nothing else is what an
        # archive without folded_layers means (115 B of a 17 KB digits archive otherwise)
        run.folded_layers = None if legacy else [list(p) for p in (before or [])] + [list(p) for p in pairs]
        run.record("fold-bn", model, None, "BatchNorm folded into the layers before it")
    return model, folded


def cluster(run: Run, model: nn.Module, masks: dict, data: tuple) -> tuple[nn.Module, dict[str, Any]]:
    """With ``compress.cluster``: k-means weight sharing (zeros kept), then retrain the
    centroids. Returns the model and its per-layer assignments (empty without clustering)."""
    config = run.config
    assignments: dict[str, Any] = {}
    if config.cluster is None:
        return model, assignments
    model, assignments = _cluster_once(run, model, masks)
    cluster_mod.round_biases(model, config.cluster.bias_dtype, assignments)
    run.record("cluster (before retraining)", model, None)
    if config.cluster_finetune.epochs > 0:
        import copy

        before = (copy.deepcopy(model.state_dict()), copy.deepcopy(assignments))
        cluster_mod.share_weights(model, assignments, codebook_dtype=config.cluster.codebook_dtype)
        state = EpochState(run.out / CLUSTER_STATE, key=f"{run.source_sha256}:{cluster_settings_sha256(run)}",
                           resume=run.resume, write=run.main)
        finetune(model, data, config.cluster_finetune, seed=run.seed + 1, desc="centroid-retrain",
                 progress=run.progress, teacher=run.teacher, log=run.log, group=run.group, state=state)
        assignments = cluster_mod.materialize(model)
        cluster_mod.round_biases(model, config.cluster.bias_dtype, assignments)
        run.record("cluster", model, None, "centroids retrained")
        if run.check_retraining("cluster_finetune", model, run.stages[-2]["val_accuracy"], hint=_head_hint(run),
                                then=": the centroids before retraining are kept"):
            # a diverged retraining is undone: the k-means centroids it started from (same
            # assignments, same sharing) are what the archive gets, not a dead network
            model.load_state_dict(before[0])
            assignments = before[1]
            run.record("cluster (retraining undone)", model, None, "k-means centroids, not retrained")
    same_on_every_rank(run, "codebooks", {f"{n}.{k}": t for n, a in assignments.items()
                                          for k, t in (("codebook", a.codebook), ("labels", a.labels))})
    model.eval()
    return model, assignments


def _cluster_once(run: Run, model: nn.Module, masks: dict) -> tuple[nn.Module, dict[str, Any]]:
    """k-means weight sharing; under torchrun on rank 0 alone, its codebooks and assignments
    broadcast to the other ranks, which put the same shared weights in their copy."""
    group, cfg = run.group, run.config.cluster
    if group is None or not group.active:
        return cluster_mod.cluster_model(model, cfg, masks, path="compress.cluster")
    from edgesqueeze import distributed

    assignments = None
    if group.main:
        model, assignments = cluster_mod.cluster_model(model, cfg, masks, path="compress.cluster")
    assignments = distributed.broadcast_object(group, assignments)
    if not group.main:
        model = cluster_mod.apply_assignments(copy.deepcopy(model), assignments)
    return model, assignments


def write_archive(run: Run, model: nn.Module, *, folded: bool, reference_accuracy: float | None, shared: Any,
                  codebook_dtype: str, chunk: int | None = None) -> tuple[dict, bytes, list, nn.Module, Path]:
    """Encode ``model`` into ``model.esq`` and prove it decodes to exactly the model held in
    memory. Returns ``(state, blob, layer stats, decoded model, path)``."""
    state = state_of(model)
    meta = run.archive_meta(folded=folded, weights_sha256=state_digest(state), reference_accuracy=reference_accuracy)
    return (state, *run.encode(state, meta, shared=shared, codebook_dtype=codebook_dtype, chunk=chunk,
                               extra=program_extra(run, model), stored=model))


def program_extra(run: Run, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """For a TorchScript / torch.export model, the tensor its code travels in (a zeroed,
    LZMA'd skeleton of the model as stored: see :func:`edgesqueeze.models.program.skeleton_for`);
    ``None`` for a model rebuilt from its class. The skeleton holds no weight value, so it is
    made once per run (post-training compression reserves its bytes before sizing layers)."""
    program = run.inp.meta.get("program")
    if not program:
        return None
    keys = tuple(model.state_dict())
    cached = getattr(run, "_program_extra", None)
    if cached is not None and cached[0] == keys:
        return cached[1]
    from edgesqueeze.checkpoint import PROGRAM_TENSOR, program_tensor
    from edgesqueeze.models.program import skeleton_for

    # the dataset's images, or the shape given (--input-shape: a lossless run without data)
    shape = run.inp.ds.input_shape if run.inp.ds is not None else run.inp.meta.get("input_shape")
    example = torch.zeros(2, *shape) if shape else None
    skeleton = skeleton_for(program["kind"], model, run.inp.loaded.source_program, example)
    extra = {PROGRAM_TENSOR: program_tensor(skeleton)}
    run._program_extra = (keys, extra)
    return extra


def evaluate_all(run: Run, original: nn.Module, decoded: nn.Module) -> dict[str, Any]:
    """The ``evaluation`` section: original against compressed on all test images (empty
    without a dataset)."""
    inp = run.inp
    if inp.ds is None:
        return {}
    return {"all": {"label": f"all {len(inp.ds.test_y)} test images of {inp.ds.name}",
                    **compare(original, decoded, inp.ds.test_x, inp.ds.test_y, mean=inp.mean, std=inp.std,
                              batch_size=run.config.eval_batch_size)}}


def weights_found(stats: list, model: nn.Module) -> dict[str, Any]:
    """What the source already was: its density and how many weight tensors the codec found
    shared (at most 256 distinct values), i.e. the zeros and codebooks a re-encoding keeps."""
    names = set(shared_weight_names(model))
    weights = [s for s in stats if s.name in names]
    shared = [s for s in weights if s.kind == "shared"]
    rows = layer_stats(model)
    total = sum(r["numel"] for r in rows)
    distinct = [int(torch.unique(m.weight[m.weight != 0]).numel()) for m in prunable_layers(model).values()]
    return {"weight_tensors": len(weights), "shared_tensors": len(shared),
            "max_distinct_values": max(distinct, default=0),
            "density": round(sum(r["nonzero"] for r in rows) / total, 4) if total else 1.0}
def calibration_split(run: Run):
    """``(images, split, indices, held_x, held_y)``: calibration images drawn as
    :class:`CalibrationConfig` says, and the test images that were not drawn."""
    cfg, ds = run.config.calibration, run.inp.ds
    x_tr = run.inp.train[0]
    split = cfg.split if cfg.split != "auto" else ("train" if len(x_tr) else "test")
    if split == "train" and not len(x_tr):
        raise DataError(f"compress.calibration.split: 'train', but dataset '{ds.name}' has no training split; "
                        "use 'auto' or 'test'")
    pool = x_tr if split == "train" else ds.test_x
    n = min(cfg.images, len(pool))
    if n < cfg.images:
        run.log(f"warning: compress.calibration.images is {cfg.images} but the {split} split of {ds.name} has "
                f"{len(pool)} images; using all of them")
    idx = calibration_indices(len(pool), n, run.seed)  # the images export draws with the same seed
    if split == "test":
        keep = np.ones(len(ds.test_x), dtype=bool)
        keep[idx] = False
        held_x, held_y = ds.test_x[keep], ds.test_y[keep]
    else:
        held_x, held_y = ds.test_x, ds.test_y
    return np.asarray(pool[idx]), split, idx, held_x, held_y  # decoded when streamed from disk


def ptq(run: Run, model: nn.Module, calib: np.ndarray, *, folded: bool,
        reference_accuracy: float | None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Re-cluster ``model`` to ``compress.ptq.target_bytes`` from the calibration images only
    (:func:`~edgesqueeze.compress.ptq.post_training_compress`), keeping its zeros. Returns
    the model, its assignments and the ptq report."""
    from edgesqueeze.compress.ptq import post_training_compress
    from edgesqueeze.data import batches

    inp = run.inp
    calib_x = next(batches(calib, np.zeros(len(calib), dtype=np.int64), batch_size=len(calib),
                           shuffle=False, generator=None, mean=inp.mean, std=inp.std))[0]
    # The budget counts the archive as written: its metadata included, with a stand-in
    # weights hash (same length, same entropy) until the weights are known.
    budget_meta = run.archive_meta(folded=folded, weights_sha256=state_digest(state_of(model)),
                                   reference_accuracy=reference_accuracy)
    run.log(f"ptq: statistics on the calibration images, then every layer clustered at each candidate size "
            f"({len(prunable_layers(model))} layers; minutes for an ImageNet model on a CPU)")
    config = run.config.ptq
    extra = program_extra(run, model)
    if extra and config.target_bytes is not None:  # the program's skeleton ships in the same archive
        reserved = sum(t.numel() for t in extra.values()) + 64  # + its row in the raw table
        if reserved >= config.target_bytes:  # a size out of reach: exit 1, as when the smallest codebooks miss it
            raise BudgetError(f"compress.ptq.target_bytes: {config.target_bytes:,} B cannot hold even the model's "
                              f"code ({reserved:,} B of TorchScript / program skeleton); raise the target above "
                              f"{reserved:,} B. Nothing was written")
        run.log(f"ptq: {reserved:,} B of the budget hold the model's code (its zeroed, LZMA'd skeleton)")
        config = dataclasses.replace(config, target_bytes=config.target_bytes - reserved)
    from edgesqueeze.device import resolve_device

    device = resolve_device(run.config.calibration.device, what="compress.calibration.device")
    if device.type != "cpu":
        run.log(f"ptq: statistics pass on {device}")
    model, assignments, ptq_report = post_training_compress(model, calib_x, config, meta=budget_meta,
                                                            log=run.log, progress=run.progress, device=device)
    ks = [r["k"] for r in ptq_report["layers"]]
    run.record("ptq", model, ptq_report["summary"]["bytes"],
               f"k {min(ks)}{'' if min(ks) == max(ks) else f'-{max(ks)}'} per layer for a "
               f"{ptq_report['summary']['budget']:,} B budget")
    return model, assignments, ptq_report


def evaluate_held_out(run: Run, original: nn.Module, decoded: nn.Module, *, n_calib: int, split: str,
                      held_x, held_y) -> dict[str, Any]:
    """The ``evaluation`` section of a post-training run: original against compressed on the
    test images not used for calibration, and, when calibration came from the test split, on
    all of them (in-sample); one log line each."""
    inp = run.inp
    ds, ebs = inp.ds, run.config.eval_batch_size
    evaluation = {"held_out": {
        "label": (f"held-out: the {len(held_y)} test images not used for calibration" if split == "test"
                  else f"held-out: all {len(held_y)} test images (calibration used the training split)"),
        **compare(original, decoded, held_x, held_y, mean=inp.mean, std=inp.std, batch_size=ebs)}}
    if split == "test":
        evaluation["all"] = {
            "label": f"all {len(ds.test_y)} test images, {n_calib} of them calibration images (in-sample: optimistic)",
            **compare(original, decoded, ds.test_x, ds.test_y, mean=inp.mean, std=inp.std, batch_size=ebs)}
    for e in evaluation.values():
        if e["n"]:
            run.log(f"{e['label']}: top-1 {100 * e['top1_original']:.2f}% -> {100 * e['top1_compressed']:.2f}%, "
                    f"agreement {100 * e['agreement']:.2f}%, KL {e['kl']:.4f}")
    return evaluation
