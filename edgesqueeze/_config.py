"""Strict conversion of plain data (parsed YAML/JSON) into frozen dataclasses.

Shared by recipes and by every stage's config. A dataclass field's type annotation drives
conversion (``Literal`` for choices, ``X | None`` for optional values, nested dataclasses
for sub-sections) and its ``metadata["range"]`` bounds numbers (``ge``, ``gt``, ``le``,
``lt``). Every refusal is a :class:`RecipeError` naming the dotted path of the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from edgesqueeze.errors import RecipeError


def _range(**bounds: float) -> dict:
    return {"range": bounds}


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
        concrete = [a for a in args if a is not type(None)]
        if len(concrete) == 1:  # Optional[X]: X's own error is the precise one
            return _convert(path, value, concrete[0])
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
        # the choice itself, of its own type: `channels: 3.0` or `true` for 1 is not the choice 3 or 1
        match = [c for c in choices if type(c) is type(value) and c == value]
        if not match:
            hint = ([str(c) for c in choices if str(c).lower() == str(value).lower()]
                    or difflib.get_close_matches(str(value), [str(c) for c in choices], n=1))
            extra = f"; did you mean {hint[0]!r}?" if hint and hint[0] != str(value) else ""
            raise RecipeError(f"{path}: must be one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
        return match[0]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # built in Python: its own __post_init__ checked it
            return value
        return _build(path, value, tp)
    if origin in (tuple, list) and (typing.get_args(tp)[1:] == (Ellipsis,) or origin is list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return origin(_convert(f"{path}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    # numbers.Integral / Real: numpy's scalars too (a recipe built in Python from computed values)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, os.PathLike):  # output_dir=Path(...), built in Python
            value = os.fspath(value)
        if not isinstance(value, str):
            import datetime

            quote = ("; YAML reads yes/no/on/off/true/false as booleans and 2024-06-01 as a date: quote "
                     "it ('no')" if isinstance(value, (bool, datetime.date)) else "")
            raise RecipeError(f"{path}: expected a string, got {value!r}{quote}")
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
        if bounds and isinstance(value, (int, float)):
            _check_range(dotted, value, bounds)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except RecipeError as exc:  # the section's own checks name its fields: put its path in front
        text = str(exc)
        if not prefix or text.startswith(prefix + ".") or text.startswith(prefix + ":"):
            raise
        raise RecipeError(f"{prefix}.{text}") from None


# ---------------------------------------------------------------------------------------
# Stage configs built in Python or from a recipe section (moved from compress/prune.py)


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
