"""Magnitude pruning, Deep Compression's first stage (Han, Mao, Dally 2016).

Per layer, the smallest-magnitude weights are set to zero and stay zero while the network is
fine-tuned ("retrain with the mask fixed; iterate"). Prunable layers are the ``weight`` of
every ``Conv2d`` and ``Linear``, named by module name (``features.3.squeeze``,
``classifier.1``); biases and BatchNorm are left alone: they are few and sensitive.

Pieces, from pure maths up:

- :func:`magnitude_mask` and :func:`polynomial_sparsity` (Zhu & Gupta 2017's gradual
  schedule) are pure functions on tensors / numbers.
- :class:`PruneConfig` says how sparse each layer gets and when; it validates every field and
  round-trips through ``to_dict`` / ``from_dict``.
- :class:`Pruner` holds one mask per layer, updates the masks on the schedule and, once
  attached to an optimizer, keeps pruned weights at exactly 0.0 through SGD momentum, weight
  decay and Adam(W).
- :func:`apply` is the one-shot stage: ``(model, config) -> (pruned copy, StageReport)``.
- :func:`sensitivity_scan` / :func:`choose_sparsities` pick per-layer sparsities from
  measured accuracy drops.

Zeros are the mask: a later stage recovers it with :func:`existing_masks` (the non-zeros), so
no side channel is needed between pruning, clustering and the container.

The config helpers here (``_check_fields``, ``_config_from_dict``, ``_resolve_layer_names``)
and :class:`StageReport` are shared with ``cluster.py`` and ``fold.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config.compress import PruneConfig
from ..errors import RecipeError
from ..models.layers import check_layer_names, prunable_layers

__all__ = [
    "Pruner", "StageReport", "apply", "apply_masks", "choose_sparsities",
    "existing_masks", "layer_stats", "magnitude_mask", "sensitivity_scan",
]

VERSION = 1


# ---------------------------------------------------------------------------------------
# Shared by the compression stages


@dataclass(frozen=True)
class StageReport:
    """What a stage did, as JSON: one row per layer plus a summary."""

    stage: str
    config: dict[str, Any]
    layers: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)


# ---------------------------------------------------------------------------------------
# Pure maths


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask (True = keep) of the largest-|w| ``1 - sparsity`` fraction of ``weight``.

    Exactly ``floor((1 - sparsity) * numel + 0.5)`` entries are kept (round half up), and at
    least one: a sparsity below 1 never disconnects a layer (a 1-weight gate at 0.6 rounded
    to none kept, silently). Ties in
    |w| are broken by position: a stable descending sort keeps the earlier index, so the mask
    is deterministic. Existing zeros have the smallest magnitude and go first.

    Example (sparsity 0.75 keeps 1 of 4)::

        >>> w = torch.tensor([0.3, -0.2, -0.01, 0.05])
        >>> magnitude_mask(w, 0.75)                     # keeps [0.3, 0, 0, 0]
        tensor([ True, False, False, False])
        >>> magnitude_mask(torch.ones(4), 0.5)          # ties: earlier indices win
        tensor([ True,  True, False, False])
        >>> magnitude_mask(torch.tensor([-0.5]), 0.6)   # a layer of one weight keeps it
        tensor([True])
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0 <= sparsity < 1:
        raise RecipeError(f"sparsity: must be >= 0 and < 1, got {sparsity!r}")
    n = weight.numel()
    keep = min(n, max(1, math.floor((1 - sparsity) * n + 0.5)))
    order = torch.sort(weight.detach().abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
    mask[order[:keep]] = True
    return mask.view(weight.shape)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero pruned weights in place. ``masked_fill`` writes +0.0 (``w * 0`` could give -0.0)."""
    with torch.no_grad():
        for name, mask in masks.items():
            w = model.get_submodule(name).weight
            w.masked_fill_(~mask.to(w.device), 0.0)


