"""Fine-tuning inside the compress pipeline: retraining after pruning and the centroids after
weight sharing, with optional distillation from a teacher. Seeded, so the same run writes
the same bytes; with an :class:`EpochState`, resumable after any finished epoch, to the same
bytes."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgesqueeze.config.compress import FinetuneConfig
from edgesqueeze.errors import EdgesqueezeError

Log = Callable[[str], None]


@dataclass
class EpochState:
    """Where a retraining keeps its state after every epoch (weights, optimizer, both random
    generators, the step, and ``extra`` tensors such as the pruner's masks), so that
    ``compress --resume`` continues an interrupted retraining after its last finished epoch
    and ends with the bits an uninterrupted run ends with (as ``train --resume`` does).

    ``key``: what determines the retraining (the input file, the settings, the seed); a state
    with another key is refused. ``write``: this process writes it (rank 0 of a torchrun
    launch; every rank reads it on resume). ``extra`` / ``restore``: more state to keep, and
    how to put it back. The file is removed once the retraining has finished."""

    path: Path
    key: str
    resume: bool = False
    write: bool = True
    extra: Callable[[], dict[str, torch.Tensor]] | None = None
    restore: Callable[[dict[str, torch.Tensor]], None] | None = None


def finetune(model: nn.Module, data, cfg: FinetuneConfig, *, seed: int, desc: str, progress: bool,
              on_step: Callable[[int], None] | None = None, attach: Callable[[Any], None] | None = None,
              teacher: nn.Module | None = None, log: Log | None = None, group=None,
              state: EpochState | None = None) -> int:
    """Fine-tune ``model`` in place for ``cfg.epochs``; returns the number of steps taken.
    With ``cfg.distill``, ``teacher`` (left untouched) supplies the soft targets. ``log``
    gets one line per epoch (what a run in the background shows of its progress). Runs on
    ``cfg.device`` in ``cfg.precision``; the model is back on its own device afterwards.
    ``group`` (:mod:`edgesqueeze.distributed`, launched by torchrun): DistributedDataParallel,
    each rank on its slice of every global batch of ``cfg.batch_size``. ``state``: save the
    state after every epoch and, with ``state.resume``, start after the saved epoch."""
    if cfg.epochs <= 0:
        return 0
    from edgesqueeze import distributed
    from edgesqueeze.device import check_precision, grad_scaler, model_device, resolve_device

    group = group or distributed.Group()
    distributed.check_batch(group, cfg.batch_size, f"{desc}: batch_size")
    device = distributed.rank_device(resolve_device(cfg.device, what=f"{desc}: device"), group)
    check_precision(cfg.precision, device, what=f"{desc}: precision")
    home = model_device(model)
    model.to(device)  # and back when done: the stages after retraining work on the CPU
    try:
        return _finetune(model, data, cfg, seed=seed, desc=desc, progress=progress, on_step=on_step,
                         attach=attach, teacher=teacher, log=log, scaler=grad_scaler(device, cfg.precision),
                         group=group, state=state)
    finally:
        model.to(home)


def _resume(state: EpochState, model: nn.Module, optimizer, gen: torch.Generator, scaler, group, *,
            desc: str, epochs: int, log: Log | None) -> tuple[int, int]:
    """Put the saved state back; ``(epoch, step)`` to go on from (``(0, 0)`` without one)."""
    from edgesqueeze import distributed
    from edgesqueeze.checkpoint import load_state_dict_checked, load_train_state
    from edgesqueeze.device import model_device
    from edgesqueeze.train import resume_threads

    # every rank resumes, or none: each looks on its own disk (refused when they disagree)
    if not state.resume or not distributed.same_file_on_every_rank(group, state.path):
        if state.resume and log is not None:
            log(f"--resume: no {state.path}: {desc} from its first epoch")
        return 0, 0
    st = load_train_state(state.path)
    if st.get("key") != state.key:
        raise EdgesqueezeError(f"{state.path}: was written by a {desc} of another model or with other settings, "
                               "seed or data; leave out --resume (it is then retrained from the start) or use "
                               "another --out")
    started = int(st.get("world_size", 1))
    if started != group.world:
        raise distributed.DistributedError(
            f"{state.path}: this {desc} was started with {started} process(es) and is resumed with "
            f"{group.world}; resume it with as many (the global batch and the data order depend on it)")
    if model_device(model).type == "cpu":
        resume_threads(st.get("threads"), log, desc)
    load_state_dict_checked(model, st["state_dict"], source=str(state.path))
    if state.restore is not None:
        state.restore(st.get("extra", {}))
    optimizer.load_state_dict(st["optimizer"])
    if scaler is not None and st.get("grad_scaler"):
        scaler.load_state_dict(st["grad_scaler"])
    torch.set_rng_state(st["torch_rng"])
    gen.set_state(st["data_rng"])
    if log is not None:
        log(f"--resume: {desc} goes on after epoch {st['epoch']}/{epochs} ({state.path})")
    return int(st["epoch"]), int(st["step"])


def _save(state: EpochState, model: nn.Module, optimizer, gen: torch.Generator, scaler, group, *,
          epoch: int, step: int) -> None:
    from edgesqueeze.checkpoint import save_train_state
    from edgesqueeze.train import _cpu

    st = {"key": state.key, "epoch": epoch, "step": step,
          "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
          "optimizer": _cpu(optimizer.state_dict()), "torch_rng": torch.get_rng_state(),
          "data_rng": gen.get_state(), "world_size": group.world, "threads": torch.get_num_threads(),
          "extra": {k: v.detach().cpu().clone() for k, v in (state.extra() if state.extra else {}).items()}}
    if scaler is not None:
        st["grad_scaler"] = scaler.state_dict()
    save_train_state(state.path, st)


def _augment_words(a) -> str:
    """The augmentation an ``AugmentConfig`` applies, in words; empty for none."""
    parts = ([f"pad-{a.crop_padding} crop"] if a.crop_padding else []) + (["mirror"] if a.hflip else []) \
        + ([f"resized crop {a.resized_crop[0]:g}-{a.resized_crop[1]:g}"] if a.resized_crop else []) \
        + ([f"rotation up to {a.rotate_deg:g} degrees"] if a.rotate_deg else []) \
        + ([f"shift up to {100 * a.translate:g}%"] if a.translate else [])
    return ", ".join(parts)


def _finetune(model: nn.Module, data, cfg: FinetuneConfig, *, seed: int, desc: str, progress: bool,
              on_step, attach, teacher, log, scaler, group, state: EpochState | None) -> int:
    from edgesqueeze import distributed
    from edgesqueeze.device import model_device
    from edgesqueeze.train import DistillLoss, make_optimizer, train_one_epoch

    x, y, ds, augment = data
    steps_per_epoch = max(1, len(x) // cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    from edgesqueeze.models.layers import KEEP_ATTR

    for m in model.modules():  # compress.keep_layers: not retrained (folding BN made new tensors)
        if getattr(m, KEEP_ATTR, False):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
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
        teacher = copy.deepcopy(teacher).eval().to(model_device(model))
        if cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)
    else:
        teacher = None
    step = 0
    from edgesqueeze.data import batches

    trained = model
    if group.active:  # gradients averaged over the ranks; the pruner's hooks stay on ``model``'s weights
        from torch.nn.parallel import DistributedDataParallel

        dev = model_device(model)
        trained = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    epochs = math.ceil(total / steps_per_epoch)
    # what the first epoch line's loss is a loss of, when not the labels' alone
    loss_of = "" if teacher is None else (f" (distillation: {1 - cfg.distill.alpha:g} x labels + "
                                          f"{cfg.distill.alpha:g} x the teacher's outputs at T {cfg.distill.temperature:g})")
    aug = augment if cfg.augment else None  # why its train accuracy can sit far below validation's
    key = {"prune-retrain": "compress.prune_finetune", "centroid-retrain": "compress.cluster_finetune"}.get(desc)
    words = _augment_words(aug) if aug is not None else ""
    on_aug = f" on augmented images ({words}; {key + '.' if key else ''}augment: false turns it off)" if words else ""
    first = 0
    if state is not None:
        first, step = _resume(state, model, optimizer, gen, scaler, group, desc=desc, epochs=epochs, log=log)
    for epoch in range(first, epochs):
        t0 = time.perf_counter()
        it = batches(x, y, batch_size=cfg.batch_size, shuffle=True, generator=gen, mean=ds.mean, std=ds.std,
                     augment=augment if cfg.augment else None, drop_last=len(x) >= cfg.batch_size,
                     channels_last=cfg.channels_last, part=(group.rank, group.world))
        step, loss_sum, correct, seen = train_one_epoch(
            trained, optimizer, distributed.shard(it, group), cfg=cfg, steps=min(steps_per_epoch, total - step),
            step=step, total_steps=total,
            loss_fn=loss_fn, desc=f"{desc} {epoch + 1}", progress=progress, on_step=on_step, teacher=teacher,
            scaler=scaler)
        if group.active:  # every rank's share of the epoch
            loss_sum, correct, seen = distributed.sum_all(group, [loss_sum, correct, seen])
        if log is not None and seen:
            log(f"  {desc} epoch {epoch + 1}/{epochs}: loss{loss_of if epoch == first else ''} {loss_sum / seen:.4f}, train accuracy "
                f"{100 * correct / seen:.2f}%{on_aug if epoch == first else ''} ({time.perf_counter() - t0:.0f} s)")
        if state is not None and state.write and epoch + 1 < epochs:
            _save(state, model, optimizer, gen, scaler, group, epoch=epoch + 1, step=step)
    if state is not None and state.write:
        state.path.unlink(missing_ok=True)  # finished: what it held is in the model now
    model.eval()
    return total
