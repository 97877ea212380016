"""The Deep Compression pipeline: fold BN, prune + retrain, cluster + retrain centroids, encode.

The order of the stages lives here and only here; each stage's maths lives in its module
(``fold``, ``prune``, ``cluster``, ``codec``). Data flows one way::

    checkpoint -> prune (masks fixed while retraining, BatchNorm still there to help)
               -> fold BatchNorm (zeros stay zeros) -> k-means weight sharing
               -> retrain centroids -> .esq -> decode check

Accuracy is measured on the validation split after every stage (the split carved from the
training set with the checkpoint's own seed, so it was never trained on) and on the test
split once, at the end, for the report.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from edgesqueeze._io import sha256_file, write_bytes_atomic, write_text_atomic
from edgesqueeze.compress import cluster as cluster_mod
from edgesqueeze.compress import codec
from edgesqueeze.compress.cluster import ClusterConfig
from edgesqueeze.compress.fold import conv_bn_pairs, fold_batchnorm
from edgesqueeze.compress.prune import (PruneConfig, Pruner, existing_masks, layer_stats, prunable_layers,
                                        resolve_auto)
from edgesqueeze.errors import EdgesqueezeError, FormatError

Log = Callable[[str], None]
ESQ_META_FORMAT = "edgesqueeze.esq-model"


def _range(**bounds: float) -> dict:
    return {"range": bounds}


@dataclass(frozen=True)
class FinetuneConfig:
    """Retraining after a stage: the fields mean what they mean in ``train``."""

    epochs: float = field(default=1.0, metadata=_range(ge=0, le=1000))
    batch_size: int = field(default=128, metadata=_range(ge=1, le=65_536))
    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = field(default=0.01, metadata=_range(gt=0, le=10))
    momentum: float = field(default=0.9, metadata=_range(ge=0, lt=1))
    nesterov: bool = True
    weight_decay: float = field(default=0.0, metadata=_range(ge=0, le=1))
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_fraction: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    label_smoothing: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    grad_clip: float | None = field(default=None, metadata=_range(gt=0))
    channels_last: bool = False
    augment: bool = True


@dataclass(frozen=True)
class CompressConfig:
    """The ``compress`` section of a recipe. A missing ``prune`` or ``cluster`` skips it."""

    VERSION: ClassVar[int] = 1

    fold_batchnorm: bool = True
    prune: PruneConfig | None = None
    prune_finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cluster: ClusterConfig | None = None
    cluster_finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_batch_size: int = field(default=512, metadata=_range(ge=1, le=65_536))


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
              on_step: Callable[[int], None] | None = None, attach: Callable[[Any], None] | None = None) -> int:
    """Fine-tune ``model`` in place for ``cfg.epochs``; returns the number of steps taken."""
    from edgesqueeze.train import make_optimizer, train_one_epoch

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
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step = 0
    from edgesqueeze.data import batches

    for epoch in range(math.ceil(total / steps_per_epoch)):
        it = batches(x, y, batch_size=cfg.batch_size, shuffle=True, generator=gen, mean=ds.mean, std=ds.std,
                     augment=augment if cfg.augment else None, drop_last=len(x) >= cfg.batch_size,
                     channels_last=cfg.channels_last)
        step, *_ = train_one_epoch(model, optimizer, it, cfg=cfg, steps=min(steps_per_epoch, total - step),
                                   step=step, total_steps=total, loss_fn=loss_fn,
                                   desc=f"{desc} {epoch + 1}", progress=progress, on_step=on_step)
    model.eval()
    return total


def shared_weight_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name in prunable_layers(model)]


def esq_meta(meta: dict, *, folded: bool, extra: dict) -> dict:
    """Archive metadata: the checkpoint's own (architecture, classes, normalization, ...)."""
    return {"format": ESQ_META_FORMAT, "folded_batchnorm": folded, **meta, **extra}