def existing_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``weight != 0`` for every prunable layer: the mask of a model pruned earlier.

    The released Deep Compression SqueezeNet is 34% dense; a later stage that must not revive
    its zeros (fine-tuning, clustering) starts from these masks.
    """
    return {name: m.weight.detach() != 0 for name, m in prunable_layers(model).items()}


def layer_stats(model: nn.Module) -> list[dict[str, Any]]:
    """One row per prunable layer: ``layer, type, shape, numel, nonzero, density``."""
    rows = []
    for name, m in prunable_layers(model).items():
        w = m.weight.detach()
        numel, nonzero = w.numel(), int(torch.count_nonzero(w))
        rows.append({"layer": name, "type": type(m).__name__, "shape": list(w.shape),
                     "numel": numel, "nonzero": nonzero,
                     "density": nonzero / numel if numel else 1.0})
    return rows


# ---------------------------------------------------------------------------------------
# Masks through fine-tuning


class Pruner:
    """One mask per prunable layer of ``model``, updated on the config's schedule.

    Masks only ever shrink: a weight pruned at one step stays pruned (its value is 0 and its
    gradient is masked, so ranking it again would be meaningless), and ``keep`` masks (e.g.
    :func:`existing_masks` of an already pruned model) are never revived.

    During fine-tuning, ``attach(optimizer)`` guarantees pruned weights stay exactly 0.0:

    1. a gradient hook zeroes their gradients, so momentum, Adam moments and gradient
       clipping never see them;
    2. a post-step hook on the optimizer re-applies the masks after every ``step()``: weight
       decay and stale momentum would otherwise move them;
    3. whenever masks change, the optimizer's per-parameter state (SGD ``momentum_buffer``,
       Adam ``exp_avg`` / ``exp_avg_sq``) is zeroed at the newly pruned positions, so
       history from before pruning does not keep pushing against the mask.

    Typical loop::

        pruner = Pruner(model, PruneConfig(sparsity=0.7, schedule="gradual", end=1000))
        pruner.attach(optimizer)
        for step, (x, y) in enumerate(batches):
            pruner.update(step)
            loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        pruner.detach()
    """

    def __init__(self, model: nn.Module, config: PruneConfig, *,
                 keep: Mapping[str, torch.Tensor] | None = None, path: str = "prune") -> None:
        self.model = model
        self.config = config
        self.targets = config.targets(model, path=path)
        layers = prunable_layers(model)
        check_layer_names(keep or {}, list(layers), "keep")
        self.masks: dict[str, torch.Tensor] = {}
        for name in self.targets:
            w = layers[name].weight
            mask = torch.ones_like(w, dtype=torch.bool)
            if keep and name in keep:
                mask &= keep[name].to(device=w.device, dtype=torch.bool)
            self.masks[name] = mask
        self._handles: list[Any] = []
        self._optimizers: list[torch.optim.Optimizer] = []

    def sparsity_at(self, step: int | None) -> dict[str, float]:
        return {n: self.config.sparsity_at(step, s) for n, s in self.targets.items()}

    def update(self, step: int | None = None) -> bool:
        """Recompute masks for ``step`` (``None``: final sparsity), apply them; True if any
        mask changed. Cheap to call every step: it does nothing until the schedule moves."""
        changed = False
        for name, s in self.sparsity_at(step).items():
            w = self.model.get_submodule(name).weight.detach()
            # the masks follow the model (retraining may run it on a GPU): a no-op on one device
            old = self.masks[name] = self.masks[name].to(w.device)
            pruned_now = int(old.numel() - torch.count_nonzero(old))
            if pruned_now >= math.floor(s * old.numel() + 0.5) and step is not None:
                continue  # already at least this sparse
            new = magnitude_mask(w.masked_fill(~old, 0.0), s) & old
            if not torch.equal(new, old):
                self.masks[name] = new
                changed = True
        self.apply_masks()
        if changed:
            for opt in self._optimizers:
                self.zero_optimizer_state(opt)
        return changed

    def apply_masks(self, model: nn.Module | None = None) -> None:
        apply_masks(self.model if model is None else model, self.masks)

    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every weight-shaped state tensor (momentum, Adam moments) at pruned positions."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                w = self.model.get_submodule(name).weight
                for value in optimizer.state.get(w, {}).values():
                    if torch.is_tensor(value) and value.shape == mask.shape:
                        value.masked_fill_(~mask.to(value.device), 0.0)

    def attach(self, optimizer: torch.optim.Optimizer) -> Pruner:
        """Keep pruned weights at exactly 0.0 while ``optimizer`` trains the model."""
        if not self._handles:  # gradient hooks once, however many optimizers
            for name in self.masks:
                w = self.model.get_submodule(name).weight
                # Reads self.masks at call time: gradual pruning replaces the mask tensors.
                self._handles.append(w.register_hook(
                    lambda g, n=name: g.masked_fill(~self.masks[n].to(g.device), 0.0)))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_masks()))
        self._optimizers.append(optimizer)
        self.zero_optimizer_state(optimizer)
        self.apply_masks()
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._optimizers.clear()

    def stats(self) -> list[dict[str, Any]]:
        rows = {r["layer"]: r for r in layer_stats(self.model)}
        return [{**rows[n], "target_sparsity": self.targets[n],
                 "mask_density": float(m.float().mean()) if m.numel() else 1.0}
                for n, m in self.masks.items()]


def apply(model: nn.Module, config: PruneConfig, *, keep_existing: bool = True,
          step: int | None = None, path: str = "prune") -> tuple[nn.Module, StageReport]:
    """One-shot prune a copy of ``model`` to the config's targets (or its schedule at ``step``).

    With ``keep_existing`` the model's current zeros stay pruned even where the target is
    lower (a pretrained pruned model is never densified), so a layer's sparsity is
    ``max(target, existing)``. Fine-tuning afterwards: ``Pruner(pruned, config,
    keep=existing_masks(pruned)).attach(optimizer)``.
    """
    pruned = copy.deepcopy(model)
    keep = existing_masks(pruned) if keep_existing else None
    pruner = Pruner(pruned, config, keep=keep, path=path)
    pruner.update(step)
    rows = pruner.stats()
    numel = sum(r["numel"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    summary = {"numel": numel, "nonzero": nonzero, "density": nonzero / numel if numel else 1.0}
    return pruned, StageReport("prune", config.to_dict(), rows, summary)


# ---------------------------------------------------------------------------------------
# Sensitivity


def sensitivity_scan(model: nn.Module, layers: Sequence[str] | None,
                     sparsities: Sequence[float],
                     eval_fn: Callable[[nn.Module], float],
                     done: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Prune one layer at a time (others untouched) and measure ``eval_fn(model)``; ``done(1)``
    after each measurement (a progress bar's update).

    Works on one deep copy whose weights are restored after each measurement, so ``model`` is
    never modified. ``layers=None`` scans every prunable layer. Returns rows
    ``{"layer", "sparsity", "accuracy"}`` (JSON-ready), sparsities ascending per layer.
    """
    work = copy.deepcopy(model)
    known = list(prunable_layers(work))
    layers = known if layers is None else list(layers)
    check_layer_names(layers, known, "layers")
    rows = []
    for name in layers:
        w = work.get_submodule(name).weight
        original = w.detach().clone()
        for s in sorted(sparsities):
            with torch.no_grad():
                w.masked_fill_(~magnitude_mask(original, s), 0.0)
            rows.append({"layer": name, "sparsity": float(s), "accuracy": float(eval_fn(work))})
            if done is not None:
                done(1)
            with torch.no_grad():
                w.copy_(original)
    return rows


