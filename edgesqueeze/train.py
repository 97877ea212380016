"""Fit and evaluate models on CPU, with checkpoints every epoch and bit-exact resume.

Why it is shaped this way:
- The learning rate is a pure function of the global step (:func:`lr_at`), so resuming
  needs no scheduler object, only the step count.
- All randomness flows from two saved states, torch's global RNG (init, dropout) and one
  ``torch.Generator`` (shuffling, augmentation), so a run resumed after a crash produces
  the same weights as an uninterrupted one.
- The training state is written atomically at the end of every epoch: a kill -9 loses at
  most the epoch in flight.
- Hyperparameters are judged on the validation split; the test split is touched once, at the
  end, for the report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgesqueeze import __version__
from edgesqueeze._io import atomic_path, output_locks, write_text_atomic
from edgesqueeze.checkpoint import (
    load_state_dict_checked,
    load_train_state,
    model_meta,
    save_checkpoint,
    save_train_state,
)
from edgesqueeze.errors import DataError, EdgesqueezeError, ModelError
from edgesqueeze.evaluation import evaluate
from edgesqueeze.recipe import Recipe, TrainConfig

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------
# Pure pieces


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:  # or any config with these fields
    """Learning rate at ``step`` (0-based) of ``total_steps``.

    - ``onecycle``: linear ramp from lr/25 up to lr over ``warmup_fraction`` of the run,
      then cosine annealing to zero (the shape of Smith's one-cycle policy).
    - ``cosine``: linear warmup from 0 over ``warmup_fraction``, then cosine to zero.
    - ``constant``: lr throughout.

    >>> from edgesqueeze.recipe import TrainConfig
    >>> cfg = TrainConfig(lr=0.1, schedule="cosine", warmup_fraction=0.0)
    >>> round(lr_at(0, 100, cfg), 4), round(lr_at(50, 100, cfg), 4), round(lr_at(100, 100, cfg), 4)
    (0.1, 0.05, 0.0)
    """
    if cfg.schedule == "constant":
        return cfg.lr
    warm = int(round(cfg.warmup_fraction * total_steps))
    start = cfg.lr / 25 if cfg.schedule == "onecycle" else 0.0
    if step < warm:
        return start + (cfg.lr - start) * step / warm
    progress = (step - warm) / max(1, total_steps - warm)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay applies to conv/linear weights only, not to biases or BatchNorm."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, a cgroup cpuset, a
    batch scheduler's allocation), which ``os.cpu_count()`` ignores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _env_threads() -> int:
    """``$OMP_NUM_THREADS`` as a positive count (its first entry), else 0."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else 0


def resume_threads(saved: Any, log: Callable[[str], Any] | None, what: str) -> int:
    """On resume, compute with the interrupted run's CPU thread count ``saved`` (recorded in
    its state file; None in older files): PyTorch's float sums depend on the thread count, so
    only then are the weights those of an uninterrupted run. Returns the count in use."""
    now = torch.get_num_threads()
    if isinstance(saved, int) and saved > 0 and saved != now:
        torch.set_num_threads(saved)
        if log is not None:
            log(f"--resume: {what} computes with {saved} CPU thread{'s' if saved != 1 else ''} as the interrupted "
                f"run did (this process would use {now}), so its weights are those of an uninterrupted run")
        return saved
    return now


def set_threads(threads: int, processes: int = 1) -> int:
    """Use ``threads`` intra-op threads; 0 (``train.threads``' default) means
    ``$OMP_NUM_THREADS`` when set, else this process's share of the CPUs it may run on, shared
    by ``processes`` processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1: all of them).
    Taking ``os.cpu_count()`` instead ran 2 threads on 1 allowed CPU (or beside another job with
    ``OMP_NUM_THREADS=1``): OpenMP's threads then wait for each other, tens of times slower."""
    n = threads or _env_threads() or max(1, available_cpus() // max(1, processes))
    torch.set_num_threads(n)
    return n


class DistillLoss(nn.Module):
    """Knowledge distillation (Hinton, Vinyals and Dean, 2015): ``(1 - alpha)`` times the
    (label-smoothed) cross-entropy with the labels plus ``alpha * T**2`` times
    ``KL(softmax(teacher / T) || softmax(student / T))``. The ``T**2`` keeps the soft term's
    gradients on the scale of the hard one's whatever the temperature."""

    def __init__(self, *, alpha: float, temperature: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.alpha, self.t = alpha, temperature
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.t
        soft = nn.functional.kl_div(torch.log_softmax(logits / t, 1), torch.log_softmax(teacher_logits / t, 1),
                                    reduction="batchmean", log_target=True)
        return (1 - self.alpha) * self.ce(logits, y) + self.alpha * t * t * soft


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, it, *, cfg, steps: int, step: int,
                    total_steps: int, loss_fn, desc: str, progress: bool,
                    on_step: Callable[[int], None] | None = None,
                    teacher: nn.Module | None = None, scaler=None) -> tuple[int, float, int, int]:
    """Up to ``steps`` optimizer steps over batches ``it``; the lr follows :func:`lr_at`.

    ``on_step(step)`` runs before each step (pruning schedules hook in here). With a
    ``teacher`` (in eval mode), ``loss_fn`` is called as ``loss_fn(logits, y, teacher_logits)``
    (a :class:`DistillLoss`). Batches (drawn on the CPU) move to the model's device; forward
    passes run in ``cfg.precision`` (autocast), with ``scaler`` (a GradScaler) for fp16.
    Returns the new global step, the summed loss, the number of correct predictions and of
    samples seen.
    """
    from tqdm.auto import tqdm

    from edgesqueeze.device import autocast, model_device

    device = model_device(model)
    precision = getattr(cfg, "precision", "fp32")
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(total=steps, desc=desc, unit="batch", leave=False, disable=not progress, dynamic_ncols=True)
    for i, (xb, yb) in enumerate(it):
        if i >= steps:
            break
        if on_step is not None:
            on_step(step)
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if device.type != "cpu":
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(xb)
            if teacher is None:
                loss = loss_fn(logits, yb)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(xb)
                loss = loss_fn(logits, yb, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        step += 1
        if not math.isfinite(loss.item()):
            raise EdgesqueezeError(f"{desc}: training diverged at step {step} (loss {loss.item()}); lower the lr")
        loss_sum += loss.item() * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{lr:.3g}")
        bar.update()
    bar.close()
    return step, loss_sum, correct, seen


# ---------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    test: dict[str, float]
    out_dir: Path
    checkpoint: Path
    wall_s: float
    meta: dict[str, Any] = field(default_factory=dict)
    main: bool = True  # False on the ranks other than 0 of a torchrun launch (they write nothing)


def _augment_for(recipe: Recipe, dataset_name: str):
    from edgesqueeze.data import default_augment

    if not recipe.data.augment:
        return None
    base = default_augment(dataset_name)
    sec = recipe.data.augmentation
    overrides = {k: v for k, v in (
        ("crop_padding", sec.crop_padding), ("hflip", sec.hflip),
        ("rotate_deg", sec.rotate_deg), ("translate", sec.translate),
        ("resized_crop", sec.resized_crop)) if v is not None}
    return replace(base, **overrides) if overrides else base


def _write_metrics(out_dir: Path, history: list[dict[str, Any]]) -> None:
    write_text_atomic(out_dir / "metrics.json", json.dumps(history, indent=2))
    cols = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(out_dir / "metrics.csv", buf.getvalue())


def plot_curves(history: list[dict[str, Any]], path: Path, title: str, label_smoothing: float = 0.0) -> None:
    """Loss and accuracy per epoch. With ``label_smoothing`` the training loss is the smoothed
    cross-entropy the optimizer saw (higher than the plain one of the validation curve), and
    its label says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-",
             label=f"train (label smoothing {label_smoothing:g})" if label_smoothing else "train")
    if any("val_loss" in h for h in history):
        ax1.plot(epochs, [h.get("val_loss", float("nan")) for h in history], "o-", label="validation")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("cross-entropy"), ax1.set_title("loss"), ax1.legend()
    ax2.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train (augmented)")
    if any("val_accuracy" in h for h in history):
        ax2.plot(epochs, [100 * h.get("val_accuracy", float("nan")) for h in history], "o-", label="validation")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("top-1 accuracy (%)"), ax2.set_title("accuracy"), ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _save_state(path: Path, model: nn.Module, optimizer, gen: torch.Generator, scaler, group, *, epoch: int,
                step: int, history: list, recipe: Recipe, meta: dict) -> None:
    """The resumable state after ``epoch``, on the CPU (it resumes on any device)."""
    state = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": _cpu(optimizer.state_dict()),
        "torch_rng": torch.get_rng_state(),
        "data_rng": gen.get_state(),
        "epoch": epoch,
        "step": step,
        "history_json": json.dumps(history),
        "recipe_hash": recipe.hash(),
        "train_hash": recipe.train_hash(),
        "train_part_json": json.dumps(recipe.train_part(), sort_keys=True),  # a refused resume names what changed
        "meta_json": json.dumps(meta),
        "threads": torch.get_num_threads(),  # float sums depend on it: --resume computes with the same
    }
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    if group.active:
        state["world_size"] = group.world
    save_train_state(path, state)


def _cpu(obj: Any) -> Any:
    """``obj`` (an optimizer state_dict) with every tensor on the CPU: a training state
    resumes on any device. The same tensors when they are already there."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def _check_model_fits(model: nn.Module, ds, arch: str) -> None:
    """One clear line, before the first epoch, when the model cannot take the dataset's
    images or does not output one logit per class."""
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *ds.input_shape))
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        gray = ds.input_shape[0] == 1 and "channels" in first
        raise DataError(f"model '{arch}' does not run on '{ds.name}' images of shape {list(ds.input_shape)} "
                        f"({first}); set model.kwargs (e.g. in_channels) to fit the data"
                        + (", or data.channels: 3 to repeat the gray channel for a model that takes RGB images"
                           if gray else "")) from None
    model.train()
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model '{arch}' returns a {type(out).__name__}, not one tensor of logits; edgesqueeze "
                         "needs forward(x) to return the logits [batch, classes]: return them alone (or wrap the "
                         "model in a module whose forward returns them, and name that in model.import)")
    if out.dim() != 2 or out.shape[-1] != ds.num_classes:
        raise DataError(f"model '{arch}' outputs shape {list(out.shape[1:])} per image but '{ds.name}' has "
                        f"{ds.num_classes} classes; set model.kwargs (e.g. num_classes: {ds.num_classes})")


