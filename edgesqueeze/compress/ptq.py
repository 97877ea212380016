"""Post-training lossy re-compression of a pruned, weight-shared model, with no training set.

The released Deep Compression SqueezeNet is already pruned and shared through 8-bit codebooks;
there is no ImageNet training set to fine-tune on, only a handful of unlabeled calibration
images. This stage keeps the pruning mask and re-clusters the surviving weights of each layer
into fewer centroids, spending the calibration images where held-out measurements
(``benchmarks/imagenet_lossy.py``, 2-fold cross-validation on 100 images) showed it pays:

1. **Statistics** (:func:`calibration_stats`): the diagonal Fisher information of the
   model's own predictive distribution, ``F_i = E_x E_{y~p(.|x)} (d log p(y|x) / dw_i)^2``,
   and each layer's input Hessian ``H = E[u u^T]`` (``u``: the unfolded input patch). Around
   the original weights ``KL(p_orig || p_quant) ~ 1/2 dw^T F dw`` (the KL's gradient there is
   zero and its Hessian is the Fisher), so these turn any weight perturbation into a
   predicted output divergence in nats, additive over layers (:func:`predicted_kl`). No
   labels are needed: ``y`` is sampled from the model itself.
2. **Candidates** (:func:`layer_candidates`): each layer is clustered at every candidate
   size (``levels_per_octave`` sizes per doubling from ``2**min_bits`` to ``2**max_bits``)
   by k-means weighted by each weight's input energy (``diag H``), then its labels are
   re-chosen by **error-compensating assignment** (:func:`gptq_assign`, OBS/GPTQ): each
   weight's rounding error is pushed onto the weights not yet rounded, so errors cancel in
   the layer's output. This was the largest single gain measured (held-out KL at 466 KB
   0.025 -> 0.007). Each candidate's real ``.esq`` section bytes come from the codec.
3. **Bit allocation** (:func:`allocate`): a multiple-choice knapsack picks, per layer, the
   candidate that minimises the total predicted KL under the archive's byte budget. Layers
   differ a lot: the same bytes buy far more fidelity in some layers than in others.
4. **Bias correction** (:func:`correct_biases`): quantization shifts each layer's mean output;
   each layer's bias is shifted, in network order and with the upstream layers already
   quantized and corrected, so that its mean output per channel on the calibration images
   equals the original's (Nagel et al. 2019). Biases are stored raw: it costs no bytes.
5. **Distillation** (:func:`distill`, off by default): the centroids (and biases) fine-tuned
   to minimise ``KL(p_orig || p_quant)`` on augmented calibration images; a centroid's
   gradient is the sum of its members' (:func:`~edgesqueeze.compress.cluster.share_weights`).
   With 50 calibration images it lowered the calibration KL but not the held-out KL (after
   error-compensating assignment it raised it), so it is available, measured, and off.

Measured on six held-out halves and not kept (benchmarks/notes.md, session 21): centroids
refitted by least squares on the layer's output error after GPTQ, extra OBS pruning offered
to the knapsack, and sequential re-assignment toward the quantized model's own inputs. Each
lowered an in-sample error; none lowered the held-out KL.

The steps live in :mod:`.ptq_stats` (1), :mod:`.ptq_candidates` (2, 3) and :mod:`.ptq_refine`
(4, 5). :func:`post_training_compress` runs them in that order and returns the model with plain
weights (every layer holds at most ``2**bits`` distinct non-zero values, the same zeros, and
codebooks already rounded to ``codebook_dtype``) so that the codec stores exactly the weights
that were evaluated.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, RecipeError
from .cluster import ClusteredLayer
from ..config.compress import PTQConfig
from ..models.layers import prunable_layers
from .prune import existing_masks
from .ptq_candidates import allocate, candidate_levels, layer_candidates
from .ptq_refine import correct_biases, distill
from .ptq_stats import calibration_stats, logits_of, output_divergence

__all__ = ["post_training_compress"]

VERSION = 1
_HEADER_MARGIN = 32  # bytes kept free for the archive header's CRC-dependent size changes


# ---------------------------------------------------------------------------------------
# The stage


def _index_bits(k: int) -> int:
    """Bits of an index into a ``k``-value codebook (1 for one or two values)."""
    return max(1, math.ceil(math.log2(max(2, k))))


def record_written(report: dict[str, Any], stats: list, archive_bytes: int) -> None:
    """Make a :func:`post_training_compress` report's per-layer bytes and codebook sizes the
    written archive's where the plan differs: the codec may store a section without Huffman
    coding when that is smaller and drops centroids no weight uses, and the archive's
    metadata was sized with a stand-in weights hash. The plan stays as ``planned_bytes`` /
    ``planned_k`` (what the allocation chose on). ``stats``: the codec's per-tensor rows."""
    written = {st.name: st for st in stats}
    for row in report["layers"]:
        st = written.get(f"{row['layer']}.weight")
        if st is None:
            continue
        if st.bytes != row["bytes"]:
            row["planned_bytes"], row["bytes"] = row["bytes"], st.bytes
        if st.k and st.k != row["k"]:
            row["planned_k"], row["k"], row["bits"] = row["k"], st.k, _index_bits(st.k)
    summary = report["summary"]
    if summary["bytes"] != archive_bytes:
        summary["planned_bytes"], summary["bytes"] = summary["bytes"], archive_bytes
        summary["within_budget"] = archive_bytes <= summary["budget"]


