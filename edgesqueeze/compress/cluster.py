"""Weight sharing, Deep Compression's second stage: k-means per layer, then trained centroids.

Each prunable layer's surviving (non-zero) weights are clustered into ``2**bits`` centroids;
a weight is then stored as a ``bits``-wide index into the layer's codebook. Pruned weights
are not clustered: they stay exact zeros, stored by the sparse index, so the codebook is spent
on the weights that exist. (``include_zero`` instead reserves code 0 for 0.0, for layouts that
store an index for every weight; survivors then share ``2**bits - 1`` centroids.)

Initialisation matters more than the k-means itself; the paper compared three:

- ``linear``: centroids evenly spaced over [min, max] of the survivors. The paper's winner:
  large weights are rare but important, and only linear init gives them centroids.
- ``density``: quantiles of the weights' CDF: dense near 0, where the weights are.
- ``kmeans++``: D^2 sampling (seeded).

Trained quantization: :func:`share_weights` replaces each clustered weight by a
parametrization computing ``where(mask, codebook[labels], 0)``; autograd's backward of that
gather is a scatter-add, so each centroid's gradient is exactly the sum of the gradients of
the weights in its cluster, as in the paper. Assignments and zeros stay fixed. After
fine-tuning, :func:`materialize` writes plain weights back.

A clustered model's weights already are ``codebook[labels]``; clustering it again with the same
``bits`` is lossless (k-means with k >= the number of distinct values returns them exactly),
which is how a later stage (the container) recovers codebooks and labels from a plain model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import RecipeError
from ..config.compress import ClusterConfig
from ..models.layers import check_layer_names, prunable_layers
from .prune import StageReport, existing_masks

__all__ = [
    "ClusteredLayer", "SharedWeights", "apply", "cluster_layer",
    "cluster_model", "codebook_parameters", "kmeans_1d", "materialize", "share_weights",
]

VERSION = 1
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------
# 1-D k-means


def _init_centroids(sv: np.ndarray, sw: np.ndarray, k: int, init: str,
                    seed: int) -> np.ndarray:
    """Initial centroids from sorted values ``sv`` with weights ``sw``, ascending."""
    if init == "linear":
        return np.linspace(sv[0], sv[-1], k)
    if init == "density":
        # Evenly spaced points on the (weighted) CDF's y axis, mapped back to values.
        cdf = np.cumsum(sw)
        targets = (np.arange(k) + 0.5) / k * cdf[-1]
        return sv[np.minimum(np.searchsorted(cdf, targets), sv.size - 1)]
    if init == "kmeans++":
        rng = np.random.default_rng(seed)
        centroids = [sv[rng.choice(sv.size, p=sw / sw.sum())]]
        d2 = (sv - centroids[0]) ** 2
        for _ in range(k - 1):
            p = d2 * sw
            total = p.sum()
            if total <= 0:  # every weighted point sits on a centroid already
                break
            c = sv[rng.choice(sv.size, p=p / total)]
            centroids.append(c)
            np.minimum(d2, (sv - c) ** 2, out=d2)
        return np.sort(np.asarray(centroids))
    raise RecipeError(f"init: must be one of 'linear', 'kmeans++', 'density', got {init!r}")


def _lloyd_sorted(sv: np.ndarray, sw: np.ndarray, c: np.ndarray, max_iter: int) -> np.ndarray:
    """Exact Lloyd iterations on sorted 1-D data; returns the final centroids, ascending.

    In 1-D the clusters are contiguous runs of the sorted values, split at the midpoints
    between neighbouring centroids. With prefix sums of ``w`` and ``w * x``, one iteration is
    ``k`` binary searches and ``k`` subtractions, O(k log n) instead of O(n k). It stops at
    the exact fixed point (no split moves) or after ``max_iter`` iterations. A value exactly
    on a midpoint joins the lower cluster.

    An empty cluster (common with linear init: few weights sit in the tails) is moved, as
    scikit-learn does, onto the value farthest (weighted squared error) from the centroid it
    was assigned to in this iteration, usually a lone large weight in a tail, so the codebook
    is not wasted; that costs O(n) only in iterations that have empty clusters.
    """
    cw = np.concatenate([[0.0], np.cumsum(sw)])
    cwx = np.concatenate([[0.0], np.cumsum(sw * sv)])
    prev = None
    for _ in range(max_iter):
        splits = np.searchsorted(sv, (c[:-1] + c[1:]) / 2, side="right")
        if prev is not None and np.array_equal(splits, prev):
            break
        prev = splits
        edges = np.concatenate([[0], splits, [sv.size]])
        mass = cw[edges[1:]] - cw[edges[:-1]]
        total = cwx[edges[1:]] - cwx[edges[:-1]]
        filled = mass > 0
        new = np.where(filled, total / np.where(filled, mass, 1.0), c)
        if not filled.all():
            new[~filled] = _far_values(sv, sw, c, edges, int((~filled).sum()))
        c = np.sort(new)
    return c


def _far_values(sv: np.ndarray, sw: np.ndarray, c: np.ndarray, edges: np.ndarray,
                count: int) -> np.ndarray:
    """``count`` distinct values with the largest weighted squared error to their centroids
    ``c`` (assignment given by ``edges``; ties: lowest index), padded with the largest value
    if too few have any error."""
    err = sw * (sv - np.repeat(c, np.diff(edges))) ** 2
    m = min(sv.size, 4 * count + 16)
    top = np.argpartition(-err, m - 1)[:m] if m < sv.size else np.arange(sv.size)
    top = top[np.lexsort((top, -err[top]))]
    picked: list[float] = []
    for i in top:
        if err[i] <= 0:
            break
        if sv[i] not in picked:
            picked.append(sv[i])
            if len(picked) == count:
                break
    picked += [sv[-1]] * (count - len(picked))
    return np.asarray(picked)


def _lloyd_sklearn(v: np.ndarray, w: np.ndarray, c: np.ndarray, max_iter: int,
                   seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=c.size, init=c.reshape(-1, 1), n_init=1, algorithm="lloyd",
                max_iter=max_iter, tol=0.0, random_state=seed)
    km.fit(v.reshape(-1, 1), sample_weight=w)
    return np.sort(km.cluster_centers_.ravel())


def kmeans_1d(values: np.ndarray, k: int, *, init: str = "linear",
              sample_weight: np.ndarray | None = None, seed: int = 0, max_iter: int = 100,
              backend: Literal["numpy", "sklearn"] = "numpy") -> tuple[np.ndarray, np.ndarray]:
    """Cluster 1-D ``values`` into at most ``k`` groups: ``(centroids ascending, labels)``.

    ``centroids[labels]`` approximates ``values``; ``sample_weight`` weights each value's
    squared error (e.g. by its effect on the output). Deterministic for a given ``seed``
    (only ``kmeans++`` draws random numbers). With ``k`` or fewer distinct values the
    centroids are those values and the result is exact. Clusters left empty are dropped, so
    fewer than ``k`` centroids may come back.

    ``backend="numpy"`` (default) is exact Lloyd on sorted data (:func:`_lloyd_sorted`);
    ``"sklearn"`` runs ``KMeans(init=..., n_init=1, algorithm="lloyd", tol=0)`` from the same
    start, O(n k) per iteration, kept as a cross-check: both reach the same centroids (to
    1e-14) and labels. Measured on 400k Laplace-distributed values, k=256, linear init,
    100 iterations, one thread on a busy 2-core machine: numpy 0.15 s, scikit-learn 12.3 s.

    Example (linear init over [0, 10] is [0, 5, 10]; Lloyd moves the middle one to 4.5)::

        >>> c, lab = kmeans_1d(np.array([0.0, 1.0, 4.0, 5.0, 10.0]), 3)
        >>> c.tolist(), lab.tolist()
        ([0.5, 4.5, 10.0], [0, 0, 1, 1, 2])
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RecipeError(f"k: must be an integer >= 1, got {k!r}")
    if not np.isfinite(v).all():
        raise RecipeError("kmeans_1d: values must be finite (found NaN or inf)")
    if sample_weight is None:
        w = np.ones_like(v)
    else:
        w = np.asarray(sample_weight, dtype=np.float64).ravel()
        if w.shape != v.shape or not np.isfinite(w).all() or (w < 0).any() \
                or (v.size and w.sum() <= 0):
            raise RecipeError("sample_weight: must be finite, >= 0, one per value, with a "
                              "positive sum")
    if v.size == 0:
        return np.empty(0), np.empty(0, dtype=np.int64)
    order = np.argsort(v, kind="stable")
    sv, sw = v[order], w[order]
    distinct = np.unique(sv)
    if distinct.size <= k:
        return distinct, np.searchsorted(distinct, v)
    c = np.sort(_init_centroids(sv, sw, k, init, seed).astype(np.float64))
    if backend == "numpy":
        c = _lloyd_sorted(sv, sw, c, max_iter)
    elif backend == "sklearn":
        c = _lloyd_sklearn(v, w, c, max_iter, seed)
    else:
        raise RecipeError(f"backend: must be 'numpy' or 'sklearn', got {backend!r}")
    labels = np.searchsorted((c[:-1] + c[1:]) / 2, v, side="left")
    used = np.bincount(labels, minlength=c.size) > 0
    if not used.all():  # drop empty clusters and renumber
        labels = (np.cumsum(used) - 1)[labels]
        c = c[used]
    return c, labels