@output_locks()  # the output folder is this run's until it returns
def fit(
    recipe: Recipe,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Log | None = print,
) -> TrainResult:
    """Train the recipe's model on its dataset; write checkpoints, metrics and curves.

    Outputs in ``out_dir`` (default ``artifacts/<recipe name>``): ``model.pt`` (final
    checkpoint), ``last.pt`` (resumable state, rewritten each epoch), ``metrics.csv``,
    ``metrics.json``, ``curves.png``, ``recipe.json``. Launched by ``torchrun``, it trains
    data-parallel (:mod:`edgesqueeze.distributed`): rank 0 writes and logs.

    ``log``: called with each line of the run's account (default ``print``; ``None``: silent).
    ``progress``: progress bars (default: when stderr is a terminal). The model returned is
    in eval mode, as :func:`~edgesqueeze.checkpoint.load_model` gives ``model.pt``; the
    caller's torch thread count and global random state come back as they were.
    """
    from edgesqueeze import distributed
    from edgesqueeze.device import check_precision, resolve_device

    if not isinstance(recipe, Recipe):
        from edgesqueeze.errors import RecipeError

        raise RecipeError(f"fit takes a Recipe (load_recipe(path) or recipe_from_dict(dict)), got "
                          f"{type(recipe).__name__}")
    if resume and overwrite:
        raise EdgesqueezeError("fit: resume=True continues the run in out_dir and overwrite=True starts over; "
                               "give one of them")
    if out_dir is not None and (not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip()):
        raise EdgesqueezeError(f"fit: out_dir: expected a folder path (or None for artifacts/<recipe name>), got "
                               f"{out_dir!r}")
    if log is None:  # silent, as the caller asked (it failed on its first line, after recipe.json)
        log = _quiet
    elif not callable(log):
        raise EdgesqueezeError(f"fit: log: expected a function taking one line (print), or None, got "
                               f"{type(log).__name__}")
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    t_start = time.perf_counter()
    cfg = recipe.train
    out = Path(out_dir) if out_dir is not None else recipe.out_dir()
    from edgesqueeze._io import lock_output_folder

    if not distributed.launched():  # one process: at once (under torchrun every rank must agree: below)
        lock_output_folder(out, "edgesqueeze train")  # a run going on in it is not "a previous run"
        _no_previous_run(None, out, resume or overwrite)
    from edgesqueeze._limits import max_threads

    if cfg.threads > max_threads():  # 1000 threads on 2 cores trained 80x slower, without a word
        raise EdgesqueezeError(f"train.threads {cfg.threads} on a machine with {os.cpu_count()} cores; give at most "
                               f"{max_threads()}, or 0 for one per CPU (more threads than cores only slow it down)")
    device = resolve_device(cfg.device, what="train.device")
    check_precision(cfg.precision, device, what="train.precision")
    group = distributed.setup(device)  # launched by torchrun: one of WORLD_SIZE processes
    distributed.explain_termination(group, out)
    threads_before = torch.get_num_threads()  # set_threads changes the process's: the caller's comes back
    rng_before = torch.get_rng_state()  # training seeds torch's global generator: the caller's comes back
    try:
        _no_previous_run(group, out, resume or overwrite)
        if group.main:  # before the data and the epochs: a folder in the way was found after training
            from edgesqueeze._io import check_writable

            lock_output_folder(out, "edgesqueeze train")  # rank 0 writes; torchrun stops the others if it fails

            for name in OUTPUTS:
                check_writable(out / name)
        return _fit(recipe, out, group, distributed.rank_device(device, group), t_start, resume=resume,
                    progress=progress and group.main, log=log if group.main else _quiet)
    except RuntimeError as exc:
        raise distributed.lost_contact(group, exc, out) from None
    finally:
        distributed.teardown(group)
        torch.set_num_threads(threads_before)
        torch.set_rng_state(rng_before)


