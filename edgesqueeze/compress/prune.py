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
import difflib
import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..errors import RecipeError
from .._config import _build, _check_range, _convert

__all__ = [
    "PruneConfig", "Pruner", "StageReport", "apply", "apply_masks", "choose_sparsities",
    "existing_masks", "layer_stats", "magnitude_mask", "polynomial_sparsity",
    "prunable_layers", "sensitivity_scan",
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


def _range(**bounds: float) -> dict:
    return {"range": bounds}


def _check_fields(cfg: Any) -> None:
    """Type, choice and range checks for every field of a frozen config (from __post_init__).

    Uses the recipe loader's converter, so a config built in Python is held to the same rules
    as one read from YAML; values are normalised in place (an int sparsity becomes a float).
    Messages name the field; :func:`_config_from_dict` adds the section's dotted path.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = _convert(f.name, getattr(cfg, f.name), hints[f.name])
        bounds = f.metadata.get("range")
        if bounds and isinstance(value, (int, float)):
            _check_range(f.name, value, bounds)
        object.__setattr__(cfg, f.name, value)


def _check_layer_values(name: str, values: Any, kind: type, bounds: dict) -> dict:
    """Validate a ``{layer_name: value}`` field; returns a plain dict with converted values."""
    out = {}
    for layer, v in values.items():
        if not isinstance(layer, str) or not layer:
            raise RecipeError(f"{name}: keys must be layer names (strings), got {layer!r}")
        path = f"{name}.{layer}"
        v = _convert(path, v, kind)
        _check_range(path, v, bounds)
        out[layer] = v
    return out


def _config_from_dict(cls: type, raw: Any, path: str) -> Any:
    """Build a stage config from plain data; every error carries ``path`` (e.g. ``prune``)."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{path}: expected a mapping of keys to values, got {type(raw).__name__}")
    raw = dict(raw)
    version = raw.pop("version", cls.VERSION)
    if version != cls.VERSION:
        raise RecipeError(f"{path}.version: this edgesqueeze reads {cls.__name__} version "
                          f"{cls.VERSION}, got {version!r}")
    try:
        return _build("", raw, cls)
    except RecipeError as exc:
        raise RecipeError(f"{path}.{exc}") from None


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _resolve_layer_names(wanted: Iterable[str], known: Sequence[str], path: str) -> None:
    """Refuse names that are not prunable layers of the model, suggesting the closest one."""
    for name in wanted:
        if name in known:
            continue
        hint = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        if hint:
            tip = f"; did you mean '{hint[0]}'?"
        else:
            shown = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
            tip = f"; the model's Conv2d/Linear layers are: {shown} ({len(known)} in all)"
        raise RecipeError(f"{path}.{name}: no Conv2d or Linear layer of that name{tip}")


