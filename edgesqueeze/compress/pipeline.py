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
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgesqueeze._io import sha256_file, write_bytes_atomic, write_text_atomic
from edgesqueeze.checkpoint import ESQ_META_FORMAT, esq_dumps, model_from_esq, state_digest
from edgesqueeze.compress import cluster as cluster_mod
from edgesqueeze.compress.prune import Pruner, existing_masks, layer_stats, resolve_auto
from edgesqueeze.config.compress import CompressConfig, FinetuneConfig
from edgesqueeze.errors import DataError, EdgesqueezeError, ModelError, RecipeError
from edgesqueeze.format.codec import CHUNK
from edgesqueeze.models.fold import conv_bn_pairs, fold_batchnorm
from edgesqueeze.models.layers import prunable_layers

Log = Callable[[str], None]


@dataclass
class CompressResult:
    model: nn.Module
    esq_path: Path
    esq_bytes: int
    report: dict[str, Any]
    out_dir: Path


# ---------------------------------------------------------------------------------------


def _float_bytes(model: nn.Module) -> int:
    """Bytes of the dense fp32 model: every floating tensor of its state_dict at 4 bytes."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if torch.is_floating_point(t))


def _finetune(model: nn.Module, data, cfg: FinetuneConfig, *, seed: int, desc: str, progress: bool,
              on_step: Callable[[int], None] | None = None, attach: Callable[[Any], None] | None = None,
              teacher: nn.Module | None = None, log: Log | None = None) -> int:
    """Fine-tune ``model`` in place for ``cfg.epochs``; returns the number of steps taken.
    With ``cfg.distill``, ``teacher`` (left untouched) supplies the soft targets. ``log``
    gets one line per epoch (what a run in the background shows of its progress)."""
    from edgesqueeze.train import DistillLoss, make_optimizer, train_one_epoch

    x, y, ds, augment = data
    if cfg.epochs <= 0:
        return 0
    steps_per_epoch = max(1, len(x) // cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    optimizer = make_optimizer(model, cfg)
    if attach is not None:
        attach(optimizer)
    gen = torch.Generator().manual_seed(seed)  # shuffling and augmentation
    torch.manual_seed(seed)  # dropout: same seed, same weights, same .esq bytes
    loss_fn: nn.Module = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.distill is not None:
        if teacher is None:  # a bug in a caller: the pipeline always passes one
            raise EdgesqueezeError(f"{desc}: distill is set but no teacher model was given")
        loss_fn = DistillLoss(alpha=cfg.distill.alpha, temperature=cfg.distill.temperature,
                              label_smoothing=cfg.label_smoothing)
        teacher = copy.deepcopy(teacher).eval()
        if cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)
    else:
        teacher = None
    step = 0
    from edgesqueeze.data import batches

    epochs = math.ceil(total / steps_per_epoch)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        it = batches(x, y, batch_size=cfg.batch_size, shuffle=True, generator=gen, mean=ds.mean, std=ds.std,
                     augment=augment if cfg.augment else None, drop_last=len(x) >= cfg.batch_size,
                     channels_last=cfg.channels_last)
        step, loss_sum, correct, seen = train_one_epoch(
            model, optimizer, it, cfg=cfg, steps=min(steps_per_epoch, total - step), step=step, total_steps=total,
            loss_fn=loss_fn, desc=f"{desc} {epoch + 1}", progress=progress, on_step=on_step, teacher=teacher)
        if log is not None and seen:
            log(f"  {desc} epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}, train accuracy "
                f"{100 * correct / seen:.2f}% ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return total


def shared_weight_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name in prunable_layers(model)]


def esq_meta(meta: dict, *, folded: bool, extra: dict) -> dict:
    """Archive metadata: the checkpoint's own (architecture, classes, normalization, ...)."""
    return {"format": ESQ_META_FORMAT, "folded_batchnorm": folded, **meta, **extra}