def _no_previous_run(group, out: Path, allowed: bool) -> None:
    """Refuse a folder that holds a previous run's ``last.pt`` unless resuming or overwriting.
    Under torchrun every rank looks on its own disk and all agree on the answer: one rank
    refusing alone, before the process group started, left the others waiting for it."""
    from edgesqueeze import distributed

    # a run's outputs without its last.pt (files of the user's own, or a run whose state was
    # deleted) were removed without a word: they are refused as a previous run's are
    others = [n for n in _FINAL_OUTPUTS if (out / n).is_file()] if not (out / "last.pt").exists() else []
    held = ((out / "last.pt").exists() or bool(others)) and not allowed
    ranks = distributed.ranks_where(group, held) if group is not None else ([0] if held else [])
    if ranks:
        many = len(ranks) > 1
        seen = (f" (as rank{'s' if many else ''} {', '.join(map(str, ranks))} of {group.world} "
                f"see{'' if many else 's'} it)") if group is not None and group.active else ""
        if others:
            raise EdgesqueezeError(f"{out}: holds {', '.join(others)}{seen}, the names a run writes, but no last.pt "
                                   "(no run to resume); pass --overwrite to replace them, or give another --out")
        raise EdgesqueezeError(f"{out}: holds a previous run (last.pt){seen}; pass --resume to continue it "
                               "or --overwrite to start over")