# ---------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True, eq=False)
class ClusteredLayer:
    """One layer's shared weights: ``weight = where(mask, codebook[labels], 0)``.

    ``labels`` (uint8, weight-shaped) are meaningful only where ``mask`` is True, except with
    ``zero_code``: then ``codebook[0] == 0.0`` and pruned positions carry label 0.
    ``codebook`` holds float32 values already rounded to the stored dtype.
    """

    name: str
    codebook: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    bits: int
    zero_code: bool = False

    def weight(self) -> torch.Tensor:
        w = self.codebook[self.labels.long()]
        return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype))


def cluster_layer(name: str, weight: torch.Tensor, mask: torch.Tensor, bits: int, *,
                  init: str = "linear", max_iter: int = 100, codebook_dtype: str = "float32",
                  include_zero: bool = False, sample_weight: torch.Tensor | None = None,
                  seed: int = 0) -> ClusteredLayer:
    """k-means on the weights where ``mask`` is True (see :class:`ClusterConfig`)."""
    w = weight.detach().cpu()
    mask = mask.detach().cpu().to(torch.bool)
    k = 2 ** bits - (1 if include_zero else 0)
    sw = None if sample_weight is None else sample_weight.detach().cpu()[mask].double().numpy()
    if sw is not None and sw.size and sw.sum() <= 0:
        sw = None  # all survivors weightless: fall back to plain k-means
    centroids, lab = kmeans_1d(w[mask].double().numpy(), k, init=init, sample_weight=sw,
                               seed=seed, max_iter=max_iter)
    codebook = torch.from_numpy(centroids).to(_DTYPES[codebook_dtype]).float()
    if not torch.isfinite(codebook).all():  # finite weights past float16's 65504 (the archive said "NaN")
        raise RecipeError(f"layer {name}: weights up to {float(np.abs(centroids).max()):.3g} do not fit a "
                          f"{codebook_dtype} codebook (largest {float(torch.finfo(_DTYPES[codebook_dtype]).max):g}); "
                          "set codebook_dtype: float32 (compress.cluster or compress.ptq)")
    if codebook.numel() == 0 and not include_zero:
        codebook = torch.zeros(1)  # fully pruned layer: one unused entry keeps gathers valid
    labels = torch.zeros(w.shape, dtype=torch.uint8)
    lab_t = torch.from_numpy(lab).to(torch.uint8)
    if include_zero:
        codebook = torch.cat([torch.zeros(1), codebook])
        lab_t = lab_t + 1
    labels[mask] = lab_t
    return ClusteredLayer(name, codebook, labels, mask, bits, include_zero)