def choose_sparsities(table: Iterable[Mapping[str, Any]], max_drop: float,
                      baseline: float) -> dict[str, float]:
    """Per layer, the largest scanned sparsity whose accuracy drop is <= ``max_drop``.

    Heuristic: walk each layer's sparsities in ascending order and stop at the first one
    whose drop ``baseline - accuracy`` exceeds ``max_drop``; the answer is the last one
    before it (0.0 if even the smallest fails). Stopping at the first failure, rather than
    taking the largest passing sparsity anywhere, ignores a lucky noisy point past a cliff.
    Single-layer drops do not add up exactly when all layers are pruned together, so choose
    ``max_drop`` below the total budget and fine-tune afterwards, as the paper does.

        >>> t = [{"layer": "a", "sparsity": s, "accuracy": acc}
        ...      for s, acc in [(0.5, 0.99), (0.7, 0.97), (0.8, 0.985), (0.9, 0.5)]]
        >>> choose_sparsities(t, max_drop=0.01, baseline=0.99)
        {'a': 0.5}
    """
    by_layer: dict[str, list[tuple[float, float]]] = {}
    for row in table:
        by_layer.setdefault(row["layer"], []).append((float(row["sparsity"]),
                                                      float(row["accuracy"])))
    chosen = {}
    for name, points in by_layer.items():
        best = 0.0
        for s, acc in sorted(points):
            if baseline - acc > max_drop:
                break
            best = s
        chosen[name] = best
    return chosen


def resolve_auto(config: PruneConfig, model: nn.Module, eval_fn: Callable[[nn.Module], float], *,
                 path: str = "prune") -> tuple[PruneConfig, dict[str, Any]]:
    """Turn ``sparsity: auto`` into per-layer sparsities from a sensitivity scan.

    Each layer is pruned alone at every ``scan`` sparsity and measured with ``eval_fn``
    (validation accuracy); a layer gets the largest sparsity whose drop stays within
    ``max_drop`` accuracy points (:func:`choose_sparsities`). Explicit settings still win:
    ``layers``, ``first_conv``, ``last_conv``, ``conv`` and ``linear`` are applied on top,
    as for a numeric ``sparsity``. Returns the resolved config and the scan (for the report).
    A config without ``auto`` comes back unchanged with an empty scan.
    """
    if config.sparsity != "auto":
        return config, {}
    fixed = config.explicit(model, path=path)
    todo = [n for n in prunable_layers(model) if n not in fixed]
    baseline = float(eval_fn(model))
    rows = sensitivity_scan(model, todo, config.scan, eval_fn) if todo else []
    chosen = choose_sparsities(rows, config.max_drop / 100, baseline)
    layers = {**chosen, **fixed}
    resolved = dataclasses.replace(config, sparsity=0.0, layers=layers)
    return resolved, {"baseline": baseline, "max_drop_points": config.max_drop, "rows": rows,
                      "chosen": chosen}