def _archive_bytes(model: nn.Module, meta: Mapping[str, Any], codebook_dtype: str) -> int:
    from edgesqueeze.checkpoint import esq_dumps
    from edgesqueeze.format.codec import CHUNK

    # A byte budget spends every byte on fidelity: the default chunk (256), not the faster
    # large-model one, which would take 0.4% of the budget for the chunk index.
    return len(esq_dumps(model.state_dict(), dict(meta), codebook_dtype=codebook_dtype, chunk=CHUNK)[0])


def _set_weights(model: nn.Module, chosen: Mapping[str, ClusteredLayer]) -> None:
    with torch.no_grad():
        for name, layer in chosen.items():
            w = model.get_submodule(name).weight
            w.copy_(layer.weight().to(w.device, w.dtype))


def post_training_compress(model: nn.Module, calib_x: torch.Tensor, config: PTQConfig, *,
                           meta: Mapping[str, Any] | None = None,
                           cache: dict | None = None,
                           log: Callable[[str], None] = print, progress: bool = False,
                           device: torch.device | None = None,
                           ) -> tuple[nn.Module, dict[str, ClusteredLayer], dict[str, Any]]:
    """Re-cluster a pruned model to a byte budget using calibration images only.

    ``calib_x``: normalized float images (N, C, H, W), no labels. ``model`` is not modified;
    the returned copy has plain weights, each layer ``where(mask, codebook[labels], 0)`` with
    the original zeros (``existing_masks``). ``meta`` is the archive metadata the budget is
    measured with (default ``{}``). ``cache``: pass the same dict to several calls with the
    *same model and calibration images* (a sweep over budgets or distillation settings) to
    compute the calibration statistics and the clustered candidates only once.

    ``device``: where the statistics pass runs (step 1, the costly one: a forward and
    ``fisher_samples`` backward passes per image); the other steps run on the CPU.

    Returns ``(model, assignments, report)``; ``report`` has one row per layer (``k``,
    ``bits``, ``bytes``, predicted KL, bias shift) and a summary: the archive bytes, the
    budget, and the calibration KL / agreement after each step (in-sample: they guide, they
    do not validate). Deterministic for a given ``seed``, input and thread count (the archive
    records it: ``compress_threads``).
    """
    if not isinstance(config, PTQConfig):
        raise RecipeError(f"config: expected a PTQConfig, got {type(config).__name__}")
    if not isinstance(calib_x, torch.Tensor) or not calib_x.is_floating_point() or \
            calib_x.dim() < 2 or len(calib_x) == 0:
        raise RecipeError("calib_x: expected a non-empty float tensor of normalized images")
    t_start = time.perf_counter()
    meta = dict(meta or {})
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    work = copy.deepcopy(model).eval()
    layers = prunable_layers(work)
    if not layers:
        raise ModelError("post_training_compress: the model has no Conv2d or Linear layer")
    masks = existing_masks(work)
    bs = config.batch_size
    timings: dict[str, float] = {}
    ref_logits = logits_of(reference, calib_x, bs)

    def calib_score(m: nn.Module) -> dict[str, float]:
        return output_divergence(m, ref_logits, calib_x, batch_size=bs)

    # 1. statistics (only what the config uses); 2. candidates. Both depend on the model
    # and images only through the fields in the keys, so a sweep can share them.
    cache = {} if cache is None else cache
    t = time.perf_counter()
    need_stats = (config.allocation == "fisher" or config.weighting != "none" or config.gptq)
    stats_key = ("stats", config.fisher_samples, config.seed, len(calib_x))
    if need_stats and stats_key not in cache:
        cache[stats_key] = calibration_stats(reference, calib_x,
                                             fisher_samples=config.fisher_samples,
                                             seed=config.seed, batch_size=bs,
                                             log=log if progress else None, device=device)
    stats = cache.get(stats_key) if need_stats else None
    timings["stats_s"] = time.perf_counter() - t

    t = time.perf_counter()
    levels = candidate_levels(config) if config.allocation == "fisher" else [2 ** config.bits]
    cand_key = ("candidates", stats_key if need_stats else None, tuple(levels),
                config.weighting, config.gptq, config.gptq_damp if config.gptq else None,
                config.codebook_dtype, config.init, config.max_iter)
    if cand_key not in cache:
        cache[cand_key] = layer_candidates(
            work, masks, levels, stats=stats, weighting=config.weighting, gptq=config.gptq,
            gptq_damp=config.gptq_damp, codebook_dtype=config.codebook_dtype,
            init=config.init, max_iter=config.max_iter, seed=config.seed)
    cands = cache[cand_key]
    first = {n: c[0].layer for n, c in cands.items()}
    _set_weights(work, first)
    fixed = _archive_bytes(work, meta, config.codebook_dtype) - sum(c[0].bytes
                                                                  for c in cands.values())
    if config.target_bytes is not None:
        budget = config.target_bytes
    else:  # the naive size: plain k-means, every layer at `bits`, no data
        naive_key = ("naive", 2 ** config.bits, config.codebook_dtype, config.init,
                     config.max_iter)
        if naive_key not in cache:
            cache[naive_key] = layer_candidates(
                reference, masks, [2 ** config.bits], codebook_dtype=config.codebook_dtype,
                init=config.init, max_iter=config.max_iter, seed=config.seed)
        budget = fixed + sum(c[0].bytes for c in cache[naive_key].values())
    timings["allocate_s"] = time.perf_counter() - t
    base = work
    # The archive's header is deflated and holds each section's CRC, so new bias or centroid
    # values move its size by a few bytes: allocate with a margin, check at the end, and in
    # the rare case the margin was too small, redo with a larger one.
    slack = _HEADER_MARGIN
    for _attempt in range(4):
        work = copy.deepcopy(base)
        t = time.perf_counter()
        if config.allocation == "uniform":
            pick = {n: 0 for n in cands}
        else:
            while True:
                pick = allocate(cands, budget - fixed - slack)
                _set_weights(work, {n: cands[n][j].layer for n, j in pick.items()})
                size = _archive_bytes(work, meta, config.codebook_dtype)
                if size + _HEADER_MARGIN <= budget or all(j == 0 for j in pick.values()):
                    break
                slack += size + _HEADER_MARGIN - budget
        chosen = {n: cands[n][j].layer for n, j in pick.items()}
        _set_weights(work, chosen)
        size = _archive_bytes(work, meta, config.codebook_dtype)
        timings["allocate_s"] += time.perf_counter() - t
        steps = {"original": {"kl": 0.0, "agreement": 1.0}, "clustered": calib_score(work)}
        log(f"ptq: clustered to {size:,} B (budget {budget:,} B), calibration KL "
            f"{steps['clustered']['kl']:.4f}, agreement {steps['clustered']['agreement']:.3f}")

        # 4. bias correction
        shifts: dict[str, float] = {}
        if config.bias_correction:
            t = time.perf_counter()
            shifts = correct_biases(work, reference, calib_x, batch_size=bs)
            timings["bias_s"] = time.perf_counter() - t
            steps["bias_corrected"] = calib_score(work)
            log(f"ptq: bias corrected, calibration KL {steps['bias_corrected']['kl']:.4f}, "
                f"agreement {steps['bias_corrected']['agreement']:.3f}")

        # 5. distillation
        assignments = dict(chosen)
        losses: list[float] = []
        if config.distill_steps:
            t = time.perf_counter()
            assignments, losses = distill(
                work, reference, chosen, calib_x, steps=config.distill_steps,
                lr=config.distill_lr, batch=config.distill_batch,
                train_bias=config.distill_bias, augment=config.augment,
                codebook_dtype=config.codebook_dtype, seed=config.seed, log=log,
                progress=progress)
            timings["distill_s"] = time.perf_counter() - t
            steps["distilled"] = calib_score(work)
            log(f"ptq: distilled {config.distill_steps} steps, calibration KL "
                f"{steps['distilled']['kl']:.4f}, agreement {steps['distilled']['agreement']:.3f}")
        size = _archive_bytes(work, meta, config.codebook_dtype)
        if size <= budget or config.allocation == "uniform" or all(j == 0 for j in pick.values()):
            break
        log(f"ptq: {size:,} B is {size - budget} B over the budget after the header changed; "
            "allocating again with a larger margin")
        slack += size - budget + _HEADER_MARGIN

    if size > budget:
        further = "lower min_bits to go further" if config.min_bits > 1 else "at 1 bit; prune more to go further"
        log(f"ptq: warning: {size:,} B does not fit the {budget:,} B budget (the smallest "
            f"candidates are chosen; {further})" if config.allocation != "uniform"
            else f"ptq: uniform {config.bits}-bit clustering takes {size:,} B")
    rows = []
    for name, j in pick.items():
        c = cands[name][j]
        rows.append({"layer": name, "nonzero": int(masks[name].sum()), "k": c.k,
                     "bits": _index_bits(c.k), "bytes": c.bytes,
                     "predicted_kl": c.distortion, "mse": c.mse,
                     "bias_shift": shifts.get(name)})
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "config": config.to_dict(),
        "layers": rows,
        "summary": {"bytes": size, "budget": budget, "within_budget": size <= budget,
                    "fixed_bytes": fixed,
                    "n_calibration": len(calib_x), "calibration": steps,
                    "distill_loss_first": losses[:5], "distill_loss_last": losses[-5:],
                    **{k: round(v, 2) for k, v in timings.items()}},
    }
    for p in work.parameters():
        p.requires_grad_(True)
    return work, assignments, report