def cluster_model(model: nn.Module, config: ClusterConfig,
                  masks: Mapping[str, torch.Tensor] | None = None, *,
                  sample_weights: Mapping[str, torch.Tensor] | None = None,
                  path: str = "cluster") -> tuple[nn.Module, dict[str, ClusteredLayer]]:
    """A copy of ``model`` whose Conv2d/Linear weights are replaced by shared centroids.

    ``masks`` (default :func:`existing_masks`: the non-zeros) say which weights survive;
    everything else becomes exactly 0.0. Returns the copy and each layer's assignment.
    """
    out = copy.deepcopy(model)
    bits = config.bits_for(out, path=path)
    masks = existing_masks(out) if masks is None else dict(masks)
    check_layer_names(masks, list(bits), "masks")
    if sample_weights:
        check_layer_names(sample_weights, list(bits), "sample_weights")
    assignments = {}
    for name, b in bits.items():
        weight = out.get_submodule(name).weight
        mask = masks.get(name, torch.ones_like(weight, dtype=torch.bool))
        assignments[name] = cluster_layer(name, weight, mask, b, init=config.init, max_iter=config.max_iter,
                                          codebook_dtype=config.codebook_dtype,
                                          include_zero=config.include_zero,
                                          sample_weight=(sample_weights or {}).get(name), seed=config.seed)
    return apply_assignments(out, assignments), assignments


