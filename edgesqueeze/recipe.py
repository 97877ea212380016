"""Recipes: one YAML file describes a whole pipeline, validated strictly before anything runs.

A recipe is ``yaml.safe_load``-ed, then converted field by field into frozen dataclasses.
Every refusal is a :class:`RecipeError` naming the dotted path of the field::

    train.lr: must be > 0, got -0.1
    model.archh: unknown key; did you mean 'arch'?

Each section is a dataclass; a field's allowed range lives in its ``metadata`` (``ge``,
``gt``, ``le``, ``lt``) and its type annotation drives conversion (``Literal`` for choices,
``X | None`` for optional values, nested dataclasses for sub-sections). Later stages
(compress, quantize, export, budget) add sections here the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgesqueeze.errors import RecipeError

RECIPE_VERSION = 1


def _range(**bounds: float) -> dict:
    return {"range": bounds}


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture to build; ``kwargs`` override its builder's defaults."""

    arch: str = "squeezenet_mnist"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AugmentSection:
    """Augmentation on tensors. ``None`` fields take the dataset's default."""

    crop_padding: int | None = field(default=None, metadata=_range(ge=0, le=64))
    hflip: bool | None = None
    rotate_deg: float | None = field(default=None, metadata=_range(ge=0, le=180))
    translate: float | None = field(default=None, metadata=_range(ge=0, le=0.5))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = field(default=None, metadata=_range(ge=4, le=1024))
    val_fraction: float = field(default=0.1, metadata=_range(ge=0, lt=1))
    limit: int | None = field(default=None, metadata=_range(ge=10))
    augment: bool = True
    augmentation: AugmentSection = field(default_factory=AugmentSection)
    download: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = field(default=10, metadata=_range(gt=0, le=10_000))
    batch_size: int = field(default=128, metadata=_range(ge=1, le=65_536))
    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = field(default=0.1, metadata=_range(gt=0, le=10))
    momentum: float = field(default=0.9, metadata=_range(ge=0, lt=1))
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata=_range(ge=0, le=1))
    schedule: Literal["cosine", "onecycle", "constant"] = "onecycle"
    warmup_fraction: float = field(default=0.15, metadata=_range(ge=0, lt=1))
    label_smoothing: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    grad_clip: float | None = field(default=None, metadata=_range(gt=0))
    channels_last: bool = False
    threads: int = field(default=0, metadata=_range(ge=0, le=1024))
    eval_batch_size: int = field(default=512, metadata=_range(ge=1, le=65_536))


@dataclass(frozen=True)
class Recipe:
    version: int
    name: str = "run"
    seed: int = field(default=0, metadata=_range(ge=0, le=2**31 - 1))
    output_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """SHA-256 of the canonical JSON form: what a run's artifacts record as provenance."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("artifacts") / self.name


# ---------------------------------------------------------------------------------------
# Strict conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _check_range(path: str, value: float, bounds: dict) -> None:
    checks = {
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for key, bound in bounds.items():
        ok, sym = checks[key]
        if not ok(value, bound):
            allowed = " and ".join(f"{checks[k][1]} {b}" for k, b in bounds.items())
            raise RecipeError(f"{path}: must be {allowed}, got {value!r}")


def _convert(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(path, value, arg)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise RecipeError(f"{path}: must be one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(path, value, tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{path}: unsupported field type {tp!r}")  # a bug in a section's definition


def _build(prefix: str, raw: Any, cls: type) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = prefix or "recipe"
        raise RecipeError(f"{where}: expected a mapping of keys to values, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; allowed keys: {', '.join(fields)}"
            raise RecipeError(f"{dotted}: unknown key{extra}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{dotted}: required key is missing")
            continue
        value = _convert(dotted, raw[name], hints[name])
        bounds = f.metadata.get("range")
        if bounds and value is not None:
            _check_range(dotted, value, bounds)
        kwargs[name] = value
    return cls(**kwargs)


def recipe_from_dict(raw: Any, *, source: str = "recipe") -> Recipe:
    """Validate a parsed recipe. ``source`` names the file in error messages."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with 'version: {RECIPE_VERSION}' at the top")
    if "version" not in raw:
        raise RecipeError(f"{source}: version: required key is missing (add 'version: {RECIPE_VERSION}')")
    if raw["version"] != RECIPE_VERSION:
        raise RecipeError(
            f"{source}: version: this edgesqueeze reads recipe version {RECIPE_VERSION}, got {raw['version']!r}"
        )
    try:
        return _build("", raw, Recipe)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw recipe dict.

    >>> apply_overrides({"train": {"epochs": 5}}, ["train.epochs=1", "data.limit=300"])
    {'train': {'epochs': 1}, 'data': {'limit': 300}}
    """
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found (shipped recipes are in recipes/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    recipe = recipe_from_dict(raw, source=str(path))
    if recipe.name == "run" and "name" not in (raw or {}):
        recipe = dataclasses.replace(recipe, name=path.stem)
    return recipe