# ---------------------------------------------------------------------------------------


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
    recipe_hash: str | None = None,
    teacher: str | Path | None = None,
    progress: bool = True,
    log: Log = print,
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
    """
    t_start = time.perf_counter()
    distills = config.mode == "retrain" and any(
        f.distill is not None for f in (config.prune_finetune, config.cluster_finetune))
    if teacher is not None and not distills:
        raise RecipeError("--teacher: only retraining with distillation uses a teacher; set "
                          "compress.prune_finetune.distill or compress.cluster_finetune.distill (e.g. to {})")
    inp = _load_inputs(checkpoint, dataset=dataset, default_dataset=default_dataset, data_dir=data_dir,
                       arch=arch, arch_kwargs=arch_kwargs, need_data=config.mode != "lossless")
    teacher_model = None
    if teacher is not None:
        from edgesqueeze.checkpoint import load_model

        loaded_teacher = load_model(teacher)
        teacher_model = loaded_teacher.model.eval()
        _check_fits(teacher_model, inp.ds, teacher, {})
        for key, mine in (("mean", inp.mean), ("std", inp.std)):
            theirs = loaded_teacher.meta.get(key)
            if theirs is not None and not np.allclose(theirs, mine):
                raise DataError(f"--teacher {teacher}: normalizes inputs with {key} {list(theirs)}, but {checkpoint} "
                                f"with {list(mine)}; distil from a model trained on the same inputs")
    run = _Run(checkpoint=Path(checkpoint), config=config, inp=inp, out=Path(out_dir), seed=seed,
               recipe_hash=recipe_hash, progress=progress, log=log, t_start=t_start,
               teacher=teacher_model if teacher_model is not None else inp.loaded.model,
               teacher_path=Path(teacher) if teacher is not None else None)
    if config.mode == "lossless":
        return _compress_lossless(run)
    if config.mode == "ptq":
        return _compress_ptq(run)
    return _compress_retrain(run)


@dataclass
class _Inputs:
    """The model to compress, its metadata, and (when known) its dataset and splits."""

    loaded: Any  # checkpoint.LoadedModel
    meta: dict[str, Any]
    ds: Any = None  # data.Dataset, or None for a lossless run without data
    train: tuple = ((), ())
    val: tuple = ((), ())
    mean: Any = None
    std: Any = None


@dataclass
class _Run:
    """What every mode shares: inputs, output folder, the stage log, evaluation helpers."""

    checkpoint: Path
    config: CompressConfig
    inp: _Inputs
    out: Path
    seed: int
    recipe_hash: str | None
    progress: bool
    log: Log
    t_start: float
    teacher: nn.Module | None = None  # what retraining distils from (the checkpoint, or --teacher)
    teacher_path: Path | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @functools.cached_property
    def source_sha256(self) -> str:
        """SHA-256 of the input file (read once: the archive and ``pruned.pt`` both record it)."""
        return sha256_file(self.checkpoint)

    def val_acc(self, m: nn.Module) -> float | None:
        from edgesqueeze.evaluate import evaluate

        x_val, y_val = self.inp.val
        if self.inp.ds is None or not len(x_val):
            return None
        return evaluate(m, x_val, y_val, mean=self.inp.mean, std=self.inp.std,
                        batch_size=self.config.eval_batch_size)["accuracy"]

    def test(self, m: nn.Module, x=None, y=None) -> dict[str, float] | None:
        from edgesqueeze.evaluate import evaluate

        if self.inp.ds is None:
            return None
        x, y = (self.inp.ds.test_x, self.inp.ds.test_y) if x is None else (x, y)
        return evaluate(m, x, y, mean=self.inp.mean, std=self.inp.std, batch_size=self.config.eval_batch_size)

    def record(self, stage: str, m: nn.Module, size: int | None, note: str = "") -> None:
        acc = self.val_acc(m)
        self.stages.append({"stage": stage, "val_accuracy": acc, "bytes": size, "note": note})
        acc_txt = f"val {100 * acc:.2f}%" if acc is not None else "no val split"
        self.log(f"[{stage}] {acc_txt}" + (f", {size:,} B" if size else "") + (f" ({note})" if note else ""))

    def check_retraining(self, section: str, model: nn.Module, before: float | None, *,
                         what: str = "retraining", hint: str = "") -> None:
        """Refuse non-finite weights, naming the stage; warn, in the log and the report, when
        retraining took validation accuracy from ``before`` more than halfway down to chance:
        the run diverged (a dead network still encodes fine, and its archive would otherwise
        look like any other)."""
        for name, tensor in model.state_dict().items():
            if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
                raise EdgesqueezeError(f"compress.{section}: retraining diverged ({name} has NaN or infinite "
                                       f"values); lower compress.{section}.lr or set compress.{section}.grad_clip")
        after = self.stages[-1]["val_accuracy"]
        if before is None or after is None or self.inp.ds is None:
            return
        chance = 1 / self.inp.ds.num_classes
        if after < chance + 0.5 * (before - chance):
            msg = (f"compress.{section}: {what} took validation accuracy from {100 * before:.2f}% to "
                   f"{100 * after:.2f}% (chance {100 * chance:.0f}%); {hint or 'it diverged'}: lower "
                   f"compress.{section}.lr or set compress.{section}.grad_clip")
            self.warnings.append(msg)
            self.log(f"warning: {msg}")

    def archive_meta(self, *, folded: bool, weights_sha256: str, reference_accuracy: float | None) -> dict:
        """The archive's metadata. Built before PTQ too, with a stand-in weights hash of the
        same length, because its (deflated) size counts against the byte budget."""
        # The full config is in report.json; the archive keeps its hash (small models: every byte counts).
        config_sha = hashlib.sha256(json.dumps(_jsonable(self.config), sort_keys=True).encode()).hexdigest()
        extra = {"compress_mode": self.config.mode, "compress_config_sha256": config_sha,
                 "source_sha256": self.source_sha256, "weights_sha256": weights_sha256,
                 "reference_accuracy": reference_accuracy,
                 "recipe_hash": self.recipe_hash or self.inp.meta.get("recipe_hash")}
        return esq_meta({k: v for k, v in self.inp.meta.items() if k not in ("metrics", "compress_stage")},
                        folded=folded, extra=extra)

    def encode(self, state: dict[str, torch.Tensor], meta: dict, *, shared: Any,
               codebook_dtype: str, chunk: int | None = None) -> tuple[bytes, list, nn.Module, Path]:
        """Write ``model.esq`` and prove it decodes to exactly ``state``."""
        blob, stats = esq_dumps(state, meta, shared=shared, codebook_dtype=codebook_dtype, chunk=chunk)
        esq_path = self.out / "model.esq"
        write_bytes_atomic(esq_path, blob)
        decoded, _ = model_from_esq(esq_path)
        for key, tensor in decoded.state_dict().items():
            if not torch.equal(tensor, state[key]):
                raise EdgesqueezeError(f"decode check failed: {key} differs after the .esq round trip (a bug)")
        return blob, stats, decoded, esq_path

    def finish(self, *, before: nn.Module, decoded: nn.Module, blob: bytes, stats: list, state: dict,
               dense_bytes: int, test_before, test_after, bits: dict, esq_path: Path,
               extra: dict[str, Any]) -> CompressResult:
        """Build and write the report; ``extra["evaluation"]`` gives the agreement the
        ``test`` section carries (held-out when there is a held-out set), for the CI gate."""
        from edgesqueeze.compress import report as report_mod

        report = report_mod.build(
            layers=stats, stages=self.stages, dense_bytes=dense_bytes, esq_bytes=len(blob), state=state,
            test_before=test_before, test_after=test_after, layer_rows=layer_stats(decoded), bits=bits,
            wall_s=time.perf_counter() - self.t_start, checkpoint=str(self.checkpoint), esq=str(esq_path),
            config=_jsonable(self.config), agreement=_agreement(extra.get("evaluation")),
            extra={"mode": self.config.mode, **extra},
        )
        report_mod.write(self.out, report, before=before, after=decoded)
        where = "held-out test" if "calibration" in extra else "test"
        acc = (f"; {where} {100 * test_before['accuracy']:.2f}% -> {100 * test_after['accuracy']:.2f}%"
               if test_before and test_after and "accuracy" in test_after else "")
        self.log(f"{esq_path}: {len(blob):,} bytes ({dense_bytes / len(blob):.1f}x smaller than dense fp32){acc}")
        return CompressResult(decoded, esq_path, len(blob), report, self.out)


def _agreement(evaluation: dict | None) -> float | None:
    ev = evaluation or {}
    row = ev.get("held_out") or ev.get("all") or {}
    return row.get("agreement")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _compare(original: nn.Module, compressed: nn.Module, x, y, *, mean, std, batch_size: int) -> dict[str, Any]:
    """Top-1 of both models on ``(x, y)``, their top-1 agreement (the fraction of images
    on which both predict the same class: what a user sees change) and mean
    ``KL(original || compressed)`` in nats."""
    from edgesqueeze.evaluate import predict

    if not len(x):
        return {"n": 0}
    a = predict(original, x, mean=mean, std=std, batch_size=batch_size)
    b = predict(compressed, x, mean=mean, std=std, batch_size=batch_size)
    y = torch.as_tensor(y, dtype=torch.long)
    logp = torch.log_softmax(a, 1)
    kl = (logp.exp() * (logp - torch.log_softmax(b, 1))).sum(1).mean()
    return {"n": len(y), "top1_original": float((a.argmax(1) == y).float().mean()),
            "top1_compressed": float((b.argmax(1) == y).float().mean()),
            "agreement": float((a.argmax(1) == b.argmax(1)).float().mean()), "kl": float(kl)}


def _weights_found(stats: list, model: nn.Module) -> dict[str, Any]:
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


def _compress_lossless(run: _Run) -> CompressResult:
    """Re-encode without changing a weight: the codec keeps what it finds (zeros as gaps,
    codebooks of at most 256 values per tensor or per slice), and the decoded weights are
    compared bit for bit with the source's."""

    inp, log = run.inp, run.log
    model = inp.loaded.model
    dense_bytes = _float_bytes(model)
    run.record("float", model, dense_bytes, "dense fp32")
    test_before = run.test(model)
    state = _state(model)
    digest = state_digest(state)
    meta = run.archive_meta(folded=bool(inp.meta.get("folded_batchnorm")), weights_sha256=digest,
                            reference_accuracy=test_before["accuracy"] if test_before else None)
    # float16 codebooks only for tensors whose every value survives float16: still lossless.
    blob, stats, decoded, esq_path = run.encode(state, meta, shared="auto", codebook_dtype="float16")
    found = _weights_found(stats, model)
    identical = state_digest(_state(decoded)) == digest and all(
        torch.equal(v, state[k]) for k, v in decoded.state_dict().items())
    log(f"lossless re-encoding (no prune, cluster or ptq section): {found['density']:.1%} of weights non-zero, "
        f"{found['shared_tensors']} of {found['weight_tensors']} weight tensors already shared (codebooks of at "
        f"most 256 values, per tensor or per slice), kept; weights bit-identical: {'yes' if identical else 'NO'}")
    run.record("esq", decoded, len(blob), "decoded from the archive; lossless, bit-identical")
    test_after = run.test(decoded)
    evaluation = {}
    if inp.ds is not None:
        evaluation["all"] = {"label": f"all {len(inp.ds.test_y)} test images of {inp.ds.name}",
                             **_compare(model, decoded, inp.ds.test_x, inp.ds.test_y, mean=inp.mean,
                                        std=inp.std, batch_size=run.config.eval_batch_size)}
    extra = {"lossless": {"weights_identical": identical, "source_weights_sha256": digest,
                          "decoded_weights_sha256": state_digest(_state(decoded)), **found},
             "evaluation": evaluation}
    if not identical:  # cannot happen unless the codec is broken; never report it as lossless
        raise EdgesqueezeError("lossless re-encoding changed a weight (a bug)")
    return run.finish(before=model, decoded=decoded, blob=blob, stats=stats, state=state, dense_bytes=dense_bytes,
                      test_before=test_before, test_after=test_after, bits={}, esq_path=esq_path, extra=extra)