def apply_assignments(model: nn.Module, assignments: Mapping[str, ClusteredLayer]) -> nn.Module:
    """Write each assigned layer's shared weights into ``model`` (in place); returns it."""
    with torch.no_grad():
        for name, layer in assignments.items():
            weight = model.get_submodule(name).weight
            weight.copy_(layer.weight().to(weight.device, weight.dtype))
    return model


def apply(model: nn.Module, config: ClusterConfig, *,
          masks: Mapping[str, torch.Tensor] | None = None,
          sample_weights: Mapping[str, torch.Tensor] | None = None,
          path: str = "cluster") -> tuple[nn.Module, StageReport]:
    """Stage form of :func:`cluster_model`: the clustered copy and a per-layer report."""
    before = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    clustered, assignments = cluster_model(model, config, masks, sample_weights=sample_weights,
                                           path=path)
    rows = []
    for name, layer in assignments.items():
        w0, w1 = before[name], clustered.get_submodule(name).weight.detach()
        err = (w1 - w0)[layer.mask]
        rows.append({
            "layer": name, "numel": w0.numel(), "nonzero": int(layer.mask.sum()),
            "bits": layer.bits, "centroids": int(layer.codebook.numel()),
            "mse": float((err ** 2).mean()) if err.numel() else 0.0,
            "max_abs_err": float(err.abs().max()) if err.numel() else 0.0,
        })
    summary = {"layers": len(rows), "nonzero": sum(r["nonzero"] for r in rows)}
    return clustered, StageReport("cluster", config.to_dict(), rows, summary)


# ---------------------------------------------------------------------------------------
# Trained quantization


