"""Fine-tuning inside the compress pipeline: retraining after pruning and the centroids after
weight sharing, with optional distillation from a teacher. Seeded, so the same run writes
the same bytes."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from edgesqueeze.config.compress import FinetuneConfig
from edgesqueeze.errors import EdgesqueezeError

Log = Callable[[str], None]


def finetune(model: nn.Module, data, cfg: FinetuneConfig, *, seed: int, desc: str, progress: bool,
              on_step: Callable[[int], None] | None = None, attach: Callable[[Any], None] | None = None,
              teacher: nn.Module | None = None, log: Log | None = None, group=None) -> int:
    """Fine-tune ``model`` in place for ``cfg.epochs``; returns the number of steps taken.
    With ``cfg.distill``, ``teacher`` (left untouched) supplies the soft targets. ``log``
    gets one line per epoch (what a run in the background shows of its progress). Runs on
    ``cfg.device`` in ``cfg.precision``; the model is back on its own device afterwards.
    ``group`` (:mod:`edgesqueeze.distributed`, launched by torchrun): DistributedDataParallel,
    each rank on its slice of every global batch of ``cfg.batch_size``."""
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
                         group=group)
    finally:
        model.to(home)


def _finetune(model: nn.Module, data, cfg: FinetuneConfig, *, seed: int, desc: str, progress: bool,
              on_step, attach, teacher, log, scaler, group) -> int:
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
    for epoch in range(epochs):
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
            log(f"  {desc} epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}, train accuracy "
                f"{100 * correct / seen:.2f}% ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return total