def _calibration_split(run: _Run):
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
    idx = np.sort(np.random.default_rng(run.seed).permutation(len(pool))[:n])
    if split == "test":
        keep = np.ones(len(ds.test_x), dtype=bool)
        keep[idx] = False
        held_x, held_y = ds.test_x[keep], ds.test_y[keep]
    else:
        held_x, held_y = ds.test_x, ds.test_y
    return pool[idx], split, idx, held_x, held_y


def _compress_ptq(run: _Run) -> CompressResult:
    """Post-training: re-cluster the (pruned) model to ``ptq.target_bytes`` from calibration
    images only (:func:`~edgesqueeze.compress.ptq.post_training_compress`), keeping its zeros;
    then encode, decode-check, and score original against compressed on held-out images."""
    from edgesqueeze.compress.ptq import post_training_compress
    from edgesqueeze.data import batches

    inp, cfg, log = run.inp, run.config, run.log
    ds = inp.ds
    original = inp.loaded.model
    calib, split, idx, held_x, held_y = _calibration_split(run)
    where = f"{len(calib)} calibration images from the {split} split of {ds.name} (seed {run.seed})"
    log(f"post-training compression: {where}; labels unused, no fine-tuning")
    model = copy.deepcopy(original)
    dense_bytes = _float_bytes(model)
    run.record("float", model, dense_bytes, "dense fp32")
    folded = bool(inp.meta.get("folded_batchnorm"))
    if cfg.fold_batchnorm and conv_bn_pairs(model):
        model = fold_batchnorm(model)  # cluster what runs
        folded = True
        run.record("fold-bn", model, None, "BatchNorm folded into convs")
    masks_before = existing_masks(model)
    held_before = run.test(original, held_x, held_y)
    calib_x = next(batches(calib, np.zeros(len(calib), dtype=np.int64), batch_size=len(calib),
                           shuffle=False, generator=None, mean=inp.mean, std=inp.std))[0]
    ref_acc = held_before.get("accuracy") if held_before else None
    # The budget counts the archive as written: its metadata included, with a stand-in
    # weights hash (same length, same entropy) until the weights are known.
    budget_meta = run.archive_meta(folded=folded, weights_sha256=state_digest(_state(model)),
                                   reference_accuracy=ref_acc)
    log(f"ptq: statistics on the calibration images, then every layer clustered at each candidate size "
        f"({len(prunable_layers(model))} layers; minutes for an ImageNet model on a CPU)")
    model, assignments, ptq_report = post_training_compress(model, calib_x, cfg.ptq, meta=budget_meta,
                                                            log=log, progress=run.progress)
    ks = [r["k"] for r in ptq_report["layers"]]
    run.record("ptq", model, ptq_report["summary"]["bytes"],
               f"k {min(ks)}{'' if min(ks) == max(ks) else f'-{max(ks)}'} per layer for a "
               f"{ptq_report['summary']['budget']:,} B budget")
    state = _state(model)
    meta = run.archive_meta(folded=folded, weights_sha256=state_digest(state), reference_accuracy=ref_acc)
    # ptq sizes layers and checks its budget with the default chunk (a budget's bytes buy
    # fidelity, not the large-model chunk index): write the archive with the same one.
    blob, stats, decoded, esq_path = run.encode(state, meta, shared="auto", codebook_dtype=cfg.ptq.codebook_dtype,
                                                chunk=CHUNK)
    run.record("esq", decoded, len(blob), "decoded from the archive")
    target = cfg.ptq.target_bytes
    if target is not None and len(blob) > target:
        log(f"warning: {len(blob):,} B is over compress.ptq.target_bytes ({target:,} B)")
    mask_kept = all(torch.equal(decoded.get_submodule(n).weight != 0, m) for n, m in masks_before.items())

    ebs = cfg.eval_batch_size
    n_test = len(ds.test_y)
    evaluation = {"held_out": {
        "label": (f"held-out: the {len(held_y)} test images not used for calibration" if split == "test"
                  else f"held-out: all {len(held_y)} test images (calibration used the training split)"),
        **_compare(original, decoded, held_x, held_y, mean=inp.mean, std=inp.std, batch_size=ebs)}}
    if split == "test":
        evaluation["all"] = {
            "label": f"all {n_test} test images, {len(calib)} of them calibration images (in-sample: optimistic)",
            **_compare(original, decoded, ds.test_x, ds.test_y, mean=inp.mean, std=inp.std, batch_size=ebs)}
    for e in evaluation.values():
        if e["n"]:
            log(f"{e['label']}: top-1 {100 * e['top1_original']:.2f}% -> {100 * e['top1_compressed']:.2f}%, "
                f"agreement {100 * e['agreement']:.2f}%, KL {e['kl']:.4f}")
    test_after = run.test(decoded, held_x, held_y)
    extra = {
        "calibration": {"dataset": ds.name, "split": split, "images": len(calib), "seed": run.seed,
                        "indices": [int(i) for i in idx]},
        "evaluation": evaluation,
        "ptq": {**ptq_report, "target_bytes": target,
                "within_target": target is None or len(blob) <= target, "mask_kept": mask_kept},
    }
    return run.finish(before=original, decoded=decoded, blob=blob, stats=stats, state=state,
                      dense_bytes=dense_bytes, test_before=held_before, test_after=test_after,
                      bits={n: a.bits for n, a in assignments.items()}, esq_path=esq_path, extra=extra)