def model_from_esq(data: bytes | str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model an ``.esq`` archive holds (decoding every weight bit-exactly)."""
    from edgesqueeze.checkpoint import load_state_dict_checked, rebuild

    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    state, meta = codec.loads_model(raw)
    if meta.get("format") != ESQ_META_FORMAT or "arch" not in meta:
        raise FormatError("meta: not an edgesqueeze model archive (no 'arch')")
    model = rebuild(meta["arch"], meta.get("arch_kwargs", {}), folded_batchnorm=bool(meta.get("folded_batchnorm")))
    load_state_dict_checked(model, state, source=str(data) if not isinstance(data, bytes) else "archive")
    return model.eval(), meta


# ---------------------------------------------------------------------------------------


def compress(
    checkpoint: str | Path,
    config: CompressConfig,
    *,
    out_dir: str | Path,
    seed: int = 0,
    data_dir: str | Path | None = None,
    dataset: str | None = None,
    recipe_hash: str | None = None,
    progress: bool = True,
    log: Log = print,
) -> CompressResult:
    """Compress the model in ``checkpoint`` into ``out_dir/model.esq`` with a report."""
    from edgesqueeze.data import default_augment
    from edgesqueeze.train import evaluate

    t_start = time.perf_counter()
    out = Path(out_dir)
    loaded, meta, ds, (x_tr, y_tr), (x_val, y_val), mean, std = _load_with_data(checkpoint, dataset, data_dir)
    ds_norm = dataclasses.replace(ds, mean=tuple(mean), std=tuple(std))
    data = (x_tr, y_tr, ds_norm, default_augment(ds.name))
    ebs = config.eval_batch_size

    def val_acc(m: nn.Module) -> float | None:
        if not len(x_val):
            return None
        return evaluate(m, x_val, y_val, mean=mean, std=std, batch_size=ebs)["accuracy"]

    model = copy.deepcopy(loaded.model)  # the stages work in place; keep the original to compare
    dense_bytes = _float_bytes(model)
    stages: list[dict[str, Any]] = []

    def record(stage: str, m: nn.Module, size: int | None, note: str = "") -> None:
        acc = val_acc(m)
        stages.append({"stage": stage, "val_accuracy": acc, "bytes": size, "note": note})
        acc_txt = f"val {100 * acc:.2f}%" if acc is not None else "no val split"
        log(f"[{stage}] {acc_txt}" + (f", {size:,} B" if size else "") + (f" ({note})" if note else ""))

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
        if pcfg.schedule == "oneshot" or ft.epochs <= 0:
            pruner.update(None)
            record("prune (before retraining)", model, None, f"{_density(model):.1%} of weights kept")
        _finetune(model, data, ft, seed=seed, desc="prune-retrain", progress=progress,
                  on_step=pruner.update if pcfg.schedule == "gradual" else None, attach=pruner.attach)
        pruner.update(None)
        pruner.detach()
        masks = pruner.masks
        record("prune", model, None, f"{_density(model):.1%} of weights kept")

    # Fold BatchNorm after pruning (retraining needs BN; a per-channel rescale keeps zeros) and
    # before weight sharing, so that what is clustered is exactly what runs.
    folded = False
    if config.fold_batchnorm and conv_bn_pairs(model):
        model = fold_batchnorm(model)
        folded = True
        record("fold-bn", model, None, "BatchNorm folded into convs")

    assignments: dict[str, Any] = {}
    if config.cluster is not None:
        model, assignments = cluster_mod.cluster_model(model, config.cluster, masks, path="compress.cluster")
        record("cluster (before retraining)", model, None)
        if config.cluster_finetune.epochs > 0:
            cluster_mod.share_weights(model, assignments, codebook_dtype=config.cluster.codebook_dtype)
            _finetune(model, data, config.cluster_finetune, seed=seed + 1, desc="centroid-retrain",
                      progress=progress)
            assignments = cluster_mod.materialize(model)
            record("cluster", model, None, "centroids retrained")
        model.eval()

    # Encode, then prove the archive decodes to exactly the model held in memory.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shared = shared_weight_names(model) if assignments else "auto"
    # The full config is in report.json; the archive keeps its hash (small models: every byte counts).
    config_sha = hashlib.sha256(json.dumps(_jsonable(config), sort_keys=True).encode()).hexdigest()
    from edgesqueeze.verify import state_digest

    test_before = evaluate(loaded.model, ds.test_x, ds.test_y, mean=mean, std=std, batch_size=ebs)
    extra = {"compress_config_sha256": config_sha, "source_sha256": sha256_file(checkpoint),
             "weights_sha256": state_digest(state), "reference_accuracy": test_before["accuracy"],
             "recipe_hash": recipe_hash or meta.get("recipe_hash")}
    archive_meta = esq_meta({k: v for k, v in meta.items() if k not in ("metrics",)}, folded=folded, extra=extra)
    blob, layer_stats_ = codec.dumps_model(state, archive_meta, shared=shared,
                                           codebook_dtype=config.cluster.codebook_dtype if config.cluster else "float32")
    esq_path = out / "model.esq"
    write_bytes_atomic(esq_path, blob)
    decoded, _ = model_from_esq(esq_path)
    for key, tensor in decoded.state_dict().items():
        if not torch.equal(tensor, state[key]):
            raise EdgesqueezeError(f"decode check failed: {key} differs after the .esq round trip (a bug)")
    record("esq", decoded, len(blob), "decoded from the archive")

    test_after = evaluate(decoded, ds.test_x, ds.test_y, mean=mean, std=std, batch_size=ebs)
    from edgesqueeze.compress import report as report_mod

    report = report_mod.build(
        layers=layer_stats_, stages=stages, dense_bytes=dense_bytes, esq_bytes=len(blob), state=state,
        test_before=test_before, test_after=test_after, layer_rows=layer_stats(decoded),
        bits={n: a.bits for n, a in assignments.items()}, wall_s=time.perf_counter() - t_start,
        checkpoint=str(checkpoint), esq=str(esq_path), config=_jsonable(config),
    )
    if auto_scan:
        report["auto_sparsity"] = auto_scan
    report_mod.write(out, report, before=loaded.model, after=decoded)
    log(f"{esq_path}: {len(blob):,} bytes ({dense_bytes / len(blob):.1f}x smaller than dense fp32); "
        f"test {100 * test_before['accuracy']:.2f}% -> {100 * test_after['accuracy']:.2f}%")
    return CompressResult(decoded, esq_path, len(blob), report, out)


def _load_with_data(checkpoint, dataset, data_dir):
    """The checkpoint, its dataset and split (see :func:`training_data`), its normalization."""
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.evaluate import training_data

    loaded = load_model(checkpoint)
    meta = dict(loaded.meta)
    if "arch" not in meta:
        raise EdgesqueezeError(f"{checkpoint}: needs an edgesqueeze checkpoint (with its architecture)")
    ds, train, val = training_data(meta, source=checkpoint, dataset=dataset, data_dir=data_dir)
    return loaded, meta, ds, train, val, meta.get("mean", ds.mean), meta.get("std", ds.std)


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
    from edgesqueeze.train import evaluate

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