# ---------------------------------------------------------------------------------------
# Pure maths


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask (True = keep) of the largest-|w| ``1 - sparsity`` fraction of ``weight``.

    Exactly ``floor((1 - sparsity) * numel + 0.5)`` entries are kept (round half up). Ties in
    |w| are broken by position: a stable descending sort keeps the earlier index, so the mask
    is deterministic. Existing zeros have the smallest magnitude and go first.

    Example (sparsity 0.75 keeps 1 of 4)::

        >>> w = torch.tensor([0.3, -0.2, -0.01, 0.05])
        >>> magnitude_mask(w, 0.75)                     # keeps [0.3, 0, 0, 0]
        tensor([ True, False, False, False])
        >>> magnitude_mask(torch.ones(4), 0.5)          # ties: earlier indices win
        tensor([ True,  True, False, False])
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0 <= sparsity < 1:
        raise RecipeError(f"sparsity: must be >= 0 and < 1, got {sparsity!r}")
    n = weight.numel()
    keep = min(n, math.floor((1 - sparsity) * n + 0.5))
    order = torch.sort(weight.detach().abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
    mask[order[:keep]] = True
    return mask.view(weight.shape)


def polynomial_sparsity(step: int, *, final: float, initial: float = 0.0, begin: int = 0,
                        end: int = 1, frequency: int = 1) -> float:
    """Zhu & Gupta (2017) gradual schedule: ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/n)^3``.

    Sparsity rises fast while redundant weights are plentiful and slowly at the end, so
    fine-tuning can recover between steps. Before ``begin`` nothing is pruned; from ``end``
    on the sparsity is ``final``; in between ``t`` is held at the last multiple of
    ``frequency`` after ``begin`` (masks change only every ``frequency`` steps).

    Example (0 -> 0.8 over 10 steps)::

        >>> [round(polynomial_sparsity(t, final=0.8, end=10), 3) for t in (0, 5, 10)]
        [0.0, 0.7, 0.8]
    """
    if step < begin:
        return 0.0
    if step >= end:
        return final
    t = begin + ((step - begin) // frequency) * frequency
    frac = (t - begin) / (end - begin)
    return final + (initial - final) * (1.0 - frac) ** 3


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
# Config


@dataclass(frozen=True)
class PruneConfig:
    """How sparse each layer ends up, and when.

    A layer's target sparsity is the first that applies of: ``layers[name]``; ``first_conv``
    / ``last_conv`` (the first and last Conv2d in module order: the stem sees raw pixels and
    the last conv is SqueezeNet's classifier, both usually kept denser); ``conv`` /
    ``linear`` by type; ``sparsity``. ``schedule: oneshot`` prunes to the target at step
    ``begin``; ``gradual`` follows :func:`polynomial_sparsity` from ``initial_sparsity`` (capped
    at each layer's target) at ``begin`` to the target at ``end``, updating every
    ``frequency`` steps. Steps are whatever the caller counts (optimizer steps or epochs).
    """

    VERSION: ClassVar[int] = VERSION

    sparsity: float | Literal["auto"] = field(default=0.5, metadata=_range(ge=0, lt=1))
    conv: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    linear: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    first_conv: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    last_conv: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    layers: dict[str, float] = field(default_factory=dict)
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    initial_sparsity: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    begin: int = field(default=0, metadata=_range(ge=0))
    end: int = field(default=0, metadata=_range(ge=0))
    frequency: int = field(default=1, metadata=_range(ge=1))
    max_drop: float = field(default=0.5, metadata=_range(gt=0, le=100))
    scan: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)

    def __post_init__(self) -> None:
        _check_fields(self)
        object.__setattr__(self, "layers",
                           _check_layer_values("layers", self.layers, float, {"ge": 0, "lt": 1}))
        for i, v in enumerate(self.scan):
            _check_range(f"scan[{i}]", v, {"ge": 0, "lt": 1})
        object.__setattr__(self, "scan", tuple(sorted(self.scan)))
        if self.sparsity == "auto" and not self.scan:
            raise RecipeError("scan: sparsity 'auto' needs at least one sparsity to scan")
        # end 0 means "the caller decides" (the compress pipeline: 70% of the retraining)
        if self.schedule == "gradual" and self.end and self.end <= self.begin:
            raise RecipeError(f"end: must be > begin ({self.begin}) for schedule 'gradual', "
                              f"got {self.end}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any, *, path: str = "prune") -> PruneConfig:
        return _config_from_dict(cls, raw, path)

    def targets(self, model: nn.Module, *, path: str = "prune") -> dict[str, float]:
        """Final sparsity of every prunable layer of ``model``; unknown ``layers`` refused."""
        if self.sparsity == "auto":
            raise RecipeError(f"{path}.sparsity: 'auto' must be resolved by a sensitivity scan "
                              "first (resolve_auto)")
        explicit = self.explicit(model, path=path)
        return {name: explicit.get(name, self.sparsity) for name in prunable_layers(model)}

    def explicit(self, model: nn.Module, *, path: str = "prune") -> dict[str, float]:
        """The layers whose sparsity is set by name, type, or as first/last conv."""
        layers = prunable_layers(model)
        _resolve_layer_names(self.layers, list(layers), f"{path}.layers")
        convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d)]
        first, last = (convs[0], convs[-1]) if convs else (None, None)
        out = {}
        for name, m in layers.items():
            s = self.conv if isinstance(m, nn.Conv2d) else self.linear
            if name == first and self.first_conv is not None:
                s = self.first_conv
            if name == last and self.last_conv is not None:
                s = self.last_conv
            s = self.layers.get(name, s)
            if s is not None:
                out[name] = s
        return out

    def sparsity_at(self, step: int | None, final: float) -> float:
        """The schedule's sparsity for a layer whose target is ``final`` (``None``: the end)."""
        if step is None:
            return final
        if self.schedule == "oneshot":
            return final if step >= self.begin else 0.0
        if self.end <= self.begin:
            raise RecipeError("end: schedule 'gradual' needs end > begin (steps); set end")
        return polynomial_sparsity(step, final=final, initial=min(self.initial_sparsity, final),
                                   begin=self.begin, end=self.end, frequency=self.frequency)


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
        _resolve_layer_names(keep or {}, list(layers), "keep")
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
            old = self.masks[name]
            pruned_now = int(old.numel() - torch.count_nonzero(old))
            if pruned_now >= math.floor(s * old.numel() + 0.5) and step is not None:
                continue  # already at least this sparse
            w = self.model.get_submodule(name).weight.detach()
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
                     eval_fn: Callable[[nn.Module], float]) -> list[dict[str, Any]]:
    """Prune one layer at a time (others untouched) and measure ``eval_fn(model)``.

    Works on one deep copy whose weights are restored after each measurement, so ``model`` is
    never modified. ``layers=None`` scans every prunable layer. Returns rows
    ``{"layer", "sparsity", "accuracy"}`` (JSON-ready), sparsities ascending per layer.
    """
    work = copy.deepcopy(model)
    known = list(prunable_layers(work))
    layers = known if layers is None else list(layers)
    _resolve_layer_names(layers, known, "layers")
    rows = []
    for name in layers:
        w = work.get_submodule(name).weight
        original = w.detach().clone()
        for s in sorted(sparsities):
            with torch.no_grad():
                w.masked_fill_(~magnitude_mask(original, s), 0.0)
            rows.append({"layer": name, "sparsity": float(s), "accuracy": float(eval_fn(work))})
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