def _compress_retrain(run: _Run) -> CompressResult:
    """Deep Compression with retraining: prune, fold BatchNorm, cluster, retrain centroids."""
    from edgesqueeze.data import default_augment

    inp, config, log, seed, progress = run.inp, run.config, run.log, run.seed, run.progress
    ds, (x_tr, y_tr), (x_val, _) = inp.ds, inp.train, inp.val
    if not len(x_tr):
        raise DataError(f"compress.prune / compress.cluster retrain on a training split, and dataset '{ds.name}' "
                        "has none; use compress.ptq (calibration images only) instead")
    ds_norm = dataclasses.replace(ds, mean=tuple(inp.mean), std=tuple(inp.std))
    data = (x_tr, y_tr, ds_norm, default_augment(ds.name))
    val_acc, record = run.val_acc, run.record

    model = copy.deepcopy(inp.loaded.model)  # the stages work in place; keep the original to compare
    dense_bytes = _float_bytes(model)

    record("float", model, dense_bytes, "dense fp32")
    # Pruning: keep existing zeros (an already pruned model), reach the targets while retraining.
    masks = existing_masks(model)
    auto_scan: dict[str, Any] = {}
    if config.prune is not None:
        pcfg = config.prune
        if pcfg.sparsity == "auto":
            if not len(x_val):
                raise EdgesqueezeError("compress.prune.sparsity: 'auto' needs a validation split to "
                                       "scan on; set numeric sparsities instead")
            log(f"sparsity auto: scanning {len(prunable_layers(model))} layers at "
                f"{', '.join(f'{s:.0%}' for s in pcfg.scan)} (max drop {pcfg.max_drop} points)")
            pcfg, auto_scan = resolve_auto(pcfg, model, val_acc, path="compress.prune")
            log("sparsity auto chose: " + ", ".join(f"{n} {s:.0%}" for n, s in pcfg.layers.items()))
        ft = config.prune_finetune
        steps = max(1, int(round(ft.epochs * max(1, len(x_tr) // ft.batch_size))))
        if pcfg.schedule == "gradual" and pcfg.end == 0:
            pcfg = dataclasses.replace(pcfg, end=max(pcfg.begin + 1, int(0.7 * steps)))
        pruner = Pruner(model, pcfg, keep=masks, path="compress.prune")
        before = run.stages[-1]["val_accuracy"]
        if pcfg.schedule == "oneshot" or ft.epochs <= 0:
            pruner.update(None)
            record("prune (before retraining)", model, None, f"{_density(model):.1%} of weights kept")
        _finetune(model, data, ft, seed=seed, desc="prune-retrain", progress=progress,
                  on_step=pruner.update if pcfg.schedule == "gradual" else None, attach=pruner.attach,
                  teacher=run.teacher, log=log)
        pruner.update(None)
        pruner.detach()
        masks = pruner.masks
        record("prune", model, None, f"{_density(model):.1%} of weights kept")
        run.check_retraining("prune_finetune", model, before, what="pruning and retraining",
                             hint="lower the sparsity, or if retraining diverged")
        _save_pruned(run, model)

    # Fold BatchNorm after pruning (retraining needs BN; a per-channel rescale keeps zeros) and
    # before weight sharing, so that what is clustered is exactly what runs.
    folded = bool(inp.meta.get("folded_batchnorm"))
    if config.fold_batchnorm and conv_bn_pairs(model):
        model = fold_batchnorm(model)
        folded = True
        record("fold-bn", model, None, "BatchNorm folded into convs")

    assignments: dict[str, Any] = {}
    if config.cluster is not None:
        model, assignments = cluster_mod.cluster_model(model, config.cluster, masks, path="compress.cluster")
        cluster_mod.round_biases(model, config.cluster.bias_dtype, assignments)
        record("cluster (before retraining)", model, None)
        if config.cluster_finetune.epochs > 0:
            cluster_mod.share_weights(model, assignments, codebook_dtype=config.cluster.codebook_dtype)
            _finetune(model, data, config.cluster_finetune, seed=seed + 1, desc="centroid-retrain",
                      progress=progress, teacher=run.teacher, log=log)
            assignments = cluster_mod.materialize(model)
            cluster_mod.round_biases(model, config.cluster.bias_dtype, assignments)
            record("cluster", model, None, "centroids retrained")
            run.check_retraining("cluster_finetune", model, run.stages[-2]["val_accuracy"])
        model.eval()

    # Encode, then prove the archive decodes to exactly the model held in memory.
    state = _state(model)
    shared = shared_weight_names(model) if assignments else "auto"
    test_before = run.test(inp.loaded.model)
    meta = run.archive_meta(folded=folded, weights_sha256=state_digest(state),
                            reference_accuracy=test_before["accuracy"])
    blob, stats, decoded, esq_path = run.encode(
        state, meta, shared=shared, codebook_dtype=config.cluster.codebook_dtype if config.cluster else "float32")
    record("esq", decoded, len(blob), "decoded from the archive")
    test_after = run.test(decoded)
    extra: dict[str, Any] = {"evaluation": {"all": {
        "label": f"all {len(ds.test_y)} test images of {ds.name}",
        **_compare(inp.loaded.model, decoded, ds.test_x, ds.test_y, mean=inp.mean, std=inp.std,
                   batch_size=config.eval_batch_size)}}}
    if auto_scan:
        extra["auto_sparsity"] = auto_scan
    if run.teacher_path is not None:
        extra["teacher"] = {"path": str(run.teacher_path), "sha256": sha256_file(run.teacher_path)}
    if config.prune is not None:
        extra["pruned_checkpoint"] = str(run.out / PRUNED_NAME)
    if run.warnings:
        extra["warnings"] = run.warnings
    return run.finish(before=inp.loaded.model, decoded=decoded, blob=blob, stats=stats, state=state,
                      dense_bytes=dense_bytes, test_before=test_before, test_after=test_after,
                      bits={n: a.bits for n, a in assignments.items()}, esq_path=esq_path, extra=extra)


PRUNED_NAME = "pruned.pt"


def _save_pruned(run: _Run, model: nn.Module) -> Path:
    """Write the pruned model (BatchNorm not yet folded) as an ordinary checkpoint, so that
    other weight-sharing settings can be tried without pruning again: compress it with the
    same recipe and ``--set compress.prune=null`` (its zeros are kept as they are), and
    ``--teacher`` the original when distilling."""
    from edgesqueeze.checkpoint import save_checkpoint

    meta = {k: v for k, v in run.inp.meta.items() if k != "metrics"}
    meta.update(compress_stage="prune", pruned_from_sha256=run.source_sha256,
                metrics={"val_accuracy": run.stages[-1]["val_accuracy"], "density": round(_density(model), 4)})
    path = save_checkpoint(run.out / PRUNED_NAME, model, meta)
    run.log(f"pruned model (before weight sharing): {path}")
    return path


def _load_inputs(checkpoint, *, dataset=None, default_dataset=None, data_dir=None, arch=None, arch_kwargs=None,
                 need_data: bool = True) -> _Inputs:
    """The model (any file :func:`~edgesqueeze.checkpoint.load_model` reads; a plain state_dict
    needs ``arch``), its dataset and splits (see :func:`~edgesqueeze.evaluate.training_data`)
    and its normalization. A plain state_dict records no dataset: the one given is written
    into the metadata, so the archive says what it was measured on."""
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.evaluate import training_data

    loaded = load_model(checkpoint, arch=arch, arch_kwargs=arch_kwargs)
    meta = dict(loaded.meta)
    if "arch" not in meta:
        raise ModelError(f"{checkpoint}: a {loaded.kind} file does not record an edgesqueeze architecture; "
                         "compress needs an edgesqueeze checkpoint, a .esq archive, or a state_dict with --arch")
    name = dataset or meta.get("dataset") or default_dataset
    if not name:
        if need_data:
            raise DataError(f"{checkpoint}: does not record its dataset; pass --data NAME (e.g. --data imagenet-sample)")
        return _Inputs(loaded, meta)
    ds, train, val = training_data(meta, source=checkpoint, dataset=name, data_dir=data_dir)
    mean, std = meta.get("mean", ds.mean), meta.get("std", ds.std)
    _check_fits(loaded.model, ds, checkpoint, meta)
    if "dataset" not in meta:
        meta.update(dataset=ds.name, input_shape=list(ds.input_shape), mean=list(mean), std=list(std))
    return _Inputs(loaded, meta, ds, train, val, mean, std)


def _check_fits(model: nn.Module, ds, source, meta: dict) -> None:
    """Refuse a dataset the model cannot take (shape, class count) with one clear line,
    before anything is computed, rather than a stack trace from inside a conv."""
    expected = meta.get("input_shape")
    if expected and list(ds.input_shape) != list(expected):
        raise DataError(f"dataset '{ds.name}' gives images of shape {list(ds.input_shape)} but {source} expects "
                        f"{list(expected)}; pass the dataset it was trained on (--data)")
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *ds.input_shape))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(f"{source} does not run on '{ds.name}' images of shape {list(ds.input_shape)} ({first}); "
                        "pass the dataset it was trained on (--data)") from None
    if out.shape[-1] != ds.num_classes:
        raise DataError(f"dataset '{ds.name}' has {ds.num_classes} classes but {source} outputs {out.shape[-1]}; "
                        "pass the dataset it was trained on (--data)")


def _load_with_data(checkpoint, dataset, data_dir):
    """The checkpoint, its dataset and split (see :func:`training_data`), its normalization."""
    inp = _load_inputs(checkpoint, dataset=dataset, data_dir=data_dir)
    return inp.loaded, inp.meta, inp.ds, inp.train, inp.val, inp.mean, inp.std


def sensitivity(
    checkpoint: str | Path,
    *,
    sparsities: list[float],
    out_dir: str | Path,
    layers: list[str] | None = None,
    max_drop: float | None = None,
    data_dir: str | Path | None = None,
    dataset: str | None = None,
    batch_size: int = 512,
    log: Log = print,
) -> dict[str, Any]:
    """Prune each layer alone at each sparsity; validation accuracy table, plot, and (with
    ``max_drop``, in accuracy points) the per-layer sparsities that stay within it."""
    from edgesqueeze.compress.prune import choose_sparsities, sensitivity_scan
    from edgesqueeze.evaluate import evaluate

    out = Path(out_dir)
    loaded, meta, ds, _, (x_val, y_val), mean, std = _load_with_data(checkpoint, dataset, data_dir)
    if not len(x_val):
        raise EdgesqueezeError(f"{checkpoint}: its dataset has no validation split to measure on")

    def acc(m: nn.Module) -> float:
        return evaluate(m, x_val, y_val, mean=mean, std=std, batch_size=batch_size)["accuracy"]

    baseline = acc(loaded.model)
    log(f"baseline validation accuracy {100 * baseline:.2f}% on {len(y_val)} images")
    rows = sensitivity_scan(loaded.model, layers, sparsities, acc)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "baseline": baseline, "rows": rows}
    if max_drop is not None:
        result["max_drop_points"] = max_drop
        result["chosen"] = choose_sparsities(rows, max_drop / 100, baseline)
    _write_sensitivity(out, result)
    return result


def _write_sensitivity(out: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgesqueeze._io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sensitivity.json", json.dumps(result, indent=2) + "\n")
    layers = list(dict.fromkeys(r["layer"] for r in result["rows"]))
    sps = sorted({r["sparsity"] for r in result["rows"]})
    acc = {(r["layer"], r["sparsity"]): r["accuracy"] for r in result["rows"]}
    lines = [f"# Sensitivity of `{result['checkpoint']}`", "",
             f"Validation accuracy with one layer pruned at a time (baseline {100 * result['baseline']:.2f}%).", "",
             "| layer | " + " | ".join(f"{s:.0%}" for s in sps) + (" | chosen |" if "chosen" in result else " |"),
             "| --- |" + " --- |" * (len(sps) + ("chosen" in result))]
    for name in layers:
        cells = " | ".join(f"{100 * acc[(name, s)]:.2f}" for s in sps)
        chosen = f" | {result['chosen'][name]:.0%}" if "chosen" in result else ""
        lines.append(f"| {name} | {cells}{chosen} |")
    write_text_atomic(out / "sensitivity.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in layers:
        ax.plot([100 * s for s in sps], [100 * acc[(name, s)] for s in sps], "o-", label=name, linewidth=1)
    ax.axhline(100 * result["baseline"], color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("sparsity of that layer (%)"), ax.set_ylabel("validation accuracy (%)")
    ax.set_title("pruning sensitivity, one layer at a time")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(out / "sensitivity.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _density(model: nn.Module) -> float:
    rows = layer_stats(model)
    total = sum(r["numel"] for r in rows)
    return sum(r["nonzero"] for r in rows) / total if total else 1.0


def _jsonable(cfg: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