_FINAL_OUTPUTS = ("model.pt", "summary.json", "curves.png", "metrics.csv", "metrics.json")
OUTPUTS = (*_FINAL_OUTPUTS, "last.pt", "recipe.json")  # every file a run writes in its folder


def _quiet(_msg: str) -> None:
    pass


def _changed_keys(saved_json: Any, now: dict) -> list[str]:
    """Dotted keys whose values differ between the training part a state recorded and the
    recipe's now (``train.lr``); [] when the state recorded none (older files)."""
    try:
        saved = json.loads(saved_json) if isinstance(saved_json, str) else None
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        return []
    now = json.loads(json.dumps(now, sort_keys=True))  # as it was stored: tuples as lists

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for key in sorted({*a, *b}, key=str)
                    for k in walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))]
        return [] if a == b else [prefix]

    return walk(saved, now, "")


def _fit(recipe: Recipe, out: Path, group, device: torch.device, t_start: float, *, resume: bool, progress: bool,
         log: Log) -> TrainResult:
    from torch.nn.parallel import DistributedDataParallel

    from edgesqueeze import distributed
    from edgesqueeze.data import batches, load_dataset, split_train_val
    from edgesqueeze.device import grad_scaler
    from edgesqueeze.models import build_model

    cfg = recipe.train
    state_path = out / "last.pt"
    # $OMP_NUM_THREADS when set (torchrun sets 1 when it starts several processes a machine and
    # the user did not), else the processes on one machine share its cores
    threads = set_threads(cfg.threads, group.local_world if group.active else 1)
    distributed.check_batch(group, cfg.batch_size, "train.batch_size")
    # every rank resumes, or none: each looks on its own disk (refused, before any data is read, when they disagree)
    resuming = resume and distributed.same_file_on_every_rank(group, state_path)

    from edgesqueeze.models import get_spec
    from edgesqueeze.models.imports import is_import_spec

    if not is_import_spec(recipe.model.arch):  # the recipe's field, before any data is read
        try:
            get_spec(recipe.model.arch)
        except ModelError as exc:
            raise ModelError(f"model.arch: {exc}") from None
    if recipe.data.stream:  # a bad $EDGESQUEEZE_WORKERS stopped the run after its first lines and recipe.json
        from edgesqueeze.data.stream import default_workers

        default_workers()
    try:
        ds = load_dataset(recipe.data.dataset, data_dir=recipe.data.data_dir, download=recipe.data.download,
                          image_size=recipe.data.image_size, limit=recipe.data.limit, seed=recipe.seed,
                          stream=recipe.data.stream)
    except DataError as exc:
        if str(exc).startswith("unknown dataset"):
            raise DataError(f"data.dataset: {exc}") from None
        raise
    if recipe.data.stream:
        from edgesqueeze.data.stream import is_lazy

        if not is_lazy(ds.train_x):  # digits, MNIST, CIFAR batches: in memory whatever it says
            log(f"note: data.stream applies to image folders (imagefolder:, imagenet:); '{ds.name}' is held in "
                "memory")
    if recipe.data.channels:
        from edgesqueeze.data import with_channels

        try:
            ds = with_channels(ds, recipe.data.channels)
        except DataError as exc:
            raise DataError(f"data.channels: {exc}") from None
    if len(ds.train_x) == 0:
        raise DataError(f"dataset '{ds.name}' has no training images")
    if len(ds.test_y) == 0:  # a 2-image folder: the carved test split rounds to none; it crashed after training
        raise DataError(f"dataset '{ds.name}' has no test images (of {len(ds.train_x)} images, the test split carved "
                        "from them rounds to none): add images, or a test/ folder beside train/"
                        + (", or raise data.limit" if recipe.data.limit else ""))
    (x_tr, y_tr), (x_val, y_val) = split_train_val(ds, recipe.data.val_fraction, recipe.seed)
    if len(x_tr) == 0:  # it crashed in the learning-rate schedule (ZeroDivisionError) after recipe.json
        raise DataError(f"data.val_fraction {recipe.data.val_fraction:g} holds out all {len(ds.train_x)} training "
                        "images of the dataset; lower data.val_fraction" + (" or raise data.limit"
                                                                           if recipe.data.limit else ""))
    untrained = sorted(set(range(ds.num_classes)) - set(y_tr.tolist()))
    if untrained:  # a tiny limit or folder: the model is scored on classes it never saw
        names = ", ".join(str(ds.classes[i]) for i in untrained[:5]) + (", ..." if len(untrained) > 5 else "")
        log(f"note: {len(untrained)} of {ds.num_classes} classes have no training images after the validation "
            f"split ({names}): the model cannot learn them; raise data.limit or lower data.val_fraction")
    if recipe.data.val_fraction > 0 and len(x_val) == 0:
        log(f"note: data.val_fraction {recipe.data.val_fraction:g} of {len(ds.train_x)} training images rounds to "
            "none: no validation split (validation columns and curves are empty)")
    augment = _augment_for(recipe, ds.name)

    torch.manual_seed(recipe.seed)
    from edgesqueeze.models.imports import accepted_kwargs

    from_data = {"num_classes": ds.num_classes, "in_channels": ds.input_shape[0]}
    if is_import_spec(recipe.model.arch):  # the user's class may not take in_channels
        from_data = accepted_kwargs(recipe.model.arch, from_data)
    try:
        model = build_model(recipe.model.arch, **{**from_data, **recipe.model.kwargs})
    except ModelError as exc:  # "SqueezeNetConfig.width_mult: ..." did not say where it came from
        raise ModelError(f"model ({recipe.model.arch}, kwargs {recipe.model.kwargs or '{}'}): {exc}") from None
    _check_model_fits(model, ds, recipe.model.arch)
    model = model.to(device)  # the CPU: the same module, untouched
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg.precision)
    # data-parallel: gradients averaged over the ranks, so the weights stay the same on each
    trained = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if group.active else model)
    gen = torch.Generator().manual_seed(recipe.seed)

    steps_per_epoch = len(x_tr) // cfg.batch_size if len(x_tr) >= cfg.batch_size else 1
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    meta = model_meta(
        model,
        dataset=ds.name,
        classes=list(ds.classes),
        input_shape=list(ds.input_shape),
        mean=list(ds.mean),
        std=list(ds.std),
        recipe_name=recipe.name,
        recipe_hash=recipe.hash(),
        seed=recipe.seed,
        val_fraction=recipe.data.val_fraction,
        data_limit=recipe.data.limit,
        image_size=recipe.data.image_size,
        **({"data_stream": True} if recipe.data.stream else {}),
        edgesqueeze_version=__version__,
        torch_version=torch.__version__,
    )

    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    from edgesqueeze._io import remove_stale_temps

    if group.main:
        remove_stale_temps(out, log, names=OUTPUTS)  # a killed run can die inside an atomic write: its own files'
        if not resuming:
            # a new run: an earlier run's results must not outlive it beside this run's files if
            # it is interrupted (the old model.pt and curves next to a new last.pt), nor its state:
            # stopped before its first epoch, --resume resumed the earlier run (--overwrite)
            from edgesqueeze._io import remove_earlier_outputs

            old = remove_earlier_outputs(out, (*_FINAL_OUTPUTS, "last.pt"))
            if old:
                log(f"note: {out}/ held an earlier run's {', '.join(p.name for p in old)}: removed")
                # what the earlier model's pipeline wrote beside it (gate.sh's layout) is not this model's
                later = [n for n in ("compressed/", "export/", "verify.json", "gate.json") if (out / n).exists()]
                if later:
                    log(f"note: {out}/ also holds {', '.join(later)} of the earlier model, left as they are: compress, "
                        "export and verify this model again before a gate reads them")
    if resuming:
        st = load_train_state(state_path)
        if "train_hash" not in st:
            raise EdgesqueezeError(f"{state_path}: was written by an older edgesqueeze that cannot be resumed; "
                                   "pass --overwrite to start over")
        if st["train_hash"] != recipe.train_hash():
            changed = _changed_keys(st.get("train_part_json"), recipe.train_part())
            said = (f"{', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''} differ"
                    if changed else f"training settings hash {st['train_hash'][:12]}")
            raise EdgesqueezeError(f"{state_path}: was written by a different recipe ({said}; the schedule and the "
                                   "data order depend on them); put them back to resume, or pass --overwrite to "
                                   "start over (to train longer, start a new run with more epochs)")
        started = int(st.get("world_size", 1))
        if started != group.world:
            how = f"torchrun --nproc_per_node {started} -m edgesqueeze train" if started > 1 else "edgesqueeze train"
            raise distributed.DistributedError(
                f"{state_path}: this run was started with {started} process(es) and is resumed with {group.world}; "
                f"resume it with {how} ... --resume (the global batch and the data order depend on it)")
        if device.type == "cpu":
            threads = resume_threads(st.get("threads"), log, "training")
            if cfg.threads and cfg.threads != threads:  # the recipe recorded is the one that computed
                recipe = dataclasses.replace(recipe, train=dataclasses.replace(cfg, threads=threads))
                cfg = recipe.train
                meta["recipe_hash"] = recipe.hash()
        load_state_dict_checked(model, st["state_dict"], source=str(state_path), plain=False)
        optimizer.load_state_dict(st["optimizer"])  # its state moves to the parameters' device
        if scaler is not None and st.get("grad_scaler"):
            scaler.load_state_dict(st["grad_scaler"])
        torch.set_rng_state(st["torch_rng"])
        gen.set_state(st["data_rng"])
        history = json.loads(st["history_json"])
        start_epoch, step = int(st["epoch"]), int(st["step"])
        log(f"resuming {out} after epoch {start_epoch}/{n_epochs}")
    elif resume:
        log(f"nothing to resume in {out}: starting from scratch")

    if device.type == "cpu":  # float sums depend on it; `threads: 0` does not say what it was
        meta["train_threads"] = threads
    if group.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "recipe.json", json.dumps(recipe.to_dict(), indent=2, sort_keys=True))
    log(f"training {recipe.model.arch} on {ds.name}: {len(x_tr)} train / {len(x_val)} val images, "
        f"{n_epochs} epoch{'s' if n_epochs != 1 else ''} ({total_steps} steps of {steps_per_epoch} an epoch), "
        + (f"{threads} thread{'s' if threads != 1 else ''}" + ("" if cfg.precision == "fp32" else f" ({cfg.precision})")
           if device.type == "cpu" else f"on {device} ({cfg.precision})")
        + (f", {group.world} processes (torch.distributed)" if group.active else "") + f" -> {out}")

    if cfg.optimizer != "sgd" and (cfg.momentum != 0.9 or cfg.nesterov is not True):
        log(f"note: train.momentum and train.nesterov apply to sgd only; {cfg.optimizer} ignores them")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start_epoch, n_epochs):
        t0 = time.perf_counter()
        steps = min(steps_per_epoch, total_steps - step)
        it = batches(x_tr, y_tr, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                     mean=ds.mean, std=ds.std, augment=augment, drop_last=len(x_tr) >= cfg.batch_size,
                     channels_last=cfg.channels_last, part=(group.rank, group.world))
        step, loss_sum, correct, seen = train_one_epoch(
            trained, optimizer, distributed.shard(it, group), cfg=cfg, steps=steps, step=step,
            total_steps=total_steps, loss_fn=loss_fn, desc=f"epoch {epoch + 1}/{n_epochs}", progress=progress,
            scaler=scaler)
        if group.active:  # every rank's share of the epoch
            loss_sum, correct, seen = distributed.sum_all(group, [loss_sum, correct, seen])
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr_at(step - 1, total_steps, cfg),
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
        }
        if len(x_val):
            val = evaluate(model, x_val, y_val, mean=ds.mean, std=ds.std, batch_size=cfg.eval_batch_size,
                           channels_last=cfg.channels_last)
            row["val_loss"], row["val_accuracy"] = val["loss"], val["accuracy"]
        row["epoch_s"] = time.perf_counter() - t0
        history.append(row)
        val_txt = f"  val loss {row['val_loss']:.4f} acc {100 * row['val_accuracy']:.2f}%" if len(x_val) else ""
        log(f"epoch {epoch + 1:>3}/{n_epochs}  train loss{' (smoothed)' if cfg.label_smoothing else ''} "
            f"{row['train_loss']:.4f} acc "
            f"{100 * row['train_accuracy']:.2f}%{val_txt}  ({row['epoch_s']:.1f}s)")
        if group.main:  # the other ranks hold the same state and write nothing
            _save_state(state_path, model, optimizer, gen, scaler, group, epoch=epoch + 1, step=step,
                        history=history, recipe=recipe, meta=meta)
            _write_metrics(out, history)

    try:
        test = evaluate(model, ds.test_x, ds.test_y, mean=ds.mean, std=ds.std, batch_size=cfg.eval_batch_size,
                        channels_last=cfg.channels_last)
    except DataError as e:  # a streamed test/ split is decoded only now, after the training
        if not n_epochs or not state_path.is_file():
            raise
        raise DataError(f"{e}. The training itself finished and is saved in {state_path}: fix the test "
                        f"images, then rerun with --resume to evaluate without training again") from None
    wall = time.perf_counter() - t_start
    meta["metrics"] = {
        "test": test,
        "val": {k: history[-1][k] for k in ("val_loss", "val_accuracy") if history and k in history[-1]},
        "epochs": n_epochs,
    }  # no wall times in the checkpoint: same recipe and seed, same bytes (they go to summary.json)
    if cfg.channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    model = model.cpu().eval()  # what compress, export and the caller expect: as load_model gives model.pt
    if group.active:
        meta["train_processes"] = group.world
    ckpt = out / "model.pt"
    if group.main:
        save_checkpoint(ckpt, model, meta)
        if history:
            plot_curves(history, out / "curves.png", f"{recipe.name}: {recipe.model.arch} on {ds.name}",
                        label_smoothing=cfg.label_smoothing)
        write_text_atomic(out / "summary.json", json.dumps({
            "test": test, "history": history[-1:] if history else [], "wall_s": wall,
            "train_wall_s": round(sum(h["epoch_s"] for h in history), 2)}, indent=2))
    distributed.barrier(group)  # every rank returns once the files are there
    top5 = f", top-5 {100 * test['top5']:.2f}%" if "top5" in test else ""
    log(f"test accuracy {100 * test['accuracy']:.2f}%{top5} on {test['n']} images; wall {wall:.1f}s")
    return TrainResult(model, history, test, out, ckpt, wall, meta, group.main)