class SharedWeights(nn.Module):
    """Parametrization ``weight = where(mask, codebook[labels], 0)`` with a trainable codebook.

    Indexing is a gather; its backward is a scatter-add, so ``codebook.grad[j]`` is the sum
    of ``weight.grad`` over the (unpruned) weights labelled ``j``. Example: labels
    ``[[0, 1], [1, 1]]``, mask all True and ``weight.grad = [[1, 2], [3, 4]]`` give
    ``codebook.grad = [1, 2 + 3 + 4] = [1, 9]``.
    """

    def __init__(self, layer: ClusteredLayer, codebook_dtype: str = "float32") -> None:
        super().__init__()
        self.codebook = nn.Parameter(layer.codebook.detach().clone().float())
        self.register_buffer("labels", layer.labels.long())
        self.register_buffer("mask", layer.mask.clone())
        self.bits = layer.bits
        self.zero_code = layer.zero_code
        self.codebook_dtype = codebook_dtype
        self.param_order: list[str] = []

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        w = self.codebook[self.labels].to(original.dtype)
        return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def share_weights(model: nn.Module, assignments: Mapping[str, ClusteredLayer], *,
                  codebook_dtype: str = "float32") -> nn.Module:
    """Put :class:`SharedWeights` on each assigned layer of ``model`` (in place).

    The plain weight is kept by ``parametrize`` as ``...parametrizations.weight.original``
    and frozen; train with ``model.parameters()`` (frozen ones get no gradient) or with
    :func:`codebook_parameters` plus biases. Call :func:`materialize` before saving.
    """
    for name, layer in assignments.items():
        module = model.get_submodule(name)
        if parametrize.is_parametrized(module, "weight"):
            raise RecipeError(f"{name}: weight is already parametrized; materialize first")
        shared = SharedWeights(layer, codebook_dtype).to(module.weight.device)
        shared.param_order = list(module._parameters)  # materialize restores state_dict order
        parametrize.register_parametrization(module, "weight", shared)
        module.parametrizations.weight.original.requires_grad_(False)
    return model


def _shared(model: nn.Module) -> dict[str, tuple[nn.Module, SharedWeights]]:
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            p = m.parametrizations.weight
            if len(p) == 1 and isinstance(p[0], SharedWeights):
                out[name] = (m, p[0])
    return out


def codebook_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable codebook of every shared layer, by layer name."""
    return {name: sw.codebook for name, (_, sw) in _shared(model).items()}


def round_biases(model: nn.Module, dtype: str, names: Iterable[str] | None = None) -> int:
    """Round the bias of each Conv2d/Linear layer (or of the ``names`` given) to ``dtype``
    and back to its own dtype, in place; return how many biases changed. ``float32`` is a
    no-op. Rounding to nearest moves a bias by at most 2**-11 of its value."""
    if dtype == "float32":
        return 0
    layers = prunable_layers(model)
    changed = 0
    with torch.no_grad():
        for name in (layers if names is None else names):
            bias = layers[name].bias
            if bias is None:
                continue
            rounded = bias.to(_DTYPES[dtype]).to(bias.dtype)
            if not torch.isfinite(rounded).all() and torch.isfinite(bias).all():
                raise RecipeError(f"compress.cluster.bias_dtype: layer {name} has a bias beyond {dtype}'s "
                                  f"range (largest {bias.abs().max().item():.4g}); use bias_dtype: float32")
            changed += int(not torch.equal(rounded, bias))
            bias.copy_(rounded)
    return changed


def materialize(model: nn.Module) -> dict[str, ClusteredLayer]:
    """Write plain weights back (in place) from the trained codebooks; return the assignments.

    Codebooks are rounded to their stored dtype first, and a ``zero_code`` entry is reset to
    0.0, so every layer again holds at most ``2**bits`` distinct values and the same zeros.
    """
    assignments = {}
    for name, (module, sw) in _shared(model).items():
        codebook = sw.codebook.detach().cpu().to(_DTYPES[sw.codebook_dtype]).float()
        if sw.zero_code:
            codebook[0] = 0.0
        layer = ClusteredLayer(name, codebook, sw.labels.cpu().to(torch.uint8), sw.mask.cpu(),
                               sw.bits, sw.zero_code)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        params = module._parameters  # re-registered last; put it back where it was
        for key in [k for k in sw.param_order if k in params]:
            params[key] = params.pop(key)
        with torch.no_grad():
            module.weight.copy_(layer.weight().to(module.weight.device, module.weight.dtype))
        module.weight.requires_grad_(True)
        assignments[name] = layer
    return assignments
